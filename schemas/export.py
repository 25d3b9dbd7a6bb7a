"""Write the JSON Schema files in schemas/json/ from the pydantic models: `python -m schemas.export`.

`--check` writes nothing and exits 1 when a committed file differs from what the models generate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.checkpoint import Manifest
from schemas.messages import DeadLetter, DefectEvent, FrameHeaders

JSON_DIR = Path(__file__).resolve().parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "frame_headers": FrameHeaders,
    "defect_event": DefectEvent,
    "dead_letter": DeadLetter,
    "checkpoint_manifest": Manifest,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="serialization")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[Path, str]:
    return {JSON_DIR / f"{name}.json": render(model) for name, model in MODELS.items()}


def stale(files: dict[Path, str]) -> list[Path]:
    return [path for path, text in files.items() if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale; write nothing")
    args = parser.parse_args(argv)
    files = rendered()
    outdated = stale(files)
    if args.check:
        for path in outdated:
            print(f"stale: {path} (run `make schemas`)", file=sys.stderr)
        return 1 if outdated else 0
    JSON_DIR.mkdir(exist_ok=True)
    for path in outdated:
        path.write_text(files[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
