"""Faults against real QEMU: killed mid-collection, frozen, unreadable socket, failed write."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpguard.inspection import inspect_target
from qmpguard.qmp.guard import Timeouts
from qmpguard.qmp.transport import QMPSession
from qmpguard.targets import parse_target
from tests.conftest import VmFactory, requires_qemu

pytestmark = [pytest.mark.integration, requires_qemu]
VM = (
    "-S",
    "-M",
    "q35",
    "-m",
    "64",
    "-device",
    "intel-iommu,caching-mode=on",
    "-device",
    "e1000e,id=nic1",
)


def test_qemu_killed_during_collection(qemu_vm: VmFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = qemu_vm(*VM)
    real_execute = QMPSession.execute

    async def execute_then_kill(self: QMPSession, command: str, arguments: Any = None) -> Any:
        if self.commands_sent == 5:  # QEMU dies after the first round of queries
            os.kill(vm.pid, signal.SIGKILL)
        return await real_execute(self, command, arguments)

    monkeypatch.setattr(QMPSession, "execute", execute_then_kill)
    result = asyncio.run(inspect_target(parse_target(str(vm.qmp_path)), overall=10))
    assert not result.ok and result.error is not None
    assert result.error.reason == "disconnected"
    assert "\n" not in result.error.message


def test_frozen_qemu_times_out(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(*VM)
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "qmpguard",
                "check",
                "--greeting-timeout",
                "1",
                "--timeout",
                "5",
                str(vm.qmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    assert proc.returncode == 3
    assert "no QMP greeting" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_frozen_after_greeting_hits_command_timeout(
    qemu_vm: VmFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = qemu_vm(*VM)
    real_execute = QMPSession.execute

    async def execute_then_freeze(self: QMPSession, command: str, arguments: Any = None) -> Any:
        if self.commands_sent == 3:
            os.kill(vm.pid, signal.SIGSTOP)
        return await real_execute(self, command, arguments)

    monkeypatch.setattr(QMPSession, "execute", execute_then_freeze)
    try:
        result = asyncio.run(
            inspect_target(
                parse_target(str(vm.qmp_path)), Timeouts(greeting=2, command=1), overall=10
            )
        )
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    assert result.error is not None and result.error.reason == "timeout"
    assert "no reply within 1s" in result.error.message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_permission_denied(qemu_vm: VmFactory, tmp_path: Path) -> None:
    """A forked child that drops to `nobody` (no exec: the venv may not be readable)."""
    vm = qemu_vm(*VM)
    tmp_path.chmod(0o755)
    vm.qmp_path.chmod(0o600)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgid(65534)
            os.setuid(65534)
            result = asyncio.run(inspect_target(parse_target(str(vm.qmp_path))))
            msg = result.error.reason + "|" + result.error.message if result.error else "ok"
            os.write(write_end, msg.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as fh:
        reason, _, message = fh.read().partition("|")
    assert reason == "permission-denied"
    assert message == f"permission denied on {vm.qmp_path}"


def test_failed_snapshot_write_leaves_no_partial_file(qemu_vm: VmFactory, tmp_path: Path) -> None:
    """A write that fails half-way (file size limit, like a full disk) leaves nothing behind."""
    vm = qemu_vm(*VM)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmpguard",
            "snapshot",
            str(vm.qmp_path),
            "-o",
            str(out_dir / "vm.json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=small_files,
    )
    assert proc.returncode == 3, proc.stderr
    assert "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out_dir.iterdir()) == []
