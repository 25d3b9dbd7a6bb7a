"""A run's per-epoch log: `log.jsonl` (read back by resume, reports and figures) and `log.csv` (for people)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def append_row(run: Path, row: dict) -> None:
    with (run / "log.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    path = run / "log.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_rows(run: Path) -> list[dict]:
    """The rows of `run`/log.jsonl, oldest first; none when the run has not logged yet."""
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
