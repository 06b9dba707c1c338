"""Fixes (qmpguard/fix.py) in the language of whoever wrote the command line.

Each rewrite is checked here for what it must be: the vIOMMU option moved (converted only
when QEMU's two device lists require it), every other argument untouched, and preflight of
the result free of QG001 with every device where it was. That the rewritten command lines
really bind the devices is proven on the DMA log in
tests/integration/test_preflight_generated.py (plain command lines),
test_preflight_libvirt.py (the domain-XML change) and test_preflight_proxmox.py (the
VM-config change).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from qmpguard.analysis.model import Verdict
from qmpguard.analysis.preflight import preflight
from qmpguard.analysis.vm import analyse
from qmpguard.fix import Fix, fixes, keyval_text, libvirt_made, proxmox_vmid
from qmpguard.snapshot import load_snapshot

DATA = Path(__file__).resolve().parents[1] / "data"
VFIO = "vfio-pci,host=0000:01:00.0,id=h0,bus=pcie.0,addr=9"


def fix_of(argv: list[str], files: dict[str, str] | None = None) -> Fix:
    found = fixes(preflight(argv, files or {}).analysis())
    assert len(found) == 1, found
    return found[0]


def misbound(argv: list[str], files: dict[str, str] | None = None) -> list[str]:
    devices = preflight(argv, files or {}).analysis().devices
    return [d.device.label for d in devices if d.verdict is Verdict.MISBOUND]


def test_keyval_vfio_then_keyval_viommu_moves_the_viommu() -> None:
    argv = shlex.split(
        f"qemu-system-x86_64 -M q35 -device {VFIO} -device intel-iommu,caching-mode=on"
    )
    fix = fix_of(argv)
    assert fix.language == "command-line"
    assert fix.argv == tuple(
        shlex.split(f"qemu-system-x86_64 -M q35 -device intel-iommu,caching-mode=on -device {VFIO}")
    )
    assert "Corrected command line: qemu-system-x86_64 -M q35 -device intel-iommu" in fix.text
    assert misbound(list(fix.argv)) == []


def test_a_json_viommu_after_keyval_vfio_becomes_keyval() -> None:
    """QEMU realizes the JSON list after the key=val one: moving the JSON option alone
    would change nothing."""
    argv = [
        "qemu-system-x86_64",
        "-M",
        "q35",
        "-device",
        '{"driver":"intel-iommu","id":"vi","caching-mode":true,"aw-bits":48}',
        "-device",
        VFIO,
    ]
    fix = fix_of(argv)
    assert fix.argv is not None
    assert list(fix.argv) == [
        "qemu-system-x86_64",
        "-M",
        "q35",
        "-device",
        "intel-iommu,id=vi,caching-mode=on,aw-bits=48",
        "-device",
        VFIO,
    ]
    assert "in key=val form" in fix.how


def test_a_json_viommu_that_key_val_cannot_say_is_left_to_a_person() -> None:
    argv = [
        "qemu-system-x86_64",
        "-M",
        "q35",
        "-device",
        '{"driver":"intel-iommu","id":"v i","caching-mode":true}',  # no such key=val id
        "-device",
        VFIO,
    ]
    fix = fix_of(argv)
    assert fix.argv is None
    assert "create intel-iommu (argv[4]) before vfio-pci (argv[6])" in fix.text


def test_json_vfio_and_json_viommu_move_as_json() -> None:
    vfio = '{"driver":"vfio-pci","host":"0000:01:00.0","id":"h0","bus":"pcie.0","addr":"9"}'
    viommu = '{"driver":"intel-iommu","caching-mode":true}'
    argv = ["qemu-system-x86_64", "-M", "q35", "-device", vfio, "-device", viommu]
    fix = fix_of(argv)
    assert fix.argv == ("qemu-system-x86_64", "-M", "q35", "-device", viommu, "-device", vfio)


def test_a_vfio_device_in_a_readconfig_file_needs_the_viommu_before_that_file() -> None:
    cfg = '[device "h0"]\n  driver = "vfio-pci"\n  host = "0000:01:00.0"\n  bus = "pcie.0"\n'
    argv = shlex.split(
        "qemu-system-x86_64 -M q35 -readconfig /vm.cfg -device e1000e,bus=pcie.0 "
        '-device \'{"driver":"intel-iommu","caching-mode":true}\''
    )
    fix = fix_of(argv, {"/vm.cfg": cfg})
    assert fix.argv == tuple(
        shlex.split(
            "qemu-system-x86_64 -M q35 -device intel-iommu,caching-mode=on -readconfig /vm.cfg "
            "-device e1000e,bus=pcie.0"
        )
    )
    assert misbound(list(fix.argv), {"/vm.cfg": cfg}) == []


def test_a_viommu_in_a_readconfig_file_moves_with_its_file() -> None:
    cfg = '[device]\n  driver = "intel-iommu"\n  caching-mode = "on"\n'
    argv = shlex.split(f"qemu-system-x86_64 -M q35 -device {VFIO} -readconfig /v.cfg")
    fix = fix_of(argv, {"/v.cfg": cfg})
    assert fix.argv == tuple(
        shlex.split(f"qemu-system-x86_64 -M q35 -readconfig /v.cfg -device {VFIO}")
    )


def test_a_moved_pci_viommu_keeps_its_slot() -> None:
    """virtio-iommu-pci without addr= took the lowest free slot at its old position;
    moved earlier it would take another (and push others): its address is pinned."""
    argv = shlex.split(
        "qemu-system-x86_64 -M q35 -nodefaults -device e1000e,id=n1 "
        f"-device {VFIO} -device virtio-iommu-pci,bus=pcie.0 -device e1000e,id=n2"
    )
    before = {d.device.label: d.device.devfn_text for d in preflight(argv).analysis().devices}
    fix = fix_of(argv)
    assert fix.argv is not None
    assert "virtio-iommu-pci,bus=pcie.0,addr=0x2.0x0" in fix.argv
    after = {
        d.device.label: d.device.devfn_text for d in preflight(list(fix.argv)).analysis().devices
    }
    assert {k: v for k, v in after.items() if "anon" not in k} == {
        k: v for k, v in before.items() if "anon" not in k
    }


def test_moving_an_anonymous_viommu_past_anonymous_bridges_is_still_a_fix() -> None:
    """The move renumbers device[N] (the bridge's QOM path changes), not where devices
    sit: the rewrite is verified by place, and offered."""
    argv = shlex.split(
        "qemu-system-x86_64 -M q35 -nodefaults "
        "-device vfio-pci,host=0000:01:00.0,bus=pcie.0,addr=9 "
        "-device pcie-pci-bridge,bus=pcie.0,addr=5 -device e1000,bus=pci.0,addr=1 "
        "-device intel-iommu,caching-mode=on"
    )
    fix = fix_of(argv)
    assert fix.argv is not None, fix.text
    assert fix.argv[4:6] == ("-device", "intel-iommu,caching-mode=on")


def test_emulated_smmuv3_gets_what_works_instead() -> None:
    argv = shlex.split(
        "qemu-system-aarch64 -M virt -device vfio-pci,host=0000:01:00.0,id=h0 "
        "-device arm-smmuv3,primary-bus=pcie.0"
    )
    fix = fix_of(argv)
    assert fix.language == "none" and fix.argv is None
    assert "refuses vfio-pci in the right order" in fix.text
    assert "virtio-iommu-pci" in fix.text


def test_keyval_text() -> None:
    from qmpguard.analysis.cmdline import CliDevice, DeviceSyntax

    cd = CliDevice(1, 0, "intel-iommu", "v", DeviceSyntax.JSON, "argv[1]", (("x", "a,b"),))
    assert keyval_text(cd) == "intel-iommu,id=v,x=a,,b"
    nested = CliDevice(1, 0, "d", None, DeviceSyntax.JSON, "argv[1]", (("x", '{"a": 1}'),))
    assert keyval_text(nested) is None


# ------------------------------------------------------------------ libvirt

LIBVIRT_ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=vm1,debug-threads=on",
    "-S",
    "-object",
    '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/x/master-key.aes"}',
    "-machine",
    "pc-q35-7.2,usb=off,kernel_irqchip=split",
    "-nodefaults",
    "-device",
    '{"driver":"pcie-root-port","port":8,"chassis":1,"id":"pci.1","bus":"pcie.0","addr":"0x1"}',
]
TAIL = ["-sandbox", "on,obsolete=deny", "-msg", "timestamp=on"]


def test_libvirt_argv_shape() -> None:
    assert libvirt_made([*LIBVIRT_ARGV, *TAIL])
    assert not libvirt_made(LIBVIRT_ARGV)
    assert not libvirt_made(["qemu", "-msg", "timestamp=on"])
    assert proxmox_vmid([*LIBVIRT_ARGV, *TAIL]) is None


def test_a_viommu_from_qemu_commandline_is_fixed_in_the_domain_xml() -> None:
    argv = [
        *LIBVIRT_ARGV,
        "-device",
        '{"driver":"vfio-pci","id":"hostdev0","sysfsdev":"/x","bus":"pci.1","addr":"0x0"}',
        "-device",
        '{"driver":"intel-iommu","intremap":"on","caching-mode":true}',
        *TAIL,
    ]
    fix = fix_of(argv)
    assert fix.language == "libvirt"
    assert "<iommu model='intel'><driver intremap='on' caching_mode='on'/></iommu>" in fix.text
    assert "<qemu:commandline>" in fix.text and "virsh" in fix.text
    assert "<ioapic driver='qemu'/>" in fix.text  # intremap needs it
    assert fix.argv is not None and misbound(list(fix.argv)) == []


def test_a_keyval_vfio_in_qemu_commandline_is_realized_before_libvirts_iommu() -> None:
    """<iommu> is JSON like everything libvirt writes; a key=val -device in
    <qemu:commandline> is realized before all of it: say so."""
    argv = [
        *LIBVIRT_ARGV,
        "-device",
        "vfio-pci,id=hostdev0,sysfsdev=/x,bus=pcie.0,addr=0x9",
        "-device",
        "intel-iommu,caching-mode=on",
        *TAIL,
    ]
    fix = fix_of(argv)
    assert fix.language == "libvirt"
    assert "<iommu model='intel'><driver caching_mode='on'/></iommu>" in fix.text
    assert "give it as <hostdev>, or in JSON form" in fix.text
    assert '-device {"driver":"vfio-pci","id":"hostdev0"' in fix.text
    assert fix.argv is not None and misbound(list(fix.argv)) == []


# ------------------------------------------------------------------ Proxmox VE

PVE_CFG = Path(__file__).with_name("data") / "pve-q35-layout.cfg"


def pve_showcmd() -> list[str]:
    text = (Path(__file__).with_name("data") / "pve-100.showcmd").read_text()
    return shlex.split(text.replace("/usr/share/qemu-server/pve-q35-4.0.cfg", str(PVE_CFG)))


def test_a_viommu_from_args_is_fixed_in_the_vm_config() -> None:
    argv = pve_showcmd()
    assert proxmox_vmid(argv) == "100"
    files = {str(PVE_CFG): PVE_CFG.read_text()}
    assert misbound(argv, files) == ["hostpci0", "hostpci1"]
    fix = fix_of(argv, files)
    assert fix.language == "proxmox"
    assert "/etc/pve/qemu-server/100.conf" in fix.text
    assert "machine: pc-q35-8.1,viommu=intel" in fix.text
    assert "-device intel-iommu,intremap=on,caching-mode=on from args:" in fix.text
    # what qemu-server then writes: the vIOMMU before its -readconfig
    assert fix.argv is not None
    i = fix.argv.index("intel-iommu,intremap=on,caching-mode=on")
    assert fix.argv[i + 1 : i + 3] == ("-readconfig", str(PVE_CFG))
    assert misbound(list(fix.argv), files) == []


# ------------------------------------------------------------------ check's findings


def test_check_findings_carry_the_fix_from_the_vms_own_command_line() -> None:
    for path in sorted(DATA.glob("q35-intel-vfio-after-*.json")):
        if path.name.endswith(".truth.json"):
            continue
        vm = analyse(load_snapshot(path))
        qg001 = [f for f in vm.findings if f.code == "QG001"]
        assert qg001, path
        assert "Corrected command line: " in qg001[0].message, qg001[0].message
        assert "-device intel-iommu,id=viommu,caching-mode=on -device vfio-pci" in qg001[0].message


def test_without_a_command_line_the_fix_stays_general() -> None:
    path = next(p for p in sorted(DATA.glob("q35-intel-vfio-after-paused-*.json")))
    vm = analyse(load_snapshot(path).without_cmdline())
    qg001 = [f for f in vm.findings if f.code == "QG001"]
    assert qg001 and "put its -device option before the vfio device's" in qg001[0].message
