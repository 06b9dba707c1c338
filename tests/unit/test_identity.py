"""VMs are named for people: QEMU's -name, libvirt's domain, Proxmox VE's VMID and name."""

from __future__ import annotations

import pytest

from qmpguard.analysis.identity import VmIdentity, vm_identity
from qmpguard.snapshot import Snapshot


def snapshot(target: str, name: str | None = None, uuid: str | None = None) -> Snapshot:
    snap = Snapshot(target=target, transport="qmp-unix", collected_at="2026-11-30T00:00:00")
    snap.record("query-name", None, {"return": {"name": name} if name else {}})
    snap.record(
        "query-uuid", None, {"return": {"UUID": uuid or "0" * 8 + "-0000" * 3 + "-" + "0" * 12}}
    )
    return snap


@pytest.mark.parametrize(
    ("snap", "expected"),
    [
        (snapshot("unix:/run/qemu/a.qmp", "web-1"), VmIdentity("web-1", "web-1")),
        (snapshot("unix:/run/qemu/a.qmp"), VmIdentity("a")),
        (snapshot("tcp:10.0.0.5:4444"), VmIdentity("10.0.0.5:4444")),
        (snapshot("libvirt:db@qemu:///system"), VmIdentity("db", "db")),
        (snapshot("unix:/var/run/qemu-server/145.qmp"), VmIdentity("vmid 145", vmid="145")),
        (
            snapshot("unix:/run/qemu/b.qmp", "b", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            VmIdentity("b", "b", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        ),
    ],
    ids=["qemu-name", "socket-name", "tcp", "libvirt", "pve-no-config", "uuid"],
)
def test_identity(snap: Snapshot, expected: VmIdentity) -> None:
    assert vm_identity(snap) == expected


def test_proxmox_name_from_its_config_current_section_only() -> None:
    snap = snapshot("unix:/var/run/qemu-server/145.qmp")
    snap.files["/etc/pve/qemu-server/145.conf"] = "boot: c\nname: gpu-box\n[snap1]\nname: old\n"
    assert vm_identity(snap) == VmIdentity("gpu-box", "gpu-box", vmid="145")
