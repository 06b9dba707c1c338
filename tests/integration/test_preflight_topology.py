"""Preflight's model of QEMU's device placement against real QEMU 7.2, 10.0 and 11.1
(x86) and 7.2 and 11.1 (aarch64): for every device of each command line below, the bus
(as the chain of bus names from the root), the devfn, where its DMA goes and the verdict
preflight computes from the command line equal what `check` reads from the running VM.

The lines are the cases that decide placement: automatic bus names per bus type (pc's
root bus takes pci.0 itself), a name two buses carry (QEMU's depth-first search, newest
first; a newer expander's host searched before the machine's), expanders with and
without bypass, default-bus-bypass-iommu (ignored by i440fx), defaults and -nic/-vga,
implicit -drive if=virtio devices, amd-iommu's PCI function, ARM virt's SMMUv3. The
command line preflight reads is the process's own /proc/PID/cmdline.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.analysis.preflight import preflight
from qmpguard.analysis.vm import VmAnalysis
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import inspect_target
from qmpguard.targets import parse_target
from tests.conftest import AUDIT, QEMU_ARM_MATRIX, VmFactory, audit_qmp_trace, requires_qemu

pytestmark = [pytest.mark.integration, requires_qemu]

X86_LINES = {
    "automatic bus names": "-M q35 -device pcie-root-port,chassis=1 -device pcie-pci-bridge "
    "-device pci-bridge,chassis_nr=3 -device i82801b11-bridge -device x3130-upstream,bus=pcie.0 "
    "-device e1000,bus=pci.1,addr=1 -device e1000e,bus=pcie.1",
    "a name two buses carry": "-M q35 -device pcie-pci-bridge "
    "-device pci-bridge,id=pci.0,chassis_nr=7,bus=pcie.0 -device e1000,id=n,bus=pci.0,addr=3",
    "newer expander searched first": "-M q35 -device intel-iommu "
    "-device pxb-pcie,id=px,bus_nr=32,bus=pcie.0,bypass_iommu=on "
    "-device pcie-root-port,bus=px,chassis=1 -device e1000e,id=behind,bus=pcie.0 "
    "-device pcie-root-port,id=rp2,bus=px,chassis=2 -device e1000e,id=root,bus=rp2",
    "i440fx and conventional expanders": "-M pc,default-bus-bypass-iommu=on "
    "-device pxb,bus_nr=32 -device pxb,bus_nr=64,id=px2,bus=pci.0,bypass_iommu=on "
    "-device pci-bridge,chassis_nr=3,bus=px2,addr=3 -device pci-testdev,bus=pci.0 "
    "-device pci-bridge,chassis_nr=4,bus=pci.0 -device e1000,bus=pci.1,addr=4 "
    "-device e1000,bus=pci.3,addr=2 -device virtio-iommu-pci,bus=pci.0 "
    '-device \'{"driver":"e1000","bus":"pci.2","id":"j1","addr":"5"}\' '
    "-device e1000,bus=px2,id=k1,addr=6",
    "q35 bypass and amd-iommu": "-M q35,default-bus-bypass-iommu=on "
    "-device pxb-pcie,bus_nr=32,bus=pcie.0 -device pcie-root-port,bus=pxb-pcie-bus.0,chassis=3 "
    "-device e1000e,bus=pcie.0 -device amd-iommu -device e1000,bus=pcie.0 -vga std "
    "-nic user,model=rtl8139",
    "implicit virtio drives": "-M q35 -device pcie-root-port,id=rp,chassis=1 "
    "-drive if=virtio,driver=null-co,read-zeroes=on -device e1000e,bus=pcie.0 "
    '-device \'{"driver":"e1000e","bus":"pcie.0"}\' '
    "-drive if=virtio,driver=null-co,read-zeroes=on",
    "virtio-iommu alias and virtio platform": "-M q35 -device virtio-iommu,bus=pcie.0,addr=3 "
    "-device virtio-net-pci,id=plain "
    "-device virtio-net-pci,id=platform,iommu_platform=on,disable-legacy=on",
}
ARM_LINES = {
    "virt with its SMMUv3": "-M virt,iommu=smmuv3 -device pcie-root-port,chassis=1,id=rp "
    "-device pci-testdev,bus=rp -device virtio-net-pci,bus=pcie.0",
    "virt with an expander": "-M virt -device pxb-pcie,id=px,bus_nr=64,bus=pcie.0 "
    "-device pcie-root-port,chassis=1,id=rp,bus=px -device pci-testdev,bus=rp",
}


def _chain(vm: VmAnalysis, bus: str | None) -> str:
    names = []
    while bus is not None:
        b = vm.topology.buses[bus]
        names.append(b.path.rsplit("/", 1)[-1])
        bus = vm.topology.devices[b.parent_device].bus if b.parent_device else None
    return "/".join(reversed(names))


def rows(vm: VmAnalysis) -> dict[str, tuple[Any, ...]]:
    """Every device by a name both sides share: its id or anonymous path, else its type
    and place (machine-made devices have QOM paths preflight cannot know)."""
    out = {}
    for d in vm.devices:
        dev = d.device
        where = _chain(vm, dev.bus)
        key = dev.path if dev.path.startswith("/machine/peripheral") else f"{dev.type}@{where}"
        if not dev.path.startswith("/machine/peripheral"):
            key += f":{dev.devfn_text}"
        req = d.binding.requester
        out[key] = (
            dev.type,
            where,
            dev.devfn_text,
            str(d.binding.kind),
            req.devfn_text if req else None,
            d.binding.viommu.type if d.binding.viommu else None,
            str(d.verdict),
            dev.iommu_platform,
        )
    return out


async def _ready(path: Path) -> None:
    client = QMPClient("ready")
    await client.connect(str(path))
    await client.execute("query-status")
    await client.disconnect()


def compare(vm: QemuProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    asyncio.run(_ready(vm.qmp_path))
    result = asyncio.run(inspect_target(parse_target(str(vm.qmp_path))))
    assert result.analysis is not None, result.error
    argv = Path(f"/proc/{vm.pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    pre = preflight(argv).analysis()
    return rows(result.analysis), rows(pre)


@pytest.mark.parametrize("case", list(X86_LINES))
def test_preflight_places_devices_as_qemu_does(qemu_vm: VmFactory, case: str) -> None:
    live, pre = compare(qemu_vm("-S", *shlex.split(X86_LINES[case])))
    assert pre == live


@pytest.mark.parametrize("label", list(QEMU_ARM_MATRIX), ids=lambda lb: f"qemu-{lb}")
@pytest.mark.parametrize("case", list(ARM_LINES))
def test_preflight_places_devices_as_qemu_does_on_arm(
    label: str, case: str, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.log"
    vm = QemuProcess(
        args=["-S", *shlex.split(ARM_LINES[case]), "-trace", f"handle_qmp_command,file={trace}"],
        qmp_path=tmp_path / "vm.qmp",
        binary=QEMU_ARM_MATRIX[label],
        stderr_path=tmp_path / "stderr",
    )
    try:
        vm.start()
        live, pre = compare(vm)
    finally:
        vm.stop()
        AUDIT["vms"] += 1
        assert not audit_qmp_trace(trace)
    assert pre == live
