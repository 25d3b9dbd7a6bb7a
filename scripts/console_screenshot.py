"""docs/img/console.png, the screenshot in README.md and deploy/README.md: the console's browser test, then its
last screenshot made small enough for the repository.

    .venv/bin/python -m scripts.console_screenshot        # needs chromium, chromium-driver and the dev venv

The test (tests/inspector/console/test_page.py) runs the broker, `inspector run --locate` and `inspector
console`, replays a few dozen frames into a headless Chromium and saves the whole page; this scales it to
WIDTH pixels and stores it with a palette of COLOURS (Pillow, which matplotlib brings), under MAX_BYTES.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "docs" / "img" / "console.png"
TEST = "tests/inspector/console/test_page.py"
WIDTH = 1200
COLOURS = 128  # octree: the steel's grays stay gray (median cut tinted them with the labels' colours)
MAX_BYTES = 300 * 1024


def shrink(source: Path, target: Path, width: int = WIDTH) -> int:
    """`source` scaled to `width` and quantized to COLOURS colours, written to `target`; its size in bytes."""
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    small = rgb.resize((width, round(rgb.height * width / rgb.width)), Image.Resampling.LANCZOS)
    small.quantize(colors=COLOURS, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
    return target.stat().st_size


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="console-screenshot-") as folder:
        test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", TEST], cwd=REPO,
                              env=os.environ | {"CONSOLE_SCREENSHOT_DIR": folder})
        shot = Path(folder) / "console.png"
        if test.returncode != 0 or not shot.exists():
            print(f"console_screenshot: {TEST} failed or was skipped; {TARGET} unchanged", file=sys.stderr)
            return 1
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        size = shrink(shot, TARGET)
    print(f"{TARGET.relative_to(REPO)}: {size / 1024:.0f} KiB")
    return 0 if size <= MAX_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
