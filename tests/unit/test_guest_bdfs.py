"""Guest-visible BDFs from query-pci (qmpguard/analysis/vm.py guest_bdfs): the reply read
into functions, one row per shape, and the functions matched to placed devices."""

from __future__ import annotations

from typing import Any

import pytest

from qmpguard.analysis.topology import PciBus, PciDevice, Topology
from qmpguard.analysis.vm import PciFunction, guest_bdfs, query_pci_functions
from qmpguard.snapshot import Snapshot

ROOT = "/machine/q35/pcie.0"
RP_BUS = "/machine/peripheral/rp1/rp1"


def fn(slot: int, function: int = 0, qdev_id: str = "", **more: Any) -> dict[str, Any]:
    return {"slot": slot, "function": function, "qdev_id": qdev_id, **more}


def bridge(secondary: object, *devices: dict[str, Any]) -> dict[str, Any]:
    return {"bus": {"secondary": secondary}, "devices": list(devices)}


NUMBERED = [
    {
        "bus": 0,
        "devices": [fn(0), fn(1, 0, "rp1", pci_bridge=bridge(1, fn(0, 0, "nic"))), fn(3, 1)],
    }
]


@pytest.mark.parametrize(
    ("case", "reply", "expected"),
    [
        pytest.param("not a list", {"bus": 0}, [], id="not-a-list"),
        pytest.param("bus without a number", [{"devices": [fn(1)]}], [], id="bus-unnumbered"),
        pytest.param("devices not a list", [{"bus": 0, "devices": {}}], [], id="devices-dict"),
        pytest.param(
            "entries that are no functions are skipped",
            [{"bus": 0, "devices": [7, {"slot": 2}, {"slot": "2", "function": 0}, fn(4)]}],
            [PciFunction(0, 4, 0, "")],
            id="malformed-entries",
        ),
        pytest.param(
            "a non-string qdev_id is no id",
            [{"bus": 0, "devices": [{"slot": 5, "function": 0, "qdev_id": 9}]}],
            [PciFunction(0, 5, 0, None)],
            id="qdev-id-a-number",
        ),
        pytest.param(
            "each bridge's functions right after it, on its secondary bus",
            NUMBERED,
            [
                PciFunction(0, 0, 0, ""),
                PciFunction(0, 1, 0, "rp1"),
                PciFunction(1, 0, 0, "nic"),
                PciFunction(0, 3, 1, ""),
            ],
            id="bridge-numbered",
        ),
        pytest.param(
            "a bridge the firmware has not numbered hides what is behind it",
            [{"bus": 0, "devices": [fn(1, 0, "rp1", pci_bridge=bridge(0, fn(0, 0, "nic")))]}],
            [PciFunction(0, 1, 0, "rp1")],
            id="bridge-unnumbered",
        ),
        pytest.param(
            "a bridge without a bus object",
            [{"bus": 0, "devices": [fn(1, 0, "rp1", pci_bridge={"devices": [fn(0)]})]}],
            [PciFunction(0, 1, 0, "rp1")],
            id="bridge-without-bus",
        ),
    ],
)
def test_query_pci_functions(case: str, reply: object, expected: list[PciFunction]) -> None:
    assert query_pci_functions(reply) == expected


@pytest.mark.parametrize(
    ("function", "devfn", "bdf"),
    [
        (PciFunction(0, 0, 0, None), 0, "00:00.0"),
        (PciFunction(0x1A, 0x1F, 7, None), 0xFF, "1a:1f.7"),
    ],
)
def test_pci_function_address(function: PciFunction, devfn: int, bdf: str) -> None:
    assert (function.devfn, function.bdf) == (devfn, bdf)


def device(path: str, bus: str, devfn: int, dev_id: str | None = None) -> PciDevice:
    return PciDevice(path, dev_id, "e1000e", bus, devfn, 0, None, False, False, None, False, None)


def topology() -> Topology:
    """pcie.0 with the mch (00.0, anonymous), root port rp1 (01.0) and an anonymous NIC at
    03.1; behind rp1 the named nic and an anonymous one."""
    devices = [
        device("/machine/q35/mch", ROOT, 0),
        device("/machine/peripheral/rp1", ROOT, 0x08, "rp1"),
        device("/machine/unattached/device[9]", ROOT, 0x19),
        device("/machine/peripheral/nic", RP_BUS, 0, "nic"),
        device("/machine/unattached/device[12]", RP_BUS, 0x08),
    ]
    return Topology(
        buses={
            ROOT: PciBus(ROOT, "PCIE", True, True, False, None),
            RP_BUS: PciBus(RP_BUS, "PCIE", True, False, False, "/machine/peripheral/rp1"),
        },
        devices={d.path: d for d in devices},
        main_root=ROOT,
    )


@pytest.mark.parametrize(
    ("case", "reply", "expected"),
    [
        pytest.param(
            "named by id, anonymous on the root bus by devfn",
            NUMBERED,
            {
                "/machine/q35/mch": "00:00.0",
                "/machine/peripheral/rp1": "00:01.0",
                "/machine/peripheral/nic": "01:00.0",
                "/machine/unattached/device[9]": "00:03.1",
            },
            id="numbered",
        ),
        pytest.param(
            "an anonymous function behind a bridge has nothing to match",
            [{"bus": 0, "devices": [fn(1, 0, "rp1", pci_bridge=bridge(1, fn(1)))]}],
            {"/machine/peripheral/rp1": "00:01.0"},
            id="anonymous-behind-bridge",
        ),
        pytest.param(
            "an id the topology lacks falls back to devfn on the root bus",
            [{"bus": 0, "devices": [fn(3, 1, "ghost")]}],
            {"/machine/unattached/device[9]": "00:03.1"},
            id="unknown-id-on-root",
        ),
        pytest.param("never read", None, {}, id="no-reply"),
    ],
)
def test_guest_bdfs(case: str, reply: object, expected: dict[str, str]) -> None:
    snap = Snapshot("t", "qmp-unix", "now")
    if reply is not None:
        snap.record("query-pci", None, {"return": reply})
    assert guest_bdfs(snap, topology()) == expected
