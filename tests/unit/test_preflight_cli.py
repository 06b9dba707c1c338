"""`qmpguard preflight` and `qmpguard exec` as a user runs them, and the hooks in
deploy/hooks/ on recorded inputs (no QEMU, libvirt or Proxmox VE needed here).

Live: tests/integration/test_preflight_exec.py (exec becomes QEMU: same PID, environment,
file descriptors), test_preflight_libvirt.py (the libvirt hook in a real libvirtd),
test_preflight_proxmox.py (the Proxmox VE fix started with the VFIO emulation).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qmpguard.preflight_command import parse_cmdline_text

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).with_name("data")
QMPGUARD = [sys.executable, "-m", "qmpguard"]
MISBOUND = [
    "qemu-system-x86_64",
    "-nodefaults",
    "-M",
    "q35",
    "-device",
    "vfio-pci,host=0000:01:00.0,id=hostdev0,bus=pcie.0,addr=9",
    "-device",
    "intel-iommu,caching-mode=on",
]
GOOD = [*MISBOUND[:4], MISBOUND[6], MISBOUND[7], MISBOUND[4], MISBOUND[5]]


def qmpguard(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QMPGUARD, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def pve_showcmd() -> str:
    text = (DATA / "pve-100.showcmd").read_text()
    return text.replace("/usr/share/qemu-server/pve-q35-4.0.cfg", str(DATA / "pve-q35-layout.cfg"))


# ------------------------------------------------------------------ preflight


@pytest.mark.parametrize(("argv", "code"), [(MISBOUND, 2), (GOOD, 0)])
def test_exit_codes_are_checks(argv: list[str], code: int) -> None:
    proc = qmpguard("preflight", "--", *argv)
    assert proc.returncode == code, proc.stderr
    assert ("QG001" in proc.stdout) == (code == 2)


def test_json_is_checks_report_document() -> None:
    proc = qmpguard("preflight", "--format", "json", "--qemu-version", "none", "--", *MISBOUND)
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "qmpguard.report/1"
    assert doc["summary"] == {"worst": "critical", "exit_code": 2}
    (target,) = doc["targets"]
    hostdev = next(d for d in target["devices"] if d["id"] == "hostdev0")
    assert hostdev["verdict"] == "misbound"
    assert hostdev["order"]["evidence"][0]["source"] == "cmdline"
    assert (
        target["findings"][0]["evidence"][-1] == "QEMU command line (preflight: QEMU not started)"
    )


def test_tree_format() -> None:
    proc = qmpguard("preflight", "--format", "tree", "--", *MISBOUND)
    assert proc.returncode == 2
    assert "[VFIO]" in proc.stdout and "QG001" in proc.stdout


def test_fix_prints_the_corrected_command_line() -> None:
    proc = qmpguard("preflight", "--fix", "--", *MISBOUND)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == GOOD
    assert "move -device intel-iommu,caching-mode=on (argv[7])" in proc.stderr
    nothing = qmpguard("preflight", "--fix", "--", *GOOD)
    assert nothing.returncode == 0 and shlex.split(nothing.stdout) == GOOD
    assert "nothing to fix" in nothing.stderr


def test_fix_without_a_reordering_says_what_works_instead() -> None:
    proc = qmpguard(
        "preflight",
        "--fix",
        "--",
        "qemu-system-aarch64",
        "-M",
        "virt",
        "-device",
        "vfio-pci,host=0000:01:00.0",
        "-device",
        "arm-smmuv3,primary-bus=pcie.0",
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "use virtio-iommu-pci instead" in proc.stderr


def test_cmdline_file_as_proc_writes_it_and_as_a_shell_prints_it(tmp_path: Path) -> None:
    nul = tmp_path / "cmdline"
    nul.write_bytes(b"\0".join(a.encode() for a in MISBOUND) + b"\0")
    shell = tmp_path / "showcmd"
    shell.write_text(shlex.join(MISBOUND[:4]) + " \\\n  " + shlex.join(MISBOUND[4:]) + "\n")
    for path in (nul, shell):
        proc = qmpguard("preflight", "--cmdline-file", str(path))
        assert proc.returncode == 2, proc.stderr
    assert parse_cmdline_text(nul.read_bytes()) == MISBOUND
    assert parse_cmdline_text(shell.read_bytes()) == MISBOUND
    piped = qmpguard("preflight", "--cmdline-file", "-", stdin=shlex.join(MISBOUND))
    assert piped.returncode == 2


def test_the_command_line_of_a_running_process() -> None:
    """/proc/PID/cmdline (size 0 in stat, NUL-separated) is read whole: here a process
    that carries QEMU's arguments and waits on its stdin."""
    waiter = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", *MISBOUND[1:]],
        stdin=subprocess.PIPE,
    )
    try:
        proc = qmpguard("preflight", "--cmdline-file", f"/proc/{waiter.pid}/cmdline")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "QG001" in proc.stdout
    finally:
        assert waiter.stdin is not None
        waiter.stdin.close()
        waiter.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cmdline-file", "/nonexistent"], "cannot read file /nonexistent"),
        (["--cmdline-file", "/dev/zero"], "is not a regular file"),
        (["--libvirt-xml", "/etc/hostname"], "domain XML /etc/hostname"),
        ([], "no command line"),
    ],
)
def test_unreadable_input_is_exit_3_with_one_line(args: list[str], message: str) -> None:
    proc = qmpguard("preflight", *args)
    assert proc.returncode == 3
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_relative_readconfig_paths_follow_cwd(tmp_path: Path) -> None:
    (tmp_path / "vm.cfg").write_text(
        '[device "h0"]\n  driver = "vfio-pci"\n  host = "0000:01:00.0"\n  bus = "pcie.0"\n'
    )
    argv = [*MISBOUND[:4], "-readconfig", "vm.cfg", *MISBOUND[6:]]
    here = qmpguard("preflight", "--cwd", str(tmp_path), "--", *argv)
    assert here.returncode == 2, here.stdout  # the file's vfio device, before intel-iommu
    elsewhere = qmpguard("preflight", "--", *argv)
    assert elsewhere.returncode == 1  # unverified: the file cannot be read from here
    assert "could not be read" in elsewhere.stdout


# ------------------------------------------------------------------ the gate


def test_gate_refuses_misbound_and_says_why_and_how() -> None:
    proc = qmpguard("preflight", "--gate", "--", *MISBOUND)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "refused to start" in proc.stderr
    assert "Corrected command line:" in proc.stderr
    ok = qmpguard("preflight", "--gate", "--", *GOOD)
    assert ok.returncode == 0 and ok.stderr == ""


def test_gate_strict_refuses_what_it_cannot_verify() -> None:
    argv = [*MISBOUND[:4], "-readconfig", "/nonexistent.cfg", MISBOUND[4], MISBOUND[5]]
    lenient = qmpguard("preflight", "--gate", "--", *argv)
    assert lenient.returncode == 0
    assert "unverified (--strict would refuse it)" in lenient.stderr
    assert "No such file or directory" in lenient.stderr
    strict = qmpguard("preflight", "--gate", "--strict", "--", *argv)
    assert strict.returncode == 2 and "cannot be verified (--strict)" in strict.stderr


def test_gate_says_when_qemu_will_refuse_the_command_line() -> None:
    """amd-iommu on 7.2 refuses vfio-pci after it: QEMU stops that VM itself, the gate
    says why (the right order, so nothing is misbound: not refused by the gate)."""
    argv = [*MISBOUND[:4], "-device", "amd-iommu", MISBOUND[4], MISBOUND[5]]
    proc = qmpguard("preflight", "--gate", "--qemu-version", "7.2", "--", *argv)
    assert proc.returncode == 0, proc.stderr
    assert "QEMU 7.2 will refuse to start: hostdev0 is realized after" in proc.stderr


def test_exec_refuses_with_exit_2_and_the_fix(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = ["sh", "-c", f"touch {marker}", *MISBOUND[1:]]
    proc = qmpguard("exec", "--", *argv)
    assert proc.returncode == 2
    assert "Corrected command line:" in proc.stderr
    assert not marker.exists()  # never executed


def test_exec_runs_the_command_when_nothing_is_wrong(tmp_path: Path) -> None:
    """exec replaces itself: the command's own exit status comes back."""
    marker = tmp_path / "ran"
    proc = qmpguard("exec", "--", "sh", "-c", f"touch {marker}; exit 7", *GOOD[1:])
    assert proc.returncode == 7 and marker.exists()
    missing = qmpguard("exec", "--", "/nonexistent/qemu", *GOOD[1:])
    assert missing.returncode == 127 and "cannot execute" in missing.stderr


# ------------------------------------------------------------------ hooks, recorded inputs


def test_proxmox_hookscript_refuses_a_viommu_from_args(tmp_path: Path) -> None:
    """On a recorded `qm showcmd 100` (no Proxmox VE here): a fake qm prints it."""
    qm = tmp_path / "qm"
    qm.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'showcmd 100' ] || exit 9\ncat {tmp_path / 'out'}\n")
    qm.chmod(0o755)
    (tmp_path / "out").write_text(pve_showcmd())
    env = {**os.environ, "QM": str(qm), "QMPGUARD": str(REPO / ".venv" / "bin" / "qmpguard")}
    hook = str(REPO / "deploy" / "hooks" / "proxmox-hookscript")
    proc = subprocess.run(
        [hook, "100", "pre-start"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "machine: pc-q35-8.1,viommu=intel" in proc.stderr
    for phase in ("post-start", "pre-stop", "post-stop"):
        other = subprocess.run([hook, "100", phase], env=env, capture_output=True, timeout=60)
        assert other.returncode == 0
    # the VM as Proxmox VE writes it for machine: q35,viommu=intel starts
    fixed = pve_showcmd().replace(" -device 'intel-iommu,intremap=on,caching-mode=on'", "")
    fixed = fixed.replace(
        " -readconfig ", " -device intel-iommu,intremap=on,caching-mode=on -readconfig "
    )
    (tmp_path / "out").write_text(fixed)
    ok = subprocess.run(
        [hook, "100", "pre-start"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr


def _libvirt_hook(tmp_path: Path) -> Path:
    hook = tmp_path / "qemu"
    text = (REPO / "deploy" / "hooks" / "libvirt-qemu").read_text()
    qmpguard_bin = REPO / ".venv" / "bin" / "qmpguard"
    hook.write_text(text.replace("/opt/qmpguard/.venv/bin/qmpguard", str(qmpguard_bin)))
    hook.chmod(0o755)
    return hook


LIBVIRT_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pcie-root'/>
    {iommu}
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='vfio-pci,id=hostdev0,sysfsdev=/x,bus=pcie.0,addr=0x9'/>
    {args}
  </qemu:commandline>
</domain>
"""


def test_libvirt_hook_reads_the_domain_xml_on_stdin(tmp_path: Path) -> None:
    hook = _libvirt_hook(tmp_path)
    bad = LIBVIRT_XML.format(
        iommu="", args="<qemu:arg value='-device'/><qemu:arg value='intel-iommu,caching-mode=on'/>"
    )
    proc = subprocess.run(
        [str(hook), "vm1", "prepare", "begin", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "<iommu model='intel'><driver caching_mode='on'/></iommu>" in proc.stderr
    other = subprocess.run(
        [str(hook), "vm1", "start", "begin", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 0  # only prepare/begin is checked
    good = LIBVIRT_XML.format(
        iommu="<iommu model='intel'><driver caching_mode='on'/></iommu>", args=""
    )
    good = good.replace(
        "vfio-pci,id=hostdev0,sysfsdev=/x,bus=pcie.0,addr=0x9",
        '{"driver":"vfio-pci","id":"hostdev0","sysfsdev":"/x","bus":"pcie.0","addr":"0x9"}',
    )
    ok = subprocess.run(
        [str(hook), "vm1", "prepare", "begin", "-"],
        input=good,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


def test_domain_xml_renders_in_libvirts_order() -> None:
    from qmpguard.analysis.libvirt_xml import domain_argv

    xml = LIBVIRT_XML.format(
        iommu="<iommu model='intel'><driver intremap='on' caching_mode='on'/></iommu>"
        "<controller type='pci' index='1' model='pcie-root-port'>"
        "<address type='pci' bus='0x00' slot='0x02' function='0x0'/></controller>"
        "<hostdev mode='subsystem' type='pci'><source><address bus='0x01'/></source>"
        "<address type='pci' bus='0x01' slot='0x00' function='0x0'/></hostdev>",
        args="",
    )
    dom = domain_argv(xml)
    devices = [
        json.loads(a)
        for i, a in enumerate(dom.argv)
        if dom.argv[i - 1] == "-device" and a.startswith("{")
    ]
    assert [d["driver"] for d in devices] == ["intel-iommu", "pcie-root-port", "vfio-pci"]
    assert devices[0] == {
        "driver": "intel-iommu",
        "id": "iommu0",
        "intremap": "on",
        "caching-mode": True,
    }
    assert devices[1] == {"driver": "pcie-root-port", "id": "pci.1", "bus": "pcie.0", "addr": "0x2"}
    assert devices[2] == {"driver": "vfio-pci", "id": "hostdev0", "bus": "pci.1", "addr": "0x0"}
    assert dom.argv[dom.commandline_start :] == (
        "-device",
        "vfio-pci,id=hostdev0,sysfsdev=/x,bus=pcie.0,addr=0x9",
        "-msg",
        "timestamp=on",
    )


@pytest.mark.parametrize(
    "text",
    [
        "<!DOCTYPE d [<!ENTITY a 'x'>]><domain><name>&a;</name></domain>",
        "<domain><name>x</name>",
        "<network/>",
    ],
)
def test_domain_xml_that_is_refused(text: str) -> None:
    from qmpguard.analysis.libvirt_xml import DomainXmlError, domain_argv

    with pytest.raises(DomainXmlError):
        domain_argv(text)
