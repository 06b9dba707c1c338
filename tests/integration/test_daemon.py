"""A real `qmpguard daemon` process against real QEMU VMs, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from qmpguard.daemon.watch import PokeListener
from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    create_sysfs_device,
    emulation_env,
)
from qmpguard.inspection import inspect_target
from qmpguard.qmp.guard import Timeouts
from qmpguard.targets import parse_target
from tests.conftest import VmFactory, requires_qemu, setup_client
from tests.hostile_peer import MODES, HostileFakeQMPPeer
from tests.integration.support import (
    BASE_VM,
    FAST_RESCAN,
    Daemon,
    free_port,
    misbound_vm,
    requires_openssl,
    self_signed_cert,
    wait_for,
)

pytestmark = [pytest.mark.integration, requires_qemu]


def test_discovery_findings_metrics_and_removal(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path, fakevfio: Path
) -> None:
    d = daemon("--watch", str(tmp_path / "vm*[0-9].qmp"), "--interval", "30")
    assert d.vms() == {}
    vm = misbound_vm(qemu_vm, tmp_path, fakevfio, "vm1")
    name = f"unix:{vm.qmp_path}"
    # Found at the next rescan (every 1 s: FAST_RESCAN) and inspected at once.
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", timeout=10, what="discovery")
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
    wait_for(lambda: name not in d.vms(), timeout=10, what="removal at the next rescan")
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
        f'watch = []\ninterval = 1\n{FAST_RESCAN}[[target]]\naddress = "unix:{vm.qmp_path}"\n'
        "hold = true\n"
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
    config.write_text(f'watch = ["{a}/*.qmp"]\ninterval = 5\n{FAST_RESCAN}')
    watched = qemu_vm(*BASE_VM, name="a/vm6")
    vm = qemu_vm(*BASE_VM, name="b/vm7")
    d = daemon("--config", str(config))
    name = f"unix:{vm.qmp_path}"
    # Once the daemon has inspected the VM it does watch, a scan has run: the other one,
    # outside its globs, must not be there.
    wait_for(lambda: d.vms().get(f"unix:{watched.qmp_path}", {}).get("status") == "ok")
    assert name not in d.vms()
    config.write_text(f'watch = ["{a}/*.qmp", "{b}/*.qmp"]\ninterval = 5\n{FAST_RESCAN}')
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
    config.write_text(f'watch = []\n{FAST_RESCAN}[http]\ntoken_file = "{token_file}"\n')
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
        timeout=10,
        what="the new VM (new socket, same path) inspected as new at the next rescan",
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
