"""Parse `info qtree` into QOM type facts: which types are PCI buses, bridges, virtio...

Format checked against QEMU 7.2, 10.0 and 11.1: nested `bus: NAME` / `type BUSTYPE` and
`dev: TYPE, id "ID"` lines, indented two spaces per level, properties as `key = value`.
qmpguard never asks QEMU for type hierarchies (`qom-list-types` loads every QOM module,
which can abort a QEMU whose module directory was upgraded under it): the facts come from
the devices that exist, as printed here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_BUS = re.compile(r"( *)bus: (.*)")
_TYPE = re.compile(r" *type (.*)")
_DEV = re.compile(r'( *)dev: ([^,]+), id "(.*)"')

#: Bus types known to be PCI (kept for buses with no device on them yet).
KNOWN_PCI_BUSES = frozenset({"PCI", "PCIE", "pxb-bus", "pxb-pcie-bus", "pxb-cxl-bus", "CXL"})


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


def type_facts(root: QtreeBus) -> TypeFacts:
    """Type facts from the parsed `info qtree` tree.

    A bus type is PCI if QEMU knows it as such or a device on it has a PCI address; a
    device with a PCI bus of its own is a bridge if it sits on a PCI bus, a host bridge
    otherwise; a device with a virtio-pci bus is a virtio-pci proxy.
    """
    buses = _all_buses(root)
    pci_bus = set(KNOWN_PCI_BUSES)
    pci_bus |= {b.type for b in buses if any(d.devfn is not None for d in b.devices)}
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
    return TypeFacts(
        frozenset(pci_bus),
        frozenset(express),
        frozenset(host),
        frozenset(bridge),
        frozenset(virtio),
    )


def _all_buses(root: QtreeBus) -> list[QtreeBus]:
    """Every bus of the tree, `root` first."""
    buses: list[QtreeBus] = []
    todo = [root]
    while todo:
        bus = todo.pop()
        buses.append(bus)
        for dev in bus.devices:
            todo.extend(dev.buses)
    return buses


# ------------------------------------------------------------------ device tree

_PROP = re.compile(r" *([A-Za-z0-9_-]+) = (.*)")


@dataclass(frozen=True)
class QtreeDevice:
    """A device as `info qtree` prints it (immutable: parsed trees are shared by a cache)."""

    type: str
    id: str
    props: Mapping[str, str]
    buses: tuple[QtreeBus, ...]

    @property
    def devfn(self) -> int | None:
        m = re.fullmatch(r"([0-9a-f]{2})\.([0-7])", self.props.get("addr", ""))
        return (int(m.group(1), 16) << 3) | int(m.group(2)) if m else None

    @property
    def iommu_platform(self) -> bool | None:
        """From the virtio backend below a virtio-pci proxy."""
        for bus in self.buses:
            for dev in bus.devices:
                value = dev.props.get("iommu_platform")
                if value in ("true", "false"):
                    return value == "true"
        return None


@dataclass(frozen=True)
class QtreeBus:
    """A bus; `devices` in creation order (qtree prints the newest first)."""

    name: str
    type: str
    devices: tuple[QtreeDevice, ...]


@dataclass
class _Dev:
    """A device while parsing."""

    type: str
    id: str
    props: dict[str, str] = field(default_factory=dict)
    buses: list[_Bus] = field(default_factory=list)


@dataclass
class _Bus:
    """A bus while parsing; devices as printed (newest first)."""

    name: str
    type: str = ""
    devices: list[_Dev] = field(default_factory=list)


def _freeze(bus: _Bus, names: dict[str, str]) -> QtreeBus:
    """The immutable tree, creation order, placeholder ids restored (see parse_device_tree)."""
    devices = tuple(
        QtreeDevice(
            d.type,
            names.get(d.id, d.id),
            MappingProxyType(d.props),
            tuple(_freeze(b, names) for b in d.buses),
        )
        for d in reversed(bus.devices)
    )
    return QtreeBus(names.get(bus.name, bus.name), bus.type, devices)


def parse_device_tree(text: object, ids: frozenset[str] = frozenset()) -> QtreeBus | None:
    """The sysbus root of `info qtree`, children in creation order; None if unknown format.

    `ids` are the device ids QOM lists under /machine/peripheral. QEMU prints ids and the
    bus names derived from them raw: an id holding a newline or a quote (JSON -device
    accepts both) would break the line structure, so such ids are swapped for
    placeholders before parsing and restored after. Parsed once per distinct input (the
    collector and the analysis both ask): the tree is immutable, so sharing it is safe.
    """
    if not isinstance(text, str) or not text.startswith("bus: main-system-bus"):
        return None
    unsafe = tuple(sorted(i for i in ids if _UNSAFE_ID.search(i)))
    return _parse_cached(text, unsafe)


_UNSAFE_ID = re.compile(r'[\n\r"]|^\s|\s$')


def _placeholder(n: int) -> str:
    return f"\x00id{n}\x00"


@functools.lru_cache(maxsize=16)
def _parse_cached(text: str, unsafe_ids: tuple[str, ...]) -> QtreeBus | None:
    names = {}
    eol = "\r\n" if "\r\n" in text else "\n"  # the monitor turns every \n into \r\n
    for n, dev_id in enumerate(sorted(unsafe_ids, key=len, reverse=True)):
        names[_placeholder(n)] = dev_id
        shown = dev_id.replace("\n", eol)
        text = text.replace(f'id "{shown}"{eol}', f'id "{_placeholder(n)}"{eol}')
        text = text.replace(f"bus: {shown}{eol}", f"bus: {_placeholder(n)}{eol}")
    root = _parse_lines(text)
    return _freeze(root, names) if root is not None else None


def _parse_lines(text: str) -> _Bus | None:
    """The tree of qtree's indented lines; None without a `bus:` line to root it."""
    tree = _TreeBuilder()
    for line in text.splitlines():
        tree.add(line)
    return tree.root


class _TreeBuilder:
    """qtree's lines into _Bus and _Dev nodes.

    A `bus:` or `dev:` line is a child of the nearest open node above it with less
    indentation (a bus of a device, a device on a bus); `type` and `key = value` lines
    belong to the node opened last, whatever their indentation.
    """

    def __init__(self) -> None:
        self.root: _Bus | None = None
        self._open: list[tuple[int, _Bus | _Dev]] = []  # (indentation, node), outermost first

    def add(self, line: str) -> None:
        """One line of qtree's output; lines of no known shape are ignored."""
        if m := _BUS.fullmatch(line):
            self._add_bus(len(m.group(1)), _Bus(m.group(2)))
        elif m := _DEV.fullmatch(line):
            self._add_device(len(m.group(1)), _Dev(m.group(2), m.group(3)))
        elif self._open:
            _set_attribute(self._open[-1][1], line)

    def _parent(self, depth: int) -> _Bus | _Dev | None:
        """Close the nodes indented `depth` or deeper; the node left open above them."""
        while self._open and self._open[-1][0] >= depth:
            self._open.pop()
        return self._open[-1][1] if self._open else None

    def _add_bus(self, depth: int, bus: _Bus) -> None:
        """A device's bus; the first bus with no device above it is the root."""
        parent = self._parent(depth)
        if isinstance(parent, _Dev):
            parent.buses.append(bus)
        elif self.root is None:
            self.root = bus
        self._open.append((depth, bus))

    def _add_device(self, depth: int, dev: _Dev) -> None:
        parent = self._parent(depth)
        if isinstance(parent, _Bus):
            parent.devices.append(dev)  # printed newest first: reversed in _freeze
        self._open.append((depth, dev))


def _set_attribute(node: _Bus | _Dev, line: str) -> None:
    """A bus's `type BUSTYPE` line, or a device's `key = value` property (quotes dropped)."""
    if isinstance(node, _Bus):
        if m := _TYPE.fullmatch(line):
            node.type = m.group(1)
    elif p := _PROP.fullmatch(line):
        node.props[p.group(1)] = p.group(2).strip('"')
