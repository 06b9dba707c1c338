"""`qmpguard daemon`: flags, config loading, signals; the work is in watch/web."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from qmpguard.daemon.reload import (
    SECRET,
    changed_settings,
    exposure_problem,
    is_loopback,
    not_applied,
    tls_context,
)
from qmpguard.daemon.settings import (
    DEFAULT_LISTEN,
    ConfigError,
    Settings,
    StaticTarget,
    load_settings,
)
from qmpguard.logs import configure_logging

if TYPE_CHECKING:  # imported when serving only, see _serve
    from qmpguard.daemon.watch import Scheduler
    from qmpguard.daemon.web import HttpServer

log = structlog.get_logger("qmpguard.daemon")
EXIT_CONFIG = 3


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `daemon` subcommand."""
    p = sub.add_parser("daemon", help="watch every VM on this host and serve results over HTTP")
    p.add_argument("--config", metavar="PATH", help="TOML config (see deploy/config.example.toml)")
    p.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="GLOB",
        help="QMP socket glob to watch (repeatable; replaces the config's list)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="TARGET",
        help="a target to always inspect (repeatable)",
    )
    p.add_argument("--listen", metavar="HOST:PORT", help=f"HTTP address (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="re-inspection interval (default 60, jittered)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve beyond loopback without a token (refused otherwise)",
    )
    p.add_argument("--log-format", choices=["auto", "console", "json"], default="auto")
    p.add_argument("-v", "--verbose", action="store_true")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "watch": tuple(args.watch),
        "targets": tuple(StaticTarget(t) for t in args.target),
        "listen": args.listen,
        "interval": args.interval,
        "allow_unauthenticated": args.allow_unauthenticated or None,  # absent: the file's
    }


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (exit 0); SIGHUP reloads the config file."""
    configure_logging(args.log_format, args.verbose, logging.INFO)
    try:
        settings = load_settings(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"qmpguard: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    loopback = is_loopback(settings.listen_host_port[0])
    problem = exposure_problem(settings, loopback)
    if problem is not None:
        print(f"qmpguard: error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        tls = tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        print(f"qmpguard: error: cannot use the TLS certificate or key: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(_serve(settings, args, tls, loopback))
    except OSError as exc:
        print(
            f"qmpguard: error: cannot serve on {settings.listen}: {exc.strerror}", file=sys.stderr
        )
        return EXIT_CONFIG


async def _serve(
    settings: Settings, args: argparse.Namespace, tls: ssl.SSLContext | None, loopback: bool
) -> int:
    """HTTP, discovery and SIGHUP reloads on one event loop, until SIGTERM or SIGINT."""
    # Imported here: `qmpguard check` should not pay for aiohttp and prometheus_client.
    from qmpguard.daemon.exporter import ScheduleCollector, build_registry
    from qmpguard.daemon.results import ResultStore
    from qmpguard.daemon.watch import Scheduler
    from qmpguard.daemon.web import build_app, start_http

    store = ResultStore()
    registry, duration = build_registry(store)
    scheduler = Scheduler(settings, store, duration)
    registry.register(ScheduleCollector(scheduler))
    # The token is looked up per request: a reload replaces scheduler.settings.
    app = build_app(store, registry, lambda: scheduler.settings.token)
    host, port = settings.listen_host_port
    http = await start_http(app, host, port, tls, registry)  # capped, with deadlines
    _log_listening(settings, tls, loopback)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wakeup = asyncio.Event()  # set: rescan now instead of at the next poll
    reloader = Reloader(args, scheduler, http, loopback, wakeup)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_sighup)
    if settings.libvirt_uris:
        _libvirt_events(settings.libvirt_uris, loop, wakeup)

    task = asyncio.create_task(_discovery(scheduler, wakeup))
    await stop.wait()
    log.info("stopping")
    task.cancel()
    await scheduler.stop()
    await http.close()
    return 0


def _log_listening(settings: Settings, tls: ssl.SSLContext | None, loopback: bool) -> None:
    """An open daemon beyond loopback (allow_unauthenticated) says so in every start's log."""
    log.info("listening", address=settings.listen, tls=tls is not None)
    if not loopback and settings.token is None:
        log.warning(
            "http_unauthenticated",
            address=settings.listen,
            reason="beyond loopback without a token (allow_unauthenticated)",
        )


def _libvirt_events(
    uris: tuple[str, ...], loop: asyncio.AbstractEventLoop, wakeup: asyncio.Event
) -> None:
    """Domain started/stopped: rescan at once instead of waiting for the next poll. (The
    watcher lives on in libvirt's event thread and callbacks, for the daemon's life.)"""
    from qmpguard.qmp.libvirt import LifecycleWatcher

    def wake_from_libvirt_thread() -> None:
        loop.call_soon_threadsafe(wakeup.set)

    watcher = LifecycleWatcher(uris, wake_from_libvirt_thread)
    log.info("libvirt_events", enabled=watcher.start())


async def _discovery(scheduler: Scheduler, wakeup: asyncio.Event) -> None:
    """Rescan every rescan_interval, or at once when woken; never dies of a failure."""
    while True:
        try:
            await scheduler.rescan()
        except Exception as exc:  # discovery must never die
            log.error("discovery_failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(scheduler.settings.rescan_interval):
                await wakeup.wait()
        wakeup.clear()


@dataclass
class Reloader:
    """SIGHUP: reload the config file in the background, one reload at a time.

    Files are read in a thread (bounded, never a FIFO): the event loop keeps serving.
    Every check passes before anything is applied: a bad file changes nothing.
    """

    args: argparse.Namespace
    scheduler: Scheduler
    http: HttpServer
    loopback: bool
    wakeup: asyncio.Event
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self.tasks.add(task)  # a running task needs a strong reference
        task.add_done_callback(self.tasks.discard)

    async def reload(self) -> None:
        """Under the lock: two quick SIGHUPs load and apply one after the other."""
        async with self.lock:
            loaded = await self._load()
            if loaded is not None:
                self._apply(*loaded)

    async def _load(self) -> tuple[Settings, ssl.SSLContext | None] | None:
        """The new settings and TLS context, or None (logged) if either cannot be had."""
        try:
            new = await asyncio.to_thread(load_settings, self.args.config, _overrides(self.args))
            return new, await asyncio.to_thread(tls_context, new)
        except ConfigError as exc:
            error = str(exc)
        except (OSError, ssl.SSLError) as exc:
            error = f"cannot use the TLS certificate or key: {exc}"
        except Exception as exc:  # a reload must never take the daemon down
            error = f"{type(exc).__name__}: {exc}"
        log.error("config_reload_failed", error=error, keeping="previous config")
        return None

    def _apply(self, new: Settings, new_tls: ssl.SSLContext | None) -> None:
        """Apply a loaded config unless it would serve the address the daemon is bound to
        beyond loopback without a token (exposure_problem). A new `listen` only takes
        effect at a restart, so the running address decides, whatever the file says."""
        old = self.scheduler.settings
        problem = exposure_problem(replace(new, listen=old.listen), self.loopback)
        if problem is not None:
            log.error("config_reload_failed", error=problem, keeping="previous config")
            return
        self.scheduler.reconfigure(new)
        self.http.limiter.tls = new_tls  # new connections; open ones keep their session
        log.info(
            "config_reloaded",
            changed=changed_settings(old, new),
            watch=list(new.watch),
            targets=len(new.targets),
            interval=new.interval,
            concurrency=new.concurrency,
            tls=new_tls is not None,
            token=new.token is not None,
        )
        pending = not_applied(old, new)
        if pending:  # one line naming what this reload could not (fully) apply
            log.warning(
                "config_needs_restart",
                settings=sorted(pending),
                running={k: getattr(old, k) for k in pending if k not in SECRET},
                reasons=pending,
            )
        self.wakeup.set()
