"""Process discovery on real processes: a QEMU in its own mount namespace, a libvirt
domain, a busy monitor, and the same discovery run with fewer privileges.

The privilege runs decide the DaemonSet's capabilities (deploy/kubernetes): each one
records what /proc refused and whether inspection still worked, in
tests/artifacts/discovery-privileges.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from qmpguard.discovery import discover
from qmpguard.discovery.model import (
    Manager,
    MonitorState,
    NamespaceRelation,
    ProbeFailure,
    ProbeOutcome,
    Route,
    Unavailable,
)
from qmpguard.discovery.probe import probe
from qmpguard.inspection import inspect_target
from qmpguard.targets import parse_target
from tests.conftest import SETUP_MARKER, VmFactory
from tests.integration.support import found, namespaced_qemu, needs_namespaces

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
NOBODY = 65534
OTHER_UID = 4242  # an unprivileged user that owns no process here


@needs_namespaces
def test_namespaced_qemu_is_found_and_inspected_through_proc_root() -> None:
    with namespaced_qemu("ns-vm") as q:
        assert not Path(q.socket).exists(), "the private tmpfs leaked into our namespace"
        vm = found(q.pid)
        here = f"/proc/{q.pid}/root{q.socket}"
        assert (vm.name, vm.mount_ns, vm.manager) == (
            "ns-vm",
            NamespaceRelation.OTHER,
            Manager.NONE,
        )
        assert (vm.route, vm.target) == (Route.MONITOR, f"unix:{here}")
        assert vm.monitors[0].state is MonitorState.FREE and not vm.problems
        result = asyncio.run(inspect_target(parse_target(vm.target)))
        assert result.ok, result.error and result.error.message
        assert result.snapshot is not None and result.snapshot.pid == q.pid


def test_busy_monitor_is_reported_not_taken(qemu_vm: VmFactory) -> None:
    vm = qemu_vm("-S", "-M", "q35", name="busy")

    async def scenario() -> None:
        holder = QMPClient("holder")
        await holder.connect(str(vm.qmp_path))
        with contextlib.suppress(ExecuteError):  # mark the holder's monitor for the audit
            await holder.execute("qom-get", {"path": "/machine", "property": SETUP_MARKER})
        try:
            for probing in (True, False):
                busy = (await discover(only=[vm.pid], probe_monitors=probing))[0]
                assert (busy.route, busy.unavailable) == (Route.NONE, Unavailable.BUSY)
                assert busy.monitors[0].state is MonitorState.HELD
                assert "held by another client" in busy.message
            # The probe alone (no socket table) says the same, and lets go at once.
            direct = await probe(f"unix:{vm.qmp_path}", 0.3)
            assert (direct.outcome, direct.reason) == (ProbeOutcome.FAILED, ProbeFailure.BUSY)
            # The holder still owns its monitor.
            status: Any = await holder.execute("query-status")
            assert status["status"] == "prelaunch"
        finally:
            await holder.disconnect()
        free = (await discover(only=[vm.pid], timeout=5.0))[0]
        assert (free.route, free.target) == (Route.MONITOR, f"unix:{vm.qmp_path}")

    asyncio.run(scenario())


@needs_namespaces
def test_discover_command_lists_it_in_json_and_as_a_table() -> None:
    with namespaced_qemu("cli-vm") as q:
        here = f"unix:/proc/{q.pid}/root{q.socket}"
        run = [sys.executable, "-m", "qmpguard", "discover", "--pid", str(q.pid)]
        proc = subprocess.run(
            [*run, "--format", "json"], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["schema"] == "qmpguard.discover/1"
        (vm,) = doc["processes"]
        assert (vm["pid"], vm["name"], vm["route"], vm["target"]) == (
            q.pid,
            "cli-vm",
            "monitor",
            here,
        )
        assert vm["monitors"][0]["state"] == "free" and vm["mount_namespace"] == "other"
        proc = subprocess.run([*run, "--no-probe"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert here in proc.stdout and "[listening]" in proc.stdout
