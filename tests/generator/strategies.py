"""Hypothesis strategies over the scenario model: only command lines QEMU accepts.

Rules the generator keeps (each learnt from QEMU refusing a generated line, or from
QEMU's source):
- pxb only on i440fx's pci.0 ("pxb devices cannot reside on a PCIe bus", "PXB devices
  can be attached only to root bus"); pxb-pcie only on pcie.0 and only root ports on it
  ("Only PCI/PCIe bridges can be plugged into pxb-pcie"); virtio-iommu-pci only on the
  main root bus; intel-iommu only on q35.
- QEMU realizes key=val (and -readconfig) devices before JSON ones: a device on the bus
  of a JSON bridge is JSON too.
- Ids outside QEMU's id_wellformed() (newline, quotes, spaces, a leading digit) only in
  JSON forms, and only on leaves (a bus is named after its bridge's id); -readconfig
  ids have at most 63 characters and no quote.
- Bridges with no id own a bus nobody can name: they stay empty.
- amd-iommu only on q35, only when the build's AmdMode is known (runner.amd_mode), with
  dma-remap=on only where it exists (10.1+), the AMD-Vi guest always, no hot-plug steps,
  and no bypass buses where QEMU refuses vfio behind it (7.2): that refusal is QEMU's
  answer to every vfio device realized after the amd-iommu, a bypassing one included
  in the same VM, so its reference run could not speak for a bypassing device.
- Explicit slots on the root buses from 0x08 (auto-placed devices take the lowest free
  slot, from 1 on q35 and 2 on i440fx, so the two never meet); slot 0 behind a bridge
  (SHPC) is avoided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import Any

from hypothesis import strategies as st

from tests.generator.model import (
    AmdMode,
    Device,
    HotOp,
    Machine,
    Scenario,
    Syntax,
    Value,
    _kv_safe_id,
    main_bus,
)

SAFE_IDS = st.sampled_from(
    ["hostdev", "dev", "pci.", "net-", "a.b-c_d", "ich9-pcie-port-", "x", "VeryLong" * 6]
)
#: ids QEMU accepts in JSON -device (7.2, 10.0): checked by starting QEMU with each
WEIRD_IDS = st.sampled_from(
    [
        "line\nbreak",
        'dq"uote',
        "sq'uote",
        "with space",
        "1leading-digit",
        "colon:id",
        "x" * 90,
        "device[0]",  # the name of an anonymous device, but under /machine/peripheral
    ]
)
#: well-formed ids that are also names of buses or of the vIOMMU elsewhere: leaves only
TRICKY_LEAF_IDS = st.sampled_from(["pcie.0", "pci.0", "viommu", "iommu0", "pxb-internal"])


@dataclass
class _Node:
    """A device being built; `parent` is a builder index (None: on the root bus)."""

    driver: str
    parent: int | None
    slot: int | None = None
    fn: int = 0
    props: dict[str, Value] = field(default_factory=dict)
    named: bool = True
    group: int | None = None
    auto_bus: bool = False  # no bus= (QEMU picks)
    auto_addr: bool = False
    children: int = 0


class _Builder:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.nodes: list[_Node] = []
        self.root_slots: set[int] = set()
        self.chassis = 0
        self.bus_nrs = iter((0x20, 0x40, 0x60, 0x80, 0xA0))

    def bus_kind(self, parent: int | None) -> str:
        if parent is None:
            return "root-pci" if self.machine == "pc" else "root-pcie"
        d = self.nodes[parent].driver
        return {
            "pcie-root-port": "port",
            "pxb-pcie": "pxb-pcie",
            "pxb": "conv",
        }.get(d, "conv")

    def buses(self) -> list[int | None]:
        """Buses that can take one more device: the root, and every named bridge."""
        out: list[int | None] = [None]
        for i, n in enumerate(self.nodes):
            if n.driver in BRIDGES and n.named:
                if n.driver == "pcie-root-port" and self.used_fns(i) >= 8:
                    continue
                out.append(i)
        return out

    def has_bridges(self) -> bool:
        """Auto-placed devices (no bus=) go to the first PCI bus QEMU's search finds:
        only predictable while the root bus is the only one."""
        return any(n.driver in BRIDGES for n in self.nodes)

    def used_fns(self, parent: int) -> int:
        return sum(1 for n in self.nodes if n.parent == parent)

    def used_slots(self, parent: int) -> set[int]:
        return {n.slot for n in self.nodes if n.parent == parent and n.slot is not None}


BRIDGES = ("pcie-root-port", "pcie-pci-bridge", "pci-bridge", "i82801b11-bridge", "pxb", "pxb-pcie")
MONITORS = ["qmp-unix", "qmp-tcp", "chardev-unix", "qmp-unix", "qmp-tcp", "chardev-unix"]
MONITORS += ["qmp-unix", "qmp-tcp", "qmp-pretty"]
SYNTAXES: list[Syntax] = ["kv", "kv", "kvd", "kvl", "json", "relaxed"]
#: options managers and people add that create no PCI device (pairs)
HAND_EXTRAS = [
    ("-rtc", "base=utc"),
    ("-msg", "timestamp=on"),
    ("-smp", "1,sockets=1,cores=1,maxcpus=1"),
    ("-boot", "strict=on"),
    ("-k", "en-us"),
    ("-overcommit", "mem-lock=off"),
    ("-name", "guest=gen,debug-threads=on"),
    ("-no-user-config",),
    ("-pidfile", "{work}/vm.pid"),
    ("-global", "kvm-pit.lost_tick_policy=discard"),
]
#: an option that creates an anonymous PCI device itself (virtio-blk-pci)
IMPLICIT_DRIVE = ("-drive", "if=virtio,driver=null-co,read-zeroes=on")
#: versioned machine types every QEMU of the matrix has (7.2, 10.0, 11.1)
VERSIONED = {"q35": "pc-q35-7.2", "pc": "pc-i440fx-7.2"}
PARENTS = {  # bridge -> bus kinds it may sit on
    "pcie-root-port": {"root-pcie", "pxb-pcie"},
    "pcie-pci-bridge": {"root-pcie", "port"},
    "pci-bridge": {"root-pcie", "root-pci", "conv"},
    "i82801b11-bridge": {"root-pcie", "root-pci"},
    "pxb": {"root-pci"},
    "pxb-pcie": {"root-pcie"},
}


def _place(draw: Any, b: _Builder, node: _Node) -> None:
    """Give `node` an address on its parent bus (maybe sharing a multifunction slot)."""
    if node.parent is None:
        shared = [n for n in b.nodes if n.parent is None and n.slot is not None and n.fn < 7]
        if shared and draw(st.integers(0, 5)) == 0:
            other = draw(st.sampled_from(shared))
            node.slot = other.slot
            node.fn = 1 + max(n.fn for n in b.nodes if n.parent is None and n.slot == other.slot)
            node.props["multifunction"] = True
            for n in b.nodes:
                if n.parent is None and n.slot == other.slot:
                    n.props["multifunction"] = True
            return
        free = [s for s in range(0x08, 0x1E) if s not in b.root_slots]
        node.slot = draw(st.sampled_from(free))
        b.root_slots.add(node.slot)
        return
    kind = b.bus_kind(node.parent)
    if kind == "port":
        node.slot, node.fn = 0, b.used_fns(node.parent)
        if node.fn:
            node.props["multifunction"] = True
            for n in b.nodes:
                if n.parent == node.parent:
                    n.props["multifunction"] = True
        return
    start = 0 if kind == "pxb-pcie" else 1
    free = [s for s in range(start, 0x20) if s not in b.used_slots(node.parent)]
    node.slot = draw(st.sampled_from(free))


def _addr_text(draw: Any, slot: int, fn: int) -> str:
    if fn == 0 and draw(st.integers(0, 3)) == 0:
        text: str = draw(st.sampled_from([f"0x{slot:x}", f"{slot:x}"]))
        return text
    return f"{slot:x}.{fn}"


def _models(machine: Machine, amd: AmdMode | None, hot: bool, only: tuple[str, ...]) -> list[str]:
    """vIOMMU models to draw from (weighted by repetition); `only` restricts them."""
    models = ["intel", "virtio", "intel", "virtio", "none"] if machine == "q35" else []
    models = models or ["virtio", "virtio", "none"]
    if machine == "q35" and amd is not None and not hot:
        models += ["amd", "amd"]
    return [m for m in models if m in only] if only else models


@st.composite
def hand_scenarios(
    draw: Any,
    unusual_ids: bool = True,
    hot: bool = False,
    amd: AmdMode | None = None,
    only: tuple[str, ...] = (),
) -> Scenario:
    """Hand-written command lines: any topology, syntax and order QEMU accepts.

    hot: a q35 VM with hot-plug steps, one vfio device alone on a root port of pcie.0 (so
    that it can be unplugged) besides whatever else is drawn. amd: the build's AmdMode
    (None: no amd-iommu). only: vIOMMU models to keep (empty: all)."""
    machines: list[Machine] = ["q35"] if hot else ["q35", "pc"]
    machines = [m for m in machines if _models(m, amd, hot, only)]
    machine: Machine = draw(st.sampled_from(machines))
    model = draw(st.sampled_from(_models(machine, amd, hot, only)))
    bypass_ok = not (model == "amd" and amd is AmdMode.REFUSES)
    b = _Builder(machine)
    groups = iter(range(1, 20))
    if hot:
        b.chassis += 1
        port = _Node("pcie-root-port", None, props={"chassis": b.chassis})
        _place(draw, b, port)
        port.props.pop("multifunction", None)
        b.nodes.append(port)
        b.nodes.append(_Node("vfio-pci", len(b.nodes) - 1, slot=0, group=next(groups)))
    # --- bridges
    for _ in range(draw(st.integers(0, 4))):
        choices = [(br, p) for p in b.buses() for br in BRIDGES if b.bus_kind(p) in PARENTS[br]]
        choices = [c for c in choices if not (c[0] == "pxb" and machine != "pc")]
        bridge, parent = draw(st.sampled_from(choices))
        node = _Node(bridge, parent)
        _place(draw, b, node)
        if bridge == "pcie-root-port":
            b.chassis += 1
            node.props["chassis"] = b.chassis
        elif bridge == "pci-bridge":
            b.chassis += 1
            node.props["chassis_nr"] = b.chassis
        elif bridge in ("pxb", "pxb-pcie"):
            node.props["bus_nr"] = next(b.bus_nrs)
            if draw(st.integers(0, 2)) == 0 and bypass_ok:
                node.props["bypass_iommu"] = True
        b.nodes.append(node)
    # --- vfio devices and a filler
    n_vfio = draw(st.integers(0 if hot else 1, 2 if hot else 3))
    if draw(st.integers(0, 9)) == 0:
        n_vfio += 2  # now and then a crowd (anonymous matching, shared spaces)
    for _ in range(n_vfio):
        buses = [p for p in b.buses() if b.bus_kind(p) != "pxb-pcie"]
        parent = draw(st.sampled_from(buses))
        driver = draw(st.sampled_from(["vfio-pci", "vfio-pci", "vfio-pci", "vfio-pci-nohotplug"]))
        node = _Node(driver, parent, group=next(groups))
        _place(draw, b, node)
        b.nodes.append(node)
    for _ in range(draw(st.integers(0, 1))):
        buses = [p for p in b.buses() if b.bus_kind(p) != "pxb-pcie"]
        node = _Node("pci-testdev", draw(st.sampled_from(buses)))
        _place(draw, b, node)
        b.nodes.append(node)
    for n in b.nodes:
        if n.parent is not None:
            b.nodes[n.parent].children += 1
    # bridges without children may be anonymous; root-bus leaves may be auto-placed
    for n in b.nodes:
        if n.driver in BRIDGES and n.children == 0 and not hot:
            # not with hot-plug steps: a later bus=pcie.0 can land on an anonymous root
            # port's bus (also named pcie.0; seen on 11.1), where qtest cannot reach it
            n.named = draw(st.booleans())
        if n.driver in ("vfio-pci", "vfio-pci-nohotplug", "pci-testdev"):
            n.named = draw(st.integers(0, 2)) > 0
            if n.parent is None and "multifunction" not in n.props:
                n.auto_addr = draw(st.integers(0, 4)) == 0
                n.auto_bus = n.auto_addr and draw(st.booleans()) and not b.has_bridges()
    # --- hot-plug: empty named root ports on pcie.0 for it
    steps: list[_HotStep] = []
    if hot:
        steps = _hotplug_plan(draw, b, groups)
    # --- command-line order: a random topological order, the vIOMMU anywhere
    order: list[int] = []
    pending = list(range(len(b.nodes)))
    while pending:
        ready = [i for i in pending if b.nodes[i].parent is None or b.nodes[i].parent in order]
        pick = draw(st.sampled_from(ready))
        order.append(pick)
        pending.remove(pick)
    viommu_at = draw(st.integers(0, len(order)))
    # --- syntaxes: JSON bridges pull their subtree into JSON
    syntax: dict[int, Syntax] = {i: draw(st.sampled_from(SYNTAXES)) for i in order}
    for i in order:  # parents come first in `order`
        p = b.nodes[i].parent
        if (
            p is not None
            and syntax[p] in ("json", "relaxed")
            and syntax[i]
            not in (
                "json",
                "relaxed",
            )
        ):
            syntax[i] = syntax[p]
    devices: list[Device] = []
    ids: dict[int, str] = {}
    used: set[str] = {main_bus(machine)}
    for k, i in enumerate(order):
        n = b.nodes[i]
        dev_id = None
        if n.named:
            weird = (
                unusual_ids
                and syntax[i] in ("json", "relaxed")  # a bridge's children are JSON too
                and draw(st.integers(0, 2)) == 0
            )
            tricky = n.driver not in BRIDGES and draw(st.integers(0, 5)) == 0
            base = draw(WEIRD_IDS if weird else TRICKY_LEAF_IDS if tricky else SAFE_IDS)
            exact = (weird or tricky) and draw(st.booleans())
            dev_id = base if exact else base + str(k)
            while dev_id in used:
                dev_id += "x"
            used.add(dev_id)
            ids[i] = dev_id
        props: list[tuple[str, Value]] = []
        if not n.auto_bus:
            props.append(("bus", main_bus(machine) if n.parent is None else ids[n.parent]))
        if not n.auto_addr and n.slot is not None:
            props.append(("addr", _addr_text(draw, n.slot, n.fn)))
        props += [(key, v) for key, v in n.props.items()]
        devices.append(
            Device(n.driver, dev_id, tuple(props), syntax[i], n.group, draw(st.integers(0, 9)) == 0)
        )
    group_ids = {b.nodes[i].group: ids[i] for i in ids if b.nodes[i].group is not None}
    hot_ops = _hot_ops(steps, ids, group_ids)  # type: ignore[arg-type]
    devices.insert(viommu_at, _viommu(draw, model, machine, b, used, amd))
    devices = _readconfig_block(draw, devices)
    if draw(st.integers(0, 3)) == 0:  # a second -readconfig file
        devices = _readconfig_block(draw, devices)
    return Scenario(
        machine,
        tuple(d for d in devices if d.driver != "none"),
        monitor=draw(
            # TCP: no command line, the QMP-only evidence decides (where bugs hide)
            st.sampled_from(MONITORS)
        ),
        launcher=draw(st.sampled_from(["direct", "direct", "kvm-link", "wrapper", "wrapper-fork"])),
        bus_bypass=draw(st.integers(0, 5)) == 0 and bypass_ok,
        machine_last=draw(st.integers(0, 4)) == 0,
        hotplug=tuple(hot_ops),
        machine_alias=draw(st.sampled_from(["", "", "", VERSIONED[machine]])),
        machine_flag=draw(st.sampled_from(["-machine", "-M"])),
        implied_type=draw(st.booleans()),
        # QEMU's default devices: not with the VT-d guest (10.0's off-tree build then
        # never reaches the guest: it loads the system's UI modules and stalls)
        nodefaults=model in ("intel", "amd") or draw(st.integers(0, 4)) > 0,
        cfg_style=draw(st.sampled_from(["plain", "plain", "tabs", "tight", "wide"])),
        cfg_relative=draw(st.integers(0, 3)) == 0,
        cfg_deleted=draw(st.integers(0, 5)) == 0,
        extra=_extras(draw, not any(n.driver in ("pxb", "pxb-pcie") for n in b.nodes)),
    )


def _extras(draw: Any, implicit_ok: bool) -> tuple[str, ...]:
    picked = draw(st.lists(st.sampled_from(HAND_EXTRAS), max_size=4, unique=True))
    # -drive if=virtio's device goes to the first PCI bus QEMU finds: a pxb-pcie's root
    # bus (pxb or pxb-pcie) takes bridges only ("Only PCI/PCIe bridges can be plugged...")
    if implicit_ok and draw(st.integers(0, 5)) == 0:
        picked.append(IMPLICIT_DRIVE)
    return tuple(a for pair in picked for a in pair)


def _viommu(
    draw: Any, model: str, machine: Machine, b: _Builder, used: set[str], amd: AmdMode | None
) -> Device:
    dev_id = draw(st.sampled_from([None, "viommu", "iommu0", "vi"]))
    while dev_id in used:
        dev_id += "-x"
    if dev_id is not None:
        used.add(dev_id)
    if model == "intel":
        props: list[tuple[str, Value]] = [("caching-mode", True)]
        if draw(st.booleans()):
            props.insert(0, ("intremap", "on"))
        syntax: Syntax = draw(st.sampled_from(SYNTAXES))
        return Device("intel-iommu", dev_id, tuple(props), syntax)
    if model == "amd":
        # 10.1+: mostly dma-remap=on (translation the DMA log can see), sometimes not
        # (pass-through, QG003's case); its AMDVI-PCI function QEMU places itself
        remap = amd is AmdMode.REMAP and draw(st.integers(0, 3)) > 0
        props = [("dma-remap", True)] if remap else []
        return Device("amd-iommu", dev_id, tuple(props), draw(st.sampled_from(SYNTAXES)))
    if model == "virtio":
        free = [s for s in range(0x08, 0x1E) if s not in b.root_slots]
        slot = draw(st.sampled_from(free))
        b.root_slots.add(slot)
        syntax = draw(st.sampled_from(SYNTAXES))
        props = [("boot-bypass", False), ("bus", main_bus(machine)), ("addr", f"{slot:x}.0")]
        if not b.has_bridges() and draw(st.integers(0, 3)) == 0:
            props = [("boot-bypass", False)]  # QEMU places it (lowest free slot of the root)
        return Device("virtio-iommu-pci", dev_id, tuple(props), syntax)
    return Device("none")  # dropped by the caller


def _readconfig_block(draw: Any, devices: list[Device]) -> list[Device]:
    """Maybe move one contiguous run of key=val devices into a -readconfig file."""
    if draw(st.integers(0, 3)) != 0 or len(devices) < 2:
        return devices
    lo = draw(st.integers(0, len(devices) - 1))
    hi = draw(st.integers(lo + 1, len(devices)))
    out = []
    for k, d in enumerate(devices):
        if (
            lo <= k < hi
            and d.syntax in ("kv", "kvd", "kvl")
            and d.driver != "none"
            and (d.id is None or (len(d.id) <= 63 and '"' not in d.id))
        ):
            d = dc_replace(d, syntax="readconfig", long_option=False)
        out.append(d)
    return out


@dataclass(frozen=True)
class _HotStep:
    action: str  # "add" | "del"
    group: int
    port: int  # builder index of the root port
    id_kind: str = "none"  # add: "none" (anonymous), "name", "same" (the unplugged one's)


def _hotplug_plan(draw: Any, b: _Builder, groups: Any) -> list[_HotStep]:
    """Up to three steps on root ports of pcie.0: plug, unplug (named or anonymous),
    unplug then re-plug with the same id."""
    ports: list[int] = []
    for _ in range(draw(st.integers(1, 2))):
        b.chassis += 1
        node = _Node("pcie-root-port", None, props={"chassis": b.chassis})
        free = [s for s in range(0x08, 0x1E) if s not in b.root_slots]
        node.slot = draw(st.sampled_from(free))
        b.root_slots.add(node.slot)
        b.nodes.append(node)
        ports.append(len(b.nodes) - 1)
    occupied: dict[int, int] = {}  # port -> group of the vfio alone at 0.0 on it
    for n in b.nodes:
        if (
            n.driver == "vfio-pci"
            and n.parent is not None
            and b.nodes[n.parent].driver == "pcie-root-port"
            and b.nodes[n.parent].parent is None
            and b.used_fns(n.parent) == 1
            and n.group is not None
        ):
            occupied[n.parent] = n.group
    empty = list(ports)
    emptied: list[tuple[int, int]] = []  # (port, group) unplugged: re-pluggable
    steps: list[_HotStep] = []
    for _ in range(draw(st.integers(1, 3))):
        actions = [a for a, ok in (("del", occupied), ("re", emptied), ("add", empty)) if ok]
        if not actions:
            break
        action = draw(st.sampled_from(actions))
        if action == "del":
            port = draw(st.sampled_from(sorted(occupied)))
            group = occupied.pop(port)
            steps.append(_HotStep("del", group, port))
            emptied.append((port, group))
            empty.append(port)
            continue
        if action == "add":
            port, group = draw(st.sampled_from(empty)), next(groups)
            id_kind = draw(st.sampled_from(["name", "none"]))
        else:
            port, group = draw(st.sampled_from(emptied))
            emptied.remove((port, group))
            id_kind = "same"
        if port not in empty:
            continue
        steps.append(_HotStep("add", group, port, id_kind))
        empty.remove(port)
        occupied[port] = group
    return steps


def _hot_ops(steps: list[_HotStep], ids: dict[int, str], group_ids: dict[int, str]) -> list[HotOp]:
    ops = []
    for st_ in steps:
        if st_.action == "del":
            ops.append(HotOp("del", st_.group))
            continue
        dev_id = {
            "none": None,
            "name": f"hot{st_.group}",
            "same": group_ids.get(st_.group),
        }[st_.id_kind]
        if dev_id is not None and not _kv_safe_id(dev_id):
            dev_id = f"hot{st_.group}"  # 7.2's device_add: "Parameter 'id' expects an identifier"
        if dev_id is not None:
            group_ids[st_.group] = dev_id
        ops.append(HotOp("add", st_.group, dev_id, ids[st_.port]))
    return ops


# ------------------------------------------------------------------ managers' shapes

PVE_CFG = "pve-q35-4.0.cfg"
#: the rest of a Proxmox VE command line that TCG and plain QEMU take (no -id, -cpu
#: kvm64,+kvm_pv_*, -daemonize)
PVE_EXTRAS = (
    "-pidfile",
    "{work}/100.pid",
    "-smbios",
    "type=1,uuid=7dd5e2a0-1f2e-4f35-9d2b-6a3c3f1b1e11",
    "-smp",
    "1,sockets=1,cores=1,maxcpus=1",
    "-boot",
    "menu=on,strict=on,reboot-timeout=1000",
    "-vnc",
    "unix:{work}/100.vnc,password=on",
    "-k",
    "en-us",
    "-global",
    "kvm-pit.lost_tick_policy=discard",
    "-rtc",
    "driftfix=slew,base=localtime",
    "-iscsi",
    "initiator-name=iqn.1993-08.org.debian:01:4f5e6d7c8b9a",
)
LIBVIRT_EXTRAS = (
    "-name",
    "guest=gen,debug-threads=on",
    "-msg",
    "timestamp=on",
    "-no-user-config",
    "-uuid",
    "7dd5e2a0-1f2e-4f35-9d2b-6a3c3f1b1e11",
    "-overcommit",
    "mem-lock=off",
    "-rtc",
    "base=utc",
    "-boot",
    "strict=on",
)


def pve_q35_layout() -> list[Device]:
    """Proxmox VE's /usr/share/qemu-server/pve-q35-4.0.cfg (bridges part), as -readconfig
    `[device]` sections: DMI bridge pcidmi with pci-bridges pci.0..3, and root ports
    ich9-pcie-port-1..4 at 1c.0-1c.3."""
    rc: Syntax = "readconfig"
    out = [
        Device("i82801b11-bridge", "pcidmi", (("bus", "pcie.0"), ("addr", "1e.0")), rc),
    ]
    for n in range(4):
        out.append(
            Device(
                "pci-bridge",
                f"pci.{n}",
                (("bus", "pcidmi"), ("addr", f"{n + 1}.0"), ("chassis_nr", str(n + 1))),
                rc,
            )
        )
    for n in range(1, 5):
        props: list[tuple[str, Value]] = [("x-speed", "16"), ("x-width", "32")]
        if n == 1:
            props.append(("multifunction", "on"))
        props += [
            ("bus", "pcie.0"),
            ("addr", f"1c.{n - 1}"),
            ("port", str(n)),
            ("chassis", str(n)),
        ]
        out.append(Device("pcie-root-port", f"ich9-pcie-port-{n}", tuple(props), rc))
    return out


@st.composite
def proxmox_scenarios(draw: Any) -> Scenario:
    """Proxmox VE's shape: `kvm` link, QMP at <vmid>.qmp via -chardev/-mon, -readconfig
    of its q35 layout, hostpciN as vfio-pci on ich9-pcie-port-N (pcie=1) or pci.N,
    `-machine type=q35` last (Proxmox says `type=q35+pve0`: plain QEMU has no such
    machine). vIOMMU from `machine: q35,viommu=...` (before -readconfig: correct) or
    from the VM's `args:` line (appended after everything: misbound)."""
    viommu = draw(st.sampled_from(["intel-pve", "intel-args", "virtio-args", "none"]))
    hostpci: list[Device] = []
    for n in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) > 0:
            bus, addr = f"ich9-pcie-port-{n + 1}", "0x0"
        else:
            bus, addr = "pci.0", f"0x{0x10 + n:x}"
        hostpci.append(
            Device("vfio-pci", f"hostpci{n}", (("bus", bus), ("addr", addr)), group=n + 1)
        )
    devices: list[Device] = []
    if viommu == "intel-pve":
        devices.append(Device("intel-iommu", None, (("intremap", "on"), ("caching-mode", True))))
    devices += pve_q35_layout()
    devices += hostpci
    if viommu == "intel-args":
        devices.append(Device("intel-iommu", None, (("intremap", "on"), ("caching-mode", True))))
    elif viommu == "virtio-args":
        devices.append(
            Device(
                "virtio-iommu-pci",
                None,
                (("boot-bypass", False), ("bus", "pcie.0"), ("addr", "0x1b")),
            )
        )
    return Scenario(
        "q35",
        tuple(devices),
        extra=PVE_EXTRAS,
        cfg_style=draw(st.sampled_from(["plain", "tabs"])),
        monitor="chardev-unix",
        launcher=draw(st.sampled_from(["kvm-link", "kvm-link", "direct"])),
        shape="proxmox",
        machine_last=True,
        cfg_name=PVE_CFG,
        monitor_name="100.qmp",
    )


@st.composite
def libvirt_scenarios(draw: Any) -> Scenario:
    """libvirt's shape: every -device in strict JSON, the vIOMMU first, root ports
    pci.N (multifunction at 0x2), hostdevN on them, monitor via -chardev/-mon."""
    machine: Machine = draw(st.sampled_from(["q35", "pc"]))
    model = draw(
        st.sampled_from(["intel", "virtio", "none"] if machine == "q35" else ["virtio", "none"])
    )
    devices: list[Device] = []
    if model == "intel":
        devices.append(
            Device("intel-iommu", "iommu0", (("intremap", "on"), ("caching-mode", True)), "json")
        )
    elif model == "virtio":
        bus = main_bus(machine)
        devices.append(
            Device(
                "virtio-iommu-pci",
                "iommu0",
                (("boot-bypass", False), ("bus", bus), ("addr", "0x9")),
                "json",
            )
        )
    n_dev = draw(st.integers(1, 3))
    for n in range(n_dev):
        if machine == "q35":
            props: list[tuple[str, Value]] = [
                ("port", 16 + n),
                ("chassis", n + 1),
                ("bus", "pcie.0"),
                ("addr", f"0x2.0x{n:x}"),
            ]
            if n == 0:
                props.insert(3, ("multifunction", True))
            devices.append(Device("pcie-root-port", f"pci.{n + 1}", tuple(props), "json"))
            devices.append(
                Device(
                    "vfio-pci",
                    f"hostdev{n}",
                    (("bus", f"pci.{n + 1}"), ("addr", "0x0")),
                    "json",
                    group=n + 1,
                )
            )
        else:
            devices.append(
                Device(
                    "vfio-pci",
                    f"hostdev{n}",
                    (("bus", "pci.0"), ("addr", f"0x{0x10 + n:x}")),
                    "json",
                    group=n + 1,
                )
            )
    return Scenario(
        machine,
        tuple(devices),
        monitor="chardev-unix",
        shape="libvirt",
        monitor_name="monitor.sock",
        extra=LIBVIRT_EXTRAS,
        machine_alias=draw(st.sampled_from(["", VERSIONED[machine]])),
    )


def scenarios(
    unusual_ids: bool = True, amd: AmdMode | None = None, only: tuple[str, ...] = ()
) -> st.SearchStrategy[Scenario]:
    """Every kind: mostly hand-written lines (some with hot-plug steps), some Proxmox VE
    and libvirt shapes.

    unusual_ids: JSON ids outside QEMU's id_wellformed(), for builds that take them
    (runner.accepts_unusual_ids). amd: the build's AmdMode (runner.amd_mode; None: no
    amd-iommu). only: vIOMMU models to keep ("intel", "virtio", "amd", "none"; empty:
    all): then hand-written lines only."""
    hand = hand_scenarios(unusual_ids, amd=amd, only=only)
    if only:
        return hand
    hot = hand_scenarios(unusual_ids, hot=True)
    return st.one_of(hand, hand, hand, hand, hot, hot, proxmox_scenarios(), libvirt_scenarios())


# ------------------------------------------------------------------ aarch64 virt

#: options that create no PCI device and that qemu-system-aarch64 takes
ARM_EXTRAS = [("-rtc", "base=utc"), ("-msg", "timestamp=on"), ("-name", "guest=gen")]


@st.composite
def arm_scenarios(draw: Any, smmu: bool = False) -> Scenario:
    """aarch64 `virt` under -S (no guest is needed: virtio-iommu-pci with
    boot-bypass=false already translates, an unprogrammed SMMUv3 maps nothing): vfio
    devices on pcie.0, on root ports and behind a pcie-pci-bridge, with
    virtio-iommu-pci or (smmu: 10.2+) a `-device arm-smmuv3` anywhere in the order.
    QEMU refuses vfio realized after the SMMUv3 (oracle.refused_behind_viommu)."""
    model = draw(st.sampled_from(["virtio", "virtio", "none", *(["smmu"] * 2 if smmu else [])]))
    b = _Builder("virt")
    groups = iter(range(1, 20))
    for _ in range(draw(st.integers(0, 2))):
        choices = [
            (br, p)
            for p in b.buses()
            for br in ("pcie-root-port", "pcie-pci-bridge")
            if b.bus_kind(p) in PARENTS[br]
        ]
        bridge, parent = draw(st.sampled_from(choices))
        node = _Node(bridge, parent)
        _place(draw, b, node)
        if bridge == "pcie-root-port":
            b.chassis += 1
            node.props["chassis"] = b.chassis
        b.nodes.append(node)
    for _ in range(draw(st.integers(1, 3))):
        node = _Node("vfio-pci", draw(st.sampled_from(b.buses())), group=next(groups))
        _place(draw, b, node)
        b.nodes.append(node)
    order: list[int] = []
    pending = list(range(len(b.nodes)))
    while pending:
        ready = [i for i in pending if b.nodes[i].parent is None or b.nodes[i].parent in order]
        pick = draw(st.sampled_from(ready))
        order.append(pick)
        pending.remove(pick)
    syntax: dict[int, Syntax] = {}
    devices: list[Device] = []
    ids: dict[int, str] = {}
    for k, i in enumerate(order):
        n = b.nodes[i]
        p = n.parent
        syntax[i] = draw(st.sampled_from(SYNTAXES))
        if p is not None and syntax[p] in ("json", "relaxed"):
            syntax[i] = syntax[p]  # realized after its JSON bridge, like it
        ids[i] = f"{'hostdev' if n.group else 'br'}{k}"
        props: list[tuple[str, Value]] = [("bus", "pcie.0" if p is None else ids[p])]
        if n.slot is not None:
            props.append(("addr", f"{n.slot:x}.{n.fn}"))
        props += list(n.props.items())
        devices.append(Device(n.driver, ids[i], tuple(props), syntax[i], n.group))
    if model == "virtio":
        slot = draw(st.sampled_from([s for s in range(0x08, 0x1E) if s not in b.root_slots]))
        vprops = (("boot-bypass", False), ("bus", "pcie.0"), ("addr", f"{slot:x}.0"))
        viommu = Device("virtio-iommu-pci", "viommu", vprops, draw(st.sampled_from(SYNTAXES)))
        devices.insert(draw(st.integers(0, len(devices))), viommu)
    elif model == "smmu":
        viommu = Device("arm-smmuv3", "smmu0", (("primary-bus", "pcie.0"),))
        devices.insert(draw(st.integers(0, len(devices))), viommu)
    extras = draw(st.lists(st.sampled_from(ARM_EXTRAS), max_size=2, unique=True))
    return Scenario(
        "virt",
        tuple(devices),
        monitor=draw(st.sampled_from(["qmp-unix", "qmp-tcp", "chardev-unix"])),
        launcher=draw(st.sampled_from(["direct", "wrapper"])),
        machine_flag=draw(st.sampled_from(["-machine", "-M"])),
        extra=tuple(a for pair in extras for a in pair),
    )
