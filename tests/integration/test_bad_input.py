"""Bad input to the real CLI and daemon: one line on stderr, exit 3, never a traceback.

Helpers for the test_bad_input* modules, and the inspection-error reasons: a path that
is no socket was "stale socket: QEMU gone?", a stopped VM whose listen backlog is full
was `not-qmp` ("[Errno 22]"). Every case in these modules failed before issue 12.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VmFactory, requires_qemu

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[1] / "data"
SNAPSHOT = DATA / "q35-intel-topology-7.2.22.json"
#: Address space of every qmpguard process here: /dev/zero read whole would blow past it.
MEMORY_LIMIT = 1024 * 1024 * 1024


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def qmpguard(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    limit_memory: bool = True,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (memory-limited unless it starts QEMU; time-bounded: a hang fails,
    and is killed)."""
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-m", "qmpguard", *args],
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=_limit_memory if limit_memory else None,
        check=False,
        **kw,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> str:
    """Exit 3, no traceback anywhere, exactly one line on stderr containing `needle`."""
    output = (proc.stdout or "") + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 3, output
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class RunningDaemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qmpguard",
                    "daemon",
                    "--config",
                    str(config),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=_limit_memory,
            )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        with contextlib.suppress(OSError):
            return self.get("/healthz")[0] == 200
        return False

    def vm_names(self) -> set[str]:
        status, body = self.get("/api/v1/vms")
        assert status == 200, body
        return {vm["name"] for vm in json.loads(body)}

    def events(self) -> list[dict[str, Any]]:
        """Every stderr line, parsed: a line that is not JSON fails the test."""
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines]

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@contextlib.contextmanager
def running_daemon(config: Path, log: Path) -> Iterator[RunningDaemon]:
    """A real `qmpguard daemon --config CONFIG` (stderr to LOG), stopped on the way out."""
    d = RunningDaemon(config, log)
    try:
        wait_for(d.healthy, what="daemon to listen")
        yield d
    finally:
        d.stop()


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
