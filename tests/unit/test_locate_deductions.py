"""Each deduction of the placement (qmpguard/analysis/locate.py) on small hand-built inputs:
one row, one case, one expected conclusion. The recorded snapshots (test_vfio_snapshots,
test_analysis_snapshots) cover the deductions together on real QEMU replies; these rows
pin each one alone, including the branches no recorded VM reaches."""

from __future__ import annotations

from typing import Any

import pytest

from qmpguard.analysis.locate import (
    PERIPHERAL,
    PendingBus,
    bypasses_iommu,
    child_buses,
    claim_host_path,
    container_index,
    device_tree,
    is_bridge,
    is_expander_host,
    locate,
    main_root,
    named_path,
    pci_buses,
    root_buses,
)
from qmpguard.analysis.qtree import QtreeBus, QtreeDevice, TypeFacts
from qmpguard.analysis.shape import ReplyShapeError
from qmpguard.qemu_names import HMP_QTREE
from qmpguard.snapshot import Snapshot

FACTS = TypeFacts(
    pci_bus=frozenset({"PCI", "PCIE", "pxb-pcie-bus"}),
    express_bus=frozenset({"PCIE", "pxb-pcie-bus"}),
    host_bridge=frozenset({"q35-pcihost", "pxb-host"}),
    bridge=frozenset({"pcie-root-port"}),
    virtio_pci=frozenset({"virtio-net-pci"}),
)


def dev(dtype: str, dev_id: str = "", *buses: QtreeBus, **props: str) -> QtreeDevice:
    return QtreeDevice(dtype, dev_id, props, buses)


def bus(name: str, btype: str, *devices: QtreeDevice) -> QtreeBus:
    return QtreeBus(name, btype, devices)


def named(*cases: tuple[object, ...]) -> list[object]:
    """Table rows whose first column is the case's name (and its test id)."""
    return [pytest.param(*c, id=str(c[0])) for c in cases]


@pytest.mark.parametrize(
    ("case", "path", "expected"),
    named(
        ("numbered entry", "/machine/unattached/device[12]", 12),
        ("first entry", "/machine/unattached/device[0]", 0),
        ("unnumbered entry sorts first", "/machine/q35", -1),
        ("not a number", "/machine/unattached/device[x]", -1),
        ("index not at the end", "/machine/device[3]/bus", -1),
    ),
)
def test_container_index(case: str, path: str, expected: int) -> None:
    assert container_index(path) == expected


PERIPHERALS: dict[str, str | None] = {
    f"{PERIPHERAL}nic": "e1000e",
    f"{PERIPHERAL}odd": None,  # listed, but not as a child<...>
}


@pytest.mark.parametrize(
    ("case", "qdev", "expected"),
    named(
        ("id confirmed by QOM", dev("e1000e", "nic"), f"{PERIPHERAL}nic"),
        ("anonymous", dev("e1000e"), None),
        ("id QOM does not list", dev("e1000e", "other"), None),
        ("id QOM lists with another type", dev("virtio-net-pci", "nic"), None),
        ("id QOM lists without a type", dev("e1000e", "odd"), None),
    ),
)
def test_named_path(case: str, qdev: QtreeDevice, expected: str | None) -> None:
    assert named_path(qdev, PERIPHERALS) == expected


@pytest.mark.parametrize(
    ("case", "host_type", "candidates", "expected", "left"),
    named(
        ("first of its type", "pxb-host", {"pxb-host": ["/a", "/b"]}, "/a", ["/b"]),
        ("the only one", "q35-pcihost", {"q35-pcihost": ["/machine/q35"]}, "/machine/q35", []),
    ),
)
def test_claim_host_path(
    case: str, host_type: str, candidates: dict[str, list[str]], expected: str, left: list[str]
) -> None:
    assert claim_host_path(host_type, candidates) == expected
    assert candidates[host_type] == left


@pytest.mark.parametrize(
    ("case", "candidates"),
    named(
        ("type never listed", {"q35-pcihost": ["/machine/q35"]}),
        ("every entry claimed", {"pxb-host": []}),
    ),
)
def test_claim_host_path_refuses_a_host_qom_lacks(
    case: str, candidates: dict[str, list[str]]
) -> None:
    with pytest.raises(ReplyShapeError, match="host bridge pxb-host not found"):
        claim_host_path("pxb-host", candidates)


@pytest.mark.parametrize(
    ("case", "props", "expected"),
    named(
        ("bypass on", {"bypass-iommu": "true"}, True),
        ("bypass off", {"bypass-iommu": "false"}, False),
        ("no such property (older QEMU)", {}, False),
        ("pxb device spelling is not the host's", {"bypass_iommu": "true"}, False),
    ),
)
def test_bypasses_iommu(case: str, props: dict[str, str], expected: bool) -> None:
    assert bypasses_iommu(dev("q35-pcihost", "", **props)) is expected


@pytest.mark.parametrize(
    ("host_type", "expected"),
    [
        ("pxb-host", True),
        ("pxb-cxl-host", True),
        ("q35-pcihost", False),
        ("i440FX-pcihost", False),
        ("gpex-pcihost", False),
    ],
)
def test_is_expander_host(host_type: str, expected: bool) -> None:
    assert is_expander_host(host_type) is expected


MAIN = PendingBus("/machine/q35/pcie.0", bus("pcie.0", "PCIE"), root=True)
PXB = PendingBus("/machine/unattached/device[9]/pxb", bus("pxb", "pxb-pcie-bus"), expander=True)
SECOND = PendingBus("/machine/other/pcie.0", bus("pcie.0", "PCIE"), root=True)


@pytest.mark.parametrize(
    ("case", "roots", "expected"),
    named(
        ("no PCI at all", [], None),
        ("only the machine's", [MAIN], MAIN.path),
        ("expander listed first", [PXB, MAIN], MAIN.path),
        ("the first of two", [MAIN, SECOND], MAIN.path),
        ("only an expander", [PXB], None),
    ),
)
def test_main_root(case: str, roots: list[PendingBus], expected: str | None) -> None:
    assert main_root(roots) == expected


ROOT_PORT = dev("pcie-root-port", "rp", bus("rp", "PCIE"), addr="01.0")
VIRTIO_NET = dev("virtio-net-pci", "", bus("virtio-bus", "virtio-pci-bus"), addr="02.0")
PXB_DEV = dev("pxb-pcie", "pxb", addr="04.0")
TWO_BUSES = dev("odd-bridge", "", bus("a", "PCI"), bus("u", "usb-bus"), bus("b", "PCIE"))


@pytest.mark.parametrize(
    ("case", "qdev", "buses", "bridge"),
    named(
        ("root port", ROOT_PORT, ["rp"], True),
        ("virtio proxy: its bus is not PCI", VIRTIO_NET, [], False),
        ("pxb owns no bus in qtree but forwards DMA", PXB_DEV, [], True),
        ("only the PCI buses, in order", TWO_BUSES, ["a", "b"], True),
    ),
)
def test_pci_buses_and_bridges(
    case: str, qdev: QtreeDevice, buses: list[str], bridge: bool
) -> None:
    assert [b.name for b in pci_buses(qdev, FACTS)] == buses
    assert is_bridge(qdev, FACTS) is bridge


@pytest.mark.parametrize(
    ("case", "qdev", "expected"),
    named(
        ("root port", ROOT_PORT, [("/d/rp", "/d")]),
        ("no PCI bus", VIRTIO_NET, []),
        ("two buses", TWO_BUSES, [("/d/a", "/d"), ("/d/b", "/d")]),
    ),
)
def test_child_buses(case: str, qdev: QtreeDevice, expected: list[tuple[str, str]]) -> None:
    got = child_buses("/d", qdev, FACTS)
    assert [(b.path, b.parent_device) for b in got] == expected
    assert not any(b.root or b.bypass_iommu or b.expander for b in got)


Q35_HOST = dev("q35-pcihost", "", bus("pcie.0", "PCIE"))
PXB_HOST = dev("pxb-host", "", bus("pxb", "pxb-pcie-bus"), **{"bypass-iommu": "true"})
FW_CFG = dev("fw_cfg_io", "", bus("fw_cfg.bus", "fw_cfg"))  # a sysbus device, not a host
HOSTS = {"q35-pcihost": ["/machine/q35"], "pxb-host": ["/machine/unattached/device[9]"]}
ROOT_ROWS = [
    ("/machine/q35/pcie.0", False, False),
    ("/machine/unattached/device[9]/pxb", True, True),
]


@pytest.mark.parametrize(
    ("case", "hosts", "expected"),
    named(
        ("machine then expander", [Q35_HOST, PXB_HOST], ROOT_ROWS),
        ("expander then machine", [PXB_HOST, Q35_HOST], ROOT_ROWS[::-1]),
        ("non-PCI sysbus devices are no hosts", [FW_CFG, Q35_HOST], ROOT_ROWS[:1]),
    ),
)
def test_root_buses(
    case: str, hosts: list[QtreeDevice], expected: list[tuple[str, bool, bool]]
) -> None:
    got = root_buses(
        bus("main-system-bus", "System", *hosts), FACTS, {t: list(p) for t, p in HOSTS.items()}
    )
    assert [(b.path, b.bypass_iommu, b.expander) for b in got] == expected
    assert all(b.root and b.parent_device is None for b in got)


def test_root_buses_refuse_a_host_qom_lacks() -> None:
    hosts = {"q35-pcihost": ["/machine/q35"]}
    with pytest.raises(ReplyShapeError, match="host bridge pxb-host not found"):
        root_buses(bus("main-system-bus", "System", Q35_HOST, PXB_HOST), FACTS, hosts)


@pytest.mark.parametrize(
    ("case", "reply"),
    named(
        ("never read", None),
        ("not qtree text", {"return": "unknown command: 'info qtree'"}),
        ("answered with an error", {"error": {"class": "GenericError", "desc": "no"}}),
    ),
)
def test_device_tree_refuses_what_is_not_qtree(case: str, reply: dict[str, Any] | None) -> None:
    snap = Snapshot("t", "unix", "now")
    if reply is not None:
        snap.record("human-monitor-command", {"command-line": HMP_QTREE}, reply)
    with pytest.raises(ReplyShapeError, match="info qtree missing"):
        device_tree(snap, [])


# --- the walk, on a hand-built VM: q35 with a pxb-pcie and one anonymous NIC on pcie.0 ----

_HOST_Q35 = """\
  dev: q35-pcihost, id ""
    bus: pcie.0
      type PCIE
      dev: e1000e, id ""
        addr = 03.0
      dev: pxb-pcie, id "pxb"
        addr = 04.0
"""
_HOST_PXB = """\
  dev: pxb-host, id ""
    bypass-iommu = true
    bus: pxb
      type pxb-pcie-bus
      dev: pcie-root-port, id "rp"
        addr = 00.0
        bus: rp
          type PCIE
"""
PCIE0 = "/machine/q35/pcie.0"
PXB_ROOT = "/machine/unattached/device[9]/pxb"
NIC = "/machine/unattached/device[20]"
#: pcie.0's child[N] links in creation order: the pxb (printed last in qtree), then the NIC.
LINKS = {"child[0]": "link<pxb-pcie>", "child[1]": "link<e1000e>"}


def vm(pxb_host_created_first: bool, bus_reads: int) -> Snapshot:
    """The VM's snapshot with the first `bus_reads` of pcie.0's listing and NIC link.

    qtree prints the newest device first: the pxb host, created in the pxb's realize, is
    printed before the machine's own host; the other order reaches the walk's other branch.
    """
    hosts = [_HOST_Q35, _HOST_PXB] if pxb_host_created_first else [_HOST_PXB, _HOST_Q35]
    snap = Snapshot("t", "unix", "now")

    def reply(cmd: str, args: dict[str, Any], value: object) -> None:
        snap.record(cmd, args, {"return": value})

    def entries(**types: str) -> list[dict[str, str]]:
        return [{"name": n, "type": t} for n, t in types.items()]

    qtree = "bus: main-system-bus\n  type System\n" + "".join(hosts)
    reply("human-monitor-command", {"command-line": HMP_QTREE}, qtree)
    reply("qom-list", {"path": "/machine"}, entries(q35="child<q35-pcihost>"))
    reply("qom-list", {"path": "/machine/unattached"}, entries(**{"device[9]": "child<pxb-host>"}))
    peripherals = entries(pxb="child<pxb-pcie>", rp="child<pcie-root-port>")
    reply("qom-list", {"path": "/machine/peripheral"}, peripherals)
    bus_replies = [
        ("qom-list", {"path": PCIE0}, entries(**LINKS)),
        ("qom-get", {"path": PCIE0, "property": "child[1]"}, NIC),
    ]
    for cmd, args, value in bus_replies[:bus_reads]:
        reply(cmd, args, value)
    return snap


@pytest.mark.parametrize("pxb_host_created_first", [False, True])
def test_expander_root_bus_hangs_off_its_pxb_device(pxb_host_created_first: bool) -> None:
    """Whether the pxb's root bus is placed before or after the pxb device, it gets it."""
    loc = locate(vm(pxb_host_created_first, bus_reads=2))
    topo = loc.topology
    assert loc.missing == []
    assert topo.main_root == PCIE0
    pxb_root = topo.buses[PXB_ROOT]
    assert (pxb_root.root, pxb_root.bypass_iommu) == (True, True)
    assert pxb_root.parent_device == f"{PERIPHERAL}pxb"
    assert pxb_root.devices == (f"{PERIPHERAL}rp",)
    assert topo.buses[f"{PERIPHERAL}rp/rp"].parent_device == f"{PERIPHERAL}rp"
    assert topo.buses[PCIE0].parent_device is None


PXB_PLACED = {f"{PERIPHERAL}pxb": 0}


@pytest.mark.parametrize(
    ("case", "bus_reads", "missing", "pcie0"),
    named(
        ("listing unread", 0, [("qom-list", {"path": PCIE0})], PXB_PLACED),
        ("link unread", 1, [("qom-get", {"path": PCIE0, "property": "child[1]"})], PXB_PLACED),
        ("both read", 2, [], {**PXB_PLACED, NIC: 1}),
    ),
)
def test_anonymous_device_is_placed_once_its_link_is_read(
    case: str, bus_reads: int, missing: list[tuple[str, dict[str, Any]]], pcie0: dict[str, int]
) -> None:
    """Named devices need no read; the anonymous NIC needs its bus's listing, then its link.

    `pcie0`: the devices placed on pcie.0, each with its creation index.
    """
    loc = locate(vm(pxb_host_created_first=False, bus_reads=bus_reads))
    topo = loc.topology
    assert loc.missing == missing
    assert topo.buses[PCIE0].devices == tuple(pcie0)
    placed = {p: d.creation_index for p, d in topo.devices.items() if d.bus == PCIE0}
    assert placed == pcie0
