"""structlog setup: human console on a TTY, JSON lines otherwise or on request; stderr only."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(
    fmt: str = "auto", verbose: bool = False, level: int = logging.WARNING
) -> None:
    """Route structlog (and stdlib logging, e.g. qemu.qmp's) to stderr.

    One-shot commands log warnings and up; the daemon passes INFO (state changes).
    """
    level = logging.DEBUG if verbose else level
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s: %(message)s")
    if not verbose:
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
