"""`inspector` command line: run, broker, replay, demo, console — generated from the typed settings.

Each command is a `Settings` subclass, so every setting is a flag (`--topic`, `--max-batch`,
`--kafka.security-protocol`…) with its docstring as help and its default shown by pydantic-settings;
a command adds its own fields. CLI flags > environment (INSPECTOR_…) > .env > defaults. Heavy modules
(torch, OpenCV) are imported only by the commands that need them, so `broker` and `replay` start
quickly. A new command is a `Command` subclass with `execute()` and one field of `Commands`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import CliApp, CliSubCommand, SettingsError, get_subcommand

from inspector.console.settings import ConsoleSettings
from inspector.settings import LogLevel, Settings, kafka_client_kwargs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Command(Settings):
    def execute(self) -> int:
        raise NotImplementedError


class Run(Command):
    """Consume frames from Kafka, classify them in micro-batches, publish one defect event per frame."""

    def execute(self) -> int:
        from inspector.app import run_inspector

        return asyncio.run(run_inspector(self))


class Broker(Command):
    """A local, memory-only Kafka-compatible broker (tansu) on 127.0.0.1:PORT, with the settings' three
    topics created; its bootstrap servers replace --bootstrap-servers. Runs until SIGINT/SIGTERM."""

    port: int = Field(default=9092, gt=0, le=65535)
    partitions: int = Field(default=3, gt=0)
    """partitions of each topic it creates"""
    verbose: bool = False
    """show tansu's own output"""

    def execute(self) -> int:
        from inspector.broker import serve

        settings = self.model_copy(update={"bootstrap_servers": f"127.0.0.1:{self.port}"})
        asyncio.run(serve(settings, self.port, partitions=self.partitions, verbose=self.verbose))
        return EXIT_OK


class Replay(Command):
    """Publish a folder of images to --topic as a camera would."""

    images: Path
    """folder of PNG/JPEG/BMP files (searched recursively)"""
    rate: float | None = Field(default=None, gt=0)
    """frames per second (none: as fast as the broker takes them)"""
    camera_id: str = "cam-1"
    coil_id: str | None = None
    limit: int | None = Field(default=None, ge=0)
    """publish at most this many frames"""

    def execute(self) -> int:
        from inspector.replay import replay

        stats = asyncio.run(replay(self.images, topic=self.topic, camera_id=self.camera_id,
                                   client_kwargs=kafka_client_kwargs(self), rate=self.rate, limit=self.limit,
                                   coil_id=self.coil_id))
        print(f"published {stats.frames} frames to {self.topic} as camera {self.camera_id} "
              f"in {stats.seconds:.2f}s ({stats.skipped} non-image files skipped)")
        return EXIT_OK


class Demo(Command):
    """A local broker, a camera replaying a folder, the inspector and the operator console together, with a
    live summary and the console's URL."""

    images: Path | None = None
    """image folder (none: ../shared/datasets/neu-cls if present, else synthesized frames)"""
    rate: float | None = Field(default=200.0, gt=0)
    """frames per second to replay"""
    limit: int | None = Field(default=None, ge=0)
    """replay at most this many frames"""
    port: int | None = Field(default=None, gt=0, le=65535)
    """broker port (none: a free one)"""
    timeout: float = Field(default=600.0, gt=0)
    """give up after this many seconds"""
    console_port: int = Field(default=9500, ge=0, le=65535)
    """port of the operator console (taken or 0: a free one)"""
    stay: bool = False
    """after the replay, keep broker, inspector and console running until Ctrl-C (to look at the page)"""
    log_level: LogLevel = "warning"

    def execute(self) -> int:
        from inspector.app import first_error
        from inspector.demo import run_demo

        try:
            return asyncio.run(run_demo(self))
        except Exception as err:  # noqa: BLE001 - a demo ends with one readable line, not a traceback
            cause = first_error(err)
            print(f"inspector demo: failed: {type(cause).__name__}: {cause}", file=sys.stderr)
            return EXIT_FAILED


class Console(ConsoleSettings):
    """A live page of the defect events every inspector replica produces, with the frames' pictures, at
    http://HOST:HTTP_PORT/: a consumer of the events and dead-letter topics with a group of its own. Its
    settings are its own (INSPECTOR_CONSOLE_… variables); runs until SIGINT/SIGTERM."""

    def execute(self) -> int:
        from inspector.console.app import run_console

        return asyncio.run(run_console(self))


class Commands(BaseModel):
    """Strip-steel line inspector: Kafka frames in, defect events out."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    run: CliSubCommand[Run]
    """serve: frames in, one defect event per frame out"""
    broker: CliSubCommand[Broker]
    """a local, memory-only Kafka-compatible broker for development"""
    replay: CliSubCommand[Replay]
    """publish a folder of images as a camera would"""
    demo: CliSubCommand[Demo]
    """broker + replay + inspector (+ console) together, with a live summary"""
    console: CliSubCommand[Console]
    """the operator console: a live web page of the events, with pictures"""


def parse(argv: Sequence[str] | None = None) -> tuple[str, Command | Console]:
    """The command named by `argv` (default: sys.argv[1:]) and its settings. Usage errors exit 2 (argparse);
    invalid values raise pydantic's ValidationError."""
    cli = CliApp.run(Commands, cli_args=None if argv is None else list(argv))
    command = get_subcommand(cli, is_required=True, cli_exit_on_error=False)
    name = next(name for name in Commands.model_fields if getattr(cli, name) is command)
    return name, command


def _one_line(err: ValidationError) -> str:
    """"inspector run: error: --max-batch: Input should be greater than 0" (a flag's or its INSPECTOR_ variable's)."""
    problems, commands = [], set()
    for e in err.errors():
        command, *field = map(str, e["loc"])
        commands.add(command)
        problems.append((f"--{'.'.join(field).replace('_', '-')}: " if field else "") + e["msg"])
    return f"inspector {' '.join(sorted(commands))}: error: {'; '.join(problems)}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        name, command = parse(argv)
    except ValidationError as err:
        print(_one_line(err), file=sys.stderr)
        return EXIT_USAGE
    except SettingsError as err:
        print(f"inspector: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    from inspector.logs import configure_logging

    configure_logging(command.log_level, command.log_format)
    try:
        return command.execute()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"inspector {name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
