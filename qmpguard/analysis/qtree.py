"""Parse `info qtree` into QOM type facts: which types are PCI buses, bridges, virtio...

Format checked against QEMU 7.2 and 10.0: nested `bus: NAME` / `type BUSTYPE` and
`dev: TYPE, id "ID"` lines, indented two spaces per level, properties as `key = value`.
qmpguard never asks QEMU for type hierarchies (`qom-list-types` loads every QOM module,
which can abort a QEMU whose module directory was upgraded under it): the facts come from
the devices that exist, as printed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_BUS = re.compile(r"( *)bus: (.*)")
_TYPE = re.compile(r" *type (.*)")
_DEV = re.compile(r'( *)dev: ([^,]+), id "(.*)"')
_ADDR = re.compile(r" *addr = [0-9a-f]{2}\.[0-7]\b")

#: Bus types known to be PCI (kept for buses with no device on them yet).
KNOWN_PCI_BUSES = frozenset({"PCI", "PCIE", "pxb-bus", "pxb-pcie-bus", "pxb-cxl-bus", "CXL"})


@dataclass
class _Bus:
    type: str = ""
    devices: list[_Dev] = field(default_factory=list)


@dataclass
class _Dev:
    type: str
    buses: list[_Bus] = field(default_factory=list)
    has_pci_addr: bool = False


@dataclass(frozen=True)
class TypeFacts:
    """QOM type sets derived from the devices in one VM."""

    pci_bus: frozenset[str]
    express_bus: frozenset[str]
    host_bridge: frozenset[str]
    bridge: frozenset[str]
    virtio_pci: frozenset[str]

    def is_vfio(self, dtype: str) -> bool:
        """vfio-pci, vfio-pci-nohotplug, vfio-user-pci, ... (not the IGD LPC helper)."""
        return dtype.startswith("vfio") and dtype != "vfio-pci-igd-lpc-bridge"


def _parse(text: str) -> list[_Bus]:
    roots: list[_Bus] = []
    stack: list[tuple[int, _Bus | _Dev]] = []
    for line in text.splitlines():
        if m := _BUS.fullmatch(line):
            depth, bus = len(m.group(1)), _Bus()
            while stack and stack[-1][0] >= depth:
                stack.pop()
            parent = stack[-1][1] if stack else None
            if isinstance(parent, _Dev):
                parent.buses.append(bus)
            elif parent is None:
                roots.append(bus)
            stack.append((depth, bus))
        elif (m := _DEV.fullmatch(line)) is not None:
            depth, dev = len(m.group(1)), _Dev(m.group(2))
            while stack and stack[-1][0] >= depth:
                stack.pop()
            if stack and isinstance(stack[-1][1], _Bus):
                stack[-1][1].devices.append(dev)
            stack.append((depth, dev))
        elif stack and (m := _TYPE.fullmatch(line)) and isinstance(stack[-1][1], _Bus):
            stack[-1][1].type = m.group(1)
        elif stack and isinstance(stack[-1][1], _Dev) and _ADDR.match(line):
            stack[-1][1].has_pci_addr = True
    return roots


def type_facts(text: object) -> TypeFacts | None:
    """Type facts from `info qtree` output; None if it is not in a known format."""
    if not isinstance(text, str) or "bus: main-system-bus" not in text:
        return None
    buses: list[_Bus] = []
    todo = _parse(text)
    while todo:
        bus = todo.pop()
        buses.append(bus)
        for dev in bus.devices:
            todo.extend(dev.buses)
    pci_bus = set(KNOWN_PCI_BUSES)
    pci_bus |= {b.type for b in buses if any(d.has_pci_addr for d in b.devices)}
    express = {t for t in pci_bus if "pcie" in t.lower() or "cxl" in t.lower()}
    host: set[str] = set()
    bridge: set[str] = set()
    virtio: set[str] = set()
    for bus in buses:
        for dev in bus.devices:
            child_types = {b.type for b in dev.buses}
            if child_types & pci_bus:
                (bridge if bus.type in pci_bus else host).add(dev.type)
            if "virtio-pci-bus" in child_types:
                virtio.add(dev.type)
    return TypeFacts(frozenset(pci_bus), frozenset(express), frozenset(host),
                     frozenset(bridge), frozenset(virtio))
