"""`qmpguard discover` output: JSON (schema qmpguard.discover/1) and a table."""

from __future__ import annotations

from typing import Any

from qmpguard.discovery.model import DiscoveredVM, MonitorFinding, Route
from qmpguard.report.text import printable

SCHEMA = "qmpguard.discover/1"


def _monitor_json(m: MonitorFinding) -> dict[str, Any]:
    spec = m.spec
    return {
        "option": spec.option,
        "argument": spec.argument,
        "protocol": spec.protocol.value,
        "transport": spec.transport.value,
        "chardev": spec.chardev,
        "path": m.path or spec.path,
        "host": spec.host,
        "port": spec.port,
        "fd": spec.fd,
        "server": spec.server,
        "state": m.state.value,
        "owner": m.owner.value,
        "address": m.address,
        "reason": m.reason or None,
    }


def vm_json(vm: DiscoveredVM) -> dict[str, Any]:
    return {
        "pid": vm.pid,
        "name": vm.name,
        "executable": vm.exe,
        "mount_namespace": vm.mount_ns.value,
        "manager": vm.manager.value,
        "route": vm.route.value,
        "target": vm.target,
        "unavailable": vm.unavailable.value if vm.unavailable else None,
        "message": vm.message,
        "monitors": [_monitor_json(m) for m in vm.monitors],
        "unreadable": [{"what": p.what.value, "error": p.error} for p in vm.problems],
        "notes": list(vm.notes),
    }


def discover_json(vms: list[DiscoveredVM]) -> dict[str, Any]:
    return {"schema": SCHEMA, "processes": [vm_json(v) for v in vms]}


def render_table(vms: list[DiscoveredVM]) -> str:
    """One block per QEMU process: how it is inspected, then each monitor."""
    if not vms:
        return "no QEMU processes found\n"
    lines = [f"{'PID':>7}  {'NAME':<24} {'MANAGER':<8} INSPECT"]
    for vm in vms:
        how = vm.target if vm.route is not Route.NONE else f"no: {vm.unavailable} ({vm.message})"
        name = printable(vm.name or "-")
        lines.append(f"{vm.pid:>7}  {name:<24} {vm.manager.value:<8} {printable(how or '')}")
        for m in vm.monitors:
            where = m.address or m.path or m.spec.path or m.spec.detail or ""
            why = f": {m.reason}" if m.reason else ""
            lines.append(
                f"{'':>9}{m.spec.option} {m.spec.protocol.value} {printable(where)} "
                f"[{m.state.value}]{printable(why)}"
            )
        if vm.problems:
            unread = ", ".join(f"/proc/{vm.pid}/{p.what.value} ({p.error})" for p in vm.problems)
            lines.append(f"{'':>9}unreadable: {unread}")
    return "\n".join(lines) + "\n"
