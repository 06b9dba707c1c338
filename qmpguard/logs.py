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
    # A traceback becomes one string field: a JSON log stays one line per event.
    exc_info: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if fmt == "json" else []
    )
    shared: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, *exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Records of the stdlib `logging` (aiohttp's server and access logs, asyncio's
    # "exception in callback", qemu.qmp, warnings) go through the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if not verbose:
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
