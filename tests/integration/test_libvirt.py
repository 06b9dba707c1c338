"""libvirt-managed VMs through a real libvirtd: passthrough, command line, discovery."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpguard.inspection import inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import record_evidence
from tests.integration.support import NO_VIOMMU, _connect

libvirt = pytest.importorskip("libvirt")
pytestmark = pytest.mark.integration


INTEL_WITH_BRIDGE = dict(
    features="<features><ioapic driver='qemu'/></features>",
    devices="""<controller type='pci' model='pcie-root-port' index='1'/>
    <controller type='pci' model='pcie-to-pci-bridge' index='2'/>
    <interface type='user'><model type='e1000'/>
      <address type='pci' bus='0x02' slot='0x01'/></interface>
    <interface type='user'><model type='e1000'/>
      <address type='pci' bus='0x02' slot='0x02'/></interface>
    <interface type='user'><model type='virtio'/><driver iommu='on'/></interface>
    <iommu model='intel'><driver intremap='on' caching_mode='on'/></iommu>""",
)


def check(name: str) -> dict[str, Any]:
    result = asyncio.run(inspect_target(parse_target(f"libvirt:{name}")))
    assert result.ok, result.error and result.error.message
    return target_json(result)


def test_libvirt_bindings_and_cmdline_evidence(libvirt_domain: Callable[..., str]) -> None:
    name = libvirt_domain(INTEL_WITH_BRIDGE)
    doc = check(name)
    record_evidence(doc, "libvirt passthrough, JSON -device", vfio_only=False)
    assert [v["type"] for v in doc["viommus"]] == ["intel-iommu"]
    devs = {d["id"]: d for d in doc["devices"] if d["id"]}
    # libvirt names the pcie-to-pci-bridge's bus pci.2: both NICs behind it alias to it.
    for nic in ("net0", "net1"):
        assert devs[nic]["expected"]["requester"]["devfn"] == "00.0"
        assert devs[nic]["expected"]["requester"]["bus"].endswith("/pci.2")
        cmdline = next(e for e in devs[nic]["order"]["evidence"] if e["source"] == "cmdline")
        assert cmdline["conclusion"] == "after"  # libvirt puts the vIOMMU first
    assert devs["net2"]["type"] == "virtio-net-pci"
    assert not [f for f in doc["findings"] if f["code"] == "QG005"]  # iommu='on'


def test_libvirt_without_viommu(libvirt_domain: Callable[..., str]) -> None:
    doc = check(libvirt_domain(NO_VIOMMU))
    assert doc["viommus"] == []
    assert {d["expected"]["kind"] for d in doc["devices"]} == {"memory"}


def test_libvirt_all_and_monitor_socket_refused(libvirt_domain: Callable[..., str]) -> None:
    name = libvirt_domain(NO_VIOMMU)
    proc = subprocess.run(
        [sys.executable, "-m", "qmpguard", "check", "--libvirt-all", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"libvirt:{name}" in proc.stdout
    # The domain's own monitor socket: qmpguard refuses it at once and says what to use.
    socks = list(Path("/var/lib/libvirt/qemu").glob(f"domain-*-{name[:20]}/monitor.sock"))
    assert socks, "libvirt's monitor socket not found"
    start = time.monotonic()
    direct = subprocess.run(
        [sys.executable, "-m", "qmpguard", "check", str(socks[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert direct.returncode == 3
    assert "use the target libvirt:DOMAIN" in direct.stdout
    assert time.monotonic() - start < 10


def test_missing_domain_is_one_line() -> None:
    _connect().close()
    proc = subprocess.run(
        [sys.executable, "-m", "qmpguard", "check", "libvirt:no-such-dom"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "no-such-dom" in proc.stdout


def test_daemon_follows_domain_start_and_stop(
    libvirt_domain: Callable[..., str], tmp_path: Path
) -> None:
    """With a 10-minute rescan, only libvirt's lifecycle events can make this fast."""
    from tests.integration.support import Daemon, free_port, wait_for

    config = tmp_path / "config.toml"
    config.write_text('watch = []\nrescan_interval = 600\nlibvirt_uris = ["qemu:///system"]\n')
    port = free_port()
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115
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
        stderr=log,
        text=True,
    )
    try:
        d = Daemon(proc, port)

        def listening() -> bool:
            try:
                return d.get("/healthz")[0] == 200
            except OSError:
                return False

        wait_for(listening, what="daemon")
        name = libvirt_domain(NO_VIOMMU)
        started = time.monotonic()
        wait_for(
            lambda: d.vms().get(f"libvirt:{name}", {}).get("status") == "ok",
            timeout=30,
            what="domain start seen",
        )
        assert time.monotonic() - started < 30
        conn = _connect()
        conn.lookupByName(name).destroy()
        conn.close()
        wait_for(lambda: f"libvirt:{name}" not in d.vms(), timeout=30, what="domain stop seen")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
