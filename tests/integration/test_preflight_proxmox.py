"""The Proxmox VE fix proven on the DMA log, from a recorded `qm showcmd` (no Proxmox VE
here: tests/unit/data/pve-100.showcmd, written from qemu-server's shape).

The recorded command line is made runnable on this host and nothing else is changed:
/usr/bin/kvm is a link to the QEMU under test, the QMP socket stays Proxmox VE's
/run/qemu-server/<vmid>.qmp (with a VMID of its own; the names qmpguard recognises
Proxmox VE by), other host paths move to the test's directory, what only Proxmox VE's
QEMU or KVM takes goes (-id, -cpu host, tap, -daemonize, the qmeventd and VNC sockets,
iSCSI, the disk), the hostpci devices take the VFIO emulation's sysfs directories, the
machine is the plain pc-q35-7.2 (no +pve0 here), and the VT-d guest runs so that the
vIOMMU translates.

1. As recorded (intel-iommu from args:, after every hostpci): both devices keep all
   guest RAM mapped and check says QG001 with the VM-config change in Proxmox VE's terms.
2. With that change applied (what qemu-server writes for `machine: ...,viommu=intel`:
   the vIOMMU before its -readconfig, nothing in args:): 0 bytes mapped, check ok.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.analysis.preflight import preflight
from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_emulation,
    build_vtd_guest,
    create_sysfs_device,
    emulation_env,
    mapped_bytes_by_group,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.fix import fixes
from qmpguard.inspection import inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import AUDIT, QEMU_MATRIX, audit_qmp_trace, requires_qemu
from tests.generator.model import QemuBinary

pytestmark = [pytest.mark.integration, requires_qemu]
DATA = Path(__file__).resolve().parents[1] / "unit" / "data"
RAM = 64 << 20
#: options that need KVM, a Proxmox VE host or a running qmeventd: (option, value prefix)
DROPPED = {
    "-id": "",
    "-cpu": "",
    "-vnc": "",
    "-daemonize": None,
    "-iscsi": "",
    "-chardev": "socket,id=qmp-event",
    "-mon": "chardev=qmp-event",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("fakevfio")
    return build_emulation(cache), build_vtd_guest(cache)


PVE_RUN = Path("/run/qemu-server")
FLAGS = frozenset({"-no-shutdown", "-nodefaults"})  # the recorded line's options without a value


@pytest.fixture
def vmid() -> Iterator[str]:
    """A VMID of this test's own, its QMP socket in Proxmox VE's directory."""
    created = not PVE_RUN.exists()
    PVE_RUN.mkdir(exist_ok=True)
    number = str(900000 + os.getpid() % 90000)
    try:
        yield number
    finally:
        (PVE_RUN / f"{number}.qmp").unlink(missing_ok=True)
        if created:
            PVE_RUN.rmdir()


def runnable(
    recorded: list[str], here: Path, qemu: QemuBinary, guest: Path, vmid: str
) -> list[str]:
    """The recorded command line, made runnable on this host (see the module docstring)."""
    out: list[str] = []
    i = 1
    while i < len(recorded):
        opt = recorded[i]
        if opt in FLAGS:
            out.append(opt)
            i += 1
            continue
        value = recorded[i + 1] if i + 1 < len(recorded) else ""
        if opt in DROPPED:
            prefix = DROPPED[opt]
            if prefix is None:
                i += 1
                continue
            if value.startswith(prefix):
                i += 2
                continue
        if opt == "-m":
            value = "64"
        elif opt == "-boot":
            value = "menu=on,strict=on,reboot-timeout=1000"
        elif opt == "-drive":
            value = "driver=null-co,read-zeroes=on,if=none,id=drive-scsi0"
        elif opt == "-netdev":
            value = "user,id=net0"
        elif opt == "-machine" and value.startswith("type="):
            value = "type=pc-q35-7.2"
        elif opt == "-device" and value.startswith("vfio-pci,host="):
            host, rest = value[len("vfio-pci,host=") :].split(",", 1)
            group = int(host.split(":")[1], 16)
            sysfs = create_sysfs_device(here / "sys", VfioDeviceSpec(host, group))
            value = f"vfio-pci,sysfsdev={sysfs},rombar=0,{rest}"
        value = value.replace("/var/run/qemu-server/100.qmp", str(PVE_RUN / f"{vmid}.qmp"))
        value = value.replace("/var/run/qemu-server", str(here))
        value = value.replace(
            "/usr/share/qemu-server/pve-q35-4.0.cfg", str(DATA / "pve-q35-layout.cfg")
        )
        out += [opt, value] if value or opt not in DROPPED else [opt]
        i += 2
    kvm = here / "bin" / "kvm"
    kvm.parent.mkdir(parents=True, exist_ok=True)
    kvm.unlink(missing_ok=True)
    kvm.symlink_to(qemu.elf)
    return [
        str(kvm),
        *qemu.elf_args,
        *out,
        "-object",
        "memory-backend-memfd,id=mem,size=64M",
        "-machine",
        "memory-backend=mem",
        "-kernel",
        str(guest),
        "-debugcon",
        f"file:{here / 'debugcon.txt'}",
        "-accel",
        "tcg",
    ]


def recorded() -> list[str]:
    return shlex.split((DATA / "pve-100.showcmd").read_text())


async def _ready(path: Path) -> None:
    client = QMPClient("ready")
    await client.connect(str(path))
    await client.execute("query-status")
    await client.disconnect()


def run_vm(
    argv: list[str], here: Path, so: Path, qemu: QemuBinary
) -> tuple[dict[int, int], dict[str, Any]]:
    """Start argv (its QMP on a socket listening before QEMU runs), let the VT-d guest
    turn translation on, then: the DMA log per group, and check's report."""
    trace = here / "trace.log"
    env = {**emulation_env(so, here / "dma.log"), **dict(qemu.elf_env)}
    vm = QemuProcess(
        args=[*argv[1:], "-trace", f"handle_qmp_command,file={trace}"],
        qmp_path=here / "check.qmp",
        binary=argv[0],
        env=env,
        stderr_path=here / "stderr",
    )
    vm.start()
    try:
        asyncio.run(_ready(vm.qmp_path))
        deadline = time.monotonic() + 60
        console = here / "debugcon.txt"
        while not (console.exists() and "TE" in console.read_text(errors="replace")):
            assert vm.popen is not None and vm.popen.poll() is None, vm.stderr_text()
            assert time.monotonic() < deadline, "guest did not enable VT-d translation"
            time.sleep(0.02)  # bounded poll on a condition
        result = asyncio.run(inspect_target(parse_target(str(vm.qmp_path))))
        assert result.ok, result.error
        return mapped_bytes_by_group(here / "dma.log"), target_json(result)
    finally:
        vm.stop()
        AUDIT["vms"] += 1
        assert not audit_qmp_trace(trace)


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_proxmox_fix_is_proven_on_the_dma_log(
    label: str, tmp_path: Path, built: tuple[Path, Path], vmid: str
) -> None:
    so, guest = built
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    before_dir, after_dir = tmp_path / "before", tmp_path / "after"
    before_dir.mkdir()
    after_dir.mkdir()
    argv = runnable(recorded(), before_dir, qemu, guest, vmid)
    # 1. as recorded: misbound, and check says how to fix it in Proxmox VE's terms
    mapped, doc = run_vm(argv, before_dir, so, qemu)
    assert mapped.get(1, 0) >= RAM and mapped.get(2, 0) >= RAM, mapped
    qg001 = [f for f in doc["findings"] if f["code"] == "QG001"]
    assert {f["device"] for f in qg001} == {
        "/machine/peripheral/hostpci0",
        "/machine/peripheral/hostpci1",
    }
    assert "machine: pc-q35-7.2,viommu=intel" in qg001[0]["message"]
    assert f"/etc/pve/qemu-server/{vmid}.conf" in qg001[0]["message"]
    # 2. the change applied: what qemu-server writes for machine: ...,viommu=intel
    files = {str(DATA / "pve-q35-layout.cfg"): (DATA / "pve-q35-layout.cfg").read_text()}
    found = fixes(preflight(runnable(recorded(), after_dir, qemu, guest, vmid), files).analysis())
    assert len(found) == 1 and found[0].language == "proxmox" and found[0].argv is not None
    fixed = list(found[0].argv)
    i = fixed.index("intel-iommu,intremap=on,caching-mode=on")
    assert fixed[i + 1] == "-readconfig"  # before Proxmox VE's layout and every hostpci
    mapped, doc = run_vm(fixed, after_dir, so, qemu)
    assert mapped == {1: 0, 2: 0}, mapped
    vfio = {d["id"]: d["verdict"] for d in doc["devices"] if d["vfio"]}
    assert vfio == {"hostpci0": "ok", "hostpci1": "ok"}
    assert not [f for f in doc["findings"] if f["code"] in ("QG001", "QG002")]
