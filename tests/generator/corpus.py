"""Explicit regression scenarios: one per class of issue 11, each with what QEMU does
(the DMA log's truth per IOMMU group, asserted so the case stays what it claims) and
what qmpguard must then say (verdicts, and findings it must not raise)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.generator.model import AmdMode, Device, HotOp, Scenario
from tests.generator.oracle import Truth
from tests.generator.strategies import PVE_CFG, PVE_EXTRAS, pve_q35_layout

Check = Callable[[dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Case:
    name: str  # the regression class
    scenario: Scenario
    truth: dict[int, Truth]  # group -> what the DMA log must show
    verdicts: dict[int, str] = field(default_factory=dict)  # group -> qmpguard's verdict
    checks: tuple[Check, ...] = ()
    #: QEMU labels of the test matrix on which qmpguard (committed main) gets it wrong
    failing_on: tuple[str, ...] = ()
    #: amd-iommu cases: the builds (runner.amd_mode) whose behaviour `truth` describes
    amd: tuple[AmdMode, ...] = ()


@dataclass(frozen=True)
class KnownOpen:
    """A class of disagreement that committed main still has (its corpus case is a strict
    xfail): generated scenarios of that class that fail only that way are not counted
    as new failures. Remove the entry with the xfail when the class is fixed."""

    name: str  # the corpus case's name
    matches: Callable[[Scenario], bool]
    classes: frozenset[str]  # disagreement classes it explains


KNOWN_OPEN: list[KnownOpen] = []


def known_open(scn: Scenario, classes: set[str]) -> KnownOpen | None:
    return next((k for k in KNOWN_OPEN if k.matches(scn) and classes <= k.classes), None)


INTEL = Device("intel-iommu", "viommu", (("caching-mode", True),))
INTEL_PVE = Device("intel-iommu", None, (("intremap", "on"), ("caching-mode", True)))


def virtio(bus: str = "pcie.0", addr: str = "8.0", dev_id: str | None = "viommu") -> Device:
    return Device(
        "virtio-iommu-pci", dev_id, (("boot-bypass", False), ("bus", bus), ("addr", addr))
    )


def vfio(group: int, dev_id: str | None, bus: str, addr: str | None = None, **kw: Any) -> Device:
    props: list[tuple[str, Any]] = [("bus", bus)]
    if addr is not None:
        props.append(("addr", addr))
    return Device("vfio-pci", dev_id, tuple(props), group=group, **kw)


def port(dev_id: str, chassis: int, addr: str) -> Device:
    return Device(
        "pcie-root-port", dev_id, (("chassis", chassis), ("bus", "pcie.0"), ("addr", addr))
    )


def no_finding_on_driver(code: str, driver: str) -> Check:
    """`code` must not be raised on any device of type `driver`."""

    def check(doc: dict[str, Any]) -> list[str]:
        paths = {d["path"] for d in doc["devices"] if d["type"] == driver}
        return [
            f"{code} on {f['device']} ({driver}): {f['message']}"
            for f in doc["findings"]
            if f["code"] == code and f["device"] in paths
        ]

    return check


def qg004_names_no_bridge(bridge_ids: tuple[str, ...]) -> Check:
    """QG004 lists the devices sharing a space: bridges do no DMA and are never among them."""

    def check(doc: dict[str, Any]) -> list[str]:
        out = []
        for f in doc["findings"]:
            if f["code"] != "QG004":
                continue
            others = f["message"].split(" with ", 1)[-1]
            out += [f"QG004 names bridge {b}: {f['message']}" for b in bridge_ids if b in others]
        return out

    return check


def no_finding(code: str, dev_id: str) -> Check:
    """`code` must not be raised on /machine/peripheral/<dev_id>."""

    def check(doc: dict[str, Any]) -> list[str]:
        path = f"/machine/peripheral/{dev_id}"
        found = [f for f in doc["findings"] if f["code"] == code and f["device"] == path]
        return [f"{code} on {path}: {f['message']}" for f in found]

    return check


def has_finding(code: str, dev_id: str) -> Check:
    """`code` must be raised on /machine/peripheral/<dev_id>."""

    def check(doc: dict[str, Any]) -> list[str]:
        path = f"/machine/peripheral/{dev_id}"
        if any(f["code"] == code and f["device"] == path for f in doc["findings"]):
            return []
        return [f"no {code} on {path}: {[(f['code'], f['device']) for f in doc['findings']]}"]

    return check


def verdict_is(dev_id: str, verdict: str) -> Check:
    """qmpguard's verdict on /machine/peripheral/<dev_id> (as a check, not in `verdicts`:
    misbound there makes test_preflight_generated prove the fix by 0 bytes mapped, which
    no order reaches under amd-iommu pass-through)."""

    def check(doc: dict[str, Any]) -> list[str]:
        path = f"/machine/peripheral/{dev_id}"
        dev = next((d for d in doc["devices"] if d["path"] == path), None)
        said = dev["verdict"] if dev else None
        return [] if said == verdict else [f"{path}: verdict {said}, expected {verdict}"]

    return check


AMD_REMAP = Device("amd-iommu", "viommu", (("dma-remap", True),))
AMD_PLAIN = Device("amd-iommu", "viommu")


def amd_vm(*devices: Device, monitor: str = "qmp-unix") -> Scenario:
    """q35 with an amd-iommu among `devices` (the runner boots the AMD-Vi guest)."""
    return Scenario("q35", devices, monitor=monitor)  # type: ignore[arg-type]


def proxmox(viommu_position: str, launcher: str = "kvm-link", cfg_style: str = "plain") -> Scenario:
    hostpci = [
        vfio(1, "hostpci0", "ich9-pcie-port-1", "0x0"),
        vfio(2, "hostpci1", "ich9-pcie-port-2", "0x0"),
    ]
    devices = [*pve_q35_layout(), *hostpci]
    if viommu_position == "pve":  # machine: q35,viommu=intel: before -readconfig
        devices.insert(0, INTEL_PVE)
    else:  # args: -device intel-iommu,... appended after every hostpci
        devices.append(INTEL_PVE)
    return Scenario(
        "q35",
        tuple(devices),
        monitor="chardev-unix",
        launcher=launcher,  # type: ignore[arg-type]
        shape="proxmox",
        machine_last=True,
        cfg_name=PVE_CFG,
        monitor_name="100.qmp",
        extra=PVE_EXTRAS,
        cfg_style=cfg_style,  # type: ignore[arg-type]
    )


CASES: list[Case] = [
    Case(
        "named conventional pxb on i440fx (misordered)",
        Scenario(
            "pc",
            (
                Device("pxb", "pxb1", (("bus_nr", 32), ("bus", "pci.0"), ("addr", "9.0"))),
                vfio(1, "hostdev0", "pxb1", "1.0"),
                virtio("pci.0"),
            ),
        ),
        truth={1: "all-ram"},
        verdicts={1: "misbound"},
    ),
    Case(
        "named conventional pxb on i440fx (vIOMMU first)",
        Scenario(
            "pc",
            (
                virtio("pci.0"),
                Device("pxb", "pxb1", (("bus_nr", 32), ("bus", "pci.0"), ("addr", "9.0"))),
                vfio(1, "hostdev0", "pxb1", "1.0"),
            ),
        ),
        truth={1: "translated"},
        verdicts={1: "ok"},
    ),
    Case(
        "relaxed-JSON -device (single quotes), anonymous devices",
        Scenario(
            "q35",
            (
                vfio(1, None, "pcie.0", "9.0", syntax="relaxed"),
                Device("intel-iommu", None, (("caching-mode", True),), "json"),
                vfio(2, None, "pcie.0", "a.0", syntax="json"),
            ),
        ),
        truth={1: "all-ram", 2: "translated"},
        verdicts={1: "misbound", 2: "ok"},
    ),
    Case(
        "hot-unplug of an anonymous device",
        Scenario(
            "q35",
            (
                port("rp1", 1, "8.0"),
                vfio(1, None, "rp1"),
                INTEL,
                vfio(2, None, "pcie.0", "9.0"),
                vfio(3, None, "pcie.0", "a.0"),
            ),
            hotplug=(HotOp("del", 1),),
        ),
        truth={2: "translated", 3: "translated"},
        verdicts={2: "ok", 3: "ok"},
    ),
    Case(
        "unplug + re-plug with the same id",
        Scenario(
            "q35",
            (port("rp1", 1, "8.0"), vfio(1, "hostdev0", "rp1"), INTEL),
            hotplug=(HotOp("del", 1), HotOp("add", 1, "hostdev0", "rp1")),
        ),
        truth={1: "translated"},
        verdicts={1: "ok"},
    ),
    Case(
        "id with a newline (JSON -device)",
        Scenario(
            "q35",
            (
                vfio(1, "host\ndev0", "pcie.0", "9.0", syntax="json"),
                Device("intel-iommu", "viommu", (("caching-mode", True),), "json"),
                vfio(2, "hostdev1", "pcie.0", "a.0", syntax="json"),
            ),
        ),
        truth={1: "all-ram", 2: "translated"},
        verdicts={1: "misbound", 2: "ok"},
    ),
    Case(
        "QEMU binary named kvm (a link)",
        Scenario("q35", (vfio(1, "hostdev0", "pcie.0", "9.0"), INTEL), launcher="kvm-link"),
        truth={1: "all-ram"},
        verdicts={1: "misbound"},
    ),
    Case(
        "QEMU through a wrapper script, QMP over -chardev/-mon",
        Scenario(
            "q35",
            (vfio(1, "hostdev0", "pcie.0", "9.0"), INTEL),
            launcher="wrapper",
            monitor="chardev-unix",
        ),
        truth={1: "all-ram"},
        verdicts={1: "misbound"},
    ),
    Case(
        "Proxmox VE shape, vIOMMU from the args: line (after every hostpci)",
        proxmox("args"),
        truth={1: "all-ram", 2: "all-ram"},
        verdicts={1: "misbound", 2: "misbound"},
    ),
    Case(
        "Proxmox VE shape, vIOMMU before -readconfig (viommu=intel)",
        proxmox("pve"),
        truth={1: "translated", 2: "translated"},
        verdicts={1: "ok", 2: "ok"},
    ),
    Case(
        "virtio-iommu VM: no QG005 on virtio-iommu-pci itself",
        Scenario("q35", (virtio(), vfio(1, "hostdev0", "pcie.0", "9.0"))),
        truth={1: "translated"},
        verdicts={1: "ok"},
        checks=(no_finding_on_driver("QG005", "virtio-iommu-pci"),),
    ),
    Case(
        "vfio behind pcie-pci-bridge next to a pci-bridge: QG004 names no bridge",
        Scenario(
            "q35",
            (
                INTEL,
                Device("pcie-pci-bridge", "ppb", (("bus", "pcie.0"), ("addr", "5.0"))),
                Device(
                    "pci-bridge", "bridge-pb", (("chassis_nr", 1), ("bus", "ppb"), ("addr", "1.0"))
                ),
                vfio(1, "hostdev0", "ppb", "2.0"),
                vfio(2, "hostdev1", "bridge-pb", "3.0"),
            ),
        ),
        truth={1: "translated", 2: "translated"},
        verdicts={1: "ok", 2: "ok"},
        checks=(qg004_names_no_bridge(("bridge-pb", "ppb")),),
    ),
    Case(
        "QMP monitor that pretty-prints (-qmp-pretty)",
        Scenario("q35", (vfio(1, "hostdev0", "pcie.0", "9.0"), INTEL), monitor="qmp-pretty"),
        truth={1: "all-ram"},
        verdicts={1: "misbound"},
    ),
    Case(
        "bus=pcie.0 lands on an anonymous root port behind a bypass pxb-pcie",
        # QEMU looks a bus name up depth-first from the system bus: the pxb-pcie's host
        # bridge comes first, and an anonymous root port's bus is named pcie.0 too
        Scenario(
            "q35",
            (
                INTEL,
                Device(
                    "pxb-pcie",
                    "pxb1",
                    (("bus", "pcie.0"), ("addr", "0x16"), ("bus_nr", 32), ("bypass_iommu", True)),
                ),
                Device("pcie-root-port", None, (("bus", "pxb1"), ("addr", "0x1c"), ("chassis", 2))),
                Device("vfio-pci", "hostdev0", (("bus", "pcie.0"),), "json", group=1),
            ),
        ),
        truth={1: "all-ram"},
        verdicts={1: "ok"},
    ),
    Case(
        "-readconfig file with tabs and other whitespace QEMU accepts (Proxmox shape)",
        proxmox("args", cfg_style="tabs"),
        truth={1: "all-ram", 2: "all-ram"},
        verdicts={1: "misbound", 2: "misbound"},
    ),
    Case(
        "hot-unplug under virtio-iommu leaves an address space: iommu-as-order says before",
        # QMP over TCP: no command line, so the address-space order decides alone. The
        # unplugged device's virtio-iommu space (devfn 0 behind its root port) stays, and
        # the rule takes a "-0" space for one only machine-done creates: hostdev0, realized
        # after the vIOMMU (0 bytes mapped), gets QG001
        Scenario(
            "q35",
            (
                virtio(addr="e.0"),
                Device("pci-bridge", "pb", (("bus", "pcie.0"), ("addr", "8.0"), ("chassis_nr", 9))),
                port("rp1", 1, "1c.0"),
                vfio(1, "hostdev1", "rp1"),
                vfio(2, "hostdev0", "pb", "3.0"),
            ),
            monitor="qmp-tcp",
            hotplug=(HotOp("del", 1),),
        ),
        truth={2: "translated"},
    ),
    Case(
        "amd-iommu dma-remap: vfio realized before it keeps all RAM, after it translated",
        amd_vm(
            vfio(1, "hostdev1", "pcie.0", "9.0"),
            AMD_REMAP,
            port("rp1", 1, "a.0"),
            vfio(2, "hostdev2", "rp1"),
        ),
        truth={1: "all-ram", 2: "translated"},
        verdicts={1: "misbound", 2: "ok"},
        amd=(AmdMode.REMAP,),
    ),
    Case(
        "amd-iommu dma-remap over QMP only (TCP): never ok for the misordered device",
        amd_vm(
            port("rp1", 1, "a.0"),
            vfio(1, "hostdev1", "rp1"),
            AMD_REMAP,
            vfio(2, "hostdev2", "pcie.0", "9.0"),
            monitor="qmp-tcp",
        ),
        truth={1: "all-ram", 2: "translated"},
        amd=(AmdMode.REMAP,),
    ),
    Case(
        "amd-iommu in pass-through: all RAM in either order, ok only with QG003",
        amd_vm(
            vfio(1, "hostdev1", "pcie.0", "9.0"),
            AMD_PLAIN,
            port("rp1", 1, "a.0"),
            vfio(2, "hostdev2", "rp1"),
        ),
        truth={1: "all-ram", 2: "all-ram"},
        verdicts={2: "ok"},
        checks=(verdict_is("hostdev1", "misbound"), has_finding("QG003", "hostdev2")),
        amd=(AmdMode.PASSTHROUGH, AmdMode.REMAP),
    ),
    Case(
        "amd-iommu pass-through on 10.0: vfio at 00:14.0 (the IOAPIC's devid) maps nothing",
        # amd-iommu creates the space of 00:14.0 (AMDVI_IOAPIC_SB_DEVID) in its own
        # realize, before 10.0.4 ahead of the region its pass-through alias points at:
        # on 10.0.2 (pt=on) a vfio device there, realized after the amd-iommu, has 0
        # bytes mapped, while the one at 09.0 keeps all RAM (pass-through). `info mtree
        # -f` shows it: amd_iommu_devfn_160 has "No rendered FlatView". No QG003 there.
        amd_vm(
            AMD_PLAIN, vfio(1, "hostdev1", "pcie.0", "14.0"), vfio(2, "hostdev2", "pcie.0", "9.0")
        ),
        truth={1: "translated", 2: "all-ram"},
        verdicts={1: "ok", 2: "ok"},
        checks=(no_finding("QG003", "hostdev1"), has_finding("QG003", "hostdev2")),
        amd=(AmdMode.PASSTHROUGH,),
    ),
    Case(
        "amd-iommu without dma-remap on 10.1+: vfio at 00:14.0 keeps all RAM like the rest",
        # the other side of the case above: from 10.1 the IOAPIC's space is made after
        # the pass-through region, so 00:14.0 maps all RAM like 09.0: QG003 on both
        amd_vm(
            AMD_PLAIN, vfio(1, "hostdev1", "pcie.0", "14.0"), vfio(2, "hostdev2", "pcie.0", "9.0")
        ),
        truth={1: "all-ram", 2: "all-ram"},
        verdicts={1: "ok", 2: "ok"},
        checks=(has_finding("QG003", "hostdev1"), has_finding("QG003", "hostdev2")),
        amd=(AmdMode.REMAP,),
    ),
    Case(
        "vfio at 00:14.0 realized before amd-iommu: all RAM, misbound on every version",
        # the IOAPIC's space does not exist yet when vfio asks: plain guest memory
        amd_vm(vfio(1, "hostdev1", "pcie.0", "14.0"), AMD_PLAIN),
        truth={1: "all-ram"},
        checks=(verdict_is("hostdev1", "misbound"), has_finding("QG001", "hostdev1")),
        amd=(AmdMode.REFUSES, AmdMode.PASSTHROUGH, AmdMode.REMAP),
    ),
    Case(
        "amd-iommu where QEMU refuses vfio behind it (7.2): the order that runs is misbound",
        amd_vm(port("rp1", 1, "a.0"), vfio(1, "hostdev1", "rp1"), AMD_PLAIN),
        truth={1: "all-ram"},
        checks=(verdict_is("hostdev1", "misbound"), has_finding("QG001", "hostdev1")),
        amd=(AmdMode.REFUSES,),
    ),
]
