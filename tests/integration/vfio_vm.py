"""VMs with emulated vfio-pci devices, shared by the VFIO ground-truth tests.

test_vfio_ground_truth.py (intel-iommu, virtio-iommu-pci) and
test_vfio_ground_truth_amd_arm.py (amd-iommu, ARM's vIOMMUs) use the same method: start a
real QEMU with the VFIO emulation (qmpguard/demo/fakevfio) preloaded, wait for it on QMP
(and, with a guest, for the guest's console line), read what the emulation's DMA log says
each VFIO container still maps, and compare that with qmpguard's report. The helpers for
those steps live here, once; each test module keeps only what its vIOMMUs need.
"""

from __future__ import annotations

import asyncio
import functools
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    create_sysfs_device,
    emulation_env,
    mapped_bytes,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import analyse_snapshot, inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import VmFactory, record_evidence

#: Guest RAM: small, so that "all RAM mapped" is one short DMA-log line per container.
RAM_MIB = 64
RAM = RAM_MIB << 20


@dataclass
class Built:
    """The VFIO emulation (an LD_PRELOAD library) and the tiny guest that turns the
    vIOMMU's translation on, both built once per session."""

    so: Path
    guest: Path


@dataclass
class Vm:
    """One QEMU process with the VFIO emulation, and the files the VM writes."""

    proc: QemuProcess
    dma_log: Path  # the emulation's log of every map/unmap per VFIO container
    console: Path  # the guest's debug console (written only when a guest runs)


def memfd_machine(machine: str) -> list[str]:
    """`-M machine` with guest RAM in a memfd: vfio-pci needs shareable RAM to map."""
    return [
        "-M",
        machine,
        "-object",
        f"memory-backend-memfd,id=mem,size={RAM_MIB}M",
        "-machine",
        "memory-backend=mem",
    ]


def vfio(
    root: Path, bus: str, addr: str | None = "9.0", dev_id: str = "hostdev0", group: int = 1
) -> str:
    """A -device vfio-pci option for a new emulated host device (IOMMU group `group`).

    Without `addr` QEMU picks the slot (a root port's only one)."""
    sysfs = create_sysfs_device(root, VfioDeviceSpec(f"0000:{group:02x}:00.0", group))
    where = f"bus={bus}" + (f",addr={addr}" if addr else "")
    return f"vfio-pci,id={dev_id},sysfsdev={sysfs},{where},rombar=0"


def start(
    qemu_vm: VmFactory,
    tmp_path: Path,
    built: Built,
    machine: list[str],
    devices: list[str],
    *,
    guest: bool = False,
    binary: str | None = None,
    setup_monitor: bool = False,
    name: str = "vm",
) -> Vm:
    """Start QEMU, waiting for nothing: `machine` args, the guest (its debug console to a
    file) or -S, then one -device per entry, in that order (the order under test).

    Not waiting lets a test see QEMU refuse to start (`refused`); the others wait with
    `greeted` and, for the guest, `console_shows`."""
    dma_log, console = tmp_path / f"{name}.dma.log", tmp_path / f"{name}.debugcon.txt"
    args = [*machine, "-m", str(RAM_MIB)]
    args += ["-kernel", str(built.guest), "-debugcon", f"file:{console}"] if guest else ["-S"]
    for dev in devices:
        args += ["-device", dev]
    env = emulation_env(built.so, dma_log)
    proc = qemu_vm(*args, env=env, binary=binary, setup_monitor=setup_monitor, name=name)
    return Vm(proc, dma_log, console)


async def _query_status(proc: QemuProcess) -> None:
    client = QMPClient("ready")
    await client.connect(str(proc.qmp_path))
    await client.execute("query-status")
    await client.disconnect()


def greeted(vm: Vm) -> Vm:
    """Wait until QEMU answers on QMP: it greets only once every cold-plugged device is
    realized, so the DMA log then holds every container's mappings from realize."""
    asyncio.run(_query_status(vm.proc))
    return vm


def console_shows(vm: Vm, marker: str, what: str, timeout: float = 30) -> Vm:
    """Wait (bounded poll on the condition) until the guest printed `marker` on its
    console; fail with `what` after `timeout` s, or at once with QEMU's stderr if it died."""
    deadline = time.monotonic() + timeout
    while not (vm.console.exists() and marker in vm.console.read_text()):
        assert vm.proc.popen is not None and vm.proc.popen.poll() is None, vm.proc.stderr_text()
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # bounded poll on a condition, not a fixed wait
    return vm


def refused(vm: Vm) -> str:
    """QEMU exited with an error at start: its stderr (to assert QEMU's own message)."""
    assert vm.proc.popen is not None
    assert vm.proc.popen.wait(timeout=60) != 0, vm.proc.stderr_text()
    return vm.proc.stderr_text()


def accepted_silently(vm: Vm) -> bool:
    """QEMU runs and printed nothing but warnings (none of them about the order)."""
    assert vm.proc.popen is not None and vm.proc.popen.poll() is None
    lines = [ln for ln in vm.proc.stderr_text().splitlines() if ln.strip()]
    return all("warning:" in ln for ln in lines)


def all_ram_mapped(vm: Vm, containers: int | None = None) -> bool:
    """The DMA log: every VFIO container keeps all guest RAM mapped (the device bypasses
    the vIOMMU), and there are `containers` of them when given (at least one otherwise)."""
    mapped = mapped_bytes(vm.dma_log)
    count_ok = len(mapped) == containers if containers is not None else bool(mapped)
    return count_ok and all(v >= RAM for v in mapped.values())


def nothing_mapped(vm: Vm) -> bool:
    """The DMA log: no VFIO container has anything mapped (the device follows a
    translating vIOMMU that has mapped nothing for it)."""
    return all(v == 0 for v in mapped_bytes(vm.dma_log).values())


def report(vm: Vm, cmdline: bool = True, scenario: str = "") -> dict[str, Any]:
    """qmpguard's JSON report on the live VM; cmdline=False keeps only QMP-visible evidence
    (the collected snapshot, analysed again without the process command line). With a
    `scenario`, the evidence is recorded for the evidence table (record_evidence)."""
    live = asyncio.run(inspect_target(parse_target(str(vm.proc.qmp_path))))
    assert live.ok and live.snapshot is not None, live.error and live.error.message
    if cmdline:
        doc = target_json(live)
    else:
        doc = target_json(analyse_snapshot(live.target, live.snapshot.without_cmdline()))
    if scenario:
        record_evidence(doc, scenario)
    return doc


def device(doc: dict[str, Any], dev_id: str = "hostdev0") -> dict[str, Any]:
    """One device of a report, by id."""
    return next(d for d in doc["devices"] if d["id"] == dev_id)


def codes(doc: dict[str, Any], dev_id: str | None) -> list[str]:
    """Sorted finding codes of a report: of one device by id, or of all with None."""
    return sorted(
        f["code"]
        for f in doc["findings"]
        if dev_id is None or f["device"] == f"/machine/peripheral/{dev_id}"
    )


@functools.cache
def qemu_version(binary: str) -> tuple[int, int]:
    """(major, minor) from `binary --version` (the 11.1 wrapper passes it through)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    assert m, f"{binary} --version: {out!r}"
    return int(m.group(1)), int(m.group(2))
