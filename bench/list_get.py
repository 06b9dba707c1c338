"""Benchmark: batched bus reads (qom-list-get, QEMU 10.1+) against one qom-list/qom-get each.

    .venv/bin/python bench/list_get.py [--sizes 60,200] [--blocks 5] [--per-block 20]

On the same VM (same shape, same QEMU process) inspections alternate in blocks between
`collect(batch=True)` and `collect(batch=False)` (the path QEMU before 10.1 takes), so
noise from the shared machine falls on both. Per inspection it reports QMP commands,
collection wall time and the QEMU process's CPU time (utime+stime from /proc/PID/stat,
summed over a block because the kernel counts in clock ticks), as medians over blocks
and as ratios batch / baseline. QEMU 10.0 runs the default path for reference (it has no
qom-list-get, so it never batches). Shapes: bench/collection.py's libvirt-style q35 VM
with every device named, and the same VM with anonymous endpoints (qmpguard then places
each through its bus's child[N] links).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from bench.collection import vm_args
from qmpguard.collect import collect
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.qmp.transport import open_session
from qmpguard.targets import parse_target

REPO = Path(__file__).resolve().parent.parent
QEMU = {
    "10.0": REPO / ".cache/qemu-10.0/qemu-system-x86_64",
    "11.1": REPO / ".cache/qemu-11.1/qemu-system-x86_64",
}
ENDPOINTS = ("virtio-net-pci", "e1000e", "virtio-blk-pci")


@dataclass(frozen=True)
class Block:
    """Per-inspection averages over one block of inspections."""

    commands: float
    wall_ms: float
    qemu_cpu_ms: float


def anonymous(args: list[str]) -> list[str]:
    """The same VM with its endpoints' ids removed (root ports keep theirs)."""
    return [
        ",".join(p for p in a.split(",") if not p.startswith("id="))
        if a.startswith(ENDPOINTS)
        else a
        for a in args
    ]


def qemu_cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def settle(path: str) -> None:
    """Wait (without qmpguard's short timeouts) until QEMU answers: every device realized."""
    client = QMPClient("bench-settle")
    await client.connect(path)
    await client.execute("query-status")
    await client.disconnect()


async def inspect(path: str, batch: bool) -> int:
    async with open_session(parse_target(path)) as session:
        await collect(session, batch=batch)
    return session.commands_sent


def block(vm: QemuProcess, batch: bool, n: int) -> Block:
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    cpu0, t0, sent = qemu_cpu_ticks(vm.pid), time.perf_counter(), 0
    for _ in range(n):
        sent += asyncio.run(inspect(str(vm.qmp_path), batch))
    wall = time.perf_counter() - t0
    cpu = qemu_cpu_ticks(vm.pid) - cpu0
    return Block(sent / n, wall * 1000 / n, cpu * tick_ms / n)


def median(blocks: list[Block]) -> Block:
    return Block(
        statistics.median(b.commands for b in blocks),
        statistics.median(b.wall_ms for b in blocks),
        statistics.median(b.qemu_cpu_ms for b in blocks),
    )


def run_shape(binary: Path, args: list[str], modes: list[bool], blocks: int, n: int) -> list[Block]:
    with tempfile.TemporaryDirectory() as tmp:
        vm = QemuProcess(args, Path(tmp) / "vm.qmp", binary=str(binary)).start()
        try:
            asyncio.run(settle(str(vm.qmp_path)))
            seen: dict[bool, list[Block]] = {m: [] for m in modes}
            for _ in range(blocks):
                for mode in modes:
                    seen[mode].append(block(vm, mode, n))
            return [median(seen[m]) for m in modes]
        finally:
            vm.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="60,200")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--per-block", type=int, default=20)
    opts = ap.parse_args()
    print(
        "| shape | PCI devices | path | commands | wall / inspection | QEMU CPU / inspection "
        "| commands vs 11.1 today | wall vs 11.1 today | QEMU CPU vs 11.1 today |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in (int(s) for s in opts.sizes.split(",")):
        for shape, args in (("named", vm_args(size)), ("anonymous", anonymous(vm_args(size)))):
            batch, today = run_shape(QEMU["11.1"], args, [True, False], opts.blocks, opts.per_block)
            (old,) = run_shape(QEMU["10.0"], args, [True], opts.blocks, opts.per_block)
            for label, b in (("11.1 today", today), ("11.1 batch", batch), ("10.0", old)):
                print(
                    f"| {shape} | {size} | {label} | {b.commands:.0f} | {b.wall_ms:.1f} ms "
                    f"| {b.qemu_cpu_ms:.2f} ms | {b.commands / today.commands:.2f} "
                    f"| {b.wall_ms / today.wall_ms:.2f} | {b.qemu_cpu_ms / today.qemu_cpu_ms:.2f} |"
                )


if __name__ == "__main__":
    main()
