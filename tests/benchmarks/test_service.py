import json
from pathlib import Path

from benchmarks.service import Plan, ServiceReport, render

RESULT = Path(__file__).parents[2] / "benchmarks" / "results" / "hosts" / "avx2" / "service.json"


def test_the_report_says_whether_other_jobs_shared_the_cores_as_its_cpu_table_measured():
    result = json.loads(RESULT.read_text())["result"]
    report, plan = ServiceReport.model_validate(result), Plan(**result["plan"])
    for phase in report.phases:
        phase.cpu.other = 0.01
    assert "no other job took more than 0.05 cores in any phase" in render(report, plan)
    report.phases[-1].cpu.other = 0.4
    text = render(report, plan)
    assert "and so did other jobs (up to 0.40 cores in a phase)" in text and "no other job" not in text
