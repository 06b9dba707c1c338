"""`info qtree` text into a tree (qmpguard/analysis/qtree.py parse_device_tree), one small
text per row: nesting by indentation, where `type` and property lines belong, creation
order, and the lines that are ignored. The recorded snapshots cover QEMU's real output."""

from __future__ import annotations

import pytest

from qmpguard.analysis.qtree import KNOWN_PCI_BUSES, QtreeBus, parse_device_tree, type_facts

Shape = tuple[str, str, list[tuple[str, str, dict[str, str], list[object]]]]


def shape(bus: QtreeBus) -> Shape:
    """(name, type, [(type, id, props, [bus shapes])]): the tree as plain values."""
    return (
        bus.name,
        bus.type,
        [(d.type, d.id, dict(d.props), [shape(b) for b in d.buses]) for d in bus.devices],
    )


HEAD = "bus: main-system-bus\n  type System\n"


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    [
        pytest.param(
            "a device on the root bus, with properties (quotes dropped)",
            HEAD + '  dev: fw_cfg_io, id ""\n    iobase = 1296 (0x510)\n    romfile = "x.rom"\n',
            (
                "main-system-bus",
                "System",
                [
                    ("fw_cfg_io", "", {"iobase": "1296 (0x510)", "romfile": "x.rom"}, []),
                ],
            ),
            id="properties",
        ),
        pytest.param(
            "qtree prints the newest device first: the tree is in creation order",
            HEAD + '  dev: b, id "second"\n  dev: a, id "first"\n',
            ("main-system-bus", "System", [("a", "first", {}, []), ("b", "second", {}, [])]),
            id="creation-order",
        ),
        pytest.param(
            "a device's bus and its own devices, by indentation",
            HEAD
            + '  dev: q35-pcihost, id ""\n'
            + "    bus: pcie.0\n      type PCIE\n"
            + '      dev: e1000e, id "nic"\n        addr = 03.0\n'
            + '  dev: kvmvapic, id ""\n',
            (
                "main-system-bus",
                "System",
                [
                    ("kvmvapic", "", {}, []),
                    (
                        "q35-pcihost",
                        "",
                        {},
                        [
                            ("pcie.0", "PCIE", [("e1000e", "nic", {"addr": "03.0"}, [])]),
                        ],
                    ),
                ],
            ),
            id="nesting",
        ),
        pytest.param(
            "a property line belongs to the device opened last, whatever its indentation",
            HEAD + '  dev: a, id ""\n    bus: a.0\n      type PCI\nx = 1\n  dev: b, id ""\ny = 2\n',
            (
                "main-system-bus",
                "System",
                [
                    ("b", "", {"y": "2"}, []),
                    ("a", "", {}, [("a.0", "PCI", [])]),
                ],
            ),
            id="property-of-last-node",
        ),
        pytest.param(
            "`type` sets a bus's type; on a device it is no property either",
            HEAD + '  dev: a, id ""\n    type PCI\n    type = x\n',
            ("main-system-bus", "System", [("a", "", {"type": "x"}, [])]),
            id="type-line",
        ),
        pytest.param(
            "a bus directly under a bus is dropped, with what is on it",
            HEAD + '  bus: stray\n    dev: lost, id ""\n  dev: kept, id ""\n',
            ("main-system-bus", "System", [("kept", "", {}, [])]),
            id="bus-under-bus",
        ),
        pytest.param(
            "lines of no known shape are ignored",
            HEAD + '  dev: a, id ""\n    class PCI bridge, addr 00:01.0\n    bar 0: mem\n',
            ("main-system-bus", "System", [("a", "", {}, [])]),
            id="unknown-lines",
        ),
    ],
)
def test_parse(case: str, text: str, expected: Shape) -> None:
    tree = parse_device_tree(text)
    assert tree is not None
    assert shape(tree) == expected


@pytest.mark.parametrize(
    "text", [None, 42, "", 'dev: a, id ""\n', "Error: unknown command 'info qtree'"]
)
def test_not_qtree(text: object) -> None:
    assert parse_device_tree(text) is None


Q35 = (
    HEAD
    + '  dev: q35-pcihost, id ""\n'
    + "    bus: pcie.0\n      type PCIE\n"
    + '      dev: pcie-root-port, id "rp1"\n        addr = 01.0\n'
    + "        bus: rp1\n          type PCIE\n"
    + '          dev: virtio-net-pci, id "vn"\n            addr = 00.0\n'
    + "            bus: virtio-bus\n              type virtio-pci-bus\n"
    + '      dev: my-odd-bridge, id "odd"\n        addr = 02.0\n'
    + "        bus: odd.0\n          type odd-pci-bus\n"
    + '          dev: e1000, id "n"\n            addr = 01.0\n'
    + '  dev: isa-thing, id ""\n    bus: isa.0\n      type ISA\n'
)


@pytest.mark.parametrize(
    ("case", "field", "expected"),
    [
        pytest.param(
            "a bus type with a PCI-addressed device on it is PCI",
            "pci_bus",
            {*KNOWN_PCI_BUSES, "odd-pci-bus"},
            id="pci-bus",
        ),
        pytest.param(
            "express by name: pcie or cxl",
            "express_bus",
            {"PCIE", "pxb-pcie-bus", "pxb-cxl-bus", "CXL"},
            id="express",
        ),
        pytest.param(
            "a PCI bus owner off PCI is a host", "host_bridge", {"q35-pcihost"}, id="host"
        ),
        pytest.param(
            "a PCI bus owner on PCI is a bridge",
            "bridge",
            {"pcie-root-port", "my-odd-bridge"},
            id="bridge",
        ),
        pytest.param("a virtio-pci-bus owner", "virtio_pci", {"virtio-net-pci"}, id="virtio"),
    ],
)
def test_type_facts(case: str, field: str, expected: set[str]) -> None:
    tree = parse_device_tree(Q35)
    assert tree is not None
    assert set(getattr(type_facts(tree), field)) == expected
