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
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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
from qmpguard.inspect import inspect_target
from qmpguard.targets import parse_target
from tests.conftest import AUDIT, QEMU_X86, SETUP_MARKER, VmFactory, audit_qmp_trace

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
NOBODY = 65534
OTHER_UID = 4242  # an unprivileged user that owns no process here

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="needs root, unshare and setpriv (util-linux)",
)


@dataclass
class NamespacedQemu:
    pid: int
    socket: str  # the QMP socket's path inside its mount namespace
    workdir: Path


def _wait_gone(pidfd: int, timeout: float) -> bool:
    """Wait on a pidfd (readable once the process exits): no polling, no sleeps."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


@contextlib.contextmanager
def namespaced_qemu(name: str, user: int | None = None) -> Iterator[NamespacedQemu]:
    """QEMU in its own mount namespace, its QMP socket on a private tmpfs that our
    namespace cannot see; as `user` if given. QEMU daemonizes once its monitor listens,
    so when `unshare` returns the socket is ready."""
    work = Path(tempfile.mkdtemp(prefix="qmpguard-discovery-"))
    work.chmod(0o711)
    private, host = work / "private", work / "host"
    private.mkdir()
    host.mkdir()
    owner = "size=1m,mode=0700"
    run_as: list[str] = []
    if user is not None:
        os.chown(host, user, user)
        owner += f",uid={user},gid={user}"
        run_as = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    sock, pidfile, trace = private / "vm.qmp", host / "qemu.pid", host / "trace.log"
    qemu = [
        *run_as,
        QEMU_X86,
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-M",
        "q35",
        "-name",
        f"guest={name}",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        "-trace",
        f"handle_qmp_command,file={trace}",
        "-daemonize",
        "-pidfile",
        str(pidfile),
    ]
    script = f"mount -t tmpfs -o {owner} qmpguard-test {private} && exec {shlex.join(qemu)}"
    try:
        subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pid = int(pidfile.read_text())
        pidfd = os.pidfd_open(pid)
        try:
            yield NamespacedQemu(pid, str(sock), work)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pidfd, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pidfd, 10)
            os.close(pidfd)
            AUDIT["vms"] += 1
            refused = audit_qmp_trace(trace)
            assert not refused, f"qmpguard sent commands outside the allow-list: {refused}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def found(pid: int, **kwargs: Any) -> Any:
    vms = asyncio.run(discover(only=[pid], **kwargs))
    assert len(vms) == 1, f"process {pid} not found as QEMU"
    return vms[0]


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
            assert (await holder.execute("query-status"))["status"] == "prelaunch"
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
