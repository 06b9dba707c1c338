"""Helpers the integration tests share: a real daemon process, VMs, polling, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    create_sysfs_device,
    emulation_env,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.demo.run import demo_vm_args
from qmpguard.discovery import discover
from tests.conftest import AUDIT, QEMU_X86, VmFactory, audit_qmp_trace

BASE_VM = (
    "-S",
    "-M",
    "q35,kernel-irqchip=split",
    "-m",
    "64",
    "-device",
    "intel-iommu,id=viommu,caching-mode=on",
)


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


#: The shortest rescan the daemon accepts (settings.INTERVAL): daemon tests put it in their
#: config, so noticing a VM that came or went costs at most 1 s instead of the default 2 s.
FAST_RESCAN = "rescan_interval = 1\n"


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    port: int
    token: str | None = None
    log: Path | None = None

    def log_lines(self) -> list[dict[str, Any]]:
        """The daemon's JSON log so far (every line must be JSON)."""
        assert self.log is not None
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token or self.token:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def vms(self) -> dict[str, dict[str, Any]]:
        status, body = self.get("/api/v1/vms")
        assert status == 200, body
        return {vm["name"]: vm for vm in json.loads(body)}

    def vm(self, name: str) -> dict[str, Any]:
        status, body = self.get(f"/api/v1/vms/{quote(name, safe='')}")
        assert status == 200, body
        return dict(json.loads(body))

    def metrics(self) -> str:
        return self.get("/metrics")[1]


def misbound_vm(qemu_vm: VmFactory, tmp_path: Path, so: Path, name: str) -> QemuProcess:
    sysfs = create_sysfs_device(tmp_path / f"{name}-dev", VfioDeviceSpec("0000:01:00.0", 1))
    return qemu_vm(
        "-S",
        "-M",
        "q35,kernel-irqchip=split",
        "-m",
        "64",
        "-device",
        f"vfio-pci,id=hostdev0,sysfsdev={sysfs},rombar=0",
        "-device",
        "intel-iommu,id=viommu,caching-mode=on",
        name=name,
        env=emulation_env(so, tmp_path / f"{name}.dma"),
    )


requires_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl CLI not installed"
)


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


DATA = Path(__file__).resolve().parents[1] / "data"
MEMORY_LIMIT = 1024 * 1024 * 1024
SNAPSHOT = DATA / "q35-intel-topology-7.2.22.json"


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


def fifo(path: Path, replace: bool = False) -> Path:
    """A FIFO at `path` (replacing the file there if asked)."""
    if replace:
        path.unlink()
    os.mkfifo(path)
    return path


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


needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="needs root, unshare and setpriv (util-linux)",
)


@dataclass
class NamespacedQemu:
    pid: int
    socket: str  # the QMP socket's path inside its mount namespace
    workdir: Path


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


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _wait_gone(pidfd: int, timeout: float) -> bool:
    """Wait on a pidfd (readable once the process exits): no polling, no sleeps."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def demo_vm(
    qemu_vm: VmFactory, tmp_path: Path, so: Path, name: str, viommu_first: bool
) -> QemuProcess:
    """One of `qmpguard demo`'s VMs (good-vm: vIOMMU first; bad-vm: vfio first, QG001),
    on the first QEMU of the matrix only: these tests are about the daemon, not QEMU."""
    group = 40 if viommu_first else 41
    sysfs = create_sysfs_device(tmp_path / name, VfioDeviceSpec(f"0000:0{group - 39}:00.0", group))
    return qemu_vm(
        *demo_vm_args(name, sysfs, viommu_first),
        name=name,
        binary=QEMU_X86,
        env=emulation_env(so, tmp_path / f"{name}.dma.log"),
    )


@contextlib.contextmanager
def monitor_held(path: Path) -> Iterator[None]:
    """Another client on the VM's only monitor: a plain socket that has read QEMU's
    greeting (so QEMU serves it) and stays open; every other client waits unanswered."""
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.settimeout(5)
    holder.connect(str(path))
    try:
        assert b'"QMP"' in holder.recv(65536)  # QEMU is serving this client now
        yield
    finally:
        holder.close()


URI = "qemu:///system"


TRACE_DIR = Path("/var/lib/libvirt/qemu/qmpguard-test-traces")


def _connect() -> Any:
    libvirt = pytest.importorskip("libvirt")
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as exc:
        if os.environ.get("CI"):
            raise  # CI installs and starts libvirtd: not reaching it is a failure
        pytest.skip(f"no libvirtd at {URI}: {exc}")


DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  {features}
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' model='pcie-root'/>
    {devices}
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-trace'/>
    <qemu:arg value='handle_qmp_command,file={trace}'/>
  </qemu:commandline>
</domain>"""


NO_VIOMMU = dict(features="", devices="<interface type='user'><model type='e1000e'/></interface>")
