"""structlog set-up: JSON lines when stderr is not a terminal, readable console lines when it is.

aiokafka logs through the standard library; its warnings and errors are rendered the same way and
each distinct message is let through at most once a minute, so a broker outage is a few lines, not a
storm. The bootstrap failure is dropped outright: the source's retry loop reports it itself.
OpenCV's own warnings (truncated PNGs…) are silenced: a frame it cannot decode becomes a dead letter
that says why.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Literal, TextIO

import orjson
import structlog

THROTTLE_S = 60.0
REPORTED_BY_SERVICE = ('Unable connect to "%s:%s": %s',)  # aiokafka's bootstrap failure


class ThrottleFilter(logging.Filter):
    """Each message template passes at most once per `period_s`."""

    def __init__(self, period_s: float = THROTTLE_S, drop: tuple[str, ...] = REPORTED_BY_SERVICE) -> None:
        super().__init__()
        self._period_s, self._drop = period_s, drop
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if template in self._drop:
            return False
        now = time.monotonic()
        if now - self._last.get(template, -self._period_s) < self._period_s:
            return False
        self._last[template] = now
        return True


def _renderer(use_json: bool) -> structlog.typing.Processor:
    if use_json:
        return structlog.processors.JSONRenderer(serializer=lambda obj, **_: orjson.dumps(obj, default=str).decode())
    # plain tracebacks: rich's (structlog's default when rich is installed) print local variables, which may
    # hold credentials (the aiokafka arguments) or whole frames
    return structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)


def configure_logging(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto",
                      stream: TextIO | None = None) -> None:
    """Configure structlog and route aiokafka's stdlib logging through the same renderer. Call once, in main."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # structured tracebacks without local variables: they may hold credentials or whole frames
    exceptions = [structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False))] if use_json else []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exceptions, _renderer(use_json)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # not cached: a module-level logger then follows a later configure() (and structlog's
        # capture_logs in tests); logging is per batch at most, so the lookup costs nothing measurable
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exceptions, _renderer(use_json)],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
    ))
    handler.addFilter(ThrottleFilter())
    kafka = logging.getLogger("aiokafka")
    kafka.handlers[:] = [handler]
    kafka.setLevel(max(numeric, logging.WARNING))
    kafka.propagate = False
    _quiet_opencv()


def _quiet_opencv() -> None:
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
