"""Run every benchmark that exists and write results/<name>.json plus results/README.md.

    python -m benchmarks.run                 # = make bench: all benchmarks
    python -m benchmarks.run --only model    # one of them; README.md keeps the others' last results
    python -m benchmarks.run --quick --out /tmp/bench   # smoke run, numbers not for quoting

A benchmark is a module `benchmarks/<name>.py` with `run(BenchOptions) -> Section` (see
benchmarks/__init__.py); add its name to BENCHMARKS. Modules not written yet are skipped, and so are
those whose `unavailable()` gives a reason (gpu without a CUDA device): their last results stay.
README.md is rebuilt from every results/*.json present, so one benchmark re-run does not drop
the others' tables.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from benchmarks import RESULTS_DIR, BenchOptions, LoadAverage, Machine, Section, load_average, machine

BENCHMARKS: tuple[str, ...] = ("model", "service", "train", "console", "gpu")


class ResultFile(BaseModel):
    """The envelope of results/<name>.json."""

    benchmark: str
    title: str
    command: str
    started_at: datetime
    duration_s: float
    machine: Machine
    load_average_start: LoadAverage
    load_average_end: LoadAverage
    options: dict[str, Any]
    markdown: str
    result: dict[str, Any]


def load_benchmark(name: str) -> Any | None:
    """The module benchmarks.<name>, or None when that file does not exist (yet)."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"benchmarks.{name}":
            return None
        raise


def run_one(name: str, module: Any, options: BenchOptions, command: str) -> ResultFile:
    started, load_start, t0 = datetime.now(UTC), load_average(), time.perf_counter()
    section: Section = module.run(options)
    return ResultFile(
        benchmark=name, title=section.title, command=command, started_at=started,
        duration_s=round(time.perf_counter() - t0, 1), machine=machine(), load_average_start=load_start,
        load_average_end=load_average(), options={"quick": options.quick, "threads": options.threads},
        markdown=section.markdown, result=section.result.model_dump(mode="json"),
    )


PROJECT_README = Path(__file__).resolve().parents[1] / "README.md"
GENERATED = ("<!-- make bench writes from here: do not edit by hand -->", "<!-- make bench writes up to here -->")


def sections(out_dir: Path, level: str = "##") -> list[str]:
    """The markdown of every results/<name>.json in `out_dir`, one titled section each, in BENCHMARKS order."""
    files = {p.stem: ResultFile.model_validate_json(p.read_bytes()) for p in sorted(out_dir.glob("*.json"))}
    order = [n for n in BENCHMARKS if n in files] + sorted(set(files) - set(BENCHMARKS))
    parts = []
    for name in order:
        f = files[name]
        m, la = f.machine, f.load_average_start
        parts += ["", f"{level} {f.title}", "",
                  f"`{f.command}` · {f.started_at:%Y-%m-%d %H:%M} UTC · {f.duration_s:.0f} s · "
                  f"{m.cpu}, {m.logical_cpus} logical CPUs{isa_note(m)} · torch {m.torch}"
                  + (f" · onnxruntime {m.onnxruntime}" if m.onnxruntime else "")
                  + f" · load average (1 min) {la.one:.2f} at start, {f.load_average_end.one:.2f} at end"
                  + (" · **quick run: not for quoting**" if f.options.get("quick") else ""),
                  "", f.markdown.strip()]
    return parts


def write_readme(out_dir: Path) -> Path:
    parts = ["# Benchmark results", "",
             "Written by `make bench` (`python -m benchmarks.run`); do not edit by hand. "
             "Each section comes from the JSON file of the same name in this folder and shows the code as it was "
             "when that benchmark last ran (the date under its title): a file or function it names, a profile's "
             "frames say, may have moved since; running the benchmark again refreshes it."]
    path = out_dir / "README.md"
    path.write_text("\n".join(parts + sections(out_dir)) + "\n")
    return path


def write_project_readme(out_dir: Path, readme: Path = PROJECT_README) -> Path:
    """The project README's Performance tables, between the GENERATED markers, from the same results."""
    text = readme.read_text()
    start, end = text.find(GENERATED[0]), text.find(GENERATED[1])
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {GENERATED[0]!r} … {GENERATED[1]!r} block to write the tables into")
    body = "\n".join(sections(out_dir, level="###")).strip()
    readme.write_text(text[:start + len(GENERATED[0])] + "\n\n" + body + "\n\n" + text[end:])
    return readme


def isa_note(m: Machine) -> str:
    """" (avx2 avx512f …)": the vector instructions a result was measured with; absent from older results."""
    return f" ({' '.join(m.isa)})" if m.isa else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny budgets (not for quoting)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    options = BenchOptions(quick=args.quick, threads=args.threads)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or BENCHMARKS:
        module = load_benchmark(name)
        if module is None:
            print(f"[bench] {name}: benchmarks/{name}.py does not exist yet; skipped", file=sys.stderr)
            continue
        reason = getattr(module, "unavailable", lambda: None)()
        if reason:
            print(f"[bench] {name}: skipped ({reason}); {name}.json keeps its last results", file=sys.stderr)
            continue
        print(f"[bench] {name}: running", file=sys.stderr)
        result = run_one(name, module, options, command.strip())
        (args.out / f"{name}.json").write_text(result.model_dump_json(indent=2) + "\n")
        print(f"[bench] {name}: {result.duration_s:.0f} s → {args.out / (name + '.json')}", file=sys.stderr)
    print(f"[bench] table → {write_readme(args.out)}", file=sys.stderr)
    if args.out.resolve() == RESULTS_DIR.resolve():  # a --quick run into another folder leaves README.md alone
        print(f"[bench] Performance section → {write_project_readme(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
