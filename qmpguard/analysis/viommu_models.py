"""Per-vIOMMU-model knowledge, one row per model: how QEMU names its address spaces in
`info mtree -f`, and what fixes a vfio device realized before it.

Names checked on QEMU 7.2, 10.0 and 11.1 (docs/design.md, "Address-space order"):
intel-iommu `vtd-SS.F` (devfn only; the IOAPIC's space `vtd-00.0` is created in the
vIOMMU's own realize), virtio-iommu `virtio-iommu-memory-region-<counter>-<devfn>` (a
global counter: a creation order on its own), amd-iommu `amd_iommu_devfn_<devfn>`
(IOAPIC space 160 created in realize; the AS name, not the root, carries it), ARM SMMUv3
`smmuv3-iommu-memory-region-<devfn>-<n>` (AS name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SpaceNaming:
    """How one model names a per-requester space in `info mtree -f` (the root region)."""

    pattern: re.Pattern[str]
    devfn_group: int
    devfn_base: int  # 16 for "SS.F" (parsed by the pattern's two groups), 10 for decimal
    counter_group: int | None  # a global creation counter in the name, if any
    own_space_devfn: int | None  # a space the vIOMMU creates in its own realize
    shown_as: str  # for evidence text: {slot:02x}, {fn}, {devfn}
    #: The order rule (vfio spaces created in realize, the rest at machine-done) was
    #: checked on a real QEMU for this model; only then does the sequence count as evidence.
    order_checked: bool
    #: Which part of an ` AS "name", root: region` line carries the requester.
    in_root: bool = True

    def subject(self, name: str, root: str) -> str:
        return root if self.in_root else name

    def parse(self, root: str) -> tuple[int, int | None] | None:
        """(devfn, counter) of a root region name, None if it is not this model's."""
        m = self.pattern.fullmatch(root)
        if m is None:
            return None
        if self.devfn_base == 16:
            devfn = (int(m.group(1), 16) << 3) | int(m.group(2))
        else:
            devfn = int(m.group(self.devfn_group))
        counter = int(m.group(self.counter_group)) if self.counter_group else None
        return devfn, counter

    def display(self, devfn: int) -> str:
        return self.shown_as.format(slot=devfn >> 3, fn=devfn & 7, devfn=devfn)


@dataclass(frozen=True)
class ViommuModel:
    """One vIOMMU model: its address-space naming and the fix for a vfio device before it."""

    kind: str
    naming: SpaceNaming | None
    #: Moving the vIOMMU before the vfio device binds it correctly (False: QEMU refuses
    #: vfio-pci behind this model in the right order, so reordering is no fix).
    reorder_fixes: bool
    alternative: str  # what works instead, when reordering does not
    #: What works where this QEMU refuses the right order (refuses_vfio_after) although
    #: other versions accept it.
    when_refused: str = ""


MODELS: dict[str, ViommuModel] = {
    "intel": ViommuModel(
        "intel",
        SpaceNaming(
            re.compile(r"vtd-([0-9a-f]{2})\.([0-7])"), 0, 16, None, 0, "vtd-{slot:02x}.{fn}", True
        ),
        True,
        "",
        "reordering alone makes QEMU refuse to start (intel-iommu without caching-mode=on "
        "refuses vfio-pci realized after it): put -device intel-iommu,caching-mode=on "
        "before the vfio device",
    ),
    "virtio": ViommuModel(
        "virtio",
        SpaceNaming(
            re.compile(r"virtio-iommu-memory-region-(\d+)-(\d+)"),
            2,
            10,
            1,
            None,
            "virtio-iommu …-{devfn}",
            True,
        ),
        True,
        "",
    ),
    "amd": ViommuModel(
        "amd",
        SpaceNaming(
            re.compile(r"amd_iommu_devfn_(\d+)"),
            1,
            10,
            None,
            160,
            "amd_iommu_devfn_{devfn}",
            True,  # 11.1 and 10.0: vfio's space right after the IOMMU's own (160) or in the batch
            in_root=False,
        ),
        True,
        "",
        "reordering alone makes this QEMU refuse to start (it refuses vfio-pci after "
        "amd-iommu on 7.2, and on 10.0 with pt=off): use QEMU 10.2 or later (10.1 "
        "translates but still shares spaces across buses, QG006) with "
        "-device amd-iommu,dma-remap=on before the vfio device, or virtio-iommu-pci",
    ),
    "smmuv3": ViommuModel(
        "smmuv3",
        SpaceNaming(
            re.compile(r"smmuv3-iommu-memory-region-(\d+)-(\d+)"),
            1,
            10,
            None,
            None,
            "smmuv3-iommu-memory-region-{devfn}-…",
            False,
            in_root=False,
        ),
        False,
        "QEMU's emulated SMMUv3 refuses vfio-pci in the right order (no MAP notifier), so "
        "reordering makes QEMU refuse to start: use virtio-iommu-pci instead, arm-smmuv3 "
        "with accel=on (host SMMUv3 nesting through iommufd) where supported, or keep the "
        "vfio device off the SMMU's buses",
    ),
    "riscv": ViommuModel("riscv", None, True, ""),
}


def model(kind: str) -> ViommuModel:
    return MODELS.get(kind, ViommuModel(kind, None, True, ""))


Version = tuple[int, int]

#: Properties read from a sysbus vIOMMU, per type, for the rules below (check reads them
#: over QOM; intel-iommu's caching-mode is not read yet: preflight alone uses that rule).
PROPERTIES: dict[str, tuple[str, ...]] = {
    "amd-iommu": ("pt", "dma-remap"),
    "arm-smmuv3": ("accel",),
}


@dataclass(frozen=True)
class PropertySpan:
    """A rule property on a QEMU range: from `since` (None: always) to before `until`
    (None: still there), with its default (`-device TYPE,help` of 7.2, 10.0 and 11.1)."""

    default: bool
    since: Version | None = None
    until: Version | None = None

    def exists(self, version: Version) -> bool:
        return (self.since is None or version >= self.since) and (
            self.until is None or version < self.until
        )

    @property
    def version_bound(self) -> bool:
        return self.since is not None or self.until is not None


SPANS: dict[str, dict[str, PropertySpan]] = {
    "amd-iommu": {
        "pt": PropertySpan(True, until=(10, 1)),
        "dma-remap": PropertySpan(False, since=(10, 1)),
    },
    "arm-smmuv3": {"accel": PropertySpan(False)},
    "intel-iommu": {"caching-mode": PropertySpan(False)},
}

_ON = frozenset({"on", "yes", "true", "y"})
_OFF = frozenset({"off", "no", "false", "n"})


def parse_version(text: str | None) -> Version | None:
    """(major, minor) of "11.1.3", "QEMU emulator version 10.0.2 (Debian ...)" or "7.2"."""
    m = re.search(r"(?:^|version )(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def rule_properties(
    vtype: str, given: Mapping[str, str], version: Version | None
) -> dict[str, object]:
    """What check would read over QOM for the rules below, from a command line's
    properties: the value given (QEMU's boolean words) or the default, for each property
    this version has. With the version unknown, a property only some versions have is
    left out, so no version-bound rule concludes (version_matters says why)."""
    out: dict[str, object] = {}
    for prop, span in SPANS.get(vtype, {}).items():
        if version is None and span.version_bound:
            continue
        if version is not None and not span.exists(version):
            continue
        word = given.get(prop, "").lower()
        out[prop] = True if word in _ON else False if word in _OFF else span.default
    return out


def refuses_vfio_after(
    vtype: str, props: Mapping[str, object], machine_created: bool, version: Version | None
) -> str | None:
    """Why QEMU refuses a vfio-pci device realized after this vIOMMU, if it does: a running
    vfio device behind it was then realized before it (seen live, DMA log as truth)."""
    if vtype == "arm-smmuv3" and not machine_created and props.get("accel") is not True:
        return (
            "QEMU's emulated SMMUv3 has no MAP notifier: it refuses vfio-pci realized after "
            "it (seen on 11.1), so a running one was realized before it"
        )
    uncached = vtype == "intel-iommu" and props.get("caching-mode") is False
    if uncached and version is not None and version >= (10, 2):
        return (
            "intel-iommu without caching-mode=on refuses vfio-pci realized after it from "
            "QEMU 10.2 on (the check moved to the moment vfio finds the vIOMMU), so a "
            "running one was realized before it"
        )
    if vtype == "amd-iommu" and version is not None:
        if version[0] == 7:
            return (
                'amd-iommu in QEMU 7.2 refuses vfio-pci realized after it ("requires iommu '
                'notifier"), so a running one was realized before it'
            )
        if version == (10, 0) and props.get("pt") is False:
            return (
                "amd-iommu with pt=off in QEMU 10.0 refuses vfio-pci realized after it, so a "
                "running one was realized before it"
            )
    return None


def passthrough(vtype: str, props: Mapping[str, object], version: Version | None) -> str | None:
    """Why this vIOMMU keeps vfio devices in pass-through whatever the guest programs, if
    it does (all guest RAM stays mapped in either order; seen on 10.0 and 11.1)."""
    if vtype != "amd-iommu" or version is None or version < (10, 0):
        return None
    if props.get("dma-remap") is False:
        return "amd-iommu without dma-remap=on keeps vfio devices in pass-through"
    if "dma-remap" not in props and props.get("pt") is True:
        return "amd-iommu with pt=on (10.0's default) keeps vfio devices in pass-through"
    return None


Release = tuple[int, int, int]

#: amd-iommu's IOAPIC pseudo requester (AMDVI_IOAPIC_SB_DEVID, 00:14.0 on the main root bus)
AMD_IOAPIC_DEVFN = 0xA0


def parse_release(text: str | None) -> Release | None:
    """(major, minor, micro) of "10.0.2" or "QEMU emulator version 10.0.2 (Debian ...)";
    None without a micro ("10.0"): a rule fixed inside a stable series cannot tell."""
    m = re.search(r"(?:^|version )(\d+)\.(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def ioapic_space_maps_nothing(vtype: str, release: Release | None) -> str | None:
    """Why this vIOMMU's IOAPIC space maps no guest memory although the vIOMMU keeps
    devices in pass-through, if it does: the version table behind check's evidence (an
    empty `amd_iommu_devfn_160` flat view in `info mtree -f`) and preflight's only source.

    amd-iommu's realize creates the IOAPIC's space (devfn 160 on the main root bus)
    before the shared regions its pass-through alias points at are initialised, so that
    alias has size 0 (hw/i386/amd_iommu.c amdvi_sysbus_realize -> amdvi_host_dma_iommu;
    fixed by "hw/i386/amd_iommu: Move IOAPIC memory region initialization to the end",
    a7842d9406 in 10.1.0, backported to 10.0.4). Any device filed under that requester
    gets the cached empty space. Before 10.0 the rules above never say pass-through."""
    if vtype != "amd-iommu" or release is None:
        return None
    if release[:2] == (10, 0) and release[2] < 4:
        return (
            "amd-iommu in QEMU 10.0.0 to 10.0.3 creates the IOAPIC's space (00:14.0) before "
            "its pass-through region exists: it maps no guest memory"
        )
    return None


def exits_with_vfio(vtype: str, props: Mapping[str, object], version: Version | None) -> str | None:
    """Why QEMU exits at machine-done when any vfio-pci device exists, whatever the order
    (so a command line, not a running VM, can show it)."""
    if vtype != "intel-iommu" or props.get("caching-mode") is not False:
        return None
    if version is None or version >= (10, 2):
        return None
    return (
        "intel-iommu without caching-mode=on makes QEMU up to 10.1 exit at machine-done "
        "when any vfio-pci device exists, whatever the order"
    )


def version_matters(vtype: str, given: Mapping[str, str]) -> str | None:
    """Why the rules above need the QEMU version for this vIOMMU (None: they do not):
    what a correctly ordered vfio device behind it gets differs between versions."""
    if vtype == "amd-iommu":
        return (
            "amd-iommu refuses vfio-pci realized after it on 7.2 (and 10.0 with pt=off), "
            "keeps it in pass-through on 10.0 (pt=on) and from 10.1 without dma-remap=on, "
            "and translates it from 10.1 with dma-remap=on"
        )
    return None


def refuses_vfio_after_on_every_version(vtype: str, given: Mapping[str, str]) -> str | None:
    """Why no QEMU version starts vfio-pci realized after this vIOMMU, if none does: the
    two intel-iommu rules above together (exit at machine-done up to 10.1, refused
    order from 10.2), so a version-less preflight can say it too."""
    if rule_properties(vtype, given, (0, 0)).get("caching-mode") is False:
        return (
            "intel-iommu without caching-mode=on makes QEMU exit with any vfio-pci up to "
            "10.1, and refuse vfio-pci realized after it from 10.2"
        )
    return None
