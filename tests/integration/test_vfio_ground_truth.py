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
from pathlib import Path
from typing import Any

import pytest

from qmpguard.demo.fakevfio import build_emulation, build_vtd_guest, mapped_bytes
from tests.conftest import VmFactory, requires_qemu, setup_client
from tests.integration.vfio_vm import (
    Built,
    Vm,
    accepted_silently,
    all_ram_mapped,
    codes,
    console_shows,
    device,
    greeted,
    memfd_machine,
    nothing_mapped,
    refused,
    report,
    start,
    vfio,
)

pytestmark = [pytest.mark.integration, requires_qemu]

INTEL = "intel-iommu,id=viommu,caching-mode=on"
VIRTIO = "virtio-iommu-pci,id=viommu,boot-bypass=false,bus=pcie.0,addr=2.0"
#: q35 with the split irqchip intel-iommu's interrupt remapping needs.
Q35 = "q35,kernel-irqchip=split"


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("fakevfio")
    return Built(build_emulation(cache), build_vtd_guest(cache))


def start_q35(
    qemu_vm: VmFactory,
    tmp_path: Path,
    built: Built,
    devices: list[str],
    guest: bool,
    setup_monitor: bool = False,
    name: str = "vm",
) -> Vm:
    """A q35 VM with `devices`, ready: greeted on QMP and, with the VT-d guest, translating
    (the guest prints TE on its debug console once GSTS shows translation enabled)."""
    vm = start(
        qemu_vm,
        tmp_path,
        built,
        memfd_machine(Q35),
        devices,
        guest=guest,
        setup_monitor=setup_monitor,
        name=name,
    )
    greeted(vm)
    if guest:
        console_shows(vm, "TE", "guest did not enable VT-d translation")
    return vm


def assert_consistent(vm: Vm, doc: dict[str, Any], dev_id: str) -> None:
    """QG001 exactly when the DMA log shows all RAM mapped while the bus is translated."""
    dev = device(doc, dev_id)
    misbound_by_log = dev["expected"]["kind"] == "viommu" and all_ram_mapped(vm)
    assert ("QG001" in codes(doc, dev_id)) == misbound_by_log
    if misbound_by_log:
        assert dev["verdict"] == "misbound"


# ------------------------------------------------------------------ scenarios


def test_no_viommu(qemu_vm: VmFactory, tmp_path: Path, built: Built) -> None:
    vm = start_q35(qemu_vm, tmp_path, built, [vfio(tmp_path, "pcie.0")], guest=False)
    assert all_ram_mapped(vm, containers=1)
    doc = report(vm)
    dev = device(doc, "hostdev0")
    assert dev["vfio"] and dev["expected"]["kind"] == "memory"
    assert dev["verdict"] == "ok" and codes(doc, None) == []
    assert_consistent(vm, doc, "hostdev0")


@pytest.mark.parametrize("viommu_first", [True, False], ids=["intel-first", "intel-after"])
def test_intel_iommu_order(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, viommu_first: bool
) -> None:
    dev = vfio(tmp_path, "pcie.0")
    nics = ["e1000e,bus=pcie.0,addr=3.0", "e1000e,bus=pcie.0,addr=4.0"]
    devices = [INTEL, dev, *nics] if viommu_first else [dev, INTEL, *nics]
    vm = start_q35(qemu_vm, tmp_path, built, devices, guest=True)
    # (1) what QEMU really did, (2) it accepted the configuration silently
    assert nothing_mapped(vm) if viommu_first else all_ram_mapped(vm)
    assert accepted_silently(vm)
    # (3) qmpguard's verdict
    doc = report(vm, scenario="intel-iommu, guest translating")
    hostdev = device(doc, "hostdev0")
    assert hostdev["verdict"] == ("ok" if viommu_first else "misbound")
    assert codes(doc, "hostdev0") == ([] if viommu_first else ["QG001"])
    assert_consistent(vm, doc, "hostdev0")
    # With translation on, every vtd space has its own flat view: creation order is lost,
    # so the QMP evidence alone must say unverified, never guess.
    bare = report(vm, cmdline=False, scenario="intel-iommu, guest translating, no cmdline")
    assert device(bare, "hostdev0")["verdict"] == "unverified"
    assert codes(bare, "hostdev0") == ["QG002"]
    as_order = next(
        e for e in device(bare, "hostdev0")["order"]["evidence"] if e["source"] == "iommu-as-order"
    )
    assert as_order["conclusion"] is None and "flat views" in as_order["detail"]
    # The same VM paused before firmware: the vtd spaces share one flat view and the
    # address-space order alone decides, rightly.
    paused = start_q35(qemu_vm, tmp_path, built, devices, guest=False, name="paused")
    bare = report(paused, cmdline=False, scenario="intel-iommu, -S, no cmdline")
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
    dev = vfio(tmp_path, "pcie.0")
    nics = ["e1000e,bus=pcie.0,addr=3.0"]
    devices = [VIRTIO, dev, *nics] if viommu_first else [dev, VIRTIO, *nics]
    vm = start_q35(qemu_vm, tmp_path, built, devices, guest=False)
    assert nothing_mapped(vm) if viommu_first else all_ram_mapped(vm)
    doc = report(vm, scenario="virtio-iommu-pci, -S")
    assert device(doc, "hostdev0")["verdict"] == ("ok" if viommu_first else "misbound")
    sources = {e["source"]: e["conclusion"] for e in device(doc, "hostdev0")["order"]["evidence"]}
    expected = "after" if viommu_first else "before"
    assert sources == {"cmdline": expected, "bus-order": expected, "iommu-as-order": expected}
    assert_consistent(vm, doc, "hostdev0")
    bare = report(vm, cmdline=False)
    assert device(bare, "hostdev0")["verdict"] == ("ok" if viommu_first else "misbound")


def test_mtree_alone_cannot_tell_says_unverified(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    """vfio at 01.0 with nothing between 00.0 and it: both orders give the same sequence."""
    vm = start_q35(
        qemu_vm,
        tmp_path,
        built,
        [vfio(tmp_path, "pcie.0", "1.0"), INTEL],
        guest=False,
    )
    assert all_ram_mapped(vm)  # before translation both orders map everything
    doc = report(vm, cmdline=False)
    hostdev = device(doc, "hostdev0")
    assert hostdev["verdict"] == "unverified"
    assert codes(doc, "hostdev0") == ["QG002"]
    assert device(report(vm), "hostdev0")["verdict"] == "misbound"  # the cmdline knows


def test_two_vfio_behind_pcie_pci_bridge_share_a_space(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    devices = [
        INTEL,
        "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=5.0",
        vfio(tmp_path, "ppb", "1.0"),
        vfio(tmp_path, "ppb", "2.0", dev_id="hostdev1", group=2),
    ]
    vm = start_q35(qemu_vm, tmp_path, built, devices, guest=True)
    containers = mapped_bytes(vm.dma_log)
    assert len(containers) == 1, containers  # one address space -> one VFIO container
    assert nothing_mapped(vm)
    doc = report(vm)
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
        vfio(tmp_path, "rp9", "0.0"),
    ]
    vm = start_q35(qemu_vm, tmp_path, built, devices, guest=True)
    assert all_ram_mapped(vm)  # translation is on, yet the device still reaches all RAM
    doc = report(vm)
    assert device(doc, "hostdev0")["expected"]["kind"] == "memory"
    assert codes(doc, "hostdev0") == ["QG003"]
    assert_consistent(vm, doc, "hostdev0")


def test_hotplugged_vfio_is_bound_correctly(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    vm = start_q35(
        qemu_vm,
        tmp_path,
        built,
        [INTEL, "pcie-root-port,id=rp1,chassis=1"],
        guest=True,
        setup_monitor=True,
    )
    sysfs_dev = vfio(tmp_path, "rp1", "0.0", dev_id="hot0", group=5)
    pairs = (kv.split("=", 1) for kv in sysfs_dev.split(",")[1:])
    props: dict[str, object] = {k: v for k, v in pairs}
    props["rombar"] = 0  # QEMU 10.0's device_add wants an integer here

    async def hotplug() -> None:
        async with contextlib.asynccontextmanager(setup_client)(vm.proc) as client:
            await client.execute("device_add", {"driver": "vfio-pci", **props})

    asyncio.run(hotplug())
    assert nothing_mapped(vm)  # 7.2 maps then unmaps; 10.0 never maps: both leave 0
    doc = report(vm, cmdline=False, scenario="hot-plugged vfio, no cmdline")
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
    dev = vfio(tmp_path, "pcie.0")
    vm = start(qemu_vm, tmp_path, built, ["-M", Q35], ["intel-iommu", dev])
    assert "caching-mode=on" in refused(vm)
