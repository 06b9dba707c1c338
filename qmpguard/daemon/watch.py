"""Discovery and scheduling: which VMs exist, and inspecting each on its own schedule.

Every VM has its own task; a shared semaphore bounds how many inspect at once; each
inspection is bounded by the target timeout, so one hung or hostile VM delays nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Histogram
from qemu.qmp import EventListener

from qmpguard.collect import collect
from qmpguard.daemon.results import ResultStore
from qmpguard.daemon.settings import Settings
from qmpguard.inspect import TargetResult, analyse_snapshot, inspect_target
from qmpguard.qmp.libvirt import running_domains
from qmpguard.qmp.transport import InspectionError, Timeouts, open_session
from qmpguard.targets import Target, parse_target

log = structlog.get_logger("qmpguard.daemon")

#: Events after which a held connection re-inspects at once (QEMU 7.2 has no DEVICE_ADDED).
REINSPECT_EVENTS = ("DEVICE_DELETED", "DEVICE_ADDED")


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
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def socket_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


class Scheduler:
    """Keeps the set of watched VMs current and inspects each on schedule."""

    def __init__(self, settings: Settings, store: ResultStore, duration: Histogram) -> None:
        self.settings = settings
        self.store = store
        self.duration = duration
        self.watched: dict[str, Watched] = {}
        self.gate = asyncio.Semaphore(settings.concurrency)
        self._libvirt_errors: set[str] = set()

    # ---------------------------------------------------------------- discovery
    async def discover(self) -> dict[str, tuple[Target, str, bool]]:
        found: dict[str, tuple[Target, str, bool]] = {}
        for pattern in self.settings.watch:
            for path in sorted(glob.glob(pattern)):
                if socket_identity(path) is not None:
                    t = Target("unix", path)
                    found[t.name] = (t, "watch", self.settings.hold_watched)
        for static in self.settings.targets:
            t = parse_target(static.target)
            found[t.name] = (t, "config", static.hold)
        for uri in self.settings.libvirt_uris:
            try:
                for t in await asyncio.to_thread(running_domains, uri):
                    found[t.name] = (t, "libvirt", False)
                self._libvirt_errors.discard(uri)
            except InspectionError as exc:
                if uri not in self._libvirt_errors:  # say it once, not every rescan
                    log.warning("libvirt_unavailable", uri=uri, error=exc.message)
                    self._libvirt_errors.add(uri)
        return found

    async def rescan(self) -> None:
        found = await self.discover()
        for name in list(self.watched):
            if name not in found:
                await self._drop(name)
        for name, (target, source, hold) in found.items():
            ident = socket_identity(target.address) if target.kind == "unix" else None
            entry = self.watched.get(name)
            if entry is None:
                entry = Watched(target, source, hold, ident)
                self.watched[name] = entry
                self.store.add(name, source)
                entry.task = asyncio.create_task(self._run_target(entry), name=name)
            elif ident is not None and ident != entry.identity:
                # Same path, new socket: a new QEMU. Forget the old verdicts, look now.
                entry.identity = ident
                self.store.forget_result(name)
                if entry.task is not None:
                    entry.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await entry.task
                entry.task = asyncio.create_task(self._run_target(entry), name=name)

    async def _drop(self, name: str) -> None:
        entry = self.watched.pop(name)
        if entry.task is not None:
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task
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
        interval = self.settings.interval
        if failures:
            return min(interval, 2.0**failures)  # back off: 2, 4, 8 ... up to interval
        return interval * random.uniform(0.9, 1.1)

    async def _wait(self, entry: Watched) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._next_delay(entry)):
                await entry.poke.wait()
        entry.poke.clear()

    async def _record(self, entry: Watched, result: TargetResult, started: float) -> None:
        elapsed = time.monotonic() - started
        self.duration.observe(elapsed)
        self.store.update(entry.target.name, result, elapsed)

    async def _run_target(self, entry: Watched) -> None:
        if entry.hold:
            await self._run_held(entry)
            return
        while True:
            async with self.gate:
                started = time.monotonic()
                result = await inspect_target(
                    entry.target, self._timeouts(), self.settings.target_timeout
                )
            await self._record(entry, result, started)
            await self._wait(entry)

    async def _run_held(self, entry: Watched) -> None:
        """Keep the monitor open and re-inspect at once on device events."""
        while True:
            started = time.monotonic()
            try:
                async with open_session(entry.target, self._timeouts()) as session:
                    session.client.register_listener(PokeListener(entry.poke))
                    while True:
                        async with self.gate:
                            started = time.monotonic()
                            async with asyncio.timeout(self.settings.target_timeout):
                                snap = await collect(session)
                        await self._record(
                            entry, analyse_snapshot(entry.target.name, snap), started
                        )
                        await self._wait(entry)
            except TimeoutError:
                err = InspectionError(
                    "timeout", f"inspection exceeded {self.settings.target_timeout:g}s"
                )
                await self._record(entry, TargetResult(entry.target.name, None, None, err), started)
            except InspectionError as exc:
                await self._record(entry, TargetResult(entry.target.name, None, None, exc), started)
            await self._wait(entry)
