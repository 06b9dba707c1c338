"""Benchmark: qmpguard's collection+analysis vs full QOM walks, on the same VMs, same run.

    .venv/bin/python bench/collection.py [--sizes 10,60,200] [--repeat 5]

For each VM size (PCI devices in the VM), measures:
  qmpguard       in-process open_session + collect + analyse (median of --repeat)
  qom-list walk  a bare recursive qom-list of the whole QOM tree from "/"
  qom tree       QEMU's own `qom tree` algorithm: qom-list every node, qom-get every property
  check process  the whole `qmpguard check` process (median), vs the qom tree algorithm
and prints commands sent, times and ratios as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from qmpguard.analysis.vm import analyse
from qmpguard.collect import collect
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.qmp.transport import open_session
from qmpguard.targets import parse_target

BUILTIN_PCI = 4  # q35 -nodefaults: mch, ICH9-LPC, ich9-ahci, ICH9-SMB


def vm_args(total_pci: int) -> list[str]:
    """A libvirt-style q35 VM with `total_pci` PCI devices: pcie-root-ports (multifunction,
    8 per slot) each holding one endpoint (virtio-net, virtio-blk or e1000e), all with
    ids as libvirt gives them (anonymous devices cost qmpguard two QOM reads each)."""
    args = ["-S", "-M", "q35", "-m", "64", "-device", "intel-iommu,caching-mode=on"]
    pairs = (total_pci - BUILTIN_PCI) // 2
    kinds = [
        "virtio-net-pci,disable-legacy=on,iommu_platform=on",
        "e1000e",
        "virtio-blk-pci,disable-legacy=on,iommu_platform=on,drive=d{n}",
    ]
    for n in range(pairs):
        slot, fn = 2 + n // 8, n % 8
        mf = ",multifunction=on" if fn == 0 else ""
        args += [
            "-device",
            f"pcie-root-port,id=rp{n},chassis={n + 1},bus=pcie.0,addr={slot:x}.{fn}{mf}",
        ]
        kind = kinds[n % 3].format(n=n)
        if kind.startswith("virtio-blk"):
            args += ["-drive", f"if=none,id=d{n},driver=null-co,read-zeroes=on"]
        args += ["-device", f"{kind},id=dev{n},bus=rp{n}"]  # libvirt names every device
    return args


class Counter:
    def __init__(self, client: QMPClient) -> None:
        self.client, self.sent = client, 0

    async def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        self.sent += 1
        try:
            return await self.client.execute(cmd, args)
        except ExecuteError:
            return None


async def qom_list_walk(path: str, full: bool) -> tuple[int, float]:
    """Recursive qom-list from / (and qom-get of every property if `full`)."""
    client = QMPClient("bench")
    await client.connect(path)
    q = Counter(client)
    start = time.perf_counter()

    async def node(p: str) -> None:
        entries = await q("qom-list", {"path": p}) or []
        children = []
        for e in entries:
            child = f"{p.rstrip('/')}/{e['name']}"
            if e["type"].startswith("child<"):
                children.append(child)
            elif full:
                await q("qom-get", {"path": p, "property": e["name"]})
        for c in children:
            await node(c)

    await node("/")
    elapsed = time.perf_counter() - start
    await client.disconnect()
    return q.sent, elapsed


async def qmpguard_once(path: str) -> tuple[int, float, int]:
    start = time.perf_counter()
    async with open_session(parse_target(path)) as session:
        snap = await collect(session)
    vm = analyse(snap)
    return session.commands_sent, time.perf_counter() - start, len(vm.devices)


def check_process(path: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "qmpguard", "check", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,60,200")
    ap.add_argument("--repeat", type=int, default=5)
    opts = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in opts.sizes.split(",")):
            vm = QemuProcess(vm_args(size), Path(tmp) / f"vm{size}.qmp").start()
            try:
                path = str(vm.qmp_path)
                runs = [asyncio.run(qmpguard_once(path)) for _ in range(opts.repeat)]
                cmds, devices = runs[0][0], runs[0][2]
                ours = statistics.median(r[1] for r in runs)
                walk_cmds, walk_s = asyncio.run(qom_list_walk(path, full=False))
                tree_cmds, tree_s = asyncio.run(qom_list_walk(path, full=True))
                proc = statistics.median(check_process(path) for _ in range(opts.repeat))
                rows.append((devices, cmds, ours, walk_cmds, walk_s, tree_cmds, tree_s, proc))
            finally:
                vm.stop()
    print(
        "| PCI devices | qmpguard cmds | qmpguard (collect+analyse) | qom-list walk cmds "
        "| walk time | walk / qmpguard | qom tree cmds | qom tree time | `check` process "
        "| qom tree / process |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, c, o, wc, ws, tc, ts, p in rows:
        print(
            f"| {d} | {c} | {o * 1000:.1f} ms | {wc} | {ws * 1000:.0f} ms | {ws / o:.1f}x "
            f"| {tc} | {ts:.2f} s | {p * 1000:.0f} ms | {ts / p:.1f}x |"
        )


if __name__ == "__main__":
    main()
