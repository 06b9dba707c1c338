"""Record the snapshots in tests/data from real QEMU (the suite's own recorder).

    .venv/bin/python -m tests.record_snapshots [--only NAME ...] [QEMU_BINARY ...]

Each scenario of tests/scenarios.py is started, snapshotted with qmpguard's own
collector, and written to tests/data/<scenario>-<qemu version>.json. The unit tests
analyse these files without QEMU. Without a binary, the system QEMU (or
$QMPGUARD_TEST_QEMU); `--matrix` records on every build of tests/conftest.py
qemu_matrix(). `--only` takes scenario names (e.g. q35-intel-vfio-first).

The vfio scenarios (scenarios.VFIO_SCENARIOS) run with the VFIO emulation
(qmpguard.demo.fakevfio) and are written as <scenario>-<state>-<version>.json, one per
state ("paused" under -S, "translating" once the guest has turned the vIOMMU on). Beside
each goes <same name>.truth.json: what the emulation's DMA log says QEMU did with each
vfio device's container once the vIOMMU translates -- "translated" (nothing mapped) or
"all-ram" (all guest RAM mapped). The offline tests compare qmpguard with that, never
with itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_emulation,
    build_vtd_guest,
    create_sysfs_device,
    emulation_env,
    mapped_bytes_by_group,
)
from qmpguard.demo.qemu_process import QemuProcess, qemu_binary
from qmpguard.inspection import snapshot_target
from qmpguard.snapshot import Snapshot, write_json_atomically
from qmpguard.targets import parse_target
from tests import scenarios
from tests.scenarios import VFIO_RAM_MIB, VfioDev, VfioScenario

DATA = Path(__file__).parent / "data"
RECORDED = {
    "q35-intel-topology": scenarios.Q35_INTEL_TOPOLOGY,
    "i440fx-pci-bridge": scenarios.I440FX_PCI_BRIDGE,
}
TRUTH_SCHEMA = "qmpguard.test-truth/1"
RAM = VFIO_RAM_MIB << 20
#: Where the recorded files say the emulated devices and other temporary files are.
SYSFS_DEVICES = "/sys/bus/pci/devices"
RUN_DIR = "/run/qmpguard-test"


def truth_path(snapshot_file: Path) -> Path:
    """tests/data/<name>-<version>.json -> tests/data/<name>-<version>.truth.json."""
    return snapshot_file.with_suffix(".truth.json")


def normalised(snap: Snapshot, name: str, paths: dict[str, str]) -> dict[str, Any]:
    """The snapshot document without this machine's noise: target, pid, temporary paths.

    `paths` maps each temporary path prefix to the fixed one the file shows instead
    (longest first), in every string of the document (command line, info qtree, ...).
    """
    snap.target = f"unix:/run/qemu/{name}.qmp"
    snap.pid = 4242
    text = json.dumps(snap.to_json())
    for real, fixed in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(json.dumps(real)[1:-1], json.dumps(fixed)[1:-1])
    doc: dict[str, Any] = json.loads(text)
    return doc


def record_plain(binary: str, tmp: Path, only: set[str] | None) -> None:
    for name, args in RECORDED.items():
        if only is not None and name not in only:
            continue
        with QemuProcess(list(args), tmp / f"{name}.qmp", binary=binary) as vm:
            snap = asyncio.run(snapshot_target(parse_target(str(vm.qmp_path))))
        out = DATA / f"{name}-{snap.qemu_version}.json"
        write_json_atomically(out, normalised(snap, name, {}))
        print(f"wrote {out}")


# ----------------------------------------------------------------- vfio scenarios


def mapped_per_device(dma_log: Path, devices: tuple[VfioDev, ...]) -> dict[str, int]:
    """Bytes the container of each vfio device (by id) still has mapped: each device has
    an IOMMU group of its own, and the log says which container each group is in."""
    by_group = mapped_bytes_by_group(dma_log)
    missing = [d.id for d in devices if d.group not in by_group]
    if missing:
        raise RuntimeError(f"no container attached for {missing} in {dma_log}")
    return {d.id: by_group[d.group] for d in devices}


def classify(mapped: int) -> str:
    """'translated' (nothing mapped) or 'all-ram' (all guest RAM mapped)."""
    if mapped == 0:
        return "translated"
    if mapped >= RAM:
        return "all-ram"
    raise RuntimeError(f"{mapped} bytes mapped: neither nothing nor all {RAM} bytes of RAM")


async def _qmp(path: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One command on the recorder's own (setup) monitor, never qmpguard's."""
    client = QMPClient("recorder")
    await client.connect(str(path))
    try:
        return await client.execute(command, arguments)
    finally:
        await client.disconnect()


def _wait_translation_on(vm: QemuProcess, console: Path, timeout: float = 60) -> None:
    """The VT-d guest prints TE on the debug console once GSTS shows translation on."""
    deadline = time.monotonic() + timeout
    while not (console.exists() and "TE" in console.read_text()):
        if vm.popen is None or vm.popen.poll() is not None:
            raise RuntimeError(f"QEMU exited: {vm.stderr_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not enable VT-d translation")
        time.sleep(0.05)


def _hotplug_props(dev: VfioDev, sysfs: Path) -> dict[str, object]:
    pairs = (kv.split("=", 1) for kv in dev.option(sysfs).split(",")[1:])
    props: dict[str, object] = {k: v for k, v in pairs}
    props["driver"] = "vfio-pci"
    props["rombar"] = 0  # QEMU 10.0's device_add wants an integer here
    return props


@contextmanager
def vfio_vm(
    binary: str, tmp: Path, name: str, sc: VfioScenario, so: Path, guest: Path
) -> Iterator[tuple[QemuProcess, Path, Path]]:
    """The scenario's VM, paused (-S), with its DMA log and debug console."""
    sysfs, dma_log, console = tmp / "sysfs", tmp / f"{name}.dma.log", tmp / f"{name}.console"
    for dev in sc.vfio:
        create_sysfs_device(sysfs, VfioDeviceSpec(dev.host, dev.group))
    args = [*scenarios.VFIO_MACHINE, "-S"]
    if sc.viommu == "intel":
        args += ["-kernel", str(guest), "-debugcon", f"file:{console}"]
    for d in sc.devices:
        args += ["-device", d.option(sysfs) if isinstance(d, VfioDev) else d]
    vm = QemuProcess(
        args,
        tmp / f"{name}.qmp",
        binary=binary,
        env=emulation_env(so, dma_log),
        stderr_path=tmp / f"{name}.stderr",
        setup_qmp_path=tmp / f"{name}.setup.qmp",
    )
    with vm:
        yield vm, dma_log, console


def record_vfio_scenario(
    binary: str, tmp: Path, name: str, sc: VfioScenario, so: Path, guest: Path
) -> None:
    """Snapshot each state of one scenario, then write each with the DMA log's truth."""
    # The emulation and the guest are built in the parent temporary directory.
    paths = {str(tmp / "sysfs"): SYSFS_DEVICES, str(tmp): RUN_DIR, str(tmp.parent): RUN_DIR}
    taken: dict[str, tuple[Snapshot, dict[str, int]]] = {}
    with vfio_vm(binary, tmp, name, sc, so, guest) as (vm, dma_log, console):
        assert vm.setup_qmp_path is not None
        target = parse_target(str(vm.qmp_path))
        asyncio.run(_qmp(vm.setup_qmp_path, "query-status"))  # every device realized
        if "paused" in sc.states:
            snap = asyncio.run(snapshot_target(target))
            taken["paused"] = (snap, mapped_per_device(dma_log, sc.cold_vfio))
        if sc.viommu == "intel":
            asyncio.run(_qmp(vm.setup_qmp_path, "cont"))
            _wait_translation_on(vm, console)
        for dev in sc.hotplug:
            asyncio.run(_qmp(vm.setup_qmp_path, "device_add", _hotplug_props(dev, tmp / "sysfs")))
        if "translating" in sc.states:
            snap = asyncio.run(snapshot_target(target))
            taken["translating"] = (snap, mapped_per_device(dma_log, sc.vfio))
        final = mapped_per_device(dma_log, sc.vfio)
        if vm.popen is None or vm.popen.poll() is not None:
            raise RuntimeError(f"QEMU exited: {vm.stderr_text()}")
    measured = (
        "after the guest enabled VT-d translation, in the same QEMU process"
        if sc.viommu == "intel"
        else "under -S: virtio-iommu-pci with boot-bypass=false translates from the start"
    )
    for state, (snap, at_snapshot) in taken.items():
        stem = f"{name}-{state}"
        out = DATA / f"{stem}-{snap.qemu_version}.json"
        write_json_atomically(out, normalised(snap, stem, paths))
        devices = {
            dev.id: {
                "truth": classify(final[dev.id]),
                "mapped_bytes": final[dev.id],
                "mapped_bytes_at_snapshot": at_snapshot[dev.id],
                "group": dev.group,
                "hotplugged": dev in sc.hotplug,
            }
            for dev in sc.vfio
            if dev.id in at_snapshot  # hot-plugged after a paused snapshot: not in it
        }
        truth = {
            "schema": TRUTH_SCHEMA,
            "snapshot": out.name,
            "qemu_version": snap.qemu_version,
            "state": state,
            "guest_ram_bytes": RAM,
            "measured": measured,
            "devices": devices,
        }
        write_json_atomically(truth_path(out), truth)
        summary = {d: v["truth"] for d, v in devices.items()}
        print(f"wrote {out.name} ({out.stat().st_size} bytes) {summary}")


def record_vfio(binary: str, tmp: Path, only: set[str] | None) -> None:
    build = tmp / "build"
    build.mkdir(mode=0o700)
    so, guest = build_emulation(build), build_vtd_guest(build)
    for name, sc in scenarios.VFIO_SCENARIOS.items():
        if only is not None and name not in only:
            continue
        with tempfile.TemporaryDirectory(dir=tmp) as one:
            record_vfio_scenario(binary, Path(one), name, sc, so, guest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.record_snapshots")
    parser.add_argument("binaries", nargs="*", metavar="QEMU_BINARY")
    parser.add_argument("--matrix", action="store_true", help="every build of qemu_matrix()")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these scenarios")
    args = parser.parse_args(argv)
    binaries = list(args.binaries)
    if args.matrix:
        from tests.conftest import qemu_matrix

        binaries += list(qemu_matrix().values())
    only = set(args.only) if args.only else None
    for binary in binaries or [qemu_binary()]:
        with tempfile.TemporaryDirectory() as tmp:
            record_plain(binary, Path(tmp), only)
            record_vfio(binary, Path(tmp), only)


if __name__ == "__main__":
    main()
