"""Which VM a target is, for people: its name, UUID, Proxmox VE VMID, and a stable label.

Socket paths are not names. QEMU knows its `-name` and `-uuid` (query-name, query-uuid);
libvirt names its domains; Proxmox VE puts VM <vmid>'s monitor at
/var/run/qemu-server/<vmid>.qmp and its name in /etc/pve/qemu-server/<vmid>.conf. A VM
with none of these still gets a readable, stable label: its socket's base name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmpguard.snapshot import Snapshot

_PVE_SOCKET = re.compile(r"(?:unix:)?(?:/var)?/run/qemu-server/(\d+)\.qmp")
_NO_UUID = "00000000-0000-0000-0000-000000000000"


def pve_config_path(vmid: str) -> str:
    return f"/etc/pve/qemu-server/{vmid}.conf"


def pve_vmid(target: str) -> str | None:
    """The Proxmox VE VMID a monitor path belongs to, if it is one of Proxmox's."""
    m = _PVE_SOCKET.fullmatch(target)
    return m.group(1) if m else None


@dataclass(frozen=True)
class VmIdentity:
    """A VM's names; `label` is always set and stable across inspections."""

    label: str
    name: str | None = None
    uuid: str | None = None
    vmid: str | None = None  # Proxmox VE


def _pve_name(snap: Snapshot, vmid: str) -> str | None:
    text = snap.files.get(pve_config_path(vmid), "")
    for line in text.splitlines():
        if line.startswith("["):
            break  # snapshot sections follow the current config
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip() or None
    return None


def _fallback_label(target: str) -> str:
    """`unix:/run/qemu/vm1.qmp` -> `vm1`; `tcp:h:4444` -> `h:4444`."""
    tail = target.split(":", 1)[-1] if target.startswith(("unix:", "tcp:")) else target
    base = tail.rstrip("/").rsplit("/", 1)[-1]
    return base.removesuffix(".qmp").removesuffix(".sock") or target


def vm_identity(snap: Snapshot) -> VmIdentity:
    """Name, UUID and VMID from the snapshot; the label from the best of them."""
    reply = snap.get_or(None, "query-name")
    qemu_name = reply.get("name") if isinstance(reply, dict) else None
    reply = snap.get_or(None, "query-uuid")
    uuid = reply.get("UUID") if isinstance(reply, dict) else None
    uuid = uuid if isinstance(uuid, str) and uuid != _NO_UUID else None
    vmid = pve_vmid(snap.target)
    name = qemu_name if isinstance(qemu_name, str) and qemu_name else None
    if snap.target.startswith("libvirt:"):
        name = name or snap.target[len("libvirt:") :].split("@", 1)[0]
    if vmid is not None:
        name = name or _pve_name(snap, vmid)
    label = name or (f"vmid {vmid}" if vmid else _fallback_label(snap.target))
    return VmIdentity(label, name, uuid, vmid)
