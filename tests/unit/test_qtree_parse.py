"""`info qtree` text into a tree (qmpguard/analysis/qtree.py parse_device_tree), one small
text per row: nesting by indentation, where `type` and property lines belong, creation
order, and the lines that are ignored. The recorded snapshots cover QEMU's real output."""

from __future__ import annotations

import pytest

from qmpguard.analysis.qtree import QtreeBus, parse_device_tree

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
