"""amd-iommu before QEMU 10.2: same-devfn devices on different buses share one space.

What QEMU does [src, qemu/qemu hw/i386/amd_iommu.c up to 10.1]: `amdvi_host_dma_iommu()`
files each per-requester address space in `s->address_spaces[pci_bus_num(bus)][devfn]`
and keeps that bus number (`AMDVIAddressSpace.bus_num`); `amdvi_do_translate()` (and
from 10.1 `amdvi_as_to_dte()`) builds the device ID for the device-table lookup from it.
`pci_bus_num()` of a bus behind a bridge reads the bridge's secondary-bus register
(hw/pci/pci.c), which stays 0 until firmware numbers the buses, and every cold-plugged
device asks for its space before that: every device at machine-done (hw/pci/pci.c
`pcibus_machine_done` -> `pci_init_bus_master`), vfio-pci already in its realize. So
every bus behind a bridge is filed as bus 0: devices with the same devfn there (00.0
behind every root port) and on the main root bus share ONE space, one VFIO container,
and the device-table entry of 00:<devfn>; the guest's entry for the device's real ID is
never read. A pxb's root bus has its own number (`bus_nr`) and its own spaces. 10.2
fixed it ("hw/i386/amd_iommu: Fix handling device on buses != 0", Oct 2025): spaces
keyed by (PCIBus pointer, devfn), the bus number read when translating. riscv-iommu has
the same pattern (not covered here).

How qmpguard knows, from QEMU's own state rather than its version [seen on 7.2, 10.0,
11.1; tests/integration/test_amd_shared_space.py]: the spaces are named
`amd_iommu_devfn_<devfn>` without a bus, and `info mtree -f` lists every one once. With
the host bridge at 00.0 and a device at 00.0 behind each of two root ports, 7.2 and 10.0
list one `amd_iommu_devfn_0`, 11.1 three. Per devfn, qmpguard counts the spaces listed
and compares them with the two keyings: one space per distinct (bus, devfn) requester
(fixed) or one per bus *number* at creation (affected). It concludes only where the
count matches the affected keying and not the fixed one; any hot-plugged (or possibly
hot-plugged) requester at that devfn makes the count inconclusive (its bus number
depends on when it was plugged), and so does a missing or unparsable `info mtree -f`.
The DMA log of the VFIO emulation is the truth: on 10.0 two vfio devices at 00.0 behind
two root ports are attached to one container; on 11.1 to two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpguard.analysis.binding import Requester
from qmpguard.analysis.model import BindingKind, Verdict
from qmpguard.analysis.mtree import AddressSpaceEntry, parse_mtree_f
from qmpguard.analysis.topology import Topology
from qmpguard.analysis.viommu import VIommu
from qmpguard.qemu_names import HMP_MTREE

if TYPE_CHECKING:  # vm.py imports the rules: no import back at run time
    from qmpguard.analysis.vm import VmAnalysis

AMD_KIND = "amd"
SPACE_NAME = re.compile(r"amd_iommu_devfn_(\d+)")
#: The IOAPIC's pseudo requester: amd-iommu creates its space in its own realize, on the
#: main root bus (AMDVI_IOAPIC_SB_DEVID, 00:14.0).
IOAPIC_DEVFN = 0xA0


@dataclass(frozen=True)
class Member:
    """One device behind the amd-iommu, as the rule needs it."""

    path: str
    label: str
    requester: Requester  # the (bus, devfn) QEMU should file its space under
    number_bus: str | None  # the bus whose NUMBER it was filed under; None: unknown
    vfio: bool  # a vfio device whose container is on its amd space
    bridge: bool = False  # forwards DMA, never initiates it: not named while others are


@dataclass(frozen=True)
class SharedSpace:
    """A vfio device filed with other requesters under one bus number: one space."""

    device: str
    label: str
    devfn: int
    others: tuple[str, ...]  # labels of the other devices in that space
    listed: int  # `amd_iommu_devfn_<devfn>` spaces in `info mtree -f`
    requesters: int  # distinct (bus, devfn) requesters qmpguard knows at that devfn


def count_spaces(entries: Iterable[AddressSpaceEntry]) -> dict[int, int]:
    """devfn -> how many amd-iommu spaces of that devfn `info mtree -f` lists."""
    counts: dict[int, int] = {}
    for e in entries:
        m = SPACE_NAME.fullmatch(e.name)
        if m:
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def number_bus(topo: Topology, requester: Requester, hotplugged: bool | None) -> str | None:
    """The root bus whose bus number a cold-plugged requester's space was filed under:
    its own bus if that is a root bus (pcie.0 is 0, a pxb's is its bus_nr), else the main
    root's (every bus behind a bridge reads 0 before firmware). None if it may have
    been plugged after the guest numbered the buses, or the main root is unknown."""
    if hotplugged is not False:
        return None
    if topo.buses[requester.bus].root:
        return requester.bus
    return topo.main_root


def ioapic(main_root: str) -> Member:
    """The IOAPIC's pseudo requester: a space of its own, made in amd-iommu's realize."""
    return Member("ioapic", "the IOAPIC", Requester(main_root, IOAPIC_DEVFN), main_root, False)


def shared_spaces(
    members: list[Member], listed: dict[int, int], main_root: str
) -> Iterator[SharedSpace]:
    """Pure: the vfio devices whose space is shared because of the bus-number keying,
    where the listed count confirms that keying for their devfn (module docstring)."""
    for devfn in sorted({m.requester.devfn for m in members}):
        at = [m for m in members if m.requester.devfn == devfn]
        if devfn == IOAPIC_DEVFN:
            at.append(ioapic(main_root))
        if _keyed_by_number(at, listed.get(devfn, 0)):
            yield from _groups(at, listed.get(devfn, 0))


def _keyed_by_number(at: list[Member], listed: int) -> bool:
    """The listed count matches the bus-number keying and not the per-bus one."""
    if any(m.number_bus is None for m in at):
        return False
    requesters = {m.requester.bus for m in at}
    keys = {m.number_bus for m in at}
    return listed == len(keys) < len(requesters)


def _groups(at: list[Member], listed: int) -> Iterator[SharedSpace]:
    requesters = len({m.requester.bus for m in at})
    for key in sorted({m.number_bus for m in at if m.number_bus}):
        group = [m for m in at if m.number_bus == key]
        if len({m.requester.bus for m in group}) < 2:
            continue  # one requester (aliasing behind a conventional bridge): QG004's
        for m in group:
            if m.vfio:
                others = [o for o in group if o is not m]
                named = [o for o in others if not o.bridge] or others
                yield SharedSpace(
                    m.path,
                    m.label,
                    m.requester.devfn,
                    tuple(o.label for o in named),
                    listed,
                    requesters,
                )


def members_of(vm: VmAnalysis, viommu: VIommu) -> list[Member]:
    """Every device with a space of this amd-iommu (bridges too: they have one)."""
    out = []
    for dev in vm.devices:
        b = dev.binding
        if b.kind is not BindingKind.VIOMMU or b.viommu != viommu or b.requester is None:
            continue
        out.append(
            Member(
                dev.device.path,
                dev.device.label,
                b.requester,
                number_bus(vm.topology, b.requester, dev.device.hotplugged),
                dev.device.vfio and dev.verdict is not Verdict.MISBOUND,
                dev.device.bridge,
            )
        )
    return out


def amd_shared_spaces(vm: VmAnalysis) -> Iterator[SharedSpace]:
    """The rule over one analysed VM: live snapshots only (it needs `info mtree -f`)."""
    amd = [v for v in vm.viommus if v.kind == AMD_KIND]
    if not amd or vm.snapshot is None or vm.topology.main_root is None:
        return
    entries = parse_mtree_f(
        vm.snapshot.get_or("", "human-monitor-command", **{"command-line": HMP_MTREE})
    )
    if entries is None:
        return
    listed = count_spaces(entries)
    for v in amd:
        yield from shared_spaces(members_of(vm, v), listed, vm.topology.main_root)
