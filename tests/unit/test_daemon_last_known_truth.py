"""The daemon's store keeps the last known truth through failed inspections; the gate
resizes on reload; reload and exposure rules; `check --format nagios|prometheus` from
recorded snapshots (no QEMU)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from qmpguard.daemon.exporter import build_registry
from qmpguard.daemon.gate import Gate
from qmpguard.daemon.reload import (
    changed_settings,
    exposure_problem,
    is_loopback,
    not_applied,
)
from qmpguard.daemon.results import ResultStore
from qmpguard.daemon.settings import (
    DEFAULT_PORT,
    ConfigError,
    Settings,
    StaticTarget,
    settings_from_toml,
)
from qmpguard.daemon.watch import Scheduler
from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.inspection import analyse_snapshot
from qmpguard.report.exposition import render_prometheus, write_text_atomically
from qmpguard.report.nagios import render_nagios, status_line
from qmpguard.result import TargetResult
from qmpguard.snapshot import load_snapshot

DATA = Path(__file__).resolve().parent.parent / "data"
NAME = "unix:/run/qemu/bad.qmp"


def result(snapshot: str, target: str = NAME) -> TargetResult:
    snap = load_snapshot(DATA / f"{snapshot}.json")
    return analyse_snapshot(target, replace(snap, target=target))


MISBOUND = "q35-intel-vfio-after-paused-7.2.22"  # QG001 on hostdev0
CLEAN = "q35-intel-vfio-first-paused-7.2.22"
WARNING = "q35-intel-topology-7.2.22"  # QG005


def busy(target: str = NAME) -> TargetResult:
    return TargetResult(target, None, None, InspectionError(ErrorReason.BUSY, "monitor busy"))


def scrape(store: ResultStore) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry, _ = build_registry(store)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith("qmpguard_")
    }


def test_failed_inspections_keep_findings_verdicts_and_their_age() -> None:
    store = ResultStore()
    store.add(NAME, "watch")
    with structlog.testing.capture_logs() as logs:
        store.update(NAME, result(MISBOUND), 0.01)
        first = store.vms[NAME].last_success
        for _ in range(5):
            store.update(NAME, busy(), 2.0)
        held = scrape(store)
        summary = store.vms[NAME].summary()
        store.update(NAME, result(MISBOUND), 0.01)
    qg001 = ("qmpguard_findings", (("code", "QG001"), ("severity", "critical"), ("vm", NAME)))
    assert held[qg001] == 1
    assert held[("qmpguard_vfio_devices", (("verdict", "misbound"), ("vm", NAME)))] == 1
    assert held[("qmpguard_vm_up", (("vm", NAME),))] == 0
    assert held[("qmpguard_last_success_timestamp_seconds", (("vm", NAME),))] == first
    assert held[("qmpguard_inspection_errors_total", (("reason", "busy"), ("vm", NAME)))] == 5
    label = "bad"  # the socket's name: the snapshot has no -name
    info = ("label", label), ("name", ""), ("uuid", ""), ("vm", NAME), ("vmid", "")
    assert held[("qmpguard_vm_info", info)] == 1
    assert summary["findings"] == ["QG001"] and summary["worst"] == "critical"
    assert summary["stale"] and not summary["up"] and summary["error_reason"] == "busy"
    assert summary["label"] == label and summary["vm"]["label"] == label
    events = [(e["event"], e.get("code")) for e in logs]
    assert events.count(("finding_appeared", "QG001")) == 1  # not again after the failures
    assert events.count(("vm_down", None)) == 1 and events.count(("vm_up", None)) == 2
    assert ("finding_cleared", "QG001") not in events
    doc = store.document(NAME)
    assert doc is not None and doc["findings"][0]["code"] == "QG001"
    assert doc["inspection"]["up"] and not doc["inspection"]["stale"]


def test_a_successful_inspection_changes_the_truth_and_logs_it() -> None:
    store = ResultStore()
    store.add(NAME, "watch")
    with structlog.testing.capture_logs() as logs:
        store.update(NAME, result(MISBOUND), 0.01)
        store.update(NAME, busy(), 2.0)
        store.update(NAME, result(CLEAN), 0.01)  # fixed (same name, say after a restart)
    assert [e["event"] for e in logs if e["event"].startswith("finding")] == [
        "finding_appeared",
        "finding_cleared",
    ]
    metrics = scrape(store)
    assert not [k for k in metrics if k[0] == "qmpguard_findings"]
    assert store.vms[NAME].summary()["worst"] == "ok"


def test_never_inspected_failures_publish_no_findings_and_worst_unknown() -> None:
    store = ResultStore()
    store.add(NAME, "watch")
    store.update(NAME, busy(), 2.0)
    metrics = scrape(store)
    assert not [k for k in metrics if k[0] in ("qmpguard_findings", "qmpguard_vfio_devices")]
    assert not [k for k in metrics if k[0] == "qmpguard_last_success_timestamp_seconds"]
    info = ("label", ""), ("name", ""), ("uuid", ""), ("vm", NAME), ("vmid", "")
    assert metrics[("qmpguard_vm_info", info)] == 1  # every listed VM joins
    summary = store.vms[NAME].summary()
    assert summary["worst"] == "unknown" and summary["vm"] is None and not summary["stale"]
    assert store.vms[NAME].shown() is not None  # the page shows the failure


def test_a_replaced_or_vanished_vm_forgets_its_truth() -> None:
    store = ResultStore()
    store.add(NAME, "watch")
    store.update(NAME, result(MISBOUND), 0.01)
    store.forget_result(NAME)
    assert store.vms[NAME].last_good is None and not scrape(store).get(
        ("qmpguard_findings", (("code", "QG001"), ("severity", "critical"), ("vm", NAME)))
    )
    store.update(NAME, result(MISBOUND), 0.01)
    store.remove(NAME)
    assert not [k for k in scrape(store) if ("vm", NAME) in k[1]]


def test_gate_resizes_while_held_and_survives_cancellation() -> None:
    async def scenario() -> None:
        gate = Gate(1)
        inside = 0
        peak = 0
        release = asyncio.Event()

        async def worker() -> None:
            nonlocal inside, peak
            async with gate:
                inside += 1
                peak = max(peak, inside)
                await release.wait()
                inside -= 1

        tasks = [asyncio.create_task(worker()) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert (gate.busy, peak) == (1, 1)
        gate.resize(3)  # waiters go at once
        await asyncio.sleep(0.01)
        assert (gate.busy, peak) == (3, 3)
        tasks[4].cancel()  # a waiter cancelled: leaves no trace
        await asyncio.sleep(0.01)
        gate.resize(1)  # shrink: holders finish, no one new until below 1
        release.set()
        await asyncio.gather(*tasks[:4])
        assert gate.busy == 0 and peak == 3
        # Granted, then cancelled before it ran: the place is handed on, not lost.
        async with gate:
            waiter = asyncio.create_task(gate.acquire())
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.busy == 0
        async with gate:
            assert gate.busy == 1

    asyncio.run(scenario())


def test_reload_names_what_changed_and_what_needs_a_restart() -> None:
    old = Settings(token="a" * 16)
    new = replace(old, listen="127.0.0.1:1", concurrency=2, token="b" * 16)
    assert changed_settings(old, new) == ["listen", "concurrency", "token"]
    assert list(not_applied(old, new)) == ["listen"]
    assert not_applied(old, replace(old, interval=5.0)) == {}
    assert list(not_applied(old, replace(old, libvirt_uris=("qemu:///system",)))) == [
        "libvirt_uris"
    ]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.0.0.2", True)],
        *[("0.0.0.0", False), ("", False), ("::", False), ("192.0.2.1", False)],
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_beyond_loopback_needs_a_token_or_an_explicit_allow() -> None:
    exposed = Settings(listen="0.0.0.0:10469")
    assert "without a token" in (exposure_problem(exposed, loopback=False) or "")
    assert exposure_problem(exposed, loopback=True) is None
    assert exposure_problem(replace(exposed, token="t" * 16), loopback=False) is None
    assert exposure_problem(replace(exposed, allow_unauthenticated=True), loopback=False) is None
    allowed = settings_from_toml("[http]\nallow_unauthenticated = true\n")
    assert allowed.allow_unauthenticated
    with pytest.raises(ConfigError, match="allow_unauthenticated' must be true or false"):
        settings_from_toml('[http]\nallow_unauthenticated = "yes"\n', "c.toml")


def test_default_port_is_not_opentelemetrys_nor_in_the_allocated_block() -> None:
    assert DEFAULT_PORT != 9464 and not 9100 <= DEFAULT_PORT <= 9999
    assert Settings().listen == f"127.0.0.1:{DEFAULT_PORT}"


def test_nagios_status_line_perfdata_and_details() -> None:
    bad, clean, warn = result(MISBOUND), result(CLEAN, "unix:/a.qmp"), result(WARNING, "unix:/w")
    text = render_nagios([clean, bad, warn, busy("unix:/gone.qmp")])
    first, *details = text.splitlines()
    assert first.startswith(
        "QMPGUARD CRITICAL - 1 misbound vfio device on bad; "
        "1 warning (QG005 x1) on w; 1 of 4 VMs not inspected "
        "(unix:/gone.qmp: busy) | "
    )
    assert first.endswith(
        "| vms=4;;;0 uninspected=1;;;0 misbound=1;;0;0 unverified=0;0;;0 vfio_ok=1;;;0 "
        "critical=1;;0;0 warnings=1;0;;0"
    )
    assert [line.split("]")[0] + "]" for line in details] == [
        "[OK]",
        "[CRITICAL]",
        "[WARNING]",
        "[UNKNOWN]",
    ]
    assert status_line([clean]).startswith("QMPGUARD OK - 1 VM, 1 vfio device, no findings |")
    assert status_line([warn]).startswith("QMPGUARD WARNING - 1 warning (QG005 x1) on ")
    assert status_line([clean, busy()]).startswith(
        f"QMPGUARD UNKNOWN - 1 of 2 VMs not inspected ({NAME}: busy) |"
    )
    hostile = busy("unix:/a|b\n.qmp")
    assert status_line([hostile]).count("|") == 1 and "\n" not in status_line([hostile])


def test_prometheus_exposition_passes_promtool_and_writes_atomically(tmp_path: Path) -> None:
    text = render_prometheus([result(MISBOUND), result(CLEAN, "unix:/a.qmp"), busy("unix:/x")])
    assert (
        'qmpguard_findings{code="QG001",severity="critical",vm="unix:/run/qemu/bad.qmp"} 1.0'
        in (text)
    )
    assert 'qmpguard_vm_up{vm="unix:/x"} 0.0' in text
    tool = shutil.which("promtool")
    if tool is None and os.environ.get("CI"):
        raise AssertionError("promtool missing: deploy/install-dev.sh installs prometheus")
    if tool is not None:
        proc = subprocess.run(
            [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "qmpguard.prom"
    out.write_text("old\n")
    write_text_atomically(out, text)
    assert out.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["qmpguard.prom"]
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "missing-dir" / "x.prom", text)
    assert [p.name for p in tmp_path.iterdir()] == ["qmpguard.prom"]


def test_reconfigure_resizes_the_gate_wakes_on_a_shorter_interval_and_rewatches_on_hold() -> None:
    """Scheduler.reconfigure and the rescan after it, through the scheduler's seams."""

    async def scenario() -> None:
        paused = asyncio.Event()

        async def inspect(target: Any, *_: Any) -> TargetResult:
            return busy(target.name)

        async def pause(poke: asyncio.Event, delay: float) -> None:
            paused.set()
            await poke.wait()

        store = ResultStore()
        _, duration = build_registry(store)
        target = StaticTarget("unix:/run/qemu/x.qmp")
        settings = Settings(watch=(), targets=(target,), interval=60.0, concurrency=2)
        scheduler = Scheduler(settings, store, duration, inspect=inspect, pause=pause)
        await scheduler.rescan()
        entry = scheduler.watched["unix:/run/qemu/x.qmp"]
        await asyncio.wait_for(paused.wait(), 5)
        first_task = entry.task
        scheduler.reconfigure(replace(settings, concurrency=5, interval=10.0))
        assert scheduler.concurrency == 5 and scheduler.interval == 10.0
        assert entry.poke.is_set()  # a shorter interval: look now, not in 60 s
        held = replace(settings, targets=(StaticTarget(target.target, hold=True),))
        scheduler.reconfigure(held)
        await scheduler.rescan()
        assert entry.hold and entry.task is not first_task  # watched the other way now
        assert first_task is not None and first_task.done()
        await scheduler.stop()

    asyncio.run(scenario())
