"""`python -m inspector.console [flags]`: the console on its own (`inspector console` runs the same)."""

from __future__ import annotations

import asyncio
import sys

from pydantic_settings import CliApp

from inspector.console.app import run_console
from inspector.console.settings import ConsoleSettings
from inspector.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    settings = CliApp.run(ConsoleSettings, cli_args=sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(run_console(settings))


if __name__ == "__main__":
    sys.exit(main())
