"""Each deduction of the address-space-order evidence (qmpguard/analysis/as_order.py) and
the per-model naming table (viommu_models.py), on small hand-built inputs: one row, one
case, one expected conclusion (or None where the rule must stay silent)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qmpguard.analysis.as_order import (
    AsOrderInput,
    IommuSpace,
    Sequence,
    as_order_evidence,
    early_devfns,
    intruder_rule,
    latecomer_rule,
    observed_sequence,
    processed_before,
    unexplained_devfns,
)
from qmpguard.analysis.binding import ExpectedBinding, Requester
from qmpguard.analysis.model import BindingKind, Relative
from qmpguard.analysis.mtree import AddressSpaceEntry
from qmpguard.analysis.topology import PciBus, PciDevice, Topology
from qmpguard.analysis.viommu import VIommu
from qmpguard.analysis.viommu_models import MODELS, SpaceNaming, model

BEFORE, AFTER = Relative.BEFORE, Relative.AFTER


def named(*cases: tuple[object, ...]) -> list[object]:
    """Table rows whose first column is the case's name (and its test id)."""
    return [pytest.param(*c, id=str(c[0])) for c in cases]


ROOT = "/machine/q35/pcie.0"
RP = "/machine/peripheral/rp1/rp1"  # a root port's secondary bus, behind ROOT
PPB = "/machine/peripheral/ppb/ppb"  # a PCIe-to-PCI bridge's bus, behind ROOT
DEEP = "/machine/peripheral/pb/pb"  # a PCI bridge's bus, behind PPB


def naming(kind: str) -> SpaceNaming:
    n = model(kind).naming
    assert n is not None
    return n


INTEL, VIRTIO = naming("intel"), naming("virtio")


def df(slot: int, fn: int = 0) -> int:
    return (slot << 3) | fn


def pci(
    name: str,
    bus: str = ROOT,
    devfn: int = 0,
    vfio: bool = False,
    hotplugged: bool | None = False,
) -> PciDevice:
    return PciDevice(
        path=f"/machine/peripheral/{name}",
        id=name,
        type="vfio-pci" if vfio else "e1000e",
        bus=bus,
        devfn=devfn,
        creation_index=0,
        hotplugged=hotplugged,
        vfio=vfio,
        virtio=False,
        iommu_platform=None,
        pcie_to_pci_bridge=False,
        viommu_kind=None,
    )


def topology() -> Topology:
    """ROOT with a root port (RP), a PCIe-to-PCI bridge (PPB) and a PCI bridge behind it."""
    bridges = {
        "rp1": pci("rp1", ROOT, df(2)),
        "ppb": pci("ppb", ROOT, df(5)),
        "pb": pci("pb", PPB, df(3)),
    }
    buses = [
        PciBus(ROOT, "PCIE", True, True, False, None),
        PciBus(RP, "PCIE", True, False, False, bridges["rp1"].path),
        PciBus(PPB, "PCI", False, False, False, bridges["ppb"].path),
        PciBus(DEEP, "PCI", False, False, False, bridges["pb"].path),
    ]
    return Topology(
        buses={b.path: b for b in buses},
        devices={d.path: d for d in bridges.values()},
        main_root=ROOT,
    )


TOPO = topology()


# ------------------------------------------------------------------ naming table


@pytest.mark.parametrize(
    ("kind", "root", "parsed"),
    [
        ("intel", "vtd-00.0", (0, None)),
        ("intel", "vtd-09.0", (df(9), None)),
        ("intel", "vtd-1f.3", (df(0x1F, 3), None)),
        ("intel", "vtd-04.0-dmar", None),  # the region inside the space, not its root
        ("intel", "vtd-ir", None),
        ("intel", "vtd-1F.0", None),  # QEMU prints lower-case hex
        ("intel", "vtd-00.8", None),  # no function 8
        ("intel", "memory", None),
        ("virtio", "virtio-iommu-memory-region-7-72", (72, 7)),
        ("virtio", "virtio-iommu-memory-region-0-0", (0, 0)),
        ("virtio", "virtio-iommu-memory-region-72", None),  # no counter
        ("virtio", "vtd-09.0", None),
        ("amd", "amd_iommu_devfn_160", (160, None)),
        ("amd", "amd_iommu_devfn_8", (8, None)),
        ("amd", "amd_iommu_devfn_x", None),
        ("smmuv3", "smmuv3-iommu-memory-region-16-0", (16, None)),
        ("smmuv3", "smmuv3-iommu-memory-region-16", None),
    ],
)
def test_naming_parse(kind: str, root: str, parsed: tuple[int, int | None] | None) -> None:
    assert naming(kind).parse(root) == parsed


@pytest.mark.parametrize(
    ("kind", "devfn", "shown"),
    [
        ("intel", 0, "vtd-00.0"),
        ("intel", df(0x1F, 3), "vtd-1f.3"),
        ("virtio", 72, "virtio-iommu …-72"),
        ("amd", 160, "amd_iommu_devfn_160"),
        ("smmuv3", 16, "smmuv3-iommu-memory-region-16-…"),
    ],
)
def test_naming_display(kind: str, devfn: int, shown: str) -> None:
    assert naming(kind).display(devfn) == shown


@pytest.mark.parametrize("kind", ["intel", "amd"])
def test_display_parses_back_for_every_devfn(kind: str) -> None:
    """Without a counter the displayed name is the space's real name."""
    n = naming(kind)
    assert [n.parse(n.display(d)) for d in range(256)] == [(d, None) for d in range(256)]


@pytest.mark.parametrize(
    ("kind", "own_space"),
    [("intel", 0), ("virtio", None), ("amd", 160), ("smmuv3", None)],
)
def test_own_space_is_the_ioapics(kind: str, own_space: int | None) -> None:
    """intel-iommu (IOAPIC vtd-00.0) and amd-iommu (devfn 160) create a space in realize."""
    assert naming(kind).own_space_devfn == own_space


@pytest.mark.parametrize("kind", ["riscv", "no-such-model"])
def test_models_without_a_naming(kind: str) -> None:
    assert model(kind).naming is None


# ------------------------------------------------------------------ observed_sequence


def entries(*rows: tuple[int, str]) -> list[AddressSpaceEntry]:
    """(flat view, root) rows in printed order."""
    return [AddressSpaceEntry(fv, i, "as", root) for i, (fv, root) in enumerate(rows)]


@pytest.mark.parametrize(
    ("name", "naming_", "rows", "spaces", "global_rank"),
    named(
        (
            "intel: printed order in each flat view, other roots skipped",
            INTEL,
            [(0, "vtd-00.0"), (0, "vtd-09.0"), (1, "memory"), (0, "vtd-03.0")],
            [(0, 0, 0), (0, 1, df(9)), (0, 3, df(3))],
            False,
        ),
        (
            "intel: a space in two flat views is listed twice",
            INTEL,
            [(0, "vtd-09.0"), (1, "vtd-09.0")],
            [(0, 0, df(9)), (1, 1, df(9))],
            False,
        ),
        (
            "virtio: by counter, whatever the printed order, once per name",
            VIRTIO,
            [
                (2, "virtio-iommu-memory-region-5-24"),
                (0, "virtio-iommu-memory-region-1-72"),
                (1, "virtio-iommu-memory-region-5-24"),
                (0, "memory"),
            ],
            [(0, 1, 72), (0, 5, 24)],
            True,
        ),
        ("no space of the model", INTEL, [(0, "memory"), (0, "I/O")], [], False),
    ),
)
def test_observed_sequence(
    name: str,
    naming_: SpaceNaming,
    rows: list[tuple[int, str]],
    spaces: list[tuple[int, int, int]],
    global_rank: bool,
) -> None:
    expected = Sequence(tuple(IommuSpace(*s) for s in spaces), global_rank)
    assert observed_sequence(entries(*rows), naming_) == expected, name


@pytest.mark.parametrize(
    ("a", "b", "global_rank", "comparable"),
    [
        (IommuSpace(0, 1, 8), IommuSpace(0, 2, 16), False, True),
        (IommuSpace(0, 1, 8), IommuSpace(1, 2, 16), False, False),
        (IommuSpace(0, 1, 8), IommuSpace(1, 2, 16), True, True),
    ],
)
def test_ranks_compare_within_a_flat_view_unless_global(
    a: IommuSpace, b: IommuSpace, global_rank: bool, comparable: bool
) -> None:
    assert Sequence((a, b), global_rank).comparable(a, b) is comparable


# ------------------------------------------------------------------ early_devfns

ME = Requester(ROOT, df(9))


@pytest.mark.parametrize(
    ("name", "naming_", "groups", "early"),
    named(
        ("intel: only the vIOMMU's own space", INTEL, {ME: [True]}, {0}),
        ("virtio: nothing", VIRTIO, {ME: [True]}, set()),
        ("another vfio requester", VIRTIO, {ME: [True], Requester(ROOT, df(4)): [True]}, {32}),
        (
            "a plain device is not early",
            VIRTIO,
            {ME: [True], Requester(ROOT, df(3)): [False]},
            set(),
        ),
        (
            "a shared (aliased) requester with one vfio device among others",
            VIRTIO,
            {ME: [True], Requester(PPB, 0): [False, True]},
            {0},
        ),
        (
            "intel: another vfio plus the own space",
            INTEL,
            {ME: [True], Requester(RP, 0): [True]},
            {0},
        ),
    ),
)
def test_early_devfns(
    name: str, naming_: SpaceNaming, groups: dict[Requester, list[bool]], early: set[int]
) -> None:
    built = {
        r: [pci(f"d{r.devfn}x{i}", r.bus, r.devfn, vfio=v) for i, v in enumerate(flags)]
        for r, flags in groups.items()
    }
    assert early_devfns(built, ME, naming_) == early, name


# ------------------------------------------------------------------ intruder_rule


def seq(*spaces: tuple[int, int, int], global_rank: bool = False) -> Sequence:
    return Sequence(tuple(IommuSpace(*s) for s in spaces), global_rank)


@pytest.mark.parametrize(
    ("name", "sequence", "me", "early", "conclusion"),
    named(
        (
            "a batch-only space precedes mine: BEFORE",
            seq((0, 0, 0), (0, 1, df(3)), (0, 2, df(9))),
            IommuSpace(0, 2, df(9)),
            {0},
            BEFORE,
        ),
        (
            "only early spaces precede mine",
            seq((0, 0, 0), (0, 1, df(4)), (0, 2, df(9))),
            IommuSpace(0, 2, df(9)),
            {0, df(4)},
            None,
        ),
        (
            "the batch-only space comes after mine",
            seq((0, 0, 0), (0, 1, df(9)), (0, 2, df(3))),
            IommuSpace(0, 1, df(9)),
            {0},
            None,
        ),
        (
            "earlier, but in another flat view: not comparable",
            seq((1, 0, df(3)), (0, 1, df(9))),
            IommuSpace(0, 1, df(9)),
            set(),
            None,
        ),
        (
            "another flat view, global counter: comparable, BEFORE",
            seq((0, 3, df(3)), (0, 7, df(9)), global_rank=True),
            IommuSpace(0, 7, df(9)),
            set(),
            BEFORE,
        ),
        ("mine alone", seq((0, 0, df(9))), IommuSpace(0, 0, df(9)), set(), None),
    ),
)
def test_intruder_rule(
    name: str, sequence: Sequence, me: IommuSpace, early: set[int], conclusion: Relative | None
) -> None:
    found = intruder_rule(sequence, me, early, INTEL, "hostdev0")
    assert (found.conclusion if found else None) == conclusion, name


def test_intruder_rule_names_the_intruder() -> None:
    found = intruder_rule(
        seq((0, 0, df(3)), (0, 1, df(9))), IommuSpace(0, 1, df(9)), set(), INTEL, "hostdev0"
    )
    assert found is not None and "created after vtd-03.0" in found.detail


# ------------------------------------------------------------------ processed_before


@pytest.mark.parametrize(
    ("name", "a", "b", "first"),
    named(
        ("same bus, lower devfn first", pci("a", ROOT, df(3)), pci("b", ROOT, df(9)), True),
        ("same bus, higher devfn later", pci("a", ROOT, df(9)), pci("b", ROOT, df(3)), False),
        ("same bus, same devfn: not before", pci("a", ROOT, df(3)), pci("b", ROOT, df(3)), False),
        ("a behind a bridge on b's bus: newer bus first", pci("a", RP, 0), pci("b", ROOT, 0), True),
        ("two bridges deep", pci("a", DEEP, df(4)), pci("b", ROOT, df(1)), True),
        ("b behind a bridge on a's bus", pci("a", ROOT, 0), pci("b", RP, 0), False),
        ("sibling buses: neither", pci("a", RP, 0), pci("b", PPB, df(1)), False),
    ),
)
def test_processed_before(name: str, a: PciDevice, b: PciDevice, first: bool) -> None:
    assert processed_before(TOPO, a, b) is first, name


# ------------------------------------------------------------------ latecomer_rule

HOSTDEV = pci("hostdev0", ROOT, df(9), vfio=True)


@dataclass(frozen=True)
class Other:
    """One other requester: its device and where its space sits in the sequence."""

    dev: PciDevice
    spaces: tuple[tuple[int, int], ...]  # (flat view, rank) of each listed space


@pytest.mark.parametrize(
    ("name", "naming_", "me", "others", "global_rank", "conclusion"),
    named(
        (
            "a device the batch creates first comes after mine: AFTER",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(3)), ((0, 2),))],
            False,
            AFTER,
        ),
        (
            "it comes before mine: not this rule's case",
            INTEL,
            (0, 2),
            [Other(pci("nic", ROOT, df(3)), ((0, 1),))],
            False,
            None,
        ),
        (
            "the batch creates it after mine anyway (higher devfn)",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(0xB)), ((0, 2),))],
            False,
            None,
        ),
        (
            "hot-plugged: its space is not from the batch",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(3), hotplugged=True), ((0, 2),))],
            False,
            None,
        ),
        (
            "hot-plug unknown: not from the batch for sure",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(3), hotplugged=None), ((0, 2),))],
            False,
            None,
        ),
        (
            "another vfio device: early itself",
            INTEL,
            (0, 1),
            [Other(pci("vf2", ROOT, df(3), vfio=True), ((0, 2),))],
            False,
            None,
        ),
        (
            "in another flat view: not comparable",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(3)), ((1, 2),))],
            False,
            None,
        ),
        (
            "listed twice, once before mine: not all after",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(3)), ((0, 0), (0, 2)))],
            False,
            None,
        ),
        (
            "not in the sequence at all",
            INTEL,
            (0, 1),
            [Other(pci("nic", ROOT, df(3)), ())],
            False,
            None,
        ),
        (
            "behind a root port (newer bus, processed first), after mine: AFTER",
            VIRTIO,
            (0, 1),
            [Other(pci("nic", RP, 0), ((0, 2),))],
            True,
            AFTER,
        ),
        (
            "intel: devfn 0 is the vIOMMU's own space, never a witness",
            INTEL,
            (0, 1),
            [Other(pci("nic", RP, 0), ((0, 2),))],
            False,
            None,
        ),
    ),
)
def test_latecomer_rule(
    name: str,
    naming_: SpaceNaming,
    me: tuple[int, int],
    others: list[Other],
    global_rank: bool,
    conclusion: Relative | None,
) -> None:
    mine = Requester(HOSTDEV.bus, HOSTDEV.devfn)
    groups = {mine: [HOSTDEV]} | {Requester(o.dev.bus, o.dev.devfn): [o.dev] for o in others}
    mine_space = IommuSpace(me[0], me[1], HOSTDEV.devfn)
    listed = [IommuSpace(fv, rank, o.dev.devfn) for o in others for fv, rank in o.spaces]
    sequence = Sequence(tuple(sorted([mine_space, *listed], key=lambda s: s.rank)), global_rank)
    ctx = AsOrderInput(TOPO, groups, sequence, naming_, "hostdev0", "viommu")
    early = early_devfns(groups, mine, naming_)
    found = latecomer_rule(ctx, mine_space, mine, early)
    assert (found.conclusion if found else None) == conclusion, name


# ------------------------------------------------------------------ as_order_evidence

VTD = VIommu("/machine/peripheral/viommu", "intel-iommu", "intel", ROOT, False)


def vtd_bindings(*devs: PciDevice) -> dict[str, ExpectedBinding]:
    return {
        d.path: ExpectedBinding(BindingKind.VIOMMU, VTD, Requester(d.bus, d.devfn)) for d in devs
    }


@pytest.mark.parametrize(
    ("name", "dev", "others", "rows", "conclusion", "why"),
    named(
        (
            "created in the batch after a plain device: BEFORE",
            HOSTDEV,
            [pci("nic", ROOT, df(3))],
            [(0, "vtd-00.0"), (0, "vtd-03.0"), (0, "vtd-09.0")],
            BEFORE,
            "",
        ),
        (
            "created before the batch: AFTER",
            HOSTDEV,
            [pci("nic", ROOT, df(3))],
            [(0, "vtd-00.0"), (0, "vtd-09.0"), (0, "vtd-03.0")],
            AFTER,
            "",
        ),
        (
            "nothing the batch creates before it: both orders agree",
            pci("hostdev0", ROOT, df(1), vfio=True),
            [pci("nic", ROOT, df(3))],
            [(0, "vtd-00.0"), (0, "vtd-01.0"), (0, "vtd-03.0")],
            None,
            "both orders predict the same",
        ),
        (
            "each space in its own flat view (translation on)",
            HOSTDEV,
            [pci("nic", ROOT, df(3))],
            [(0, "vtd-00.0"), (1, "vtd-09.0"), (2, "vtd-03.0")],
            None,
            "spread over 3 flat views",
        ),
        (
            "the device's space shares the vIOMMU's own name",
            pci("hostdev0", RP, 0, vfio=True),
            [],
            [(0, "vtd-00.0")],
            None,
            "also the vIOMMU's own space",
        ),
        (
            "two spaces with the device's name",
            HOSTDEV,
            [pci("nic", RP, df(9))],
            [(0, "vtd-09.0"), (0, "vtd-09.0")],
            None,
            "ambiguous",
        ),
        (
            "hot-plugged",
            pci("hostdev0", ROOT, df(9), vfio=True, hotplugged=True),
            [],
            [(0, "vtd-09.0")],
            None,
            "only cold-plugged devices",
        ),
    ),
)
def test_as_order_evidence(
    name: str,
    dev: PciDevice,
    others: list[PciDevice],
    rows: list[tuple[int, str]],
    conclusion: Relative | None,
    why: str,
) -> None:
    topo = topology()
    for d in (dev, *others):
        topo.devices[d.path] = d
    found = as_order_evidence(topo, vtd_bindings(dev, *others), entries(*rows), dev, VTD)
    assert (found.conclusion, why in found.detail) == (conclusion, True), (name, found.detail)


def test_as_order_evidence_without_mtree_says_so() -> None:
    topo = topology()
    topo.devices[HOSTDEV.path] = HOSTDEV
    found = as_order_evidence(topo, vtd_bindings(HOSTDEV), None, HOSTDEV, VTD)
    assert (found.conclusion, "info mtree -f not available" in found.detail) == (None, True)


@pytest.mark.parametrize("kind", ["smmuv3", "riscv"])
def test_as_order_evidence_only_for_checked_models(kind: str) -> None:
    viommu = VIommu("/machine/peripheral/viommu", f"{kind}-iommu", kind, ROOT, False)
    topo = topology()
    topo.devices[HOSTDEV.path] = HOSTDEV
    binding = {HOSTDEV.path: ExpectedBinding(BindingKind.VIOMMU, viommu, Requester(ROOT, df(9)))}
    found = as_order_evidence(topo, binding, entries((0, "memory")), HOSTDEV, viommu)
    assert (found.conclusion, "not established" in found.detail) == (None, True)


def test_amd_spaces_are_read_from_the_as_name() -> None:
    """amd-iommu prints `AS "amd_iommu_devfn_72", root: amdvi_root` (11.1): the name
    carries the requester, the root does not; the IOMMU's own space 160 comes first."""
    naming = MODELS["amd"].naming
    assert naming is not None and naming.order_checked and naming.own_space_devfn == 160
    rows = [
        AddressSpaceEntry(3, i, f"amd_iommu_devfn_{d}", "amdvi_root")
        for i, d in enumerate((160, 72, 0, 8))
    ]
    assert [s.devfn for s in observed_sequence(rows, naming).spaces] == [160, 72, 0, 8]


# ------------------------------------------------------------------ unexplained_devfns


@pytest.mark.parametrize(
    ("name", "spaces", "requesters", "unexplained"),
    [
        ("one space per requester", [df(0), df(8)], [df(0), df(8)], set()),
        # a device unplugged from behind a root port left its "-0" space; the q35 host
        # bridge at 00.0 explains only one of the two
        ("stale space after an unplug", [df(0), df(8), df(0)], [df(0), df(8)], {df(0)}),
        ("a space nobody present explains", [df(3)], [df(8)], {df(3)}),
    ],
)
def test_unexplained_devfns(
    name: str, spaces: list[int], requesters: list[int], unexplained: set[int]
) -> None:
    sequence = seq(*((0, rank, d) for rank, d in enumerate(spaces)), global_rank=True)
    groups = {Requester(f"{ROOT}/b{i}", d): [pci(f"d{i}")] for i, d in enumerate(requesters)}
    assert unexplained_devfns(sequence, groups, VIRTIO) == unexplained, name
