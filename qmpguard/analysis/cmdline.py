"""The QEMU command line as order evidence: -device options in realize order.

Both `driver,key=val` and JSON (`-device {"driver": ...}`, libvirt's form) are read.
QEMU realizes every key=val -device first and every JSON one after them
(qemu_create_cli_devices), so realize order is not always command-line order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class CliDevice:
    """One -device option."""

    position: int  # index among -device options on the command line
    realize_rank: int  # order in which QEMU realizes it
    driver: str
    id: str | None
    json: bool


@dataclass(frozen=True)
class CliFacts:
    """What the command line says about devices and the machine."""

    devices: list[CliDevice]
    machine_opts: dict[str, str]
    readconfig: bool  # -readconfig present: devices may come from a file we cannot see


def split_keyval(text: str) -> list[str]:
    """Split a QemuOpts string on commas, honouring the ',,' escape."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _keyval(text: str, implied: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, part in enumerate(split_keyval(text)):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
        elif i == 0 and part:
            out[implied] = part
    return out


def parse_cmdline(argv: list[str]) -> CliFacts:
    """Parse a QEMU argv (as read from /proc/PID/cmdline)."""
    raw: list[tuple[int, str, str | None, bool]] = []
    machine: dict[str, str] = {}
    readconfig = False
    i = 1
    while i < len(argv):
        opt = argv[i]
        norm = "-" + opt.lstrip("-") if opt.startswith("-") else opt
        val = argv[i + 1] if i + 1 < len(argv) else None
        if norm == "-device" and val is not None:
            if val.lstrip().startswith("{"):
                try:
                    obj = json.loads(val)
                except json.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("driver"), str):
                    dev_id = obj.get("id")
                    raw.append(
                        (len(raw), obj["driver"], dev_id if isinstance(dev_id, str) else None, True)
                    )
            else:
                kv = _keyval(val, "driver")
                if "driver" in kv:
                    raw.append((len(raw), kv["driver"], kv.get("id"), False))
            i += 2
            continue
        if norm in ("-machine", "-M") and val is not None:
            machine.update(_keyval(val, "type"))
            i += 2
            continue
        if norm == "-readconfig":
            readconfig = True
        i += 1
    ordered = sorted(raw, key=lambda r: (r[3], r[0]))  # key=val first, then JSON
    devices = [
        CliDevice(position=pos, realize_rank=rank, driver=drv, id=dev_id, json=is_json)
        for rank, (pos, drv, dev_id, is_json) in enumerate(ordered)
    ]
    return CliFacts(devices=devices, machine_opts=machine, readconfig=readconfig)
