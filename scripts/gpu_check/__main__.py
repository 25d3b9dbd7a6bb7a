"""scripts/gpu-check: the inspector's CUDA path proven on a CUDA machine, in one run of at most 8 minutes.

    scripts/gpu-check [--quick] [--budget-s 480]    # reports in $OUT (default: a new temporary folder)

1. probe    — torch sees a CUDA device; else exit 3 at once ("no CUDA device"), nothing else is run.
2. install  — the wheels `make gpu-carry` put in .gpu-carry/wheels go into a temporary folder on PYTHONPATH
              (without them the interpreter's own packages are used); then pyproject's requirements, the
              broker extra and pytest must all be met, and the tansu binary must run.
3. tests    — `pytest -m gpu tests/gpu` (CUDA vs CPU, uploads, hot reload, batch limit): gpu-tests.xml.
4. bench    — `python -m benchmarks.run --only gpu`: gpu.json (copy it to benchmarks/results/ to publish it).
5. e2e      — broker, `inspector run --device cuda`, replay and load, every frame accounted for: e2e.json,
              inspector.log.
Then gpu-check.json and gpu-check.md (the summary of all of it); gpu-check.log holds every step's output.
Each step has a time cap, all of them together the budget; a step that overruns is stopped and fails.

Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 this machine cannot run the
check (packages missing, wheels that do not install); 3 no CUDA device. Standard library only: it runs
before the carried packages are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts.gpu_check import carry

EXIT_PASSED, EXIT_FAILED, EXIT_SETUP, EXIT_NO_CUDA = 0, 1, 2, 3
BUDGET_S = 480.0
CAPS_S = {"tests": 140.0, "bench": 170.0, "e2e": 150.0}  # each step's most, inside the budget
QUICK_CAPS_S = {"tests": 140.0, "bench": 90.0, "e2e": 100.0}
MIN_STEP_S = 30.0  # a step with less left than this is not started
PROBE = """
import json, os, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info |= {"device": props.name, "capability": f"{props.major}.{props.minor}",
             "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
             "device_count": torch.cuda.device_count()}
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


class Check:
    """One run of the check: where it writes, how much time is left, what each step found."""

    def __init__(self, out: Path, budget_s: float, python: str) -> None:
        self.out, self.python = out, python
        self.started, self.deadline = time.monotonic(), time.monotonic() + budget_s
        self.budget_s = budget_s
        self.started_at = datetime.now(UTC)
        self.steps: list[Step] = []
        self.device: dict[str, Any] = {}
        self.log = out / "gpu-check.log"

    def say(self, text: str) -> None:
        print(f"gpu-check: {text}", flush=True)
        with self.log.open("a") as log:
            log.write(f"gpu-check: {text}\n")

    # -- running a step ----------------------------------------------------------------------------------

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run_logged(self, name: str, command: list[str], env: dict[str, str], cap_s: float) -> int | None:
        """`command` in its own process group, output to our stdout and the log; its exit code, or None when it
        ran past min(cap, what is left of the budget) and was stopped."""
        timeout = min(cap_s, self.left_s())
        self.say(f"{name}: {shlex.join(command)} (at most {timeout:.0f} s)")
        with self.log.open("a") as log:
            process = subprocess.Popen(command, cwd=carry.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                       errors="replace", start_new_session=True)

            def pump() -> None:
                assert process.stdout is not None
                for line in process.stdout:
                    log.write(line)
                    print(f"[{name}] {line}", end="", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                code: int | None = process.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_group(process)
                code = None
            reader.join(10)
        return code

    def step(self, name: str, run: Any) -> None:
        """Run one step (a function returning a Step), unless too little of the budget is left."""
        if self.left_s() < MIN_STEP_S:
            self.steps.append(Step(name, False, 0.0, f"not run: {self.left_s():.0f} s left of the {self.budget_s:.0f} s"))
            return
        t0 = time.monotonic()
        result: Step = run()
        result.seconds = round(time.monotonic() - t0, 1)
        self.steps.append(result)
        self.say(f"{name}: {'passed' if result.ok else 'FAILED'} in {result.seconds:.0f} s — {result.summary}")

    # -- the report --------------------------------------------------------------------------------------

    def finish(self, status: str, code: int, reason: str = "") -> int:
        report = {"status": status, "exit_code": code, "reason": reason, "started_at": self.started_at.isoformat(),
                  "seconds": round(time.monotonic() - self.started, 1), "budget_s": self.budget_s,
                  "device": self.device, "steps": [asdict(s) for s in self.steps], "out": str(self.out)}
        (self.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(report, self.out))
        self.say(f"{status} (exit {code}); reports in {self.out}" + (f": {reason}" if reason else ""))
        return code


def stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM to the step's own process group (it and what it started), SIGKILL if it is still there after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the steps --------------------------------------------------------------------------------------------


def probe(python: str) -> dict[str, Any]:
    result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise carry.SetupError(f"{python} cannot import torch: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout)


def install(check: Check) -> dict[str, str]:
    """The environment every step runs in: the carried wheels installed and on PYTHONPATH, every need met."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    files = carry.wheels()
    paths = [str(carry.REPO_ROOT)]
    if files:
        target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        carry.install(files, target, check.python)
        paths.insert(0, str(target))
        check.say(f"install: {len(files)} carried wheels into {target}")
    else:
        check.say(f"install: no carried wheels in {carry.CARRY / 'wheels'}; using {check.python}'s own packages")
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    neu = carry.neu_cls()
    if neu is not None:
        env["NEU_CLS_DIR"] = str(neu)
    unmet = carry.unmet(check.python, env, carry.requirements())
    if unmet:
        raise carry.SetupError("missing or too old: " + "; ".join(unmet) + ". Run `make gpu-carry` on a machine "
                               "that reaches PyPI and bring .gpu-carry along with the repository.")
    check.say(f"install: requirements met; local broker {carry.broker_version(check.python, env)}; "
              f"NEU-CLS: {neu or 'not found (synthetic frames)'}")
    return env


def tests(check: Check, env: dict[str, str], cap_s: float) -> Step:
    xml = check.out / "gpu-tests.xml"
    code = check.run_logged("tests", [check.python, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rfEs",
                                      "-p", "no:cacheprovider", f"--junitxml={xml}"], env, cap_s)
    if not xml.exists():
        return Step("tests", False, 0, f"no test report ({'timed out' if code is None else f'exit {code}'})")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")  # type: ignore[assignment]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    outcomes: dict[tuple[str, str], list[str]] = {}  # (failure|error|skipped, message) → test names
    for case in suite.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcomes.setdefault((child.tag, (child.get("message") or "")[:300]), []).append(case.get("name", "?"))
    problems = [f"{tag} {', '.join(names)}: {message}" for (tag, message), names in outcomes.items()]
    ok = code == 0 and passed > 0 and passed == counts["tests"]
    summary = f"{passed}/{counts['tests']} passed" + (f"; {'; '.join(problems)}" if problems else "")
    return Step("tests", ok, 0, summary + ("" if code is not None else "; timed out"), counts | {"problems": problems})


def bench(check: Check, env: dict[str, str], cap_s: float, quick: bool) -> Step:
    with tempfile.TemporaryDirectory(prefix="gpu-check-bench-") as tmp:
        command = [check.python, "-m", "benchmarks.run", "--only", "gpu", "--out", tmp, *(["--quick"] if quick else [])]
        code = check.run_logged("bench", command, env, cap_s)
        produced = Path(tmp) / "gpu.json"
        if code != 0 or not produced.exists():
            return Step("bench", False, 0, "timed out" if code is None else f"exit {code}, no gpu.json")
        shutil.copy(produced, check.out / "gpu.json")
    result = json.loads((check.out / "gpu.json").read_text())
    cells = result["result"]["cells"]
    best = max(cells, key=lambda c: c["images_per_s"], default=None)
    one = min((c for c in cells if c["batch"] == 1 and c["mode"].startswith("service")), key=lambda c: c["p50_ms"],
              default=None)
    summary = (f"{len(cells)} cells" + (f"; best {best['images_per_s']:,.0f} img/s ({best['precision']}, "
                                        f"{best['mode']}, batch {best['batch']})" if best else "")
               + (f"; batch 1 {one['p50_ms']:.2f} ms ({one['precision']}, {one['mode']}) vs the paper's 2.4 ms"
                  if one else "")
               + (f"; {len(result['result']['failures'])} modes failed" if result["result"]["failures"] else ""))
    return Step("bench", bool(cells), 0, summary, {"markdown": result["markdown"]})


def e2e(check: Check, env: dict[str, str], cap_s: float, quick: bool) -> Step:
    out = check.out / "e2e.json"
    neu = env.get("NEU_CLS_DIR")
    command = [check.python, "-m", "scripts.gpu_check.e2e", "--out", str(out), "--log", str(check.out / "inspector.log"),
               *(["--images", neu] if neu else []), *(["--quick"] if quick else [])]
    code = check.run_logged("e2e", command, env, cap_s)
    if not out.exists():
        return Step("e2e", False, 0, "timed out" if code is None else f"exit {code}, no e2e.json")
    report = json.loads(out.read_text())
    failed = [f"{c['name']} ({c['detail']})" for c in report["checks"] if not c["ok"]]
    a = report["accounting"]
    summary = (f"{a['distinct']}/{a['sent']} frames with an event, {a['dead_letters']} dead letters"
               + "".join(f"; {p['phase']} {p['delivered_fps']:,.0f} events/s, p99 {p['p99_ms']} ms"
                         for p in report["phases"])
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return Step("e2e", code == 0 and report["ok"], 0, summary, {"markdown": report["markdown"]})


# --- the report -------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any], out: Path) -> str:
    device = report["device"]
    lines = [f"# GPU check: {report['status']} (exit {report['exit_code']})", "",
             f"{report['started_at'][:16].replace('T', ' ')} UTC · {report['seconds']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget · " + (
                 f"{device.get('device')} ({device.get('memory_gib')} GiB, compute capability "
                 f"{device.get('capability')}), torch {device.get('torch')}, CUDA {device.get('cuda')}"
                 if device.get("cuda_available") else f"torch {device.get('torch', '?')}, no CUDA device"), ""]
    if report["reason"]:
        lines += [report["reason"], ""]
    if report["steps"]:
        lines += ["| Step | Result | Seconds | Summary |", "| :--- | :--- | ---: | :--- |"]
        lines += [f"| {s['name']} | {'pass' if s['ok'] else '**FAIL**'} | {s['seconds']:.0f} | "
                  f"{s['summary'].replace('|', '/')} |" for s in report["steps"]]
    for s in report["steps"]:
        if s["details"].get("markdown"):
            title = {"bench": "Benchmark (gpu.json)", "e2e": "End to end (e2e.json)"}.get(s["name"], s["name"])
            lines += ["", f"## {title}", "", s["details"]["markdown"]]
    files = {p.name for p in out.iterdir() if p.is_file()} | {"gpu-check.md"}
    lines += ["", f"Files in {out}: " + ", ".join(sorted(files)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark's and the e2e's short plans")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's most (default 480 s)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s, sys.executable)
    try:
        check.device = probe(check.python)
    except carry.SetupError as err:
        return check.finish("setup_error", EXIT_SETUP, str(err))
    if not check.device["cuda_available"]:
        reason = (f"no CUDA device: torch {check.device['torch']} sees none (torch.cuda.is_available() is False; "
                  f"CUDA_VISIBLE_DEVICES={check.device['cuda_visible_devices']!r}); nothing was checked")
        print(f"gpu-check: {reason}", file=sys.stderr, flush=True)
        return check.finish("no_cuda", EXIT_NO_CUDA, reason)
    check.say(f"{check.device['device']}, torch {check.device['torch']}, CUDA {check.device['cuda']}; "
              f"budget {args.budget_s:.0f} s; reports in {out}")
    try:
        env = install(check)
    except carry.SetupError as err:
        return check.finish("setup_error", EXIT_SETUP, str(err))
    caps = QUICK_CAPS_S if args.quick else CAPS_S
    check.step("tests", lambda: tests(check, env, caps["tests"]))
    check.step("bench", lambda: bench(check, env, caps["bench"], args.quick))
    check.step("e2e", lambda: e2e(check, env, caps["e2e"], args.quick))
    ok = all(s.ok for s in check.steps)
    return check.finish("passed" if ok else "failed", EXIT_PASSED if ok else EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
