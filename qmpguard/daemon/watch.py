"""Discovery and scheduling: which VMs exist, and inspecting each on its own schedule.

Every VM has its own task; a shared semaphore bounds how many inspect at once; each
inspection is bounded by the target timeout, so one hung or hostile VM delays nobody.
A VM's task ends only when the VM goes away or the daemon stops: whatever an inspection
raises is logged once, counted and retried after a bounded back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import os
import random
import stat
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog
from prometheus_client import Histogram
from qemu.qmp import EventListener

from qmpguard.daemon.gate import Gate
from qmpguard.daemon.results import ResultStore
from qmpguard.daemon.settings import Settings
from qmpguard.discovery import ProcessTargets
from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.inspection import inspect_session, inspect_target
from qmpguard.qmp.guard import Timeouts
from qmpguard.qmp.libvirt import running_domains
from qmpguard.qmp.transport import open_session
from qmpguard.result import TargetResult
from qmpguard.targets import Target, parse_target

log = structlog.get_logger("qmpguard.daemon")

#: Events after which a held connection re-inspects at once (QEMU 7.2 has no DEVICE_ADDED).
REINSPECT_EVENTS = ("DEVICE_DELETED", "DEVICE_ADDED")
#: Back-off after n failures is 2**min(n, this) s (capped by the interval): the exponent
#: is bounded so no failure count overflows a float (2.0**1024 did, after ~17 h).
MAX_BACKOFF_EXPONENT = 16
#: errno values that mean the host ran short, not that the VM misbehaved.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Inspect = Callable[..., Awaitable[TargetResult]]
OpenSession = Callable[..., contextlib.AbstractAsyncContextManager[Any]]
Pause = Callable[[asyncio.Event, float], Awaitable[None]]
#: VMs found by discovery: name -> (target, source, hold).
Found = dict[str, tuple[Target, str, bool]]


#: The inspection-error reason every unexpected fault is counted under (metric label).
FAULT_REASON = ErrorReason.INTERNAL


class FaultKind(StrEnum):
    """What an unexpected exception says about its cause (the `kind` of its log line)."""

    RESOURCES = "resources"  # out of file descriptors or memory: the host, not the VM
    INTERNAL = "internal"  # a bug in qmpguard or a library

    @property
    def headline(self) -> str:
        return "host out of resources" if self is FaultKind.RESOURCES else "internal error"


def fault_kind(exc: BaseException) -> FaultKind:
    """Resource exhaustion is told apart: the operator's fix differs (limits, not code)."""
    if isinstance(exc, MemoryError):
        return FaultKind.RESOURCES
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return FaultKind.RESOURCES
    return FaultKind.INTERNAL


def describe_fault(exc: BaseException) -> str:
    """`Type: message` on one line, even for an exception whose str() itself raises."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    first = text.splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def fault_location(exc: BaseException) -> str | None:
    """The innermost frame (`file:line in func`): enough to find a bug, in one JSON field."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"


def backoff_delay(failures: int, interval: float) -> float:
    """Seconds to the next attempt: the jittered interval after a success, 2, 4, 8 … s
    (never more than the interval) after consecutive failures, for any failure count."""
    if failures <= 0:
        return interval * random.uniform(0.9, 1.1)
    return min(interval, 2.0 ** min(failures, MAX_BACKOFF_EXPONENT))


async def pause_until_poked(poke: asyncio.Event, delay: float) -> None:
    """Wait `delay` seconds, or less if a device event pokes (the default Pause)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await poke.wait()


def _really_cancelled() -> bool:
    """A CancelledError is ours only if this task was asked to stop; a library's stray
    one must not end a VM's watch."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class PokeListener(EventListener):  # type: ignore[misc]
    """Turns matching events into a wake-up; stores nothing, so a flood costs no memory."""

    def __init__(self, poke: asyncio.Event) -> None:
        super().__init__(REINSPECT_EVENTS)
        self.poke = poke

    async def put(self, event: Any) -> None:
        if self.accept(event):
            self.poke.set()


@dataclass
class Watched:
    """A VM the daemon watches, with its task and wake-up event."""

    target: Target
    source: str
    hold: bool
    identity: tuple[int, int] | None = None  # (inode, ctime) of a watched socket
    patterns: tuple[str, ...] = ()  # the watch globs in force when it was found
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    started: float = 0.0  # monotonic start of the current attempt
    reported: str | None = None  # exception type already logged in this failure run


def socket_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


class Scheduler:
    """Keeps the set of watched VMs current and inspects each on schedule."""

    def __init__(
        self,
        settings: Settings,
        store: ResultStore,
        duration: Histogram,
        *,
        inspect: Inspect = inspect_target,
        session: OpenSession = open_session,
        pause: Pause = pause_until_poked,
    ) -> None:
        """`inspect`, `session` and `pause` are the seams a test drives the schedule
        through: failures of every kind, and no real time spent waiting."""
        self.settings = settings
        self.store = store
        self.duration = duration
        self.inspect = inspect
        self.session = session
        self.pause = pause
        self.watched: dict[str, Watched] = {}
        self.gate = Gate(settings.concurrency)
        self._libvirt_errors: set[str] = set()
        self._processes = ProcessTargets()

    # ---------------------------------------------------------------- settings
    @property
    def interval(self) -> float:
        return self.settings.interval

    @property
    def concurrency(self) -> int:
        return self.gate.size

    @property
    def in_progress(self) -> int:
        return self.gate.busy

    def reconfigure(self, new: Settings) -> None:
        """Apply reloaded settings: discovery, timeouts and the interval are read from
        `settings` at each use; the gate is resized at once; a shorter interval wakes
        every VM (else each would first sleep out the old one). New, changed and gone
        targets follow at the next rescan, which the caller triggers."""
        old, self.settings = self.settings, new
        if new.concurrency != self.gate.size:
            self.gate.resize(new.concurrency)
        if new.interval < old.interval:
            for entry in self.watched.values():
                entry.poke.set()

    # ---------------------------------------------------------------- discovery
    async def discover(self) -> Found:
        """Every VM to watch now, by name. Sources are asked in order and a later one
        wins a name (config over a watched socket, libvirt over config), except /proc:
        a QEMU process found there is taken only if no other source knows it."""
        found: Found = {}
        found.update(self._watched_sockets())
        found.update(self._configured())
        found.update(await self._libvirt_domains())
        for name, entry in (await self._qemu_processes()).items():
            found.setdefault(name, entry)
        return found

    def _watched_sockets(self) -> Found:
        found: Found = {}
        for pattern in self.settings.watch:
            for path in sorted(glob.glob(pattern)):
                if socket_identity(path) is not None:
                    t = Target("unix", path)
                    found[t.name] = (t, "watch", self.settings.hold_watched)
        return found

    def _configured(self) -> Found:
        found: Found = {}
        for static in self.settings.targets:
            t = parse_target(static.target)
            found[t.name] = (t, "config", static.hold)
        return found

    async def _libvirt_domains(self) -> Found:
        """Running domains of every URI that answers; one that does not is logged once
        (not every rescan) and contributes nothing until it answers again."""
        found: Found = {}
        for uri in self.settings.libvirt_uris:
            try:
                for t in await asyncio.to_thread(running_domains, uri):
                    found[t.name] = (t, "libvirt", False)
                self._libvirt_errors.discard(uri)
            except InspectionError as exc:
                if uri not in self._libvirt_errors:
                    log.warning("libvirt_unavailable", uri=uri, error=exc.message)
                    self._libvirt_errors.add(uri)
        return found

    async def _qemu_processes(self) -> Found:
        found: Found = {}
        if "proc" in self.settings.discover:
            for t in await self._processes():
                found.setdefault(t.name, (t, "proc", False))
        return found

    async def rescan(self) -> None:
        """Start a task for each new VM, restart one whose socket a new QEMU re-created,
        and end those that are gone (their sockets, not a failed directory listing)."""
        found = await self.discover()
        for name in list(self.watched):
            if name not in found and not self._still_listening(self.watched[name]):
                await self._drop(name)
        for name, (target, source, hold) in found.items():
            entry = self.watched.get(name)
            ident = socket_identity(target.address) if target.kind == "unix" else None
            if entry is None:
                self._watch_new(name, Watched(target, source, hold, ident, self.settings.watch))
            else:
                await self._refresh(entry, hold, ident)

    def _watch_new(self, name: str, entry: Watched) -> None:
        self.watched[name] = entry
        self.store.add(name, entry.source)
        self._start(entry)

    async def _refresh(self, entry: Watched, hold: bool, ident: tuple[int, int] | None) -> None:
        """Bring a VM found again up to date: restart its watch when it is a new QEMU or
        is to be watched the other way, and heal a watch that ended."""
        name = entry.target.name
        entry.patterns = self.settings.watch  # still found under the globs in force
        if ident is not None and ident != entry.identity:
            # Same path, new socket: a new QEMU. Forget the old verdicts, look now.
            entry.identity = ident
            self.store.forget_result(name)
            await self._end(entry)
            self._start(entry)
        elif hold != entry.hold:
            # `hold` changed (reload): the same VM, watched the other way from now.
            entry.hold = hold
            await self._end(entry)
            self._start(entry)
        elif entry.task is None or entry.task.done():
            log.error("watch_restarted", vm=name)  # cannot happen; if it does, heal
            self._start(entry)

    def _still_listening(self, entry: Watched) -> bool:
        """glob() answers [] when it cannot list a directory (no fd left, EMFILE): a watched
        socket that still exists, under unchanged globs, stays watched."""
        return (
            entry.source == "watch"
            and entry.patterns == self.settings.watch
            and entry.identity is not None
            and socket_identity(entry.target.address) == entry.identity
        )

    def _start(self, entry: Watched) -> None:
        entry.reported = None
        entry.task = asyncio.create_task(self._run_target(entry), name=entry.target.name)

    async def _end(self, entry: Watched) -> None:
        """Cancel a VM's task and wait for it; whatever it died of never reaches the
        caller (rescan, or the daemon's stop: SIGTERM still exits 0)."""
        task, entry.task = entry.task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
        except Exception as exc:
            log.error("watch_ended", vm=entry.target.name, error=describe_fault(exc))

    async def _drop(self, name: str) -> None:
        entry = self.watched.pop(name)
        await self._end(entry)
        self.store.remove(name)

    async def stop(self) -> None:
        for name in list(self.watched):
            await self._drop(name)

    # ---------------------------------------------------------------- inspection
    def _timeouts(self) -> Timeouts:
        return Timeouts(self.settings.greeting_timeout, self.settings.command_timeout)

    def _next_delay(self, entry: Watched) -> float:
        record = self.store.vms.get(entry.target.name)
        failures = record.consecutive_failures if record else 0
        return backoff_delay(failures, self.settings.interval)

    async def _wait(self, entry: Watched) -> None:
        await self.pause(entry.poke, self._next_delay(entry))
        entry.poke.clear()

    async def _record(self, entry: Watched, result: TargetResult) -> None:
        elapsed = time.monotonic() - entry.started
        self.duration.observe(elapsed)
        self.store.update(entry.target.name, result, elapsed)
        if result.ok:
            entry.reported = None  # the failure run is over: a new one is logged again

    async def _run_target(self, entry: Watched) -> None:
        """Inspect on schedule until cancelled (VM gone, daemon stopping)."""
        if entry.hold:
            await self._run_held(entry)
            return
        while True:
            await self._attempt(entry, self._inspect_once)
            await self._wait(entry)

    async def _inspect_once(self, entry: Watched) -> None:
        async with self.gate:
            entry.started = time.monotonic()
            result = await self.inspect(
                entry.target, self._timeouts(), self.settings.target_timeout
            )
        await self._record(entry, result)

    async def _run_held(self, entry: Watched) -> None:
        """Keep the monitor open and re-inspect at once on device events; reconnect after
        any failure."""
        while True:
            await self._attempt(entry, self._hold_session)
            await self._wait(entry)

    async def _hold_session(self, entry: Watched) -> None:
        """Inspect over one kept session (the same inspect_session as `check`) until an
        inspection fails; the failure is recorded and the caller reconnects."""
        async with self.session(entry.target, self._timeouts()) as session:
            session.client.register_listener(PokeListener(entry.poke))
            while True:
                async with self.gate:
                    entry.started = time.monotonic()
                    result = await inspect_session(
                        session, entry.target.name, self.settings.target_timeout
                    )
                await self._record(entry, result)
                if not result.ok and result.error is not None and result.snapshot is None:
                    return  # the session failed: reconnect after the back-off
                await self._wait(entry)

    async def _attempt(self, entry: Watched, body: Callable[[Watched], Awaitable[None]]) -> None:
        """Run one attempt. Every failure becomes a recorded result (and so a back-off
        and a metric); only a real cancellation or interpreter exit gets through."""
        entry.started = time.monotonic()
        try:
            await body(entry)
            return
        except TimeoutError:
            failure = InspectionError(
                "timeout", f"inspection exceeded {self.settings.target_timeout:g}s"
            )
        except InspectionError as exc:
            failure = exc
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # a watch must outlive any bug
            if isinstance(exc, asyncio.CancelledError) and _really_cancelled():
                raise
            failure = self._fault(entry, exc)
        try:
            await self._record(entry, TargetResult(entry.target.name, None, None, failure))
        except Exception as exc:  # the store itself failed: say so, keep the schedule
            self._fault(entry, exc)

    def _fault(self, entry: Watched, exc: BaseException) -> InspectionError:
        """Log an unexpected exception once per failure run and exception type; the
        returned error is counted as reason `internal`, its message names the kind."""
        kind = fault_kind(exc)
        text = describe_fault(exc)
        name = type(exc).__name__
        if entry.reported != name:
            entry.reported = name
            with contextlib.suppress(Exception):  # stderr gone must not end the watch
                log.error(
                    "watch_error",
                    vm=entry.target.name,
                    kind=kind.value,
                    exception=name,
                    error=text,
                    location=fault_location(exc),
                    retry="with back-off",
                )
        return InspectionError(FAULT_REASON, f"{kind.headline}: {text}")
