"""preflight's rendering of a domain XML against libvirt's own: every PCI `-device`
libvirt would run (`virsh domxml-to-native`) is rendered with the same driver, bus and
address, controllers included, and nothing else is.

The domain is defined (never started, the `domains` fixture), so libvirt assigns the
addresses, and undefined at the end.
"""

from __future__ import annotations

import itertools
import json
import shlex
import uuid
from typing import Any

import pytest

from qmpguard.analysis.libvirt_xml import domain_argv

pytestmark = pytest.mark.integration

#: Controllers of each kind libvirt makes a -device for, the machine's own AHCI/IDE,
#: a conventional bridge with a controller behind it, and ordinary endpoints.
DEVICES = """
    <controller type='usb' index='0' model='qemu-xhci'/>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <controller type='virtio-serial' index='0'/>
    {own}
    {bridge}
    <interface type='user'><model type='virtio'/></interface>
    <memballoon model='virtio'/>
"""
MACHINES = {
    "q35": {
        "own": "<controller type='sata' index='0'/>",
        "bridge": "<controller type='pci' index='8' model='pcie-to-pci-bridge'/>"
        "<controller type='usb' index='1' model='nec-xhci'>"
        "<address type='pci' bus='8' slot='1'/></controller>",
    },
    "pc": {
        "own": "<controller type='ide' index='0'/>",
        "bridge": "<controller type='pci' index='1' model='pci-bridge'/>"
        "<controller type='usb' index='1' model='nec-xhci'>"
        "<address type='pci' bus='1' slot='1'/></controller>",
    },
}


def define(domains: Any, machine: str) -> Any:
    """A domain on `machine` with DEVICES, defined (never started) by `domains`."""
    devices = DEVICES.format(**MACHINES[machine])
    return domains(
        f"<domain type='qemu'><name>qmpguard-xml-{uuid.uuid4().hex[:8]}</name>"
        "<memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>"
        f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}</devices>"
        "</domain>"
    )


def pci_devices(argv: list[str] | tuple[str, ...]) -> set[tuple[str, str, str]]:
    """(driver, bus, addr) of every JSON -device with a PCI address."""
    out = set()
    for prev, arg in itertools.pairwise(argv):
        if prev == "-device" and arg.startswith("{"):
            dev = json.loads(arg)
            if "addr" in dev:
                out.add((dev["driver"], dev["bus"], dev["addr"]))
    return out


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_rendered_pci_devices_are_libvirts(domains: Any, machine: str) -> None:
    dom = define(domains, machine)
    xml = dom.XMLDesc(0)  # with the addresses libvirt assigned
    native = shlex.split(dom.connect().domainXMLToNative("qemu-argv", xml, 0))
    theirs, ours = pci_devices(native), pci_devices(domain_argv(xml).argv)
    assert ours == theirs
    drivers = {d for d, _, _ in theirs}
    assert {"qemu-xhci", "nec-usb-xhci", "virtio-scsi-pci", "virtio-serial-pci"} <= drivers
    assert not drivers & {"ich9-ahci", "piix3-ide"}  # the machine's own: no -device
