"""Each step of rendering a libvirt domain XML as QEMU's command line
(qmpguard/analysis/libvirt_xml.py domain_argv), one small XML per row: the parse and its
refusals, <os><type>, the emulator, the PCI controllers' order, hostdev numbering and
<qemu:commandline>. test_preflight_cli and test_preflight_libvirt cover whole domains."""

from __future__ import annotations

import itertools
import json

import pytest

from qmpguard.analysis.libvirt_xml import LIBVIRT_TAIL, DomainXmlError, domain_argv

QEMU_NS = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"


def xml(devices: str = "", os: str = "", extra: str = "", name: str = "vm1") -> str:
    body = f"<name>{name}</name>{os}{extra}<devices>{devices}</devices>"
    return f"<domain type='kvm' {QEMU_NS}>{body}</domain>"


def pci(bus: int, slot: int, fn: int = 0) -> str:
    return f"<address type='pci' domain='0' bus='{bus}' slot='{slot}' function='{fn}'/>"


def device_options(argv: tuple[str, ...]) -> list[dict[str, object]]:
    """The JSON -device options, in order."""
    return [json.loads(a) for prev, a in itertools.pairwise(argv) if prev == "-device"]


@pytest.mark.parametrize(
    ("case", "text", "says"),
    [
        pytest.param("DOCTYPE", "<!DOCTYPE d><domain/>", "DOCTYPE", id="doctype"),
        pytest.param(
            "entity", "<domain><!ENTITY x 'y'></domain>", "entity declaration", id="entity"
        ),
        pytest.param("not XML", "<domain>", "not well-formed", id="malformed"),
        pytest.param("another root", "<network/>", "root element is <network>", id="root"),
        pytest.param("too large", "<domain>" + " " * (4 << 20) + "</domain>", "larger", id="big"),
    ],
)
def test_refused(case: str, text: str, says: str) -> None:
    with pytest.raises(DomainXmlError, match=says):
        domain_argv(text)


@pytest.mark.parametrize(
    ("case", "os", "devices", "head"),
    [
        pytest.param(
            "libvirt's defaults",
            "",
            "",
            ("qemu-system-x86_64", "-name", "guest=vm1,debug-threads=on", "-S", "-machine", "pc"),
            id="defaults",
        ),
        pytest.param(
            "machine and arch of <os><type>",
            "<os><type arch='aarch64' machine='virt-9.0'>hvm</type></os>",
            "",
            (
                "qemu-system-aarch64",
                "-name",
                "guest=vm1,debug-threads=on",
                "-S",
                "-machine",
                "virt-9.0",
            ),
            id="os-type",
        ),
        pytest.param(
            "empty attributes are absent ones",
            "<os><type arch='' machine=''>hvm</type></os>",
            "",
            ("qemu-system-x86_64", "-name", "guest=vm1,debug-threads=on", "-S", "-machine", "pc"),
            id="os-type-empty",
        ),
        pytest.param(
            "the <emulator> element wins",
            "<os><type arch='aarch64' machine='q35'>hvm</type></os>",
            "<emulator> /usr/bin/kvm </emulator>",
            ("/usr/bin/kvm", "-name", "guest=vm1,debug-threads=on", "-S", "-machine", "q35"),
            id="emulator",
        ),
    ],
)
def test_command_head(case: str, os: str, devices: str, head: tuple[str, ...]) -> None:
    argv = domain_argv(xml(devices, os)).argv
    assert argv[: len(head)] == head
    assert argv[len(head)] == "-nodefaults"


def test_smmuv3_is_a_machine_option() -> None:
    dom = domain_argv(xml("<iommu model='smmuv3'/>", "<os><type machine='virt'>hvm</type></os>"))
    assert dom.argv[dom.argv.index("-machine") + 1] == "virt,iommu=smmuv3"
    assert device_options(dom.argv) == []


@pytest.mark.parametrize(
    ("case", "devices", "ids"),
    [
        pytest.param(
            "PCI controllers by index, whatever their document order",
            "<controller type='pci' index='2' model='pcie-root-port'>" + pci(0, 3) + "</controller>"
            "<controller type='pci' index='1' model='pcie-root-port'>"
            + pci(0, 2)
            + "</controller>",
            ["pci.1", "pci.2"],
            id="by-index",
        ),
        pytest.param(
            "the vIOMMU before them, the other devices after, in document order",
            "<interface type='user'><model type='virtio'/><alias name='net0'/>"
            + pci(1, 0)
            + "</interface>"
            "<controller type='pci' index='1' model='pcie-root-port'>" + pci(0, 2) + "</controller>"
            "<iommu model='virtio'>" + pci(0, 1) + "</iommu>",
            ["iommu0", "pci.1", "net0"],
            id="viommu-first",
        ),
        pytest.param(
            "hostdevs count all of them, only PCI subsystem ones are devices",
            "<hostdev mode='subsystem' type='usb'/>"
            "<hostdev mode='subsystem' type='pci'>" + pci(0, 5) + "</hostdev>"
            "<hostdev mode='capabilities' type='pci'>" + pci(0, 6) + "</hostdev>"
            "<hostdev type='pci'>" + pci(0, 7) + "</hostdev>",
            ["hostdev1", "hostdev3"],
            id="hostdev-numbering",
        ),
        pytest.param(
            "usb, scsi and virtio-serial controllers after the PCI ones, before endpoints",
            "<interface type='user'><model type='virtio'/><alias name='net0'/>"
            + pci(1, 0)
            + "</interface>"
            "<controller type='usb' index='0' model='qemu-xhci'><alias name='usb'/>"
            + pci(2, 0)
            + "</controller>"
            "<controller type='pci' index='1' model='pcie-root-port'>" + pci(0, 2) + "</controller>"
            "<controller type='scsi' index='0' model='virtio-scsi'><alias name='scsi0'/>"
            + pci(3, 0)
            + "</controller>",
            ["pci.1", "usb", "scsi0", "net0"],
            id="device-controllers",
        ),
        pytest.param(
            "the machine's own AHCI and IDE are not -devices (libvirt writes none)",
            "<controller type='sata' index='0'><alias name='ide'/>"
            + pci(0, 0x1F, 2)
            + "</controller>"
            "<controller type='ide' index='0'><alias name='ide'/>" + pci(0, 1, 1) + "</controller>"
            "<controller type='sata' index='1'><alias name='sata1'/>" + pci(0, 5) + "</controller>",
            ["sata1"],
            id="built-in-controllers",
        ),
        pytest.param(
            "a controller without a PCI address is not a PCI device",
            "<controller type='usb' index='0' model='none'/>"
            "<controller type='virtio-serial' index='0'><alias name='virtio-serial0'/>"
            "<address type='virtio-mmio'/></controller>",
            [],
            id="controller-without-pci-address",
        ),
        pytest.param(
            "the root controller and index 0 create no device",
            "<controller type='pci' index='0' model='pcie-root'/>"
            "<controller type='pci' index='0' model='pcie-root-port'/>",
            [],
            id="root-controller",
        ),
    ],
)
def test_device_order(case: str, devices: str, ids: list[str]) -> None:
    opts = device_options(domain_argv(xml(devices, "<os><type machine='q35'/></os>")).argv)
    assert [o.get("id") for o in opts] == ids


@pytest.mark.parametrize(
    ("case", "extra", "args"),
    [
        pytest.param("none", "", (), id="none"),
        pytest.param(
            "verbatim, a value-less arg as ''",
            "<qemu:commandline><qemu:arg value='-device'/><qemu:arg value='intel-iommu'/>"
            "<qemu:arg/></qemu:commandline>",
            ("-device", "intel-iommu", ""),
            id="args",
        ),
        pytest.param(
            "an arg outside libvirt's namespace is not one",
            "<qemu:commandline><arg value='-S'/></qemu:commandline>",
            (),
            id="wrong-namespace",
        ),
    ],
)
def test_qemu_commandline_before_libvirts_tail(
    case: str, extra: str, args: tuple[str, ...]
) -> None:
    dom = domain_argv(xml("<hostdev type='pci'>" + pci(0, 9) + "</hostdev>", extra=extra))
    assert dom.argv[dom.commandline_start :] == (*args, *LIBVIRT_TAIL)
    assert dom.argv[dom.commandline_start - 2] == "-device"


@pytest.mark.parametrize(("name", "expected"), [("vm1", "vm1"), ("  web  ", "web"), ("", "domain")])
def test_name(name: str, expected: str) -> None:
    assert domain_argv(xml(name=name)).name == expected


def test_missing_addresses_are_noted_in_document_order() -> None:
    dom = domain_argv(
        xml(
            "<hostdev type='pci'/><controller type='pci' index='1' model='pcie-root-port'/>"
            "<iommu model='virtio'/>"
        )
    )
    assert [n.split(" has no PCI address")[0] for n in dom.notes] == [
        "<iommu model='virtio'>",
        "<controller index='1'>",
        "<hostdev> 0",
    ]


@pytest.mark.parametrize(
    ("case", "iommu", "device"),
    [
        pytest.param(
            "intel, no driver attributes",
            "<iommu model='intel'/>",
            {"driver": "intel-iommu", "id": "iommu0"},
            id="intel-bare",
        ),
        pytest.param(
            "intel switches: intremap written 'on', the others as booleans; aw_bits a number",
            "<iommu model='intel'><driver intremap='on' caching_mode='yes' eim='off' "
            "iotlb='on' aw_bits='48'/></iommu>",
            {
                "driver": "intel-iommu",
                "id": "iommu0",
                "intremap": "on",
                "caching-mode": True,
                "eim": False,
                "device-iotlb": True,
                "aw-bits": 48,
            },
            id="intel-switches",
        ),
        pytest.param(
            "intel intremap off is a boolean",
            "<iommu model='intel'><driver intremap='off' aw_bits=''/></iommu>",
            {"driver": "intel-iommu", "id": "iommu0", "intremap": False},
            id="intel-intremap-off",
        ),
        pytest.param(
            "virtio at its PCI address",
            "<iommu model='virtio'>" + pci(0, 1) + "</iommu>",
            {"driver": "virtio-iommu-pci", "id": "iommu0", "bus": "pcie.0", "addr": "0x1"},
            id="virtio",
        ),
        pytest.param(
            "amd", "<iommu model='amd'/>", {"driver": "amd-iommu", "id": "iommu0"}, id="amd"
        ),
    ],
)
def test_viommu_device(case: str, iommu: str, device: dict[str, object]) -> None:
    dom = domain_argv(xml(iommu, "<os><type machine='q35'/></os>"))
    assert device_options(dom.argv) == [device]
    assert dom.notes == ()


def test_unknown_viommu_model_is_noted() -> None:
    dom = domain_argv(xml("<iommu model='riscv'/>"))
    assert device_options(dom.argv) == []
    assert dom.notes == ("<iommu model='riscv'> is unknown to qmpguard",)


@pytest.mark.parametrize(
    ("controller", "driver"),
    [
        ("<controller type='usb' model='qemu-xhci'>", "qemu-xhci"),
        ("<controller type='usb' model='nec-xhci'>", "nec-usb-xhci"),
        ("<controller type='scsi' model='virtio-scsi'>", "virtio-scsi-pci"),
        ("<controller type='virtio-serial'>", "virtio-serial-pci"),
        ("<controller type='sata' index='1'>", "ich9-ahci"),
    ],
)
def test_device_controller_drivers(controller: str, driver: str) -> None:
    """The QEMU type libvirt runs for each (as `virsh domxml-to-native` writes it)."""
    devices = controller + pci(0, 5) + "</controller>"
    opts = device_options(domain_argv(xml(devices, "<os><type machine='q35'/></os>")).argv)
    assert [(o["driver"], o["addr"]) for o in opts] == [(driver, "0x5")]
