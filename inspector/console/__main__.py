"""`python -m inspector.console [flags]`: the same command as `inspector console [flags]`."""

from __future__ import annotations

import sys

from inspector.cli import main

if __name__ == "__main__":
    sys.exit(main(["console", *sys.argv[1:]]))
