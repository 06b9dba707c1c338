"""Ground truth: real QEMU + emulated vfio-pci (fakevfio) + real qmpguard.

For each scenario the emulation's DMA log says what QEMU really did: how many bytes each
VFIO container still has mapped once the guest has turned translation on (intel-iommu:
the tiny VT-d guest; virtio-iommu-pci with boot-bypass=false: already under -S). Then
qmpguard's verdict must agree: QG001 exactly when all guest RAM stays mapped although
the device's bus is translated; `ok` only when the order is proven right.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_emulation,
    build_vtd_guest,
    create_sysfs_device,
    emulation_env,
    mapped_bytes,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import analyse_snapshot, inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import VmFactory, record_evidence, requires_qemu, setup_client

pytestmark = [pytest.mark.integration, requires_qemu]

RAM_MIB = 64
RAM = RAM_MIB << 20
INTEL = "intel-iommu,id=viommu,caching-mode=on"
VIRTIO = "virtio-iommu-pci,id=viommu,boot-bypass=false,bus=pcie.0,addr=2.0"


@dataclass
class Built:
    so: Path
    guest: Path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("fakevfio")
    return Built(build_emulation(cache), build_vtd_guest(cache))


@dataclass
class Scenario:
    """One VM: its -device list (vfio devices as {vfio:ID:BUS:ADDR}) and the guest it runs."""

    devices: list[str]
    guest: bool  # run the VT-d guest (intel) instead of staying paused (-S)
    extra: list[str] = field(default_factory=list)


@dataclass
class Run:
    vm: QemuProcess
    dma_log: Path
    console: Path


def vfio(dev_id: str, bus: str, addr: str, root: Path, group: int) -> str:
    sysfs = create_sysfs_device(root, VfioDeviceSpec(f"0000:{group:02x}:00.0", group))
    return f"vfio-pci,id={dev_id},sysfsdev={sysfs},bus={bus},addr={addr},rombar=0"


def start(
    qemu_vm: VmFactory,
    tmp_path: Path,
    built: Built,
    devices: list[str],
    guest: bool,
    extra: list[str] | None = None,
    setup_monitor: bool = False,
    name: str = "vm",
) -> Run:
    dma_log, console = tmp_path / f"{name}.dma.log", tmp_path / f"{name}.debugcon.txt"
    args = [
        "-M",
        "q35,kernel-irqchip=split",
        "-m",
        str(RAM_MIB),
        "-object",
        f"memory-backend-memfd,id=mem,size={RAM_MIB}M",
        "-machine",
        "memory-backend=mem",
        *(extra or []),
    ]
    args += ["-kernel", str(built.guest), "-debugcon", f"file:{console}"] if guest else ["-S"]
    for dev in devices:
        args += ["-device", dev]
    vm = qemu_vm(
        *args, env=emulation_env(built.so, dma_log), setup_monitor=setup_monitor, name=name
    )
    run = Run(vm, dma_log, console)
    asyncio.run(wait_ready(vm))
    if guest:
        wait_translation_on(run)
    return run


async def wait_ready(vm: QemuProcess) -> None:
    """QEMU greets on QMP once every cold-plugged device is realized."""
    client = QMPClient("ready")
    await client.connect(str(vm.qmp_path))
    await client.execute("query-status")
    await client.disconnect()


def wait_translation_on(run: Run, timeout: float = 30) -> None:
    """The guest prints TE on the debug console once GSTS shows translation enabled."""
    deadline = time.monotonic() + timeout
    while not (run.console.exists() and "TE" in run.console.read_text()):
        assert run.vm.popen is not None and run.vm.popen.poll() is None, run.vm.stderr_text()
        assert time.monotonic() < deadline, "guest did not enable VT-d translation"
        time.sleep(0.02)  # bounded poll on a condition, not a fixed wait


def check(run: Run, scenario: str = "") -> dict[str, Any]:
    result = asyncio.run(inspect_target(parse_target(str(run.vm.qmp_path))))
    assert result.ok, result.error and result.error.message
    doc = target_json(result)
    if scenario:
        record_evidence(doc, scenario)
    return doc


def check_without_cmdline(run: Run, scenario: str = "") -> dict[str, Any]:
    """Only QMP-visible evidence: the snapshot with the QEMU command line removed."""
    live = asyncio.run(inspect_target(parse_target(str(run.vm.qmp_path))))
    assert live.snapshot is not None
    doc = target_json(analyse_snapshot(live.target, live.snapshot.without_cmdline()))
    if scenario:
        record_evidence(doc, scenario)
    return doc


def device(doc: dict[str, Any], dev_id: str) -> dict[str, Any]:
    return next(d for d in doc["devices"] if d["id"] == dev_id)


def codes(doc: dict[str, Any], dev_id: str | None = None) -> list[str]:
    return sorted(
        f["code"]
        for f in doc["findings"]
        if dev_id is None or f["device"] == f"/machine/peripheral/{dev_id}"
    )


def accepted_silently(run: Run) -> bool:
    """QEMU is running and printed nothing but warnings (none of them about the order)."""
    lines = [ln for ln in run.vm.stderr_text().splitlines() if ln.strip()]
    assert run.vm.popen is not None and run.vm.popen.poll() is None
    return all("warning:" in ln for ln in lines)


def all_ram_mapped(run: Run) -> bool:
    mapped = mapped_bytes(run.dma_log)
    return bool(mapped) and all(v >= RAM for v in mapped.values())


def nothing_mapped(run: Run) -> bool:
    return all(v == 0 for v in mapped_bytes(run.dma_log).values())


def assert_consistent(run: Run, doc: dict[str, Any], dev_id: str) -> None:
    """QG001 exactly when the DMA log shows all RAM mapped while the bus is translated."""
    dev = device(doc, dev_id)
    misbound_by_log = dev["expected"]["kind"] == "viommu" and all_ram_mapped(run)
    assert ("QG001" in codes(doc, dev_id)) == misbound_by_log
    if misbound_by_log:
        assert dev["verdict"] == "misbound"


# ------------------------------------------------------------------ scenarios


def test_no_viommu(qemu_vm: VmFactory, tmp_path: Path, built: Built) -> None:
    run = start(
        qemu_vm, tmp_path, built, [vfio("hostdev0", "pcie.0", "9.0", tmp_path, 1)], guest=False
    )
    assert all_ram_mapped(run) and len(mapped_bytes(run.dma_log)) == 1
    doc = check(run)
    dev = device(doc, "hostdev0")
    assert dev["vfio"] and dev["expected"]["kind"] == "memory"
    assert dev["verdict"] == "ok" and codes(doc) == []
    assert_consistent(run, doc, "hostdev0")


@pytest.mark.parametrize("viommu_first", [True, False], ids=["intel-first", "intel-after"])
def test_intel_iommu_order(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, viommu_first: bool
) -> None:
    dev = vfio("hostdev0", "pcie.0", "9.0", tmp_path, 1)
    nics = ["e1000e,bus=pcie.0,addr=3.0", "e1000e,bus=pcie.0,addr=4.0"]
    devices = [INTEL, dev, *nics] if viommu_first else [dev, INTEL, *nics]
    run = start(qemu_vm, tmp_path, built, devices, guest=True)
    # (1) what QEMU really did, (2) it accepted the configuration silently
    assert nothing_mapped(run) if viommu_first else all_ram_mapped(run)
    assert accepted_silently(run)
    # (3) qmpguard's verdict
    doc = check(run, "intel-iommu, guest translating")
    hostdev = device(doc, "hostdev0")
    assert hostdev["verdict"] == ("ok" if viommu_first else "misbound")
    assert codes(doc, "hostdev0") == ([] if viommu_first else ["QG001"])
    assert_consistent(run, doc, "hostdev0")
    # With translation on, every vtd space has its own flat view: creation order is lost,
    # so the QMP evidence alone must say unverified, never guess.
    bare = check_without_cmdline(run, "intel-iommu, guest translating, no cmdline")
    assert device(bare, "hostdev0")["verdict"] == "unverified"
    assert codes(bare, "hostdev0") == ["QG002"]
    as_order = next(
        e for e in device(bare, "hostdev0")["order"]["evidence"] if e["source"] == "iommu-as-order"
    )
    assert as_order["conclusion"] is None and "flat views" in as_order["detail"]
    # The same VM paused before firmware: the vtd spaces share one flat view and the
    # address-space order alone decides, rightly.
    paused = start(qemu_vm, tmp_path, built, devices, guest=False, name="paused")
    bare = check_without_cmdline(paused, "intel-iommu, -S, no cmdline")
    assert device(bare, "hostdev0")["verdict"] == ("ok" if viommu_first else "misbound"), device(
        bare, "hostdev0"
    )["order"]
    as_order = next(
        e for e in device(bare, "hostdev0")["order"]["evidence"] if e["source"] == "iommu-as-order"
    )
    assert as_order["conclusion"] == ("after" if viommu_first else "before")


@pytest.mark.parametrize("viommu_first", [True, False], ids=["virtio-first", "virtio-after"])
def test_virtio_iommu_order(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, viommu_first: bool
) -> None:
    dev = vfio("hostdev0", "pcie.0", "9.0", tmp_path, 1)
    nics = ["e1000e,bus=pcie.0,addr=3.0"]
    devices = [VIRTIO, dev, *nics] if viommu_first else [dev, VIRTIO, *nics]
    run = start(qemu_vm, tmp_path, built, devices, guest=False)
    assert nothing_mapped(run) if viommu_first else all_ram_mapped(run)
    doc = check(run, "virtio-iommu-pci, -S")
    assert device(doc, "hostdev0")["verdict"] == ("ok" if viommu_first else "misbound")
    sources = {e["source"]: e["conclusion"] for e in device(doc, "hostdev0")["order"]["evidence"]}
    expected = "after" if viommu_first else "before"
    assert sources == {"cmdline": expected, "bus-order": expected, "iommu-as-order": expected}
    assert_consistent(run, doc, "hostdev0")
    bare = check_without_cmdline(run)
    assert device(bare, "hostdev0")["verdict"] == ("ok" if viommu_first else "misbound")


def test_mtree_alone_cannot_tell_says_unverified(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    """vfio at 01.0 with nothing between 00.0 and it: both orders give the same sequence."""
    run = start(
        qemu_vm,
        tmp_path,
        built,
        [vfio("hostdev0", "pcie.0", "1.0", tmp_path, 1), INTEL],
        guest=False,
    )
    assert all_ram_mapped(run)  # before translation both orders map everything
    doc = check_without_cmdline(run)
    hostdev = device(doc, "hostdev0")
    assert hostdev["verdict"] == "unverified"
    assert codes(doc, "hostdev0") == ["QG002"]
    assert device(check(run), "hostdev0")["verdict"] == "misbound"  # the cmdline knows


def test_two_vfio_behind_pcie_pci_bridge_share_a_space(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    devices = [
        INTEL,
        "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=5.0",
        vfio("hostdev0", "ppb", "1.0", tmp_path, 1),
        vfio("hostdev1", "ppb", "2.0", tmp_path, 2),
    ]
    run = start(qemu_vm, tmp_path, built, devices, guest=True)
    containers = mapped_bytes(run.dma_log)
    assert len(containers) == 1, containers  # one address space -> one VFIO container
    assert nothing_mapped(run)
    doc = check(run)
    for dev_id in ("hostdev0", "hostdev1"):
        assert device(doc, dev_id)["expected"]["requester"] == {
            "bus": "/machine/peripheral/ppb/ppb",
            "devfn": "00.0",
        }
        assert device(doc, dev_id)["verdict"] == "ok"
        assert codes(doc, dev_id) == ["QG004"]


def test_vfio_on_bypass_root_bus(qemu_vm: VmFactory, tmp_path: Path, built: Built) -> None:
    devices = [
        INTEL,
        "pxb-pcie,id=pxb,bus_nr=64,bypass_iommu=true,bus=pcie.0,addr=6.0",
        "pcie-root-port,id=rp9,chassis=9,bus=pxb",
        vfio("hostdev0", "rp9", "0.0", tmp_path, 1),
    ]
    run = start(qemu_vm, tmp_path, built, devices, guest=True)
    assert all_ram_mapped(run)  # translation is on, yet the device still reaches all RAM
    doc = check(run)
    assert device(doc, "hostdev0")["expected"]["kind"] == "memory"
    assert codes(doc, "hostdev0") == ["QG003"]
    assert_consistent(run, doc, "hostdev0")


def test_hotplugged_vfio_is_bound_correctly(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    run = start(
        qemu_vm,
        tmp_path,
        built,
        [INTEL, "pcie-root-port,id=rp1,chassis=1"],
        guest=True,
        setup_monitor=True,
    )
    sysfs_dev = vfio("hot0", "rp1", "0.0", tmp_path, 5)
    pairs = (kv.split("=", 1) for kv in sysfs_dev.split(",")[1:])
    props: dict[str, object] = {k: v for k, v in pairs}
    props["rombar"] = 0  # QEMU 10.0's device_add wants an integer here

    async def hotplug() -> None:
        async with contextlib.asynccontextmanager(setup_client)(run.vm) as client:
            await client.execute("device_add", {"driver": "vfio-pci", **props})

    asyncio.run(hotplug())
    assert nothing_mapped(run)  # 7.2 maps then unmaps; 10.0 never maps: both leave 0
    doc = check_without_cmdline(run, "hot-plugged vfio, no cmdline")
    hot = device(doc, "hot0")
    assert hot["verdict"] == "ok"
    assert hot["order"]["evidence"][0] == {
        "source": "hotplugged",
        "conclusion": "after",
        "detail": "hot-plugged after machine init; a vIOMMU cannot be",
    }


def test_intel_without_caching_mode_is_refused(
    tmp_path: Path, built: Built, qemu_vm: VmFactory
) -> None:
    """QEMU refuses intel-iommu without caching-mode=on next to vfio-pci, in either order."""
    dev = vfio("hostdev0", "pcie.0", "9.0", tmp_path, 1)
    vm = qemu_vm(
        "-S",
        "-M",
        "q35,kernel-irqchip=split",
        "-m",
        "64",
        "-device",
        "intel-iommu",
        "-device",
        dev,
        env=emulation_env(built.so, tmp_path / "dma.log"),
    )
    assert vm.popen is not None
    assert vm.popen.wait(timeout=30) != 0
    assert "caching-mode=on" in vm.stderr_text()
