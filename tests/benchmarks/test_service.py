import json
from pathlib import Path

from benchmarks.service import Plan, ServiceReport, render, targets

RESULT = Path(__file__).parents[2] / "benchmarks" / "results" / "hosts" / "avx2" / "service.json"


def committed_report() -> tuple[ServiceReport, Plan]:
    result = json.loads(RESULT.read_text())["result"]
    return ServiceReport.model_validate(result), Plan(**result["plan"])


def test_the_report_says_whether_other_jobs_shared_the_cores_as_its_cpu_table_measured():
    report, plan = committed_report()
    for phase in report.phases:
        phase.cpu.other = 0.01
    assert "no other job took more than 0.05 cores in any phase" in render(report, plan)
    report.phases[-1].cpu.other = 0.4
    text = render(report, plan)
    assert "and so did other jobs (up to 0.40 cores in a phase)" in text and "no other job" not in text


def test_the_cpu_target_says_what_the_model_and_decoding_cost_inside_the_service_when_the_run_measured_it():
    report, plan = committed_report()
    saturation = next(p for p in report.phases if p.system == "inspector run" and p.phase == "saturation")
    saturation.inference_cpu_ms_per_frame = saturation.decode_cpu_ms_per_frame = None  # a run before them
    report.targets = targets(report, plan)
    assert "of it the model" not in render(report, plan)
    saturation.inference_cpu_ms_per_frame, saturation.decode_cpu_ms_per_frame = 2.5, 0.25
    report.targets = targets(report, plan)
    assert "saturation; of it the model 2.500 ms, decoding 0.250 ms)" in render(report, plan)
