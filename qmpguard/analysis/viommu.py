"""Which vIOMMUs a VM has and which root buses each one translates."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmpguard import qemu_names as T
from qmpguard.analysis.shape import qom_get, qom_list
from qmpguard.analysis.topology import Topology, is_builtin
from qmpguard.analysis.viommu_models import (
    PROPERTIES,
    Version,
    passthrough,
    refuses_vfio_after,
)
from qmpguard.qemu_names import child_type
from qmpguard.snapshot import Snapshot


@dataclass(frozen=True)
class VIommu:
    """One vIOMMU and the root bus whose IOMMU ops it installs."""

    path: str
    type: str
    kind: str  # intel | amd | virtio | smmuv3 | riscv
    covers: str | None  # root bus path it translates, None if unknown
    machine_created: bool  # created with the machine, before every -device
    #: Why QEMU refuses vfio-pci realized after it (model rule), None if it does not.
    refuses_vfio_after: str | None = None
    #: Why it keeps vfio devices in pass-through whatever the guest does, None if not.
    passthrough: str | None = None

    @property
    def label(self) -> str:
        tail = self.path.rsplit("/", 1)[-1]
        return tail if self.path.startswith("/machine/peripheral/") else self.path


def sysbus_viommus(snap: Snapshot) -> list[tuple[str, str]]:
    """(QOM path, type) of every sysbus vIOMMU (intel-iommu, amd-iommu, arm-smmuv3)."""
    out = []
    for container in T.OBJECT_CONTAINERS:
        for name, etype in qom_list(snap, container):
            vtype = child_type(etype)
            if vtype in T.VIOMMU_TYPES and vtype not in T.PCI_VIOMMU_TYPES:
                out.append((f"{container}/{name}", vtype))
    return out


def viommu_reads(snap: Snapshot) -> list[tuple[str, dict[str, str]]]:
    """The QOM reads find_viommus needs: a sysbus vIOMMU's primary bus, if it has one."""
    return [
        ("qom-get", {"path": path, "property": prop})
        for path, vtype in sysbus_viommus(snap)
        for prop in ("primary-bus", *PROPERTIES.get(vtype, ()))
    ]


def _props(snap: Snapshot, path: str, vtype: str) -> dict[str, object]:
    """The model-rule properties QEMU has for this vIOMMU (absent ones are left out)."""
    out: dict[str, object] = {}
    for prop in PROPERTIES.get(vtype, ()):
        value = snap.get_or(None, "qom-get", path=path, property=prop)
        if isinstance(value, bool):
            out[prop] = value
    return out


def qemu_version(snap: Snapshot) -> Version | None:
    """(major, minor) of the inspected QEMU."""
    parts = (snap.qemu_version or "").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def find_viommus(snap: Snapshot, topo: Topology) -> list[VIommu]:
    """vIOMMUs from QOM: sysbus ones in the containers, PCI ones on the buses."""
    found: list[VIommu] = []
    for path, vtype in sysbus_viommus(snap):
        primary = qom_get(snap, path, "primary-bus", str)
        # The virt machine creates its SMMU itself (/machine/unattached); a user's
        # -device arm-smmuv3 lives under /machine/peripheral(-anon). The machine's `iommu`
        # property is never read: its getter aborts QEMU when a virtio-iommu is present.
        machine_created = vtype == "arm-smmuv3" and is_builtin(path)
        props = _props(snap, path, vtype)
        version = qemu_version(snap)
        found.append(
            VIommu(
                path,
                vtype,
                T.VIOMMU_TYPES[vtype],
                primary or topo.main_root,
                machine_created,
                refuses_vfio_after(vtype, props, machine_created, version),
                passthrough(vtype, props, version),
            )
        )
    for dev in topo.devices.values():
        if dev.type in T.PCI_VIOMMU_TYPES:
            found.append(VIommu(dev.path, dev.type, T.VIOMMU_TYPES[dev.type], dev.bus, False))
    return sorted(found, key=lambda v: v.path)


_FLATVIEW = re.compile(r"FlatView #\d+")
_AS_NAME = re.compile(r' AS "(.*)", root: .*')
_RAM_RANGE = re.compile(r"[0-9a-f]+-[0-9a-f]+ \(prio -?\d+, ram\): .*")


def spaces_rendering_ram(text: object) -> dict[str, frozenset[bool]]:
    """Address-space name -> whether each flat view of `info mtree -f` that lists a space
    of that name renders guest RAM ({} for no or unknown output). What a vfio device's
    container maps is its space's flat view: one with no RAM range (QEMU prints `No
    rendered FlatView` for an empty one) maps nothing, whatever the vIOMMU's mode says.
    Several spaces can share a name (amd-iommu's `amd_iommu_devfn_<devfn>` has no bus)."""
    if not isinstance(text, str) or "FlatView #" not in text:
        return {}
    views: list[tuple[list[str], list[bool]]] = []  # (names, [renders RAM])
    for line in text.splitlines():
        if _FLATVIEW.fullmatch(line.strip()):
            views.append(([], [False]))
        elif views and (m := _AS_NAME.fullmatch(line.rstrip())):
            views[-1][0].append(m.group(1))
        elif views and _RAM_RANGE.fullmatch(line.strip()):
            views[-1][1][0] = True
    out: dict[str, set[bool]] = {}
    for names, ram in views:
        for name in names:
            out.setdefault(name, set()).add(ram[0])
    return {name: frozenset(seen) for name, seen in out.items()}
