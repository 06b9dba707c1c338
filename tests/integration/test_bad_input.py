"""Bad input to the real CLI and daemon: one line on stderr, exit 3, never a traceback.

Helpers for the test_bad_input* modules, and the inspection-error reasons: a path that
is no socket was "stale socket: QEMU gone?", a stopped VM whose listen backlog is full
was `not-qmp` ("[Errno 22]"). Every case in these modules failed before issue 12.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import VmFactory, requires_qemu
from tests.integration.support import (
    qmpguard,
    sparse,
)

pytestmark = pytest.mark.integration
#: Address space of every qmpguard process here: /dev/zero read whole would blow past it.


# -- reasons that say what happened ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "directory", "dev-zero"])
def test_check_on_a_path_that_is_no_socket(tmp_path: Path, kind: str) -> None:
    path = {
        "file": sparse(tmp_path / "vm.qmp", 10),
        "directory": tmp_path,
        "dev-zero": Path("/dev/zero"),
    }[kind]
    proc = qmpguard("check", "--format", "json", str(path))
    assert proc.returncode == 3 and proc.stderr == "", proc.stderr
    (target,) = json.loads(proc.stdout)["targets"]
    assert target["error_reason"] == "not-a-socket"
    assert "stale socket" not in target["error"] and "not a QMP socket" in target["error"]


@requires_qemu
def test_stopped_vm_with_a_full_backlog_is_busy_not_not_qmp(qemu_vm: VmFactory) -> None:
    """Once the listen backlog is full, connect() fails with EAGAIN: that is `busy`."""
    vm = qemu_vm("-S", "-M", "q35", "-m", "64")
    queued: list[socket.socket] = []
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        for _ in range(1000):  # fill QEMU's listen backlog
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(vm.qmp_path))
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        else:
            pytest.fail("the listen backlog never filled")
        proc = qmpguard("check", "--format", "json", "--greeting-timeout", "0.5", str(vm.qmp_path))
    finally:
        for s in queued:
            s.close()
        os.kill(vm.pid, signal.SIGCONT)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    (target,) = json.loads(proc.stdout)["targets"]
    assert target["error_reason"] == "busy", target["error"]
    assert "listen backlog" in target["error"] and "Errno" not in target["error"]
