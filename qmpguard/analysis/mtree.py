"""Parse `info mtree -f`: address spaces grouped by flat view, in printed order.

Format checked against QEMU 7.2, 10.0 and 11.1: `FlatView #N` headers followed by
` AS "name", root: region` lines. Inside one flat view, address spaces are listed in
creation order (QEMU's global address-space list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FLATVIEW = re.compile(r"FlatView #(\d+)")
_AS_LINE = re.compile(r' AS "(.*)", root: (.*)')


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
