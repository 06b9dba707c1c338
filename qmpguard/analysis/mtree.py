"""Parse `info mtree -f`: address spaces grouped by flat view, in printed order.

Format checked against QEMU 7.2 and 10.0: `FlatView #N` headers followed by
` AS "name", root: region` lines. Inside one flat view, address spaces are listed in
creation order (QEMU's global address-space list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FLATVIEW = re.compile(r"FlatView #(\d+)")
_AS_LINE = re.compile(r' AS "(.*)", root: (.*)')
_VTD = re.compile(r"vtd-([0-9a-f]{2})\.([0-7])")
_VIRTIO = re.compile(r"virtio-iommu-memory-region-(\d+)-(\d+)")


@dataclass(frozen=True)
class AddressSpaceEntry:
    """One ` AS ...` line: its flat view, position in the output, name and root region."""

    flatview: int
    position: int
    name: str
    root: str


def parse_mtree_f(text: str) -> list[AddressSpaceEntry] | None:
    """Entries in printed order, or None if the text is not in a known format."""
    if not isinstance(text, str) or "FlatView #" not in text:
        return None
    entries: list[AddressSpaceEntry] = []
    view = -1
    for line in text.splitlines():
        m = _FLATVIEW.fullmatch(line.strip())
        if m:
            view = int(m.group(1))
            continue
        a = _AS_LINE.fullmatch(line.rstrip())
        if a and view >= 0:
            entries.append(AddressSpaceEntry(view, len(entries), a.group(1), a.group(2)))
    return entries


@dataclass(frozen=True)
class IommuSpace:
    """A vIOMMU per-requester address space: its flat view, creation rank and devfn."""

    flatview: int
    rank: int  # creation order, comparable only within `flatview` (or globally if global_rank)
    devfn: int


def viommu_spaces(entries: list[AddressSpaceEntry], kind: str) -> tuple[list[IommuSpace], bool]:
    """The vIOMMU's spaces and whether their ranks are a global creation order.

    intel: root `vtd-SS.F`, ranked by printed position (order holds within a flat view).
    virtio: root `virtio-iommu-memory-region-<counter>-<devfn>`, ranked by the counter,
    which is global.
    """
    out: list[IommuSpace] = []
    if kind == "intel":
        for e in entries:
            m = _VTD.fullmatch(e.root)
            if m:
                out.append(
                    IommuSpace(e.flatview, e.position, (int(m.group(1), 16) << 3) | int(m.group(2)))
                )
        return out, False
    if kind == "virtio":
        seen = set()
        for e in entries:
            m = _VIRTIO.fullmatch(e.root)
            if m and e.root not in seen:
                seen.add(e.root)
                out.append(IommuSpace(0, int(m.group(1)), int(m.group(2))))
        return sorted(out, key=lambda s: s.rank), True
    return out, False
