"""Ground truth for amd-iommu and ARM's vIOMMUs: real QEMU + VFIO emulation + qmpguard.

Same method as test_vfio_ground_truth.py: the emulation's DMA log says what QEMU really
did with each VFIO container, QEMU's own refusals are asserted by their message, and
qmpguard's verdict must agree with both.

amd-iommu (x86 matrix): with `dma-remap=on` (10.1+) the tiny AMD-Vi guest
(qmpguard/demo/amd_guest.S) programs a device table and invalidates every entry, which
switches each device QEMU knows from pass-through to translation: a correctly ordered
container then maps nothing, a misordered one keeps all guest RAM. 10.0 has no
`dma-remap`: with the default `pt=on` every vfio device stays in pass-through, with
`pt=off` the correct order is refused; 7.2 refuses the correct order outright.

ARM `virt` (aarch64 matrix): a user-created `-device arm-smmuv3` (10.2+) refuses vfio-pci
in the right order and maps all RAM in the wrong one; the machine's own `iommu=smmuv3`
always comes first, so it always refuses; virtio-iommu-pci with boot-bypass=false shows
the difference under -S. No guest is needed on ARM.

Tests marked xfail(strict) are the analysis gaps measured here: each reason names what
qmpguard lacks, and the mark must come off once the analysis closes the gap.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from qmpguard.demo.fakevfio import build_amd_guest, build_emulation, mapped_bytes
from qmpguard.inspection import inspect_target
from qmpguard.qemu_names import HMP_MTREE
from qmpguard.targets import parse_target
from tests.conftest import QEMU_ARM_MATRIX, QEMU_MATRIX, VmFactory, requires_qemu
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
    qemu_version,
    refused,
    report,
    start,
    vfio,
)

pytestmark = [pytest.mark.integration, requires_qemu]

AMD = "amd-iommu,id=viommu"  # 10.0: pt=on by default; 11.1: no dma-remap, pass-through
AMD_REMAP = f"{AMD},dma-remap=on"
NIC = "e1000e,bus=pcie.0,addr=3.0"  # between the IOMMU's own 01.0 and vfio at 09.0
ROOT_PORT = "pcie-root-port,id=rp1,chassis=1"
SMMU_DEVICE = "arm-smmuv3,id=smmu0,primary-bus=pcie.0"
ARM_VIRTIO = "virtio-iommu-pci,id=viommu,boot-bypass=false"
NOTIFIER_REFUSAL = "requires iommu notifier which is not currently supported"
MAP_NOTIFIER_REFUSAL = "requires iommu MAP notifier which is not currently supported"
GUEST_MARKER = "AMDVI"
ORDERS = pytest.mark.parametrize("viommu_first", [True, False], ids=["viommu-first", "vfio-first"])
ARM = pytest.mark.parametrize("arm", list(QEMU_ARM_MATRIX), ids=lambda label: f"qemu-{label}")
# ARM tests start aarch64 VMs: the x86 matrix is pinned to its first build (test_check_live).
ON_ARM = pytest.mark.parametrize(
    "qemu_vm", [next(iter(QEMU_MATRIX))], indirect=True, ids=["aarch64"]
)


def arm_binary(arm: str, since: tuple[int, int] = (0, 0)) -> str:
    binary = QEMU_ARM_MATRIX[arm]
    if shutil.which(binary) is None and not Path(binary).exists():
        pytest.skip(f"{binary} not installed")
    if qemu_version(binary) < since:
        pytest.skip(f"needs QEMU {since[0]}.{since[1]}+ for aarch64")
    return binary


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("fakevfio-amd")
    return Built(build_emulation(cache), build_amd_guest(cache))


def start_amd(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, devices: list[str], guest: bool
) -> Vm:
    """q35 (TCG; kernel-irqchip=split is not needed for amd-iommu) with `devices`, and
    either the AMD-Vi guest or -S; not waiting (the correct order may be refused)."""
    return start(qemu_vm, tmp_path, built, memfd_machine("q35"), devices, guest=guest)


def running(vm: Vm, guest: bool = False) -> Vm:
    """QEMU greeted on QMP (every cold-plugged device realized); with the guest, also
    until it printed on its console that the queue drained."""
    greeted(vm)
    return console_shows(vm, GUEST_MARKER, "the AMD-Vi guest did not finish") if guest else vm


def mtree_text(vm: Vm) -> str:
    """`info mtree -f` as qmpguard collected it (no command of the test's own)."""
    live = asyncio.run(inspect_target(parse_target(str(vm.proc.qmp_path))))
    assert live.snapshot is not None
    text = live.snapshot.get_or("", "human-monitor-command", **{"command-line": HMP_MTREE})
    assert isinstance(text, str)
    return text


def finding(doc: dict[str, Any], code: str, dev_id: str = "hostdev0") -> dict[str, Any]:
    return next(
        f
        for f in doc["findings"]
        if f["code"] == code and f["device"] == f"/machine/peripheral/{dev_id}"
    )


def qemu_alive(vm: Vm) -> bool:
    """QEMU is still running (reading it must never abort it)."""
    return bool(vm.proc.popen is not None and vm.proc.popen.poll() is None)


def assert_verdict(doc: dict[str, Any], misbound: bool) -> None:
    """QG001 exactly for the misordered device; the correct one is not misbound."""
    dev = device(doc)
    assert dev["vfio"] and dev["expected"]["kind"] == "viommu", dev["expected"]
    if misbound:
        assert dev["verdict"] == "misbound", dev["order"]
        assert "QG001" in codes(doc, "hostdev0")
    else:
        assert dev["verdict"] == "ok", dev["order"]
        assert "QG001" not in codes(doc, "hostdev0")


def amd_spaces(text: str) -> list[int]:
    """devfns of amd-iommu's address spaces in printed order (`amd_iommu_devfn_<n>`)."""
    return [int(n) for n in re.findall(r' AS "amd_iommu_devfn_(\d+)"', text)]


def bus_master_order(text: str) -> list[str]:
    """Device names in the flat view of bus-master-disabled spaces, in creation order."""
    return re.findall(r' AS "([^"]+)", root: bus master container', text)


def order(viommu_first: bool, viommu: str, vfio_dev: str, *rest: str) -> list[str]:
    return [viommu, vfio_dev, *rest] if viommu_first else [vfio_dev, viommu, *rest]


# ------------------------------------------------------------- amd-iommu, x86


@ORDERS
def test_amd_dma_remap_guest_translating(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int], viommu_first: bool
) -> None:
    """11.1: correct order 0 bytes mapped once the guest translates, wrong order all RAM."""
    if x86 < (10, 1):
        pytest.skip("amd-iommu has dma-remap (vfio behind a translating amd-iommu) from 10.1")
    devices = order(viommu_first, AMD_REMAP, vfio(tmp_path, "pcie.0"), NIC)
    vm = running(start_amd(qemu_vm, tmp_path, built, devices, guest=True), guest=True)
    as_ordered = nothing_mapped(vm) if viommu_first else all_ram_mapped(vm, containers=1)
    assert as_ordered, mapped_bytes(vm.dma_log)
    assert accepted_silently(vm), vm.proc.stderr_text()
    doc = report(vm, scenario="amd-iommu dma-remap, guest translating")
    assert_verdict(doc, misbound=not viommu_first)
    # QMP alone: once translating, every amd space has its own flat view (creation order
    # lost). Whatever qmpguard concludes, it must never contradict the DMA log.
    bare = report(vm, cmdline=False, scenario="amd-iommu dma-remap, guest translating, no cmdline")
    assert device(bare)["verdict"] in ("ok" if viommu_first else "misbound", "unverified")


@ORDERS
def test_amd_dma_remap_paused_sequence(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int], viommu_first: bool
) -> None:
    """11.1 under -S: both map all RAM (pass-through); the space order tells them apart.

    The IOMMU's own spaces come first (IOAPIC, devfn 160, in its realize); vfio at 09.0
    (devfn 72) asks for its space in realize, so the correct order puts 72 right after 160
    and the wrong one puts it inside the machine-done batch, in devfn order. Samples:
    tests/data/11.1-samples/amd-dma-remap-*-paused.txt.
    """
    if x86 < (10, 1):
        pytest.skip("amd-iommu has dma-remap from 10.1")
    devices = order(viommu_first, AMD_REMAP, vfio(tmp_path, "pcie.0"), NIC)
    vm = running(start_amd(qemu_vm, tmp_path, built, devices, guest=False))
    # nothing translates before the guest
    assert all_ram_mapped(vm, containers=1), mapped_bytes(vm.dma_log)
    text = mtree_text(vm)
    batch = [0, 8, 24, 248, 250, 251]  # mch, AMDVI-PCI, e1000e, LPC, AHCI, SMBus
    assert amd_spaces(text) == (
        [160, 72, *batch] if viommu_first else [160, 0, 8, 24, 72, *batch[3:]]
    )
    seen = [n for n in bus_master_order(text) if n in ("AMDVI-PCI", "vfio-pci")]
    assert seen == (["AMDVI-PCI", "vfio-pci"] if viommu_first else ["vfio-pci", "AMDVI-PCI"])
    assert_verdict(report(vm, scenario="amd-iommu dma-remap, -S"), misbound=not viommu_first)


@ORDERS
def test_amd_dma_remap_paused_verdict_without_cmdline(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int], viommu_first: bool
) -> None:
    if x86 < (10, 1):
        pytest.skip("amd-iommu has dma-remap from 10.1")
    devices = order(viommu_first, AMD_REMAP, vfio(tmp_path, "pcie.0"), NIC)
    vm = running(start_amd(qemu_vm, tmp_path, built, devices, guest=False))
    bare = report(vm, cmdline=False, scenario="amd-iommu dma-remap, -S, no cmdline")
    assert_verdict(bare, misbound=not viommu_first)


@ORDERS
def test_amd_passthrough_keeps_all_ram(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int], viommu_first: bool
) -> None:
    """10.0 (pt=on, its default) and 10.1+ without dma-remap: whatever the guest does,
    both orders keep all guest RAM mapped. Only the misordered one is misbound."""
    if x86 < (10, 0):
        pytest.skip("QEMU 7.2 refuses the correct order (test_amd_notifier_refusal)")
    devices = order(viommu_first, AMD, vfio(tmp_path, "pcie.0"), NIC)
    vm = running(start_amd(qemu_vm, tmp_path, built, devices, guest=True), guest=True)
    assert all_ram_mapped(vm, containers=1), mapped_bytes(vm.dma_log)
    assert accepted_silently(vm), vm.proc.stderr_text()
    doc = report(vm, scenario="amd-iommu pass-through, guest running")
    assert_verdict(doc, misbound=not viommu_first)


def test_amd_passthrough_is_reported(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    if x86 < (10, 0):
        pytest.skip("QEMU 7.2 refuses the correct order (test_amd_notifier_refusal)")
    devices = [AMD, vfio(tmp_path, "pcie.0"), NIC]
    vm = running(start_amd(qemu_vm, tmp_path, built, devices, guest=True), guest=True)
    assert all_ram_mapped(vm, containers=1)
    assert codes(report(vm), "hostdev0") != []


@ORDERS
def test_amd_notifier_refusal(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int], viommu_first: bool
) -> None:
    """7.2 (any amd-iommu) and 10.0 with pt=off: QEMU refuses the correct order; the
    wrong one boots and keeps all guest RAM mapped after the guest programs the IOMMU."""
    if x86 >= (10, 1):
        pytest.skip("10.1+ has no amd-iommu pt property; dma-remap=on accepts vfio")
    viommu = AMD if x86 < (10, 0) else f"{AMD},pt=off"
    devices = order(viommu_first, viommu, vfio(tmp_path, "pcie.0"), NIC)
    vm = start_amd(qemu_vm, tmp_path, built, devices, guest=True)
    if viommu_first:
        err = refused(vm)
        assert NOTIFIER_REFUSAL in err and "Region amd_iommu: device 00.09.0" in err, err
        return
    running(vm, guest=True)
    assert all_ram_mapped(vm, containers=1), mapped_bytes(vm.dma_log)
    assert accepted_silently(vm), vm.proc.stderr_text()
    assert_verdict(report(vm, scenario="amd-iommu, correct order refused"), misbound=True)


def test_amd_refused_order_implies_misbound_without_cmdline(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    if x86 >= (10, 1):
        pytest.skip("10.1+ accepts both orders")
    viommu = AMD if x86 < (10, 0) else f"{AMD},pt=off"
    vm = running(
        start_amd(qemu_vm, tmp_path, built, [vfio(tmp_path, "pcie.0"), viommu, NIC], False)
    )
    assert all_ram_mapped(vm, containers=1)
    assert_verdict(report(vm, cmdline=False), misbound=True)


# ------------------------------------------------------------- ARM virt, aarch64


def order_arm(viommu_first: bool, viommu: str, vfio_dev: str) -> list[str]:
    """The vIOMMU before or after the root port holding the vfio device."""
    return [viommu, ROOT_PORT, vfio_dev] if viommu_first else [ROOT_PORT, vfio_dev, viommu]


def start_arm(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, binary: str, machine: str, devices: list[str]
) -> Vm:
    """ARM `machine` under -S (no guest is needed on ARM); not waiting."""
    return start(qemu_vm, tmp_path, built, ["-M", machine], devices, binary=binary)


@ON_ARM
@ARM
@ORDERS
def test_arm_smmuv3_device_order(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, arm: str, viommu_first: bool
) -> None:
    """-device arm-smmuv3 (10.2+): the right order is refused, the wrong one maps all RAM."""
    binary = arm_binary(arm, since=(10, 2))
    devices = order_arm(viommu_first, SMMU_DEVICE, vfio(tmp_path, "rp1", addr=None))
    vm = start_arm(qemu_vm, tmp_path, built, binary, "virt", devices)
    if viommu_first:
        err = refused(vm)
        assert MAP_NOTIFIER_REFUSAL in err and "Region smmuv3-iommu-memory-region-" in err, err
        return
    running(vm)
    assert all_ram_mapped(vm, containers=1), mapped_bytes(vm.dma_log)
    assert accepted_silently(vm), vm.proc.stderr_text()
    doc = report(vm, scenario="arm-smmuv3 device, -S")
    assert [v["type"] for v in doc["viommus"]] == ["arm-smmuv3"]
    assert device(doc)["expected"]["viommu"] == "/machine/peripheral/smmu0"
    assert_verdict(doc, misbound=True)


@ON_ARM
@ARM
def test_arm_smmuv3_fix_is_not_reorder(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, arm: str
) -> None:
    """Reordering makes QEMU refuse to start: QG001 must name what works instead."""
    binary = arm_binary(arm, since=(10, 2))
    devices = order_arm(False, SMMU_DEVICE, vfio(tmp_path, "rp1", addr=None))
    vm = running(start_arm(qemu_vm, tmp_path, built, binary, "virt", devices))
    message = finding(report(vm), "QG001")["message"]
    fix = message.split("Fix:", 1)[-1]
    assert "before" not in fix, message  # "put the -device arm-smmuv3 option before ..."
    assert "virtio-iommu" in fix and "refuse" in fix, message


@ON_ARM
@ARM
def test_arm_smmuv3_misorder_without_cmdline(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, arm: str
) -> None:
    """QEMU refuses vfio-pci behind an emulated SMMUv3 in the right order, so a running
    one is misbound: QMP alone must not call it ok."""
    binary = arm_binary(arm, since=(10, 2))
    devices = order_arm(False, SMMU_DEVICE, vfio(tmp_path, "rp1", addr=None))
    vm = running(start_arm(qemu_vm, tmp_path, built, binary, "virt", devices))
    bare = report(vm, cmdline=False, scenario="arm-smmuv3 device, -S, no cmdline")
    assert_verdict(bare, misbound=True)


@ON_ARM
@ARM
def test_arm_machine_smmuv3_refuses_vfio(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, arm: str
) -> None:
    """virt,iommu=smmuv3 exists before every device: vfio-pci behind it never starts."""
    binary = arm_binary(arm)
    devices = [ROOT_PORT, vfio(tmp_path, "rp1", addr=None)]
    err = refused(start_arm(qemu_vm, tmp_path, built, binary, "virt,iommu=smmuv3", devices))
    assert MAP_NOTIFIER_REFUSAL in err and "Region smmuv3-iommu-memory-region-" in err, err


@ON_ARM
@ARM
@ORDERS
def test_arm_virtio_iommu_order(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, arm: str, viommu_first: bool
) -> None:
    """virtio-iommu-pci on virt with boot-bypass=false: the difference shows under -S."""
    binary = arm_binary(arm)
    devices = order_arm(viommu_first, ARM_VIRTIO, vfio(tmp_path, "rp1", addr=None))
    vm = running(start_arm(qemu_vm, tmp_path, built, binary, "virt", devices))
    as_ordered = nothing_mapped(vm) if viommu_first else all_ram_mapped(vm, containers=1)
    assert as_ordered, mapped_bytes(vm.dma_log)
    assert accepted_silently(vm), vm.proc.stderr_text()


@ON_ARM
@ARM
@ORDERS
def test_arm_virtio_iommu_verdict(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, arm: str, viommu_first: bool
) -> None:
    binary = arm_binary(arm)
    devices = order_arm(viommu_first, ARM_VIRTIO, vfio(tmp_path, "rp1", addr=None))
    vm = running(start_arm(qemu_vm, tmp_path, built, binary, "virt", devices))
    doc = report(vm, scenario="virtio-iommu-pci on ARM virt, -S")
    assert qemu_alive(vm), vm.proc.stderr_text()  # reading must never abort the VM
    assert_verdict(doc, misbound=not viommu_first)
    bare = report(vm, cmdline=False, scenario="virtio-iommu-pci on ARM virt, -S, no cmdline")
    # Without the command line: the vfio device (00.0 behind its root port) and the host
    # bridge (00.0 on pcie.0) have spaces of the same name, so the sequence cannot decide;
    # qmpguard must say so rather than guess.
    dev = device(bare)
    assert dev["verdict"] == "unverified", dev["order"]
    assert "ambiguous" in dev["order"]["evidence"][-1]["detail"]
    assert qemu_alive(vm)
