"""Findings: small rules over one analysed VM, each with a stable code and evidence."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpguard.analysis.amd_shared_space import AMD_KIND, amd_shared_spaces
from qmpguard.analysis.model import BindingKind, MemoryReason, Severity, Verdict
from qmpguard.analysis.topology import format_devfn
from qmpguard.analysis.viommu import spaces_rendering_ram
from qmpguard.analysis.viommu_models import (
    AMD_IOAPIC_DEVFN,
    ioapic_space_maps_nothing,
    model,
    parse_release,
)
from qmpguard.qemu_names import HMP_MTREE

if TYPE_CHECKING:
    from qmpguard.analysis.binding import Requester
    from qmpguard.analysis.viommu import VIommu
    from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis


@dataclass(frozen=True)
class Finding:
    """One problem, on one device (or the whole target), with its evidence."""

    code: str
    severity: Severity
    device: str | None
    message: str
    evidence: tuple[str, ...]


Rule = Callable[["VmAnalysis"], Iterator[Finding]]


def _evidence_lines(dev: DeviceAnalysis) -> tuple[str, ...]:
    order = dev.order
    return tuple(
        f"{e.source}: {e.conclusion or 'inconclusive'}: {e.detail}" for e in order.evidence
    )


def qg001_misbound(vm: VmAnalysis) -> Iterator[Finding]:
    """vfio device realized before the vIOMMU that translates its bus."""
    for dev in vm.devices:
        if dev.verdict is not Verdict.MISBOUND:
            continue
        v = dev.binding.viommu
        assert v is not None
        yield Finding(
            "QG001",
            Severity.CRITICAL,
            dev.device.path,
            f"{dev.device.label} ({dev.device.type}) was realized before vIOMMU {v.label} "
            f"({v.type}): its VFIO container is attached to plain guest memory, so the device "
            f"can DMA to all guest RAM, bypassing the guest's IOMMU. Fix: {_fix(dev, vm)}",
            _evidence_lines(dev),
        )


def _fix(dev: DeviceAnalysis, vm: VmAnalysis | None = None) -> str:
    """What makes the binding right, for this vIOMMU model (docs/design.md, "Fixes"):
    from the VM's own command line when the snapshot has it (qmpguard/fix.py)."""
    v = dev.binding.viommu
    assert v is not None
    m = model(v.kind)
    if not m.reorder_fixes:
        return m.alternative + "."
    if v.refuses_vfio_after is not None and m.when_refused:
        return m.when_refused + "."
    if v.passthrough is not None:  # reordering alone would leave it in pass-through
        return _reorder_text(dev, vm) + f" Also: {v.passthrough}; set dma-remap=on (10.1+)."
    return _reorder_text(dev, vm)


def _reorder_text(dev: DeviceAnalysis, vm: VmAnalysis | None) -> str:
    """The reordering fix: concrete from the VM's own command line when there is one."""
    v = dev.binding.viommu
    assert v is not None
    if vm is not None:
        from qmpguard.fix import fix_for  # imports the analysis: not at module level

        try:
            concrete = fix_for(vm, dev)
        except (RecursionError, ValueError, KeyError, LookupError):
            # A fix is advice: a command line it cannot rewrite must never cost the
            # verdict (seen: a bus graph the rewriter looped on). The general text stays.
            concrete = None
        if concrete is not None:
            return concrete.text
    return (
        f"create {v.label} ({v.type}) before {dev.device.label}: put its -device option "
        f"before the vfio device's on the QEMU command line (a vIOMMU given through "
        f"libvirt's <qemu:commandline> or Proxmox VE's args: lands after every assigned "
        f"device; use <iommu model=...> or machine: ...,viommu=... instead), then restart "
        f"the VM."
    )


def qg002_unverified(vm: VmAnalysis) -> Iterator[Finding]:
    """vfio device behind a vIOMMU whose order could not be established."""
    for dev in vm.devices:
        if dev.verdict is not Verdict.UNVERIFIED:
            continue
        v = dev.binding.viommu
        assert v is not None
        why = "the evidence conflicts" if dev.order.conflicting else "no source could establish it"
        yield Finding(
            "QG002",
            Severity.WARNING,
            dev.device.path,
            f"cannot tell whether {dev.device.label} was realized before or after vIOMMU "
            f"{v.label}: {why}; if before, its DMA bypasses the guest's IOMMU",
            _evidence_lines(dev) or ("no evidence source applies",),
        )


def qg003_bypass(vm: VmAnalysis) -> Iterator[Finding]:
    """vfio device whose DMA the vIOMMU never translates: a bypass bus, or a vIOMMU that
    keeps vfio devices in pass-through."""
    if not vm.viommus:
        return
    listing = spaces_rendering_ram(
        vm.snapshot.get_or("", "human-monitor-command", **{"command-line": HMP_MTREE})
        if vm.snapshot is not None
        else ""
    )
    for dev in vm.devices:
        if not dev.device.vfio or dev.verdict is Verdict.MISBOUND:
            continue  # QG001 already says more
        v = dev.binding.viommu
        if dev.binding.memory_reason is MemoryReason.BYPASS:
            where, why = "sits on a bus that bypasses the vIOMMU", dev.binding.reason
        elif v is not None and v.passthrough is not None and not _maps_nothing(vm, dev, listing):
            where, why = f"is kept in pass-through by {v.label}", v.passthrough
        else:
            continue
        yield Finding(
            "QG003",
            Severity.WARNING,
            dev.device.path,
            f"{dev.device.label} {where}: the guest cannot isolate its DMA "
            "(all guest RAM stays mapped for it)",
            (why,),
        )


def _maps_nothing(vm: VmAnalysis, dev: DeviceAnalysis, listing: dict[str, frozenset[bool]]) -> bool:
    """A device behind a pass-through amd-iommu whose space maps no guest memory at all
    (its DMA reaches nothing, so nothing is exposed): QEMU's own `info mtree -f` first,
    where every space of the device's name agrees; else the version table, for the
    IOAPIC's space (viommu_models.ioapic_space_maps_nothing; docs/design.md, amd-iommu)."""
    v, req = dev.binding.viommu, dev.binding.requester
    if v is None or req is None or v.kind != AMD_KIND:
        return False
    seen = listing.get(f"amd_iommu_devfn_{req.devfn}")
    if seen is not None and len(seen) == 1:
        return not next(iter(seen))
    if not _in_ioapic_space(vm, dev):
        return False
    return ioapic_space_maps_nothing(v.type, parse_release(vm.qemu_version)) is not None


def _in_ioapic_space(vm: VmAnalysis, dev: DeviceAnalysis) -> bool:
    """Translated as the IOAPIC's requester, devfn 160 on the main root bus (a device
    behind a conventional bridge at 00:14.0 too): amd-iommu hands it the IOAPIC's space.
    Other requesters at devfn 160 sit on other bus numbers (PCIe ports have slot 0 only;
    a pxb's root bus has its own number), so never in it."""
    req = dev.binding.requester
    return req is not None and req.devfn == AMD_IOAPIC_DEVFN and req.bus == vm.topology.main_root


def qg004_shared_space(vm: VmAnalysis) -> Iterator[Finding]:
    """vfio device sharing one IOMMU address space with other devices (requester aliasing)."""
    groups: dict[tuple[VIommu | None, Requester], list[DeviceAnalysis]] = {}
    for dev in vm.devices:
        if dev.binding.requester is not None and not dev.device.bridge:
            groups.setdefault((dev.binding.viommu, dev.binding.requester), []).append(dev)
    for members in groups.values():
        for dev in members:
            if not dev.device.vfio or len(members) < 2:
                continue
            others = [m.device.label for m in members if m is not dev]
            req = dev.binding.requester
            assert req is not None
            yield Finding(
                "QG004",
                Severity.WARNING,
                dev.device.path,
                f"{dev.device.label} shares one IOMMU address space with "
                f"{', '.join(others)}: the guest cannot isolate them from each other",
                (f"all are translated as requester {req.devfn_text} on {req.bus}",),
            )


def qg005_virtio_platform(vm: VmAnalysis) -> Iterator[Finding]:
    """virtio device translated by a vIOMMU with iommu_platform off."""
    for dev in vm.devices:
        d = dev.device
        # The vIOMMU's own queues are not translated by itself: never a finding.
        is_viommu = d.viommu_kind is not None
        if (
            d.virtio
            and not is_viommu
            and dev.binding.kind is BindingKind.VIOMMU
            and d.iommu_platform is False
        ):
            yield Finding(
                "QG005",
                Severity.WARNING,
                d.path,
                f"{d.label} ({d.type}) is behind a vIOMMU but has "
                "iommu_platform=off: its DMA bypasses the vIOMMU",
                (f"{d.path}/virtio-backend iommu_platform=false",),
            )


def qg006_amd_bus_number_space(vm: VmAnalysis) -> Iterator[Finding]:
    """vfio device sharing an amd-iommu space filed under bus number 0 (QEMU < 10.2;
    the rule and its QEMU sources: qmpguard/analysis/amd_shared_space.py)."""
    for s in amd_shared_spaces(vm):
        devfn = format_devfn(s.devfn)
        yield Finding(
            "QG006",
            Severity.WARNING,
            s.device,
            f"{s.label} shares one amd-iommu address space with {', '.join(s.others)}: "
            f"this QEMU filed it under bus number 0 (read before the guest numbered its "
            f"bus), so they share one DMA translation (one VFIO container) the guest "
            f"cannot separate, and QEMU looks up its device-table entry as 00:{devfn}, "
            f"not its own. Fix: QEMU 10.2 or later, or give each such device a slot of "
            f"its own on the root bus.",
            (
                f"info mtree -f: {s.listed} amd_iommu_devfn_{s.devfn} space(s) for "
                f"{s.requesters} requesters at devfn {devfn} on different buses",
                "amd-iommu before QEMU 10.2 keys its spaces by bus number when it creates "
                "them (hw/i386/amd_iommu.c amdvi_host_dma_iommu)",
            ),
        )


RULES: tuple[Rule, ...] = (
    qg001_misbound,
    qg002_unverified,
    qg003_bypass,
    qg004_shared_space,
    qg005_virtio_platform,
    qg006_amd_bus_number_space,
)
