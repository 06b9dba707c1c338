"""Run one scenario on one QEMU build: start it with the VFIO emulation, drive it, read
the DMA log's truth, and run qmpguard on it (in process), auditing every command sent.

The test's own monitor is a socket listening before QEMU runs (handed over as fd 4), so
readiness is QEMU's greeting on it: no polling for sockets, no sleeps. Hot-plug steps go
through that monitor (marked and excluded from the audit, as conftest's setup_client);
hot-unplug is completed by playing the guest over `-qtest` (DOMAIN.md section 7).
Every QEMU runs in its own process group and is killed in a `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    attached_groups,
    build_amd_guest,
    build_emulation,
    build_vtd_guest,
    create_sysfs_device,
    emulation_env,
    mapped_bytes_by_group,
)
from qmpguard.inspection import inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import AUDIT, SETUP_MARKER, audit_qmp_trace
from tests.generator.model import (
    SETUP_FD,
    AmdMode,
    QemuBinary,
    RenderContext,
    Rendered,
    Scenario,
    render,
)

PR_SET_PDEATHSIG = 1
READY_TIMEOUT = 30.0
GUEST_TIMEOUT = 30.0
UNPLUG_TIMEOUT = 10.0
_GROUP_DIR = re.compile(r"0000:([0-9a-f]+):00\.0$")


@dataclass(frozen=True)
class Built:
    so: Path
    guest: Path  # the VT-d guest
    amd_guest: Path | None = None  # the AMD-Vi guest

    @staticmethod
    def build(cache: Path) -> Built:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # a private build cache
        return Built(build_emulation(cache), build_vtd_guest(cache), build_amd_guest(cache))


_VERSIONS: dict[str, tuple[int, int]] = {}


def qemu_version(qemu: QemuBinary) -> tuple[int, int]:
    """(major, minor) of this build, from `--version` (asked once)."""
    if qemu.path not in _VERSIONS:
        out = subprocess.run(
            [qemu.path, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
        m = re.search(r"version (\d+)\.(\d+)", out)
        if m is None:
            raise HarnessError(f"{qemu.path} --version: {out!r}")
        _VERSIONS[qemu.path] = (int(m.group(1)), int(m.group(2)))
    return _VERSIONS[qemu.path]


def amd_mode(qemu: QemuBinary) -> AmdMode:
    """What this build does with vfio behind amd-iommu: before 10.0 it refuses it, 10.0
    keeps it in pass-through (pt=on), 10.1 added dma-remap (ground truth in
    tests/integration/test_vfio_ground_truth_amd_arm.py; QEMU's hw/i386/amd_iommu.c)."""
    version = qemu_version(qemu)
    if version < (10, 0):
        return AmdMode.REFUSES
    return AmdMode.PASSTHROUGH if version < (10, 1) else AmdMode.REMAP


@dataclass(frozen=True)
class VfioPresent:
    """A vfio-pci device QEMU has at inspection time (read through the test's monitor)."""

    path: str
    id: str | None
    group: int


@dataclass
class RunResult:
    """What one run of a scenario produced."""

    argv: list[str]
    status: str  # "ran" | "rejected" | "harness-error"
    detail: str = ""  # rejected: QEMU's error line; harness-error: what went wrong
    present: list[VfioPresent] = field(default_factory=list)
    mapped: dict[int, int] = field(default_factory=dict)  # group -> bytes still mapped
    doc: dict[str, Any] | None = None  # qmpguard's target_json
    inspection_error: str | None = None
    audit_refused: list[str] = field(default_factory=list)
    seconds: float = 0.0
    readconfig: str = ""


class Rejected(Exception):
    """QEMU refused the command line (exited before greeting)."""


class HarnessError(Exception):
    """The test's own driving of QEMU failed (not a finding about qmpguard)."""


_UNUSUAL_IDS: dict[str, bool] = {}


def accepts_unusual_ids(qemu: QemuBinary) -> bool:
    """Does this QEMU take a JSON -device id outside id_wellformed() (7.2 and 10.0 do;
    11.1 says "Invalid qdev ID")? Asked of the binary itself, once."""
    if qemu.path not in _UNUSUAL_IDS:
        proc = subprocess.run(
            [
                qemu.path,
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-M",
                "q35",
                "-device",
                '{"driver": "pci-testdev", "id": "1 unusual"}',
                "-qmp",
                "stdio",
            ],
            input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True,
            timeout=30,
            check=False,
        )
        _UNUSUAL_IDS[qemu.path] = b"Invalid qdev ID" not in proc.stderr and proc.returncode == 0
    return _UNUSUAL_IDS[qemu.path]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _qemu_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "warning:" not in ln]
    line = (errors or lines or ["(no output)"])[0]
    # QEMU's reason comes last, after the whole -device argument: keep both ends
    return line if len(line) <= 600 else f"{line[:200]} ... {line[-400:]}"


def _start(rendered: Rendered, ctx: RenderContext, so: Path) -> subprocess.Popen[bytes]:
    for path, text in rendered.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if text.startswith("#!"):
            path.chmod(0o755)
    for link, dest in rendered.links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(dest)
    ctx.setup_socket.unlink(missing_ok=True)
    setup_path = str(ctx.setup_socket)

    def listen_in_child() -> None:
        # QEMU dies with the process that started it, even one killed outright (a bench
        # worker ended by SIGKILL cannot run its finally)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(setup_path)
        listener.listen(16)
        os.dup2(listener.fileno(), SETUP_FD, inheritable=True)

    env = {**os.environ, **emulation_env(so, ctx.dma_log), **rendered.env}
    with open(ctx.stderr, "wb") as err:
        return subprocess.Popen(
            rendered.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,
            close_fds=False,
            preexec_fn=listen_in_child,
            cwd=rendered.cwd,
        )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End QEMU's whole process group (a wrapper script execs, but be sure)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the group left behind


# ------------------------------------------------------------------ the test's monitor


async def _setup_client(ctx: RenderContext, proc: subprocess.Popen[bytes]) -> QMPClient:
    client = QMPClient("test-setup")
    connect = asyncio.ensure_future(client.connect(str(ctx.setup_socket)))
    deadline = time.monotonic() + READY_TIMEOUT
    while not connect.done():
        if proc.poll() is not None:
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise Rejected(_qemu_error_line(ctx.stderr.read_text(errors="replace")))
        if time.monotonic() > deadline:
            connect.cancel()
            raise HarnessError("no QMP greeting on the setup monitor")
        await asyncio.wait({connect}, timeout=0.05)
    try:
        connect.result()
    except Exception as exc:
        # EOF before the greeting: QEMU is exiting (a refused option); let it finish
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is not None:
            raise Rejected(_qemu_error_line(ctx.stderr.read_text(errors="replace"))) from None
        raise HarnessError(f"setup monitor: {exc!r}") from None
    with contextlib.suppress(ExecuteError):  # mark this monitor in QEMU's trace
        await client.execute("qom-get", {"path": "/machine", "property": SETUP_MARKER})
    await client.execute("query-status")
    return client


async def present_vfio(client: QMPClient, ctx: RenderContext) -> list[VfioPresent]:
    """Every vfio-pci device QEMU has now, with its IOMMU group (from its sysfsdev)."""
    out = []
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        children: Any = await client.execute("qom-list", {"path": parent})
        for child in children:
            if child["type"] not in ("child<vfio-pci>", "child<vfio-pci-nohotplug>"):
                continue
            path = f"{parent}/{child['name']}"
            sysfsdev = await client.execute("qom-get", {"path": path, "property": "sysfsdev"})
            m = _GROUP_DIR.search(str(sysfsdev))
            assert m, sysfsdev
            dev_id = child["name"] if parent == "/machine/peripheral" else None
            out.append(VfioPresent(path, dev_id, int(m.group(1), 16)))
    return out


async def wait_guest_translation(
    ctx: RenderContext, proc: subprocess.Popen[bytes], marker: str = "TE"
) -> None:
    """The VT-d guest prints TE on the debug console once translation is on, the AMD-Vi
    guest AMDVI once its invalidation queue drained."""
    deadline = time.monotonic() + GUEST_TIMEOUT
    while not (ctx.console.exists() and marker in ctx.console.read_text(errors="replace")):
        if proc.poll() is not None:
            raise HarnessError(f"QEMU exited while the guest booted: {ctx.stderr.read_text()}")
        if time.monotonic() > deadline:
            raise HarnessError(f"guest did not print {marker} (translation not on)")
        await asyncio.sleep(0.02)  # bounded poll on a condition


# ------------------------------------------------------------------ qtest: the guest's hands


class Qtest:
    """QEMU's qtest protocol over its socket: port I/O lines, `OK ...` answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @staticmethod
    async def open(path: Path) -> Qtest:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return Qtest(reader, writer)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        while True:
            answer = (await asyncio.wait_for(self.reader.readline(), 10)).decode().strip()
            if answer.startswith(("OK", "FAIL", "ERR")):
                if not answer.startswith("OK"):
                    raise HarnessError(f"qtest {line!r}: {answer}")
                return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    @staticmethod
    def _addr(bus: int, devfn: int, off: int) -> str:
        return hex(0x80000000 | (bus << 16) | (devfn << 8) | (off & 0xFC))

    async def cfg_read32(self, bus: int, devfn: int, off: int) -> int:
        await self.cmd(f"outl 0xcf8 {self._addr(bus, devfn, off)}")
        return int((await self.cmd("inl 0xcfc")).split()[1], 16)

    async def cfg_read16(self, bus: int, devfn: int, off: int) -> int:
        return (await self.cfg_read32(bus, devfn, off) >> (8 * (off & 2))) & 0xFFFF

    async def cfg_write16(self, bus: int, devfn: int, off: int, value: int) -> None:
        await self.cmd(f"outl 0xcf8 {self._addr(bus, devfn, off)}")
        await self.cmd(f"outw {hex(0xCFC + (off & 2))} {hex(value)}")

    async def pcie_cap(self, bus: int, devfn: int) -> int:
        ptr = (await self.cfg_read32(bus, devfn, 0x34)) & 0xFC
        for _ in range(48):
            if not ptr:
                break
            head = await self.cfg_read16(bus, devfn, ptr)
            if head & 0xFF == 0x10:
                return ptr
            ptr = (head >> 8) & 0xFC
        raise HarnessError(f"no PCIe capability at {bus:02x}:{devfn >> 3:02x}.{devfn & 7}")

    async def slot_control(self, bus: int, devfn: int, set_bits: int, clear_bits: int) -> None:
        cap = await self.pcie_cap(bus, devfn)
        value = await self.cfg_read16(bus, devfn, cap + 0x18)
        await self.cfg_write16(bus, devfn, cap + 0x18, (value & ~clear_bits) | set_bits)


SLTCTL_PIC = 0x0300  # power indicator control
SLTCTL_PCC = 0x0400  # power controller control (1: off)
PIC_ON = 0x0100


async def _root_port_of(client: QMPClient, path: str) -> tuple[int, int, str]:
    """(bus number, devfn, QOM path) of the root port holding `path`, on the main root bus."""
    bus = await client.execute("qom-get", {"path": path, "property": "parent_bus"})
    port = str(bus).rsplit("/", 1)[0]
    devfn: Any = await client.execute("qom-get", {"path": port, "property": "addr"})
    port_bus = str(await client.execute("qom-get", {"path": port, "property": "parent_bus"}))
    if not port_bus.endswith(("/pcie.0", "/pci.0")) or "/peripheral" in port_bus:
        raise HarnessError(f"unplug: {port} is not on the main root bus ({port_bus})")
    return 0, int(devfn), port


async def _device_gone(client: QMPClient, path: str) -> bool:
    parent, _, name = path.rpartition("/")
    children: Any = await client.execute("qom-list", {"path": parent})
    return all(c["name"] != name for c in children)


async def hot_unplug(
    client: QMPClient, qtest: Qtest, path: str, group: int, ctx: RenderContext
) -> tuple[int, int]:
    """device_del, then play the guest: power the slot off; wait until QEMU has dropped
    the device and released its VFIO group (finalized after an RCU grace period)."""
    bus, devfn, _ = await _root_port_of(client, path)
    await client.execute("device_del", {"id": path})
    await qtest.slot_control(bus, devfn, SLTCTL_PCC | SLTCTL_PIC, 0)
    deadline = time.monotonic() + UNPLUG_TIMEOUT
    while not await _device_gone(client, path) or group in attached_groups(ctx.dma_log):
        if time.monotonic() > deadline:
            raise HarnessError(f"unplug of {path} did not complete")
        await asyncio.sleep(0.02)  # bounded poll on a condition
    return bus, devfn


async def _play(
    scn: Scenario, ctx: RenderContext, client: QMPClient, proc: subprocess.Popen[bytes]
) -> None:
    qtest = await Qtest.open(ctx.qtest_socket) if scn.unplugs else None
    powered_off: dict[str, tuple[int, int]] = {}  # root port id -> (bus, devfn)
    try:
        for op in scn.hotplug:
            if op.action == "add":
                args: dict[str, Any] = {
                    "driver": "vfio-pci",
                    "sysfsdev": str(ctx.sysfs_dir(op.group)),
                    "rombar": 0,
                }
                if op.bus is not None:
                    args["bus"] = op.bus
                if op.id is not None:
                    args["id"] = op.id
                if qtest is not None and op.bus in powered_off:
                    # the guest powers an emptied slot on again for the new device
                    bus, devfn = powered_off.pop(op.bus)
                    await qtest.slot_control(bus, devfn, PIC_ON, SLTCTL_PCC | SLTCTL_PIC)
                try:
                    await client.execute("device_add", args)
                except ExecuteError as exc:
                    raise Rejected(f"device_add {args}: {exc}") from None
            else:
                assert qtest is not None
                match = [v for v in await present_vfio(client, ctx) if v.group == op.group]
                if not match:
                    raise HarnessError(f"unplug: no vfio device of group {op.group}")
                bus_path = await client.execute(
                    "qom-get", {"path": match[0].path, "property": "parent_bus"}
                )
                port_id = str(bus_path).rsplit("/", 2)[-2]
                powered_off[port_id] = await hot_unplug(client, qtest, match[0].path, op.group, ctx)
    finally:
        if qtest is not None:
            await qtest.close()


async def _drive(
    scn: Scenario, rendered: Rendered, ctx: RenderContext, proc: subprocess.Popen[bytes]
) -> RunResult:
    result = RunResult(rendered.argv, "ran")
    client = await _setup_client(ctx, proc)
    try:
        if scn.cfg_deleted:  # QEMU has read them; qmpguard finds them gone
            for path in rendered.files:
                if path.suffix == ".cfg":
                    path.unlink()
        if scn.guest:
            await wait_guest_translation(ctx, proc, "AMDVI" if scn.viommu_model == "amd" else "TE")
        await _play(scn, ctx, client, proc)
        result.present = await present_vfio(client, ctx)
        result.mapped = mapped_bytes_by_group(ctx.dma_log)
        try:
            inspected = await inspect_target(parse_target(rendered.target))
        except Exception:
            result.inspection_error = "exception: " + traceback.format_exc(limit=4)
        else:
            result.doc = target_json(inspected)
            if not inspected.ok:
                result.inspection_error = (
                    f"{inspected.error.reason}: {inspected.error.message}"
                    if inspected.error
                    else "no analysis"
                )
    finally:
        await client.disconnect()
    return result


def run_scenario(scn: Scenario, qemu: QemuBinary, workdir: Path, built: Built) -> RunResult:
    """Run `scn` once on `qemu` in `workdir` (created). Never leaves a QEMU behind."""
    started = time.monotonic()
    for attempt in range(3):
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = RenderContext(workdir, qemu, built.guest, free_tcp_port(), built.amd_guest)
        for path in (ctx.dma_log, ctx.console, ctx.trace):
            path.unlink(missing_ok=True)
        for group in scn.vfio_groups():
            create_sysfs_device(ctx.sysfs_root, VfioDeviceSpec(ctx.sysfs_dir(group).name, group))
        rendered = render(scn, ctx)
        proc = _start(rendered, ctx, built.so)
        try:
            result = asyncio.run(_drive(scn, rendered, ctx, proc))
        except Rejected as exc:
            if "Address already in use" in str(exc) and attempt < 2:
                continue  # the free port was taken in between: a new port
            result = RunResult(rendered.argv, "rejected", str(exc))
        except HarnessError as exc:
            result = RunResult(rendered.argv, "harness-error", str(exc))
        except Exception:
            result = RunResult(rendered.argv, "harness-error", traceback.format_exc(limit=6))
        finally:
            _kill(proc)
        result.audit_refused = audit_qmp_trace(ctx.trace)
        AUDIT["vms"] += 1
        result.readconfig = "".join(
            f"# {p.name}\n{text}" for p, text in rendered.files.items() if p.suffix == ".cfg"
        )
        result.seconds = time.monotonic() - started
        return result
    raise AssertionError("unreachable")
