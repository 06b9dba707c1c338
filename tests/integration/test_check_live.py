"""qmpguard check against real QEMU (TCG, no guest OS): bindings, requester IDs, order evidence."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.inspection import analyse_snapshot, inspect_target
from qmpguard.qmp.guard import Timeouts
from qmpguard.report.document import report_json, target_json
from qmpguard.snapshot import load_snapshot
from qmpguard.targets import parse_target
from tests.conftest import (
    QEMU_ARM_MATRIX,
    QEMU_MATRIX,
    VmFactory,
    record_evidence,
    requires_qemu,
    setup_client,
)
from tests.scenarios import I440FX_PCI_BRIDGE, Q35_INTEL_TOPOLOGY

pytestmark = [pytest.mark.integration, requires_qemu]


def run_check(vm_path: Path) -> dict[str, Any]:
    result = asyncio.run(inspect_target(parse_target(str(vm_path))))
    assert result.ok, result.error and result.error.message
    return target_json(result)


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["id"] or d["path"]: d for d in doc["devices"]}


def test_q35_intel_bindings_aliasing_bypass_and_virtio(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(*Q35_INTEL_TOPOLOGY)
    doc = run_check(vm.qmp_path)
    devs = by_id(doc)
    assert doc["viommus"] == [{"path": "/machine/peripheral/iommu", "type": "intel-iommu"}]
    # Express root port: own requester ID.
    assert devs["nic1"]["expected"]["requester"] == {
        "bus": "/machine/peripheral/rp1/rp1",
        "devfn": "00.0",
    }
    # Behind a PCIe-to-PCI bridge: aliased to (its secondary bus, 00.0) - both devices,
    # and everything behind the nested pci-bridge too (the crossing nearest the root wins).
    alias = {"bus": "/machine/peripheral/ppb/ppb", "devfn": "00.0"}
    for name in ("legacy1", "legacy2", "pb", "deep"):
        assert devs[name]["expected"]["kind"] == "viommu"
        assert devs[name]["expected"]["requester"] == alias, name
    # Bypass root bus: plain memory even though a vIOMMU exists.
    for name in ("rp2", "vnbypass"):
        assert devs[name]["expected"]["kind"] == "memory"
        assert "bypass" in devs[name]["expected"]["reason"]
    # The pxb device itself sits on pcie.0 and is translated.
    assert devs["pxb"]["expected"]["requester"] == {"bus": "/machine/q35/pcie.0", "devfn": "04.0"}
    # Order evidence from the command line (vIOMMU first here).
    assert devs["nic1"]["order"]["relative_to_viommu"] == "after"
    assert devs["nic1"]["order"]["evidence"][0]["source"] == "cmdline"
    # virtio: QG005 only for the translated one with iommu_platform off.
    qg005 = [f for f in doc["findings"] if f["code"] == "QG005"]
    assert [f["device"] for f in qg005] == ["/machine/peripheral/vnoff"]
    assert qg005[0]["evidence"][-1] == f"QEMU {doc['qemu']['version']} (qmp-unix)"
    assert all(d["verdict"] == "n/a" for d in doc["devices"])  # no vfio here
    # -S: firmware has not numbered buses behind bridges.
    assert devs["nic1"]["bdf"] is None
    assert devs["vnon"]["bdf"] == "00:05.0"


def test_i440fx_conventional_bridges_alias_to_bridge_devfn(qemu_vm: VmFactory) -> None:
    """Behind pci-bridge / i82801b11-bridge (not PCIe-to-PCI): requester = the bridge itself."""
    devs = by_id(run_check(qemu_vm(*I440FX_PCI_BRIDGE).qmp_path))
    for name in ("behind1", "behind2", "pb"):
        assert devs[name]["expected"]["requester"]["devfn"] == "05.0", name
    assert devs["behinddmi"]["expected"]["requester"]["devfn"] == "1e.0"
    assert devs["behinddmi"]["expected"]["requester"]["bus"] == devs["dmi"]["bus"]


def test_running_firmware_numbers_buses(qemu_vm: VmFactory, tmp_path: Path) -> None:
    """Without -S SeaBIOS numbers the buses: query-pci then gives BDFs behind bridges."""
    args = [a for a in Q35_INTEL_TOPOLOGY if a != "-S"]
    vm = qemu_vm(*args, "-bios", "/usr/share/seabios/bios-256k.bin")

    async def wait_numbered() -> None:
        client = QMPClient("setup")
        await client.connect(str(vm.qmp_path))
        try:
            async with asyncio.timeout(30):
                while True:  # bounded by the timeout: wait for firmware to number rp1's bus
                    buses: Any = await client.execute("query-pci")
                    if any(
                        d.get("pci_bridge", {}).get("bus", {}).get("secondary", 0) > 0
                        for b in buses
                        for d in b["devices"]
                    ):
                        return
                    await asyncio.sleep(0.05)
        finally:
            await client.disconnect()

    asyncio.run(wait_numbered())
    devs = by_id(run_check(vm.qmp_path))
    assert devs["nic1"]["bdf"] is not None and devs["nic1"]["bdf"] != "00:00.0"
    assert devs["nic1"]["expected"]["requester"]["devfn"] == "00.0"


def test_no_viommu_all_memory(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(
        "-S",
        "-M",
        "q35",
        "-m",
        "64",
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        "-device",
        "e1000e,id=nic1,bus=rp1",
    )
    doc = run_check(vm.qmp_path)
    assert doc["viommus"] == []
    assert {d["expected"]["kind"] for d in doc["devices"]} == {"memory"}
    assert by_id(doc)["nic1"]["expected"]["reason"] == "no vIOMMU in this VM"
    assert doc["findings"] == []


def test_default_bus_bypass_iommu(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(
        "-S",
        "-M",
        "q35,default-bus-bypass-iommu=true",
        "-m",
        "64",
        "-device",
        "intel-iommu,id=iommu,caching-mode=on",
        "-device",
        "e1000e,id=nic1",
    )
    doc = run_check(vm.qmp_path)
    nic = by_id(doc)["nic1"]
    assert nic["expected"]["kind"] == "memory"
    assert "/machine/q35/pcie.0" in nic["expected"]["reason"]


@pytest.mark.parametrize("viommu_first", [True, False])
def test_virtio_iommu_pci_bus_order(qemu_vm: VmFactory, viommu_first: bool) -> None:
    viommu = ["-device", "virtio-iommu-pci,id=viommu"]
    nic = ["-device", "e1000e,id=nic1"]
    vm = qemu_vm("-S", "-M", "q35", "-m", "64", *(viommu + nic if viommu_first else nic + viommu))
    doc = run_check(vm.qmp_path)
    assert doc["viommus"] == [{"path": "/machine/peripheral/viommu", "type": "virtio-iommu-pci"}]
    order = by_id(doc)["nic1"]["order"]
    expected = "after" if viommu_first else "before"
    assert order["relative_to_viommu"] == expected
    sources = {e["source"]: e["conclusion"] for e in order["evidence"]}
    assert sources == {"cmdline": expected, "bus-order": expected}


def test_json_device_options_are_realized_after_keyval(qemu_vm: VmFactory) -> None:
    """QEMU realizes key=val -device options before JSON ones, whatever their position."""
    vm = qemu_vm(
        "-S",
        "-M",
        "q35",
        "-m",
        "64",
        "-device",
        '{"driver": "e1000e", "id": "nic1"}',
        "-device",
        "virtio-iommu-pci,id=viommu",
    )
    order = by_id(run_check(vm.qmp_path))["nic1"]["order"]
    sources = {e["source"]: e for e in order["evidence"]}
    assert sources["bus-order"]["conclusion"] == "after"  # what QEMU really did
    assert sources["cmdline"]["conclusion"] == "after"
    assert "JSON" in sources["cmdline"]["detail"]


def test_hotplugged_device_is_after_viommu(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(
        "-S",
        "-M",
        "q35",
        "-m",
        "64",
        "-device",
        "intel-iommu,id=iommu,caching-mode=on",
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        setup_monitor=True,
    )

    async def hotplug() -> None:
        async with contextlib.asynccontextmanager(setup_client)(vm) as client:
            await client.execute("device_add", {"driver": "e1000e", "id": "hot1", "bus": "rp1"})

    asyncio.run(hotplug())
    hot = by_id(run_check(vm.qmp_path))["hot1"]
    assert hot["expected"]["requester"] == {"bus": "/machine/peripheral/rp1/rp1", "devfn": "00.0"}
    assert hot["order"]["relative_to_viommu"] == "after"
    assert hot["order"]["evidence"][0]["source"] == "hotplugged"
    cmdline = next(e for e in hot["order"]["evidence"] if e["source"] == "cmdline")
    assert cmdline["conclusion"] is None and "hot-plugged" in cmdline["detail"]


# The VMs are aarch64 ones: the x86 matrix is pinned to its first build, the ARM one varies.
@pytest.mark.parametrize("qemu_vm", [next(iter(QEMU_MATRIX))], indirect=True, ids=["aarch64"])
@pytest.mark.parametrize("arm", list(QEMU_ARM_MATRIX), ids=lambda label: f"qemu-{label}")
def test_arm_virt_smmuv3(qemu_vm: VmFactory, arm: str) -> None:
    if shutil.which(QEMU_ARM_MATRIX[arm]) is None:
        pytest.skip(f"{QEMU_ARM_MATRIX[arm]} not installed")
    vm = qemu_vm(
        "-S",
        "-M",
        "virt,iommu=smmuv3",
        "-m",
        "64",
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        "-device",
        "e1000e,id=nic1,bus=rp1",
        binary=QEMU_ARM_MATRIX[arm],
    )
    doc = run_check(vm.qmp_path)
    record_evidence(doc, "ARM virt,iommu=smmuv3", vfio_only=False)
    assert [v["type"] for v in doc["viommus"]] == ["arm-smmuv3"]
    nic = by_id(doc)["nic1"]
    assert nic["expected"]["kind"] == "viommu"
    assert nic["expected"]["requester"] == {"bus": "/machine/peripheral/rp1/rp1", "devfn": "00.0"}
    assert nic["order"]["relative_to_viommu"] == "after"
    assert nic["order"]["evidence"][0]["source"] == "machine-viommu"


def test_snapshot_replay_equals_live(qemu_vm: VmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(*Q35_INTEL_TOPOLOGY)
    out = tmp_path / "vm.json"
    qmpguard = [sys.executable, "-m", "qmpguard"]
    snap = subprocess.run(
        [*qmpguard, "snapshot", str(vm.qmp_path), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert snap.returncode == 0, snap.stderr
    live = subprocess.run(
        [*qmpguard, "check", "--format", "json", str(vm.qmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    offline = subprocess.run(
        [*qmpguard, "check", "--format", "json", "--snapshot", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert live.returncode == offline.returncode == 1  # QG005 warning
    live_doc, off_doc = json.loads(live.stdout), json.loads(offline.stdout)
    assert live_doc["targets"][0]["devices"] == off_doc["targets"][0]["devices"]
    assert live_doc["targets"][0]["findings"] == off_doc["targets"][0]["findings"]
    again = analyse_snapshot("x", load_snapshot(out))
    assert report_json([again])["summary"] == live_doc["summary"]


def test_busy_monitor_fails_fast(qemu_vm: VmFactory) -> None:
    vm = qemu_vm("-S", "-M", "q35", "-m", "64")

    async def scenario() -> Any:
        holder = QMPClient("holder")
        await holder.connect(str(vm.qmp_path))
        try:
            return await inspect_target(
                parse_target(str(vm.qmp_path)), Timeouts(greeting=0.5, command=2), overall=5
            )
        finally:
            await holder.disconnect()

    result = asyncio.run(scenario())
    assert not result.ok and result.error is not None
    assert result.error.reason == "busy"
    assert "monitor busy, held by another client" in result.error.message


def test_cli_errors_are_one_line_exit_3(tmp_path: Path) -> None:
    dead = tmp_path / "dead.qmp"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()  # a socket file nobody listens on: what a crashed QEMU leaves behind
    cases = {
        str(tmp_path / "missing.qmp"): "no such socket",
        str(dead): "connection refused",
        "bogus-target": "cannot parse target",
    }
    for target, needle in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "qmpguard", "check", target],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 3, (target, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert needle in proc.stdout + proc.stderr, (target, proc.stdout, proc.stderr)


def test_usage_error_exits_3() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qmpguard", "check", "--format", "xml", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr


def test_tcp_target_without_cmdline(qemu_vm: VmFactory) -> None:
    """Over TCP there is no peer PID: bindings still work, cmdline evidence says why not."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    vm = qemu_vm(
        "-S",
        "-M",
        "q35",
        "-m",
        "64",
        "-qmp",
        f"tcp:127.0.0.1:{port},server=on,wait=off",
        "-device",
        "intel-iommu,id=iommu,caching-mode=on",
        "-device",
        "e1000e,id=nic1",
        setup_monitor=True,
    )

    async def tcp_ready() -> None:  # the UNIX monitors listen before QEMU runs; TCP does not
        async with contextlib.asynccontextmanager(setup_client)(vm) as client:
            await client.execute("query-status")  # QEMU has parsed its options by now

    asyncio.run(tcp_ready())
    result = asyncio.run(inspect_target(parse_target(f"tcp:127.0.0.1:{port}")))
    assert result.ok
    doc = target_json(result)
    nic = by_id(doc)["nic1"]
    assert nic["expected"]["requester"] == {"bus": "/machine/q35/pcie.0", "devfn": "01.0"}
    assert nic["order"]["evidence"][0]["detail"] == (
        "QEMU command line not available (not a local socket)"
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_its_vms_on_signal(sig: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpguard", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # printed once the VMs are up
        assert "VMs running" in line, line
        sockets = [Path(p.strip()) for p in line.split(":", 1)[1].split(",")]
        assert all(s.exists() for s in sockets)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 3  # interrupted: UNKNOWN
        assert not any(s.exists() for s in sockets)
        assert not Path(sockets[0]).parent.exists()  # temporary directory removed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
