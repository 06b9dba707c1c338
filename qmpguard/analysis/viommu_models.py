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


MODELS: dict[str, ViommuModel] = {
    "intel": ViommuModel(
        "intel",
        SpaceNaming(
            re.compile(r"vtd-([0-9a-f]{2})\.([0-7])"), 0, 16, None, 0, "vtd-{slot:02x}.{fn}", True
        ),
        True,
        "",
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
