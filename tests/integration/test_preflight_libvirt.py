"""The libvirt path of issue 16 with the real libvirtd (system QEMU 7.2, which libvirt runs).

A domain whose <qemu:commandline> puts `-device intel-iommu` after a vfio device:
1. without qmpguard it starts, misbound: the VFIO emulation's DMA log shows all guest RAM
   mapped, and `qmpguard check libvirt:NAME` says QG001 with the domain-XML fix
   (<iommu model='intel'>, and the vfio device in JSON form: a key=val -device in
   <qemu:commandline> is realized before every device libvirt writes);
2. with deploy/hooks/libvirt-qemu installed as /etc/libvirt/hooks/qemu (libvirtd told by
   SIGHUP; restored afterwards), `virsh start` fails with the reason in its error;
3. the fix applied as check worded it: the hook lets it start, the VT-d guest turns
   translation on, the DMA log shows 0 bytes mapped, and check says ok.

The VFIO emulation reaches the domain through <qemu:env> (LD_PRELOAD). libvirt's own
<hostdev> wants a real host PCI device, which the emulation cannot stand in for: the
vfio device is given in <qemu:commandline> instead, as people also do.

Installing a libvirt hook affects every domain of this libvirtd: the installed hook
only hands domains named qmpguard-gate-* to qmpguard's hook and lets all others pass
untouched, so that other tests' domains are never gated.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_emulation,
    build_vtd_guest,
    create_sysfs_device,
    mapped_bytes_by_group,
)
from qmpguard.inspection import inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.agreement import libvirt_disagreements
from tests.conftest import REPO, audit_qmp_trace

libvirt = pytest.importorskip("libvirt")
pytestmark = pytest.mark.integration
URI = "qemu:///system"
HOOK = Path("/etc/libvirt/hooks/qemu")
RAM = 64 << 20
PREFIX = "qmpguard-gate-"

DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{guest}</kernel></os>
  <features><ioapic driver='qemu'/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' model='pcie-root'/>
    {iommu}
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    {args}
    <qemu:arg value='-debugcon'/>
    <qemu:arg value='file:{rw}/debugcon.txt'/>
    <qemu:arg value='-trace'/>
    <qemu:arg value='handle_qmp_command,file={rw}/trace.log'/>
    <qemu:env name='LD_PRELOAD' value='{so}'/>
    <qemu:env name='QMPGUARD_VFIO_DMA_LOG' value='{rw}/dma.log'/>
  </qemu:commandline>
</domain>"""


def arg(value: str) -> str:
    quoted = value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
    return f"<qemu:arg value='{quoted}'/>"


def _connect() -> Any:
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no libvirtd at {URI}: {exc}")


@pytest.fixture
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Files QEMU (as libvirt's qemu user) reads and writes: the emulation, the VT-d
    guest, the device's sysfs directory, and a writable directory for the logs."""
    build = tmp_path_factory.mktemp("build")
    base = Path("/var/lib/libvirt/qemu") / f"qmpguard-preflight-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o755)
    try:
        so, guest = base / "fakevfio.so", base / "vtd-guest.elf"
        shutil.copy(build_emulation(build), so)
        shutil.copy(build_vtd_guest(build), guest)
        so.chmod(0o644)
        guest.chmod(0o644)
        sysfs = create_sysfs_device(base / "sys", VfioDeviceSpec("0000:01:00.0", 1))
        rw = base / "rw"
        rw.mkdir(mode=0o777)
        rw.chmod(0o777)
        yield {
            "base": str(base),
            "so": str(so),
            "guest": str(guest),
            "sysfs": str(sysfs),
            "rw": str(rw),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _libvirtd_pid() -> int:
    for pidfile in (Path("/run/libvirtd.pid"), Path("/var/run/libvirtd.pid")):
        if pidfile.exists():
            return int(pidfile.read_text().split()[0])
    pytest.skip("libvirtd's pid file not found: cannot make it re-read its hooks")


def _probe(conn: Any, log: Path, expect_called: bool, deadline: float) -> None:
    """Start throwaway domains until libvirtd calls the hook (or stops calling it): it
    re-reads its hooks on SIGHUP in its own time. A bounded wait on a condition."""
    xml = (
        "<domain type='qemu'><name>{}</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/>"
        "</devices></domain>"
    )
    while True:
        name = f"{PREFIX}probe-{uuid.uuid4().hex[:8]}"
        try:
            dom = conn.createXML(xml.format(name), libvirt.VIR_DOMAIN_START_PAUSED)
            dom.destroy()
            started = True
        except libvirt.libvirtError:
            started = False
        called = log.exists() and name in log.read_text()
        if started and called == expect_called:
            return
        assert time.monotonic() < deadline, "libvirtd did not re-read its hooks"


@pytest.fixture
def hook_installed(tmp_path: Path) -> Iterator[Path]:
    """deploy/hooks/libvirt-qemu as libvirt's qemu hook, for qmpguard-gate-* domains."""
    conn = _connect()
    pid = _libvirtd_pid()
    ours = tmp_path / "libvirt-qemu"
    text = (REPO / "deploy" / "hooks" / "libvirt-qemu").read_text()
    ours.write_text(
        text.replace("/opt/qmpguard/.venv/bin/qmpguard", str(REPO / ".venv" / "bin" / "qmpguard"))
    )
    ours.chmod(0o755)
    log = tmp_path / "calls.log"
    backup = HOOK.with_name("qemu.qmpguard-test-backup")
    if HOOK.exists():
        shutil.copy2(HOOK, backup)
    HOOK.parent.mkdir(parents=True, exist_ok=True)
    HOOK.write_text(
        "#!/bin/sh\n"
        "# installed by qmpguard's tests; only qmpguard-gate-* domains are checked\n"
        f'case "$1" in {PREFIX}probe-*) echo "$1" >> {log}; exit 0;; '
        f'{PREFIX}*) exec {ours} "$@";; esac\n'
        "exit 0\n"
    )
    HOOK.chmod(0o755)
    try:
        os.kill(pid, signal.SIGHUP)
        _probe(conn, log, True, time.monotonic() + 30)
        yield ours
    finally:
        if backup.exists():
            shutil.move(backup, HOOK)
        else:
            HOOK.unlink(missing_ok=True)
        os.kill(pid, signal.SIGHUP)
        if not backup.exists() and not HOOK.exists():
            _probe(conn, log, False, time.monotonic() + 30)
        conn.close()


def check(name: str) -> dict[str, Any]:
    result = asyncio.run(inspect_target(parse_target(f"libvirt:{name}")))
    assert result.ok, result.error and result.error.message
    return target_json(result)


def wait_translation(rw: Path, dom: Any) -> None:
    deadline = time.monotonic() + 60
    console = rw / "debugcon.txt"
    while not (console.exists() and "TE" in console.read_text(errors="replace")):
        assert dom.isActive(), "the domain stopped while its guest booted"
        assert time.monotonic() < deadline, "guest did not enable VT-d translation"
        time.sleep(0.05)  # bounded poll on a condition


def misbound_xml(name: str, place: dict[str, str]) -> str:
    vfio = f"vfio-pci,id=hostdev0,sysfsdev={place['sysfs']},bus=pcie.0,addr=0x9,rombar=0"
    args = "".join(arg(a) for a in ("-device", vfio, "-device", "intel-iommu,caching-mode=on"))
    return DOMAIN.format(name=name, iommu="", args=args, **place)


def apply_fix(message: str, xml: str) -> str:
    """The fix as check words it, applied to the domain XML: the <qemu:arg> pair out,
    <iommu> in, the vfio device in the JSON form it gives."""
    m = re.search(r"add (<iommu model='intel'>.*?</iommu>) to <devices>", message)
    assert m, message
    iommu = m.group(1)
    j = re.search(r"in JSON form: -device (\{.*?\})(?:;|$)", message)
    assert j, message
    out = xml.replace(arg("-device") + arg("intel-iommu,caching-mode=on"), "")
    out = re.sub(r"<qemu:arg value='vfio-pci,[^']*'/>", arg(j.group(1)), out)
    return out.replace("<memballoon model='none'/>", f"{iommu}\n    <memballoon model='none'/>")


def test_misbound_domain_runs_without_the_gate_and_check_says_qg001(
    place: dict[str, str], domains: Callable[[str], Any]
) -> None:
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    xml = misbound_xml(name, place)
    rw = Path(place["rw"])
    pre = subprocess.run(
        [str(REPO / ".venv" / "bin" / "qmpguard"), "preflight", "--libvirt-xml", "-"],
        input=xml,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pre.returncode == 2 and "QG001" in pre.stdout, pre.stdout
    dom = domains(xml)
    dom.create()
    try:
        wait_translation(rw, dom)
        mapped = mapped_bytes_by_group(rw / "dma.log")
        assert mapped.get(1, 0) >= RAM, mapped  # all guest RAM stays mapped
        doc = check(name)
        hostdev = next(d for d in doc["devices"] if d["id"] == "hostdev0")
        assert hostdev["verdict"] == "misbound"
        qg001 = next(f for f in doc["findings"] if f["code"] == "QG001")
        # the fix in libvirt's terms, not "libvirt does this itself"
        assert "<iommu model='intel'><driver caching_mode='on'/></iommu>" in qg001["message"]
        assert "<qemu:commandline>" in qg001["message"]
        assert "in JSON form: -device {" in qg001["message"]
        fixed_xml = apply_fix(qg001["message"], xml)
        # issue 16's contract, as for every qemu_vm and libvirt_domain VM
        assert not libvirt_disagreements(dom, URI)
    finally:
        dom.destroy()
        assert not [
            r for r in audit_qmp_trace(rw / "trace.log") if "qom-" in r or "human-monitor" in r
        ]
    # the domain-XML fix, as check gave it, read by preflight: nothing realized too early
    again = subprocess.run(
        [str(REPO / ".venv" / "bin" / "qmpguard"), "preflight", "--libvirt-xml", "-"],
        input=fixed_xml,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stdout


def test_the_hook_refuses_it_and_lets_the_fixed_domain_start(
    place: dict[str, str], domains: Callable[[str], Any], hook_installed: Path
) -> None:
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    xml = misbound_xml(name, place)
    rw = Path(place["rw"])
    dom = domains(xml)
    with pytest.raises(libvirt.libvirtError) as refused:
        dom.create()
    error = str(refused.value)
    assert "refused to start" in error and "QG001" in error, error
    assert "<iommu model='intel'><driver caching_mode='on'/></iommu>" in error
    assert not dom.isActive()
    assert not (rw / "dma.log").exists()  # QEMU never ran
    # `virsh start` shows the same reason to a person
    virsh = subprocess.run(
        ["virsh", "-c", URI, "start", name], capture_output=True, text=True, timeout=120
    )
    assert virsh.returncode != 0 and "refused to start" in virsh.stderr, virsh.stderr
    # the fix as the hook's message words it
    message = error[error.index("QG001") :]
    fixed = domains(
        apply_fix(message, xml).replace(f"<name>{name}</name>", f"<name>{name}-fixed</name>")
    )
    fixed.create()
    try:
        wait_translation(rw, fixed)
        assert mapped_bytes_by_group(rw / "dma.log") == {1: 0}  # translated: nothing mapped
        doc = check(f"{name}-fixed")
        hostdev = next(d for d in doc["devices"] if d["id"] == "hostdev0")
        assert hostdev["verdict"] == "ok", json.dumps(hostdev["order"])
        assert not [f for f in doc["findings"] if f["code"] in ("QG001", "QG002")]
    finally:
        fixed.destroy()
