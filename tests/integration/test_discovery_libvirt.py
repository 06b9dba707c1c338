"""Process discovery of libvirt domains, and what each privilege level can discover.

A libvirt domain is found by its QEMU process and inspected through libvirt, never its
monitor. The privilege runs decide the DaemonSet's capabilities (deploy/kubernetes):
each one records what /proc refused and whether inspection still worked, in
tests/artifacts/discovery-privileges.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpguard.discovery import discover
from qmpguard.discovery.classify import monitor_addresses
from qmpguard.discovery.model import Manager, MonitorState, Route
from qmpguard.discovery.procfs import read_argv, read_facts
from qmpguard.discovery.render import vm_json
from qmpguard.inspection import inspect_target
from qmpguard.targets import parse_target
from tests.conftest import SETUP_MARKER
from tests.integration.support import (
    NO_VIOMMU,
    found,
    namespaced_qemu,
    needs_namespaces,
    wait_for,
)

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
NOBODY = 65534
OTHER_UID = 4242  # an unprivileged user that owns no process here


# ---------------------------------------------------------------- libvirt


def libvirt_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def test_libvirt_domain_found_by_its_process(libvirt_domain: Callable[..., str]) -> None:
    name = libvirt_domain(NO_VIOMMU)
    pid = libvirt_pid(name)
    vm = found(pid)
    assert (vm.manager, vm.route, vm.target) == (Manager.LIBVIRT, Route.LIBVIRT, f"libvirt:{name}")
    (mon,) = vm.monitors
    # libvirt hands QEMU its monitor as fd=N: resolved through /proc/PID/fd and net/unix
    assert mon.state is MonitorState.LIBVIRT and mon.spec.fd is not None
    assert mon.path and mon.path.startswith("/var/lib/libvirt/qemu/domain-")
    assert monitor_addresses(read_facts(pid, read_argv(pid) or [])) == []  # never probed
    result = asyncio.run(inspect_target(parse_target(vm.target)))
    assert result.ok, result.error and result.error.message
    assert result.snapshot is not None and result.snapshot.pid == pid


# ---------------------------------------------------------------- privileges

_RUN = """
import asyncio, json, sys
from qmpguard.discovery import discover
from qmpguard.discovery.render import vm_json
from qmpguard.inspection import inspect_target
from qmpguard.targets import parse_target

async def main(pids, inspect):
    out = {}
    for vm in await discover(only=pids):
        doc = vm_json(vm)
        if vm.target and inspect:
            r = await inspect_target(parse_target(vm.target))
            doc["inspected"] = r.ok
            doc["inspect_error"] = r.error.reason.value if r.error else None
        out[str(vm.pid)] = doc
    return out

print(json.dumps(asyncio.run(main([int(p) for p in sys.argv[1:]], True))))
"""


def _as_root_with(bounding: str, pids: list[int]) -> dict[str, Any]:
    """Discovery (and inspection) as root with only the capabilities in `bounding`."""
    proc = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            "--no-new-privs",
            sys.executable,
            "-c",
            _RUN,
            *map(str, pids),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _as_user(uid: int, pids: list[int]) -> dict[str, Any]:
    """Discovery as an unprivileged user with no capabilities. Forked, not executed:
    the interpreter may live where that user cannot reach (a home directory)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            vms = asyncio.run(discover(only=pids))
            os.write(write, json.dumps({str(v.pid): vm_json(v) for v in vms}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, Any] = json.loads(data)
    return result


def _unreadable(doc: dict[str, Any]) -> set[str]:
    return {f"{u['what']} ({u['error']})" for u in doc["unreadable"]}


def _row(label: str, doc: dict[str, Any]) -> str:
    unread = ", ".join(sorted(_unreadable(doc))) or "-"
    inspected = {True: "yes", False: f"no ({doc.get('inspect_error')})", None: "-"}[
        doc.get("inspected")
    ]
    how = doc["target"] or f"none: {doc['unavailable']}"
    return f"| {label} | {unread} | {how} | {inspected} |"


@needs_namespaces
def test_what_each_privilege_level_can_discover(libvirt_domain: Callable[..., str]) -> None:
    with namespaced_qemu("priv-vm", user=NOBODY) as q:
        name = libvirt_domain(NO_VIOMMU)
        lv = libvirt_pid(name)
        pids = [q.pid, lv]
        ns_target = f"unix:/proc/{q.pid}/root{q.socket}"
        runs = {
            "root, all capabilities": _as_root_with("+all", pids),
            "root, no CAP_SYS_PTRACE": _as_root_with("-sys_ptrace", pids),
            "root, CAP_SYS_PTRACE only": _as_root_with("-all,+sys_ptrace", pids),
            "root, CAP_SYS_PTRACE + CAP_DAC_OVERRIDE": _as_root_with(
                "-all,+sys_ptrace,+dac_override", pids
            ),
            f"uid {OTHER_UID}, no capabilities": _as_user(OTHER_UID, pids),
        }
        lines = [
            "| who | /proc reads refused | target found | inspected |",
            "|---|---|---|---|",
        ]
        for label, run in runs.items():
            lines.append(
                _row(f"{label}: QEMU of uid {NOBODY} in its own mount ns", run[str(q.pid)])
            )
            lines.append(_row(f"{label}: libvirt domain (uid libvirt-qemu)", run[str(lv)]))
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "discovery-privileges.md").write_text("\n".join(lines) + "\n")

        full = runs["root, all capabilities"]
        minimal = runs["root, CAP_SYS_PTRACE + CAP_DAC_OVERRIDE"]
        for run in (full, minimal):
            assert run[str(q.pid)]["target"] == ns_target and run[str(q.pid)]["inspected"]
            assert run[str(lv)]["target"] == f"libvirt:{name}" and run[str(lv)]["inspected"]
            assert not run[str(q.pid)]["unreadable"] and not run[str(lv)]["unreadable"]

        # Without CAP_SYS_PTRACE, another user's /proc/PID/{exe,ns,fd} (and root/) are
        # closed: the namespaced socket cannot be found; libvirt's chardev name still
        # identifies its domain, whose daemon socket is then taken from our own /run.
        for label in ("root, no CAP_SYS_PTRACE", f"uid {OTHER_UID}, no capabilities"):
            ns, lvd = runs[label][str(q.pid)], runs[label][str(lv)]
            assert {"exe (EACCES)", "ns/mnt (EACCES)", "fd (EACCES)"} <= _unreadable(ns)
            assert ns["mount_namespace"] == "unknown" and ns["target"] is None
            assert lvd["manager"] == "libvirt" and lvd["target"] is not None

        # CAP_SYS_PTRACE opens /proc/PID/root and ns/, but the socket's directory and the
        # socket itself belong to the QEMU's user: CAP_DAC_OVERRIDE is needed too (and
        # it also lets /proc/PID/fd be listed).
        ptrace_only = runs["root, CAP_SYS_PTRACE only"]
        assert ptrace_only[str(q.pid)]["mount_namespace"] == "other"
        assert ptrace_only[str(q.pid)]["target"] is None
        assert "permission denied" in ptrace_only[str(q.pid)]["message"]
        assert "fd (EACCES)" in _unreadable(ptrace_only[str(q.pid)])


# ---------------------------------------------------------------- the daemon


def _json_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.startswith("{")]


def _qmp_line(sock: socket.socket, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send `request` (if any) and read one reply line, skipping events."""
    if request is not None:
        sock.sendall(json.dumps(request).encode() + b"\n")
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, "the monitor closed"
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        if "event" not in msg:
            return msg


@needs_namespaces
def test_daemon_inspects_all_three_without_taking_a_monitor(
    libvirt_domain: Callable[..., str], daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """A QEMU in its own mount namespace, a libvirt domain and a QEMU whose only monitor
    is held: the daemon with `discover = ["proc"]` inspects the first two (through
    /proc/PID/root and through libvirt) and leaves the held monitor to its holder."""
    with namespaced_qemu("d-free") as free, namespaced_qemu("d-busy") as busy:
        name = libvirt_domain(NO_VIOMMU)
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.settimeout(10)
        holder.connect(f"/proc/{busy.pid}/root{busy.socket}")
        try:
            assert "QMP" in _qmp_line(holder)
            _qmp_line(holder, {"execute": "qmp_capabilities"})
            # marks the holder's monitor for the read-only audit
            _qmp_line(
                holder,
                {"execute": "qom-get", "arguments": {"path": "/machine", "property": SETUP_MARKER}},
            )
            config = tmp_path / "config.toml"
            config.write_text('watch = []\ndiscover = ["proc"]\nrescan_interval = 1\n')
            d = daemon("--config", str(config))
            ns_name = f"unix:/proc/{free.pid}/root{free.socket}"

            def inspected() -> bool:
                vms = d.vms()
                return all(
                    vms.get(n, {}).get("status") == "ok" for n in (ns_name, f"libvirt:{name}")
                )

            wait_for(inspected, timeout=60, what="namespaced QEMU and libvirt domain inspected")
            vms = d.vms()
            assert not [n for n in vms if f"/proc/{busy.pid}/" in n], vms
            assert vms[f"libvirt:{name}"]["source"] == "proc"
            said = [
                line
                for line in map(json.loads, _json_lines(tmp_path / f"daemon-{d.port}.log"))
                if line.get("event") == "qemu_not_inspectable" and line.get("pid") == busy.pid
            ]
            assert said and said[0]["reason"] == "busy", said
            # The holder still has its monitor.
            reply = _qmp_line(holder, {"execute": "query-status"})
            assert reply["return"]["status"] == "prelaunch"
        finally:
            holder.close()
