"""QG006 against the truth: amd-iommu before 10.2 gives same-devfn devices on different
buses one address space (qmpguard/analysis/amd_shared_space.py has the QEMU sources).

Scenario: q35, amd-iommu first, two PCIe root ports, a device at 00.0 behind each (the
host bridge is at 00.0 on pcie.0 too). Truth for vfio devices is the VFIO emulation's log:
QEMU puts the groups of vfio devices that share one DMA address space into one container
(hw/vfio: one container per address space), so the log's `attach g=… c=…` lines say
whether the two devices share a space. QEMU's own listing (`info mtree -f`, one line per
address space) is asserted beside it.

- 7.2: amd-iommu refuses every correctly ordered vfio device (test_amd_notifier_refusal
  in test_vfio_ground_truth_amd_arm.py), so no vfio device can share its space; QEMU
  still lists a single `amd_iommu_devfn_0` for three requesters (emulated devices).
- 10.0 (pt=on, its default; pt=off refuses the correct order): both vfio groups in ONE
  container, one `amd_iommu_devfn_0`: QG006 on both devices.
- 11.1 (dma-remap=on, with the AMD-Vi guest translating): two containers, three
  `amd_iommu_devfn_0`, no QG006.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    attached_groups,
    build_amd_guest,
    build_emulation,
    create_sysfs_device,
    emulation_env,
    mapped_bytes_by_group,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import inspect_target
from qmpguard.qemu_names import HMP_MTREE
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import VmFactory, record_evidence, requires_qemu

pytestmark = [pytest.mark.integration, requires_qemu]

RAM_MIB = 64
ROOT_PORTS = [
    "pcie-root-port,id=rp1,chassis=1,addr=4.0",
    "pcie-root-port,id=rp2,chassis=2,addr=5.0",
]
NICS = ["e1000e,id=nic1,bus=rp1", "e1000e,id=nic2,bus=rp2"]
NOTIFIER_REFUSAL = "requires iommu notifier which is not currently supported"
GROUPS = (11, 12)  # the emulation's IOMMU groups of hostdev1 and hostdev2
GUEST_MARKER = "AMDVI"


@dataclass
class Built:
    so: Path
    guest: Path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("fakevfio-amd-shared")
    return Built(build_emulation(cache), build_amd_guest(cache))


@dataclass
class Vm:
    proc: QemuProcess
    dma_log: Path
    console: Path


def amd(version: tuple[int, int]) -> str:
    """The amd-iommu that accepts a correctly ordered vfio device on this QEMU: 10.0's
    default pt=on; dma-remap=on from 10.1 (translated once the guest programs it)."""
    return "amd-iommu,id=viommu" + (",dma-remap=on" if version >= (10, 1) else "")


def vfio(tmp_path: Path, n: int, bus: str) -> str:
    spec = VfioDeviceSpec(f"0000:0{n}:00.0", GROUPS[n - 1])
    sysfs = create_sysfs_device(tmp_path / f"sys{n}", spec)
    return f"vfio-pci,id=hostdev{n},sysfsdev={sysfs},bus={bus},rombar=0"


def start(qemu_vm: VmFactory, tmp_path: Path, built: Built, devices: list[str], guest: bool) -> Vm:
    """q35 (TCG) with memfd RAM, then one -device per entry; the AMD-Vi guest or -S."""
    dma_log, console = tmp_path / "vm.dma.log", tmp_path / "vm.debugcon.txt"
    args = ["-M", "q35", "-m", str(RAM_MIB)]
    args += ["-object", f"memory-backend-memfd,id=mem,size={RAM_MIB}M"]
    args += ["-machine", "memory-backend=mem"]
    args += ["-kernel", str(built.guest), "-debugcon", f"file:{console}"] if guest else ["-S"]
    for dev in devices:
        args += ["-device", dev]
    proc = qemu_vm(*args, env=emulation_env(built.so, dma_log), name="vm")
    return Vm(proc, dma_log, console)


async def _greeted(proc: QemuProcess) -> None:
    client = QMPClient("ready")
    await client.connect(str(proc.qmp_path))
    await client.execute("query-status")
    await client.disconnect()


def running(vm: Vm, guest: bool, timeout: float = 30) -> Vm:
    """Greeted on QMP; with the guest, also until it printed that its queue drained."""
    asyncio.run(_greeted(vm.proc))
    deadline = time.monotonic() + timeout
    while guest and not (vm.console.exists() and GUEST_MARKER in vm.console.read_text()):
        assert vm.proc.popen is not None and vm.proc.popen.poll() is None, vm.proc.stderr_text()
        assert time.monotonic() < deadline, "the AMD-Vi guest did not finish"
        time.sleep(0.02)  # bounded poll on a condition, not a fixed wait
    return vm


def inspect(vm: Vm, scenario: str) -> tuple[dict[str, Any], str]:
    """qmpguard's report and the `info mtree -f` it read (no command of the test's own)."""
    live = asyncio.run(inspect_target(parse_target(str(vm.proc.qmp_path))))
    assert live.ok and live.snapshot is not None, live.error and live.error.message
    text = live.snapshot.get_or("", "human-monitor-command", **{"command-line": HMP_MTREE})
    assert isinstance(text, str)
    doc = target_json(live)
    record_evidence(doc, scenario)
    return doc, text


def amd_spaces(text: str, devfn: int) -> int:
    """How many address spaces QEMU lists as amd_iommu_devfn_<devfn>."""
    return len(re.findall(rf' AS "amd_iommu_devfn_{devfn}", ', text))


def qg006(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """QG006 findings by device id."""
    return {f["device"].rsplit("/", 1)[-1]: f for f in doc["findings"] if f["code"] == "QG006"}


def test_two_vfio_devices_same_devfn_behind_two_root_ports(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    """The DMA log decides whether the two vfio devices share a space; QG006 must say
    so exactly when they do."""
    devices = [amd(x86), *ROOT_PORTS, vfio(tmp_path, 1, "rp1"), vfio(tmp_path, 2, "rp2")]
    guest = x86 >= (10, 1)  # 10.0 keeps vfio in pass-through whatever the guest does
    vm = start(qemu_vm, tmp_path, built, devices, guest)
    if x86 < (10, 0):
        assert vm.proc.popen is not None
        assert vm.proc.popen.wait(timeout=60) != 0
        assert NOTIFIER_REFUSAL in vm.proc.stderr_text(), vm.proc.stderr_text()
        return
    running(vm, guest)
    containers = attached_groups(vm.dma_log)
    assert set(containers) == set(GROUPS), containers
    shared = containers[GROUPS[0]] == containers[GROUPS[1]]
    doc, mtree = inspect(vm, "amd-iommu, vfio at 00.0 behind two root ports")
    found = qg006(doc)
    if x86 < (10, 2):
        assert shared, containers  # truth: one container for both
        assert amd_spaces(mtree, 0) == 1  # host bridge, hostdev1, hostdev2: one space
        assert set(found) == {"hostdev1", "hostdev2"}, doc["findings"]
        assert "hostdev2" in found["hostdev1"]["message"]
        assert "hostdev1" in found["hostdev2"]["message"]
        assert found["hostdev1"]["severity"] == "warning"
    else:
        assert not shared, containers  # truth: a container each
        assert mapped_bytes_by_group(vm.dma_log) == {g: 0 for g in GROUPS}  # translated
        assert amd_spaces(mtree, 0) == 3
        assert found == {}, found


def test_vfio_and_nic_same_devfn(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    """One vfio device and an emulated NIC at 00.0 behind two root ports: the finding
    names the NIC (and the host bridge at 00.0) on affected QEMUs, nothing on 11.1."""
    if x86 < (10, 0):
        pytest.skip("7.2 refuses vfio behind amd-iommu in the correct order")
    devices = [amd(x86), *ROOT_PORTS, vfio(tmp_path, 1, "rp1"), NICS[1]]
    vm = running(start(qemu_vm, tmp_path, built, devices, guest=False), guest=False)
    assert set(attached_groups(vm.dma_log)) == {GROUPS[0]}
    doc, mtree = inspect(vm, "amd-iommu, vfio and e1000e at 00.0 behind two root ports")
    found = qg006(doc)
    if x86 < (10, 2):
        assert amd_spaces(mtree, 0) == 1
        assert set(found) == {"hostdev1"}, doc["findings"]
        assert "nic2" in found["hostdev1"]["message"]
    else:
        assert amd_spaces(mtree, 0) == 3
        assert found == {}, found


def test_emulated_devices_share_one_listed_space(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    """QEMU's own listing on every version, without vfio (so no QG006: the finding is
    about assigned devices): 7.2 and 10.0 list one amd_iommu_devfn_0 for the host
    bridge and the two NICs, 11.1 three."""
    devices = ["amd-iommu,id=viommu", *ROOT_PORTS, *NICS]
    vm = running(start(qemu_vm, tmp_path, built, devices, guest=False), guest=False)
    doc, mtree = inspect(vm, "amd-iommu, two NICs at 00.0 behind two root ports")
    assert amd_spaces(mtree, 0) == (1 if x86 < (10, 2) else 3)
    assert qg006(doc) == {}


def test_vfio_alone_on_its_devfn_is_not_reported(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    """A vfio device on pcie.0 at a devfn nobody else has keeps its own space on every
    version: no QG006 (the rule must not fire on amd-iommu alone)."""
    if x86 < (10, 0):
        pytest.skip("7.2 refuses vfio behind amd-iommu in the correct order")
    devices = [amd(x86), *ROOT_PORTS, vfio(tmp_path, 1, "pcie.0") + ",addr=9.0", NICS[0]]
    vm = running(start(qemu_vm, tmp_path, built, devices, guest=False), guest=False)
    doc, mtree = inspect(vm, "amd-iommu, vfio on pcie.0, NIC behind a root port")
    assert amd_spaces(mtree, 72) == 1
    assert qg006(doc) == {}


MIXED_TOPOLOGY = [
    "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=6.0",
    "e1000,id=c1,bus=ppb,addr=1.0",
    "e1000,id=c2,bus=ppb,addr=2.0",
    "pcie-root-port,id=rp3,chassis=3,addr=7.0",
    "x3130-upstream,id=up,bus=rp3",
    "xio3130-downstream,id=dn1,bus=up,chassis=4,slot=1,addr=0.0",
    "xio3130-downstream,id=dn2,bus=up,chassis=5,slot=2,addr=1.0",
    "e1000e,id=n1,bus=dn1",
    "pxb-pcie,id=pxb,bus_nr=32,bus=pcie.0,addr=8.0",
    "pcie-root-port,id=rp9,chassis=9,bus=pxb",
    "e1000e,id=n9,bus=rp9",
]


def test_switch_bridge_and_expander(
    qemu_vm: VmFactory, tmp_path: Path, built: Built, x86: tuple[int, int]
) -> None:
    """vfio behind a root port and behind a switch's downstream port, with a
    pcie-pci-bridge, a pxb-pcie (a root bus with a number of its own) and NICs at 00.0:
    on 10.0 both vfio groups share one container and QEMU lists two devfn-0 spaces (bus
    0 and the pxb's 32) for nine requesters; on 11.1 a container and a space each."""
    if x86 < (10, 0):
        pytest.skip("7.2 refuses vfio behind amd-iommu in the correct order")
    devices = [amd(x86), ROOT_PORTS[0], vfio(tmp_path, 1, "rp1"), *MIXED_TOPOLOGY]
    devices.append(vfio(tmp_path, 2, "dn2"))
    vm = running(start(qemu_vm, tmp_path, built, devices, guest=False), guest=False)
    containers = attached_groups(vm.dma_log)
    doc, mtree = inspect(vm, "amd-iommu, vfio behind a root port and a switch port")
    found = qg006(doc)
    if x86 < (10, 2):
        assert containers[GROUPS[0]] == containers[GROUPS[1]], containers
        assert amd_spaces(mtree, 0) == 2
        assert set(found) == {"hostdev1", "hostdev2"}, doc["findings"]
        named = found["hostdev2"]["message"].split(":", 1)[0]
        assert all(n in named for n in ("hostdev1", "n1", "c1", "n9")), named
        assert "dn1" not in named and "up," not in named  # bridges are not named
    else:
        assert containers[GROUPS[0]] != containers[GROUPS[1]], containers
        assert amd_spaces(mtree, 0) == 9
        assert found == {}, found
