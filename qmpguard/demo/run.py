"""`qmpguard demo`: real QEMU VMs with emulated vfio-pci devices, checked by qmpguard.

Starts two VMs in a temporary directory, each with a vfio-pci device backed by the
user-space VFIO emulation (no hardware, no /dev/vfio) and an intel-iommu:
  good-vm: -device intel-iommu ... before -device vfio-pci ...  (correct)
  bad-vm:  -device vfio-pci ... before -device intel-iommu ...  (misbound)
then runs the same inspection as `qmpguard check` and prints the report.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path

from qmpguard.demo.fakevfio import (
    UnsafeCacheError,
    VfioDeviceSpec,
    build_emulation,
    create_sysfs_device,
    emulation_env,
    private_cache_dir,
)
from qmpguard.demo.qemu_process import QemuProcess, SocketPathTooLongError, check_socket_path
from qmpguard.inspection import inspect_many
from qmpguard.report.document import report_json
from qmpguard.report.table import render_report
from qmpguard.result import TargetResult
from qmpguard.targets import parse_target

INTRO = """\
qmpguard demo: two QEMU VMs, each given a PCI device through VFIO (device assignment)
and a virtual IOMMU (intel-iommu) that the guest uses to fence that device's DMA.
The only difference is the order of two -device options:

  good-vm:  -device intel-iommu ...  -device vfio-pci ...
  bad-vm:   -device vfio-pci ...     -device intel-iommu ...

QEMU starts both without a word. But vfio-pci picks its DMA address space when it is
created: in bad-vm the vIOMMU does not exist yet, so the device is wired to all of
guest memory, bypassing the IOMMU the guest believes protects it.
qmpguard reads both VMs over QMP (read-only) and reports:
"""

OUTRO = """\
How to read this: bad-vm's vfio device is MISBOUND (QG001, critical): it can DMA
anywhere in the guest. The fix is in the evidence: put -device intel-iommu before
-device vfio-pci on the QEMU command line (libvirt already does), then restart the VM.
good-vm's device is ok. Try it yourself: `qmpguard check /path/to/vm.qmp`.
"""


def demo_vm_args(name: str, sysfs: Path, viommu_first: bool) -> list[str]:
    """QEMU arguments of one demo VM (TCG, paused before firmware: no guest needed)."""
    viommu = ["-device", "intel-iommu,id=viommu0,caching-mode=on"]
    vfio = ["-device", f"vfio-pci,id=hostdev0,bus=pcie.0,addr=9.0,rombar=0,sysfsdev={sysfs}"]
    return [
        "-name",
        name,
        "-S",
        "-accel",
        "tcg",
        "-machine",
        "q35,kernel-irqchip=split",
        "-m",
        "64",
        "-device",
        "e1000e,id=nic0,bus=pcie.0,addr=3.0",
        *(viommu + vfio if viommu_first else vfio + viommu),
    ]


async def _inspect(paths: list[Path]) -> list[TargetResult]:
    return await inspect_many([parse_target(str(p)) for p in paths])


def demo_passed(results: list[TargetResult]) -> bool:
    """bad-vm has QG001 on hostdev0 and good-vm's hostdev0 is ok."""
    verdicts: dict[str, str] = {}
    for r in results:
        if r.analysis is None:
            return False
        for d in r.analysis.devices:
            if d.device.id == "hostdev0":
                verdicts[Path(r.target).stem] = d.verdict
    return verdicts == {"good-vm": "ok", "bad-vm": "misbound"}


#: The build cache is not private, or the temporary directory is too deep for a QMP
#: socket: nothing is started (exit code UNKNOWN, one line on stderr).
EXIT_REFUSED = 3


#: The demo's VMs: name, and whether the vIOMMU comes first on the command line.
DEMO_VMS = (("good-vm", True), ("bad-vm", False))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _emulation(work: Path) -> Path:
    """Build (or reuse) the VFIO emulation library. It is preloaded into QEMU, so it is
    built into a private cache only, never a shared path such as
    $TMPDIR/qmpguard-demo-cache (UnsafeCacheError otherwise); without a usable home it
    is built afresh in this run's own directory."""
    try:
        cache = private_cache_dir()
    except UnsafeCacheError:
        raise
    except (OSError, RuntimeError):
        cache = work / "build"
        cache.mkdir(mode=0o700)
    return build_emulation(cache)


def _start_vms(work: Path, so_path: Path, vms: list[QemuProcess]) -> None:
    """Start DEMO_VMS, appending each to `vms` as it starts (the caller stops them)."""
    for i, (name, first) in enumerate(DEMO_VMS):
        sysfs = create_sysfs_device(
            work / name, VfioDeviceSpec(name=f"0000:0{i + 1}:00.0", group=40 + i)
        )
        vm = QemuProcess(
            args=demo_vm_args(name, sysfs, first),
            qmp_path=work / f"{name}.qmp",
            env=emulation_env(so_path, work / f"{name}.dma.log"),
            stderr_path=work / f"{name}.stderr",
        )
        vms.append(vm.start())


def _print_report(results: list[TargetResult], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(report_json(results), indent=2))
    else:
        print(INTRO)
        print(render_report(results))
        print(OUTRO)


def _wait_while_kept(vms: list[QemuProcess]) -> None:
    """`--keep`: leave the VMs to the user until they exit or the user interrupts."""
    sockets = ", ".join(str(v.qmp_path) for v in vms)
    print(f"VMs running; QMP sockets: {sockets}\nCtrl-C to stop.", file=sys.stderr)
    for vm in vms:
        assert vm.popen is not None
        vm.popen.wait()


def _explain_failure(vms: list[QemuProcess]) -> None:
    """Each VM's last stderr line (why QEMU stopped, if it did), then the one-line verdict."""
    for vm in vms:
        err = vm.stderr_text().strip()
        if err:
            print(f"{vm.qmp_path.stem}: {err.splitlines()[-1]}", file=sys.stderr)
    print("qmpguard demo: the demo did not produce the expected verdicts", file=sys.stderr)


def run_demo(fmt: str = "table", keep: bool = False) -> int:
    """Build the emulation, start the VMs, check them, stop them. 0 if the demo worked.

    Ctrl-C, SIGTERM and SIGHUP all stop the VMs (SIGINT is re-armed: a shell may start
    background jobs with it ignored).
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    vms: list[QemuProcess] = []
    with tempfile.TemporaryDirectory(prefix="qmpguard-demo-") as tmp:
        work = Path(tmp)  # mkdtemp: 0700, ours
        try:  # before anything is built: a too-deep $TMPDIR is a usage error
            for name, _ in DEMO_VMS:
                check_socket_path(work / f"{name}.qmp")
            so_path = _emulation(work)
        except (SocketPathTooLongError, UnsafeCacheError) as exc:
            print(f"qmpguard demo: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        try:
            _start_vms(work, so_path, vms)
            results = asyncio.run(_inspect([vm.qmp_path for vm in vms]))
            _print_report(results, fmt)
            if keep:
                _wait_while_kept(vms)
        finally:
            for vm in vms:
                vm.stop()
        ok = demo_passed(results)
        if not ok:
            _explain_failure(vms)
        return 0 if ok else 1
