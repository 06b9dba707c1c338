"""A real `qmpguard daemon` process against real QEMU VMs, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from qmpguard.daemon.watch import PokeListener
from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_emulation,
    create_sysfs_device,
    emulation_env,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspect import inspect_target
from qmpguard.qmp.transport import Timeouts
from qmpguard.targets import parse_target
from tests.conftest import VmFactory, requires_qemu, setup_client
from tests.hostile_peer import MODES, HostileFakeQMPPeer

pytestmark = [pytest.mark.integration, requires_qemu]
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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, token: str | None = None, nofile: int | None = None) -> Daemon:
        """A daemon on a free port; `nofile` sets its RLIMIT_NOFILE (soft and hard)."""
        port = free_port()

        def limit_fds() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qmpguard",
                "daemon",
                "--listen",
                f"127.0.0.1:{port}",
                "--log-format",
                "json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"daemon-{port}.log", "w"),  # noqa: SIM115
            text=True,
            preexec_fn=limit_fds if nofile is not None else None,
        )
        started.append(proc)
        d = Daemon(proc, port, token, tmp_path / f"daemon-{port}.log")

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / f"daemon-{port}.log").read_text()
            with contextlib.suppress(OSError):
                return d.get("/healthz")[0] == 200
            return False

        wait_for(healthy, what="daemon to listen")
        return d

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def fakevfio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_emulation(tmp_path_factory.mktemp("fakevfio"))


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


def test_discovery_findings_metrics_and_removal(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path, fakevfio: Path
) -> None:
    d = daemon("--watch", str(tmp_path / "vm*[0-9].qmp"), "--interval", "30")
    assert d.vms() == {}
    vm = misbound_vm(qemu_vm, tmp_path, fakevfio, "vm1")
    name = f"unix:{vm.qmp_path}"
    started = time.monotonic()
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", what="discovery")
    assert time.monotonic() - started < 5  # rescan every 2 s
    assert d.vms()[name]["findings"] == ["QG001"]
    assert d.vm(name)["findings"][0]["code"] == "QG001"
    metrics = d.metrics()
    assert f'qmpguard_findings{{code="QG001",severity="critical",vm="{name}"}} 1.0' in metrics
    assert f'qmpguard_vfio_devices{{verdict="misbound",vm="{name}"}} 1.0' in metrics
    assert f'qmpguard_vm_up{{vm="{name}"}} 1.0' in metrics
    assert "qmpguard_inspection_duration_seconds_count" in metrics
    status, page = d.get("/")
    assert status == 200 and "QG001" in page and "critical" in page
    vm.stop()  # QEMU gone, socket removed: gone from the API and from /metrics
    wait_for(lambda: name not in d.vms(), what="removal")
    assert name not in d.metrics()


def test_hotplug_is_reflected(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path, fakevfio: Path
) -> None:
    vm = qemu_vm(
        *BASE_VM,
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        name="vm2",
        setup_monitor=True,
        env=emulation_env(fakevfio, tmp_path / "vm2.dma"),
    )
    d = daemon("--watch", str(tmp_path / "vm*[0-9].qmp"), "--interval", "1")
    name = f"unix:{vm.qmp_path}"
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", what="first inspection")
    assert f'qmpguard_vfio_devices{{verdict="ok",vm="{name}"}} 0.0' in d.metrics()
    sysfs = create_sysfs_device(tmp_path / "hot", VfioDeviceSpec("0000:02:00.0", 2))

    async def hotplug() -> None:
        async with contextlib.asynccontextmanager(setup_client)(vm) as client:
            await client.execute(
                "device_add",
                {"driver": "vfio-pci", "id": "hot0", "bus": "rp1", "sysfsdev": str(sysfs)},
            )

    asyncio.run(hotplug())
    wait_for(
        lambda: any(dev["id"] == "hot0" for dev in d.vm(name).get("devices", [])),
        what="hot-plugged device in the API",
    )
    hot = next(dev for dev in d.vm(name)["devices"] if dev["id"] == "hot0")
    assert hot["verdict"] == "ok" and hot["order"]["evidence"][0]["source"] == "hotplugged"
    assert f'qmpguard_vfio_devices{{verdict="ok",vm="{name}"}} 1.0' in d.metrics()


def test_busy_and_hostile_peers_do_not_stall_healthy_vms(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Every HostileFakeQMPPeer misbehaviour at once, plus a busy monitor, next to a healthy
    VM: the healthy one keeps its schedule, each bad one is down with a reason."""
    healthy = qemu_vm(*BASE_VM, name="vm3")
    busy = qemu_vm(*BASE_VM, name="vm4")
    hostile = {mode: tmp_path / f"vm{10 + i}.qmp" for i, mode in enumerate(MODES)}
    with contextlib.ExitStack() as stack:
        for mode, path in hostile.items():
            stack.enter_context(HostileFakeQMPPeer(path, mode))

        async def scenario() -> None:
            holder = QMPClient("holder")  # another client holds vm4's only monitor
            await holder.connect(str(busy.qmp_path))
            try:
                await asyncio.to_thread(check_daemon)
            finally:
                await holder.disconnect()

        def check_daemon() -> None:
            d = daemon("--watch", str(tmp_path / "vm*[0-9].qmp"), "--interval", "1")
            ok_name = f"unix:{healthy.qmp_path}"
            wait_for(lambda: d.vms().get(ok_name, {}).get("status") == "ok", what="healthy")
            first = d.vms()[ok_name]["last_inspection"]
            # The healthy VM keeps being re-inspected on its own 1 s schedule although the
            # hostile peers stall for their whole timeouts.
            wait_for(
                lambda: d.vms()[ok_name]["last_inspection"] > first + 1.5,
                timeout=10,
                what="healthy VM re-inspected on schedule",
            )
            bad = [f"unix:{busy.qmp_path}", *(f"unix:{p}" for p in hostile.values())]
            vms = wait_for(
                lambda: (
                    (v := d.vms()) and all(v.get(n, {}).get("status") == "error" for n in bad) and v
                ),
                timeout=30,
                what="every bad peer reported down",
            )
            assert "monitor busy" in vms[f"unix:{busy.qmp_path}"]["error"]
            assert all(vms[n]["error"] and "\n" not in vms[n]["error"] for n in bad)
            assert d.vms()[ok_name]["up"]
            metrics = d.metrics()
            assert f'qmpguard_vm_up{{vm="unix:{busy.qmp_path}"}} 0.0' in metrics
            assert (
                f'qmpguard_inspection_errors_total{{reason="busy",vm="unix:{busy.qmp_path}"}}'
                in metrics
            )

        asyncio.run(scenario())


def test_held_monitor_stays_open_and_reinspects(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """hold = true: the daemon keeps the monitor (others find it busy) and re-inspects."""
    vm = qemu_vm(*BASE_VM, name="held1")
    config = tmp_path / "held.toml"
    config.write_text(
        f'watch = []\ninterval = 1\n[[target]]\naddress = "unix:{vm.qmp_path}"\nhold = true\n'
    )
    d = daemon("--config", str(config))
    name = f"unix:{vm.qmp_path}"
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", what="held VM")
    first = d.vms()[name]["last_inspection"]
    wait_for(lambda: d.vms()[name]["last_inspection"] > first, what="re-inspection")
    other = asyncio.run(
        inspect_target(parse_target(str(vm.qmp_path)), Timeouts(greeting=0.5), overall=5)
    )
    assert other.error is not None and other.error.reason == "busy"


def test_device_events_wake_a_held_inspection() -> None:
    poke = asyncio.Event()
    listener = PokeListener(poke)

    async def feed(event: str) -> bool:
        poke.clear()
        await listener.put(
            Message({"event": event, "data": {}, "timestamp": {"seconds": 0, "microseconds": 0}})
        )
        return poke.is_set()

    assert asyncio.run(feed("DEVICE_DELETED"))
    assert not asyncio.run(feed("RTC_CHANGE"))
    assert listener._queue.qsize() == 0  # stores nothing: a flood costs no memory


def test_sighup_reload_and_sigterm(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'watch = ["{a}/*.qmp"]\ninterval = 5\n')
    vm = qemu_vm(*BASE_VM, name="b/vm7")
    d = daemon("--config", str(config))
    name = f"unix:{vm.qmp_path}"
    time.sleep(0)  # (no waiting: the VM is not watched yet, and must not show up)
    assert name not in d.vms()
    config.write_text(f'watch = ["{a}/*.qmp", "{b}/*.qmp"]\ninterval = 5\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", what="VM after reload")
    config.write_text("interval = -1\n")  # invalid: logged, old config kept
    d.proc.send_signal(signal.SIGHUP)
    assert d.get("/healthz")[0] == 200 and name in d.vms()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0


def test_token_and_bad_requests(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-enough-length\n")
    config = tmp_path / "config.toml"
    config.write_text(f'watch = []\n[http]\ntoken_file = "{token_file}"\n')
    d = daemon("--config", str(config), token="s3cret-token-of-enough-length")
    assert d.get("/api/v1/vms")[0] == 200
    for path in ("/api/v1/vms", "/metrics", "/", "/api/v1/vms/x"):
        assert d.get(path, token="wrong-token-wrong-token")[0] == 401
    anonymous = Daemon(d.proc, d.port, None)
    assert anonymous.get("/healthz")[0] == 200
    assert anonymous.get("/metrics")[0] == 401
    assert d.get("/api/v1/vms/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert d.get("/api/v1/vms/%00")[0] == 404
    assert d.get("/nope")[0] == 404


def test_config_errors_exit_3_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('listen = "127.0.0.1:9464"\n\ninterval = "soon"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "qmpguard", "daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert proc.stderr.strip() == (
        f"qmpguard: error: {config}:3: 'interval' must be a positive number, got 'soon'"
    )


def test_socket_recreated_by_new_qemu_has_no_stale_verdicts(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path, fakevfio: Path
) -> None:
    first = misbound_vm(qemu_vm, tmp_path, fakevfio, "vm8")
    name = f"unix:{first.qmp_path}"
    d = daemon("--watch", str(tmp_path / "vm*[0-9].qmp"), "--interval", "30")
    wait_for(lambda: d.vms().get(name, {}).get("findings") == ["QG001"], what="first VM")
    first.stop()
    qemu_vm(*BASE_VM, "-device", "e1000e,id=nic9", name="vm8")  # a new VM, same path
    wait_for(
        lambda: any(dev["id"] == "nic9" for dev in d.vm(name).get("devices", [])),
        what="the new VM inspected as new",
    )
    assert d.vms()[name]["findings"] == []
    assert "QG001" not in d.metrics()


def test_malformed_http_requests_get_4xx(daemon: Callable[..., Daemon]) -> None:
    d = daemon("--watch", "/nonexistent/*.qmp")
    requests = [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"POST /api/v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000,
    ]
    for raw in requests:
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            s.sendall(raw)
            status_line = s.recv(200).split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.") and status_line.split()[1][:1] == b"4", (
            raw[:40],
            status_line,
        )
    assert d.get("/healthz")[0] == 200


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


@requires_openssl
def test_tls(daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'watch = []\n[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmpguard",
            "daemon",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cert))

        def https_ok() -> bool:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=5
                ) as resp:
                    return resp.status == 200
            except OSError:
                assert proc.poll() is None
                return False

        wait_for(https_ok, what="TLS listener")
        with pytest.raises(OSError):  # plain HTTP is not served on a TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
