"""A VM's watch outlives every failure: thousands in a row, fd exhaustion, exceptions of
every kind from the inspection or the session. Afterwards the next success is published
at once. The scheduler is driven through its seams (inspect, session, pause): no real
time passes, so a run of 5,000 failures takes a fraction of a second."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qmpguard.inspection as inspection
from qmpguard.daemon.exporter import build_registry
from qmpguard.daemon.results import ResultStore
from qmpguard.daemon.settings import Settings
from qmpguard.daemon.watch import (
    MAX_BACKOFF_EXPONENT,
    FaultKind,
    Scheduler,
    Watched,
    backoff_delay,
    describe_fault,
    fault_kind,
)
from qmpguard.errors import InspectionError
from qmpguard.inspection import analyse_snapshot
from qmpguard.result import TargetResult
from qmpguard.snapshot import Snapshot, load_snapshot
from qmpguard.targets import Target

DATA = Path(__file__).resolve().parent.parent / "data"
SNAPSHOT: Snapshot = load_snapshot(DATA / "q35-intel-topology-7.2.22.json")
TARGET = Target("unix", "/run/qemu/watched.qmp")
INTERVAL = 60.0

MakeExc = Callable[[], BaseException]


def emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


class StrayBaseException(BaseException):
    """A BaseException a library might raise: not Exception, not a cancellation."""


class UnprintableError(Exception):
    """Its str() raises: the fault log line must still be written."""

    def __str__(self) -> str:
        raise RuntimeError("no text")


def _builtin(cls: type[BaseException]) -> MakeExc:
    def make() -> BaseException:
        try:
            return cls()
        except TypeError:  # e.g. UnicodeDecodeError needs five arguments
            return cls.__new__(cls)

    make.__name__ = cls.__name__
    return make


#: Every builtin Exception class (warnings included), plus the faults the issue names.
#: Not StopIteration/StopAsyncIteration: raised in a coroutine or an async generator
#: they reach the watch as RuntimeError (PEP 479), which is in the list.
BUILTIN_EXCEPTIONS = sorted(
    (
        c
        for c in vars(builtins).values()
        if isinstance(c, type)
        and issubclass(c, Exception)
        and not issubclass(c, BaseExceptionGroup | StopIteration | StopAsyncIteration)
    ),
    key=lambda c: c.__name__,
)
FAULTS: list[MakeExc] = [
    *(_builtin(c) for c in BUILTIN_EXCEPTIONS),
    emfile,
    lambda: OSError(errno.ENFILE, "Too many open files in system"),
    lambda: InspectionError("refused", "connection refused (stale socket: QEMU gone?)"),
    lambda: TimeoutError(),
    lambda: asyncio.CancelledError(),  # stray: nobody cancelled the task
    lambda: StrayBaseException("from a library"),
    lambda: ExceptionGroup("many", [ValueError(1), OSError(errno.EMFILE, "x")]),
    lambda: UnprintableError(),
]
EXPECTED = (InspectionError, TimeoutError)  # failures with a reason of their own


def failure_runs() -> st.SearchStrategy[list[tuple[MakeExc, int]]]:
    """Runs of one exception repeated 1..1500 times: sequences of up to ~10,000 failures."""
    return st.lists(
        st.tuples(st.sampled_from(FAULTS), st.integers(1, 1500)), min_size=1, max_size=8
    )


@dataclass
class Script:
    """Raises the given failures in order, then succeeds; records every pause asked for.
    After the success the next pause blocks: the test then looks at what was published."""

    failures: deque[MakeExc]
    delays: list[float] = field(default_factory=list)
    succeeded: bool = False
    published: asyncio.Event = field(default_factory=asyncio.Event)

    async def inspect(self, target: Target, *_: Any) -> TargetResult:
        if self.failures:
            raise self.failures.popleft()()
        self.succeeded = True
        return analyse_snapshot(target.name, replace(SNAPSHOT, target=target.name))

    async def pause(self, poke: asyncio.Event, delay: float) -> None:
        self.delays.append(delay)
        if self.succeeded:
            self.published.set()
            await asyncio.Event().wait()  # until the test cancels the watch
        await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def session(self, target: Target, *_: Any) -> AsyncIterator[Any]:
        if self.failures:
            raise self.failures.popleft()()
        self.succeeded = True
        yield FakeHeldSession()


class FakeHeldSession:
    """Stands for a QMP session: `collect` is monkeypatched to return a recorded snapshot."""

    class client:  # lower case: mirrors QMPSession.client
        @staticmethod
        def register_listener(_: Any) -> None:
            return None


def expected_log_lines(makers: list[MakeExc]) -> int:
    """One watch_error line per change of unexpected exception type within a failure run."""
    lines, last = 0, None
    for make in makers:
        exc = make()
        if isinstance(exc, EXPECTED):
            continue
        if type(exc).__name__ != last:
            lines, last = lines + 1, type(exc).__name__
    return lines


async def drive(makers: list[MakeExc], hold: bool) -> tuple[Script, ResultStore, list[Any]]:
    """Run one VM's watch through the failures until its success is published."""
    script = Script(deque(makers))
    store = ResultStore()
    registry, duration = build_registry(store)
    scheduler = Scheduler(
        Settings(watch=(), interval=INTERVAL),
        store,
        duration,
        inspect=script.inspect,
        session=script.session,
        pause=script.pause,
    )
    entry = Watched(TARGET, "config", hold)
    scheduler.watched[TARGET.name] = entry
    store.add(TARGET.name, "config")
    with structlog.testing.capture_logs() as logs:
        scheduler._start(entry)
        assert entry.task is not None
        published = asyncio.ensure_future(script.published.wait())
        # Whichever comes first: the success published, or the watch dead (the bug).
        await asyncio.wait({published, entry.task}, timeout=60, return_when="FIRST_COMPLETED")
        published.cancel()
        assert not entry.task.done(), f"the watch ended: {entry.task!r}"
        assert script.published.is_set(), "no success published within 60 s"
        metrics = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
        }
        await scheduler.stop()  # a real cancellation ends it, and cleanly
    assert entry.task is None and TARGET.name not in store.vms
    return script, store, [logs, metrics]


def check_published(makers: list[MakeExc], hold: bool) -> None:
    script, _, (logs, metrics) = asyncio.run(drive(makers, hold))
    assert metrics[("qmpguard_vm_up", (("vm", TARGET.name),))] == 1
    counted = sum(
        v
        for (name, labels), v in metrics.items()
        if name == "qmpguard_inspection_errors_total" and ("vm", TARGET.name) in labels
    )
    assert counted == len(makers)  # every failure counted, none lost
    assert len(script.delays) == len(makers) + 1
    assert all(math.isfinite(d) and 0 < d <= INTERVAL * 1.1 for d in script.delays)
    if makers:  # the success came at most one interval after the last failure
        assert script.delays[-2] <= INTERVAL
    faults = [e for e in logs if e["event"] == "watch_error"]
    assert len(faults) == expected_log_lines(makers)
    assert all(e["vm"] == TARGET.name and e["exception"] and e["kind"] for e in faults)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=failure_runs(), hold=st.booleans())
@example(runs=[(emfile, 1100)], hold=False)  # 1,100 x EMFILE: past 2.0**1024
def test_watch_survives_any_failure_sequence_and_publishes_the_next_success(
    runs: list[tuple[MakeExc, int]], hold: bool, monkeypatch_collect: None
) -> None:
    makers = [make for make, n in runs for _ in range(n)]
    check_published(makers, hold)


@pytest.fixture(scope="module")
def monkeypatch_collect() -> Iterator[None]:
    """A held session's `collect` answers with the recorded snapshot (module-wide: the
    hypothesis test runs many examples on one fixture)."""
    with pytest.MonkeyPatch.context() as mp:

        async def collect(_: Any) -> Snapshot:
            return replace(SNAPSHOT, target=TARGET.name)

        mp.setattr(inspection, "collect", collect)  # the one inspection step held mode uses
        yield


def test_every_builtin_exception_is_survived_and_logged_once(monkeypatch_collect: None) -> None:
    """Deterministic floor under the property test: each FAULTS entry three times in a
    row, held and not: one line each, all counted, success published."""
    makers = [make for make in FAULTS for _ in range(3)]
    for hold in (False, True):
        check_published(makers, hold)


def test_emfile_run_is_logged_once_as_resources() -> None:
    makers: list[MakeExc] = [emfile] * 3000
    _, _, (logs, metrics) = asyncio.run(drive(makers, hold=False))
    [line] = [e for e in logs if e["event"] == "watch_error"]
    assert line["kind"] == "resources" and line["exception"] == "OSError"
    assert "Too many open files" in line["error"]
    key = ("qmpguard_inspection_errors_total", (("reason", "internal"), ("vm", TARGET.name)))
    assert metrics[key] == 3000


@given(failures=st.integers(0, 10**9), interval=st.floats(1e-3, 1e9))
def test_backoff_is_bounded_for_any_failure_count(failures: int, interval: float) -> None:
    delay = backoff_delay(failures, interval)
    assert math.isfinite(delay) and 0 < delay <= interval * 1.1
    if failures:
        assert delay == min(interval, 2.0 ** min(failures, MAX_BACKOFF_EXPONENT))


def test_fault_classification_and_description() -> None:
    assert fault_kind(OSError(errno.EMFILE, "x")) is FaultKind.RESOURCES
    assert fault_kind(MemoryError()) is FaultKind.RESOURCES
    assert fault_kind(OSError(errno.EPIPE, "x")) is FaultKind.INTERNAL
    assert fault_kind(KeyError("k")) is FaultKind.INTERNAL
    assert describe_fault(UnprintableError()) == "UnprintableError"
    assert describe_fault(ValueError("one\ntwo")) == "ValueError: one"
