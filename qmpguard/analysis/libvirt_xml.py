"""A libvirt domain XML as the QEMU command line libvirt would give it (for preflight).

Only what decides DMA binding is rendered, in libvirt's order (checked against
`virsh domxml-to-native` of libvirt 9.0 with QEMU 7.2): the machine, then every device
as JSON `-device` with its id and guest address, the vIOMMU (`<iommu>`, id iommu0)
first, the PCI controllers next (pci.N on bus pci.M), the other controllers with a PCI
address (usb, scsi, virtio-serial; not the machine's own sata/ide), then the other
devices, hostdevs
as vfio-pci; then the `<qemu:commandline>` arguments verbatim; then `-msg timestamp=on`,
libvirt's last option. That is how a vIOMMU given in <qemu:commandline> lands after
every device libvirt creates -- and why a key=val `-device` there is realized before
all of them.

The XML is read without network or entity expansion (a DOCTYPE is refused outright:
libvirt never writes one).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
MAX_XML_BYTES = 4 << 20
#: The last option libvirt writes; <qemu:commandline> arguments come before it.
LIBVIRT_TAIL = ("-msg", "timestamp=on")


class DomainXmlError(ValueError):
    """A domain XML qmpguard cannot read."""


@dataclass(frozen=True)
class DomainArgv:
    """The rendered command line and where its parts came from."""

    name: str
    argv: tuple[str, ...]
    commandline_start: int  # index of the first <qemu:commandline> argument
    notes: tuple[str, ...]


_CONTROLLER_DRIVERS = {
    "pcie-root-port": "pcie-root-port",
    "pcie-to-pci-bridge": "pcie-pci-bridge",
    "pci-bridge": "pci-bridge",
    "dmi-to-pci-bridge": "i82801b11-bridge",
    "pcie-switch-upstream-port": "x3130-upstream",
    "pcie-switch-downstream-port": "xio3130-downstream",
    "pci-expander-bus": "pxb",
    "pcie-expander-bus": "pxb-pcie",
}
_NIC_MODELS = {"virtio": "virtio-net-pci", "virtio-transitional": "virtio-net-pci-transitional"}


def _int(text: str | None, default: int = 0) -> int:
    if not text:
        return default
    try:
        return int(text, 0)
    except ValueError:
        return default


def _onoff(value: str | None) -> bool | None:
    return None if value is None else value in ("on", "yes")


class _Render:
    def __init__(self, machine_family: str) -> None:
        self.root = "pcie.0" if machine_family == "q35" or machine_family == "virt" else "pci.0"
        self.devices: list[dict[str, object]] = []
        self.notes: list[str] = []

    def address(self, el: ET.Element, what: str) -> dict[str, object]:
        addr = el.find("address")
        if addr is None or addr.get("type") != "pci":
            self.notes.append(
                f"{what} has no PCI address in the XML (libvirt assigns them when the domain "
                "is defined: give preflight the output of `virsh dumpxml`)"
            )
            return {}
        bus = _int(addr.get("bus"))
        slot, fn = _int(addr.get("slot")), _int(addr.get("function"))
        out: dict[str, object] = {"bus": self.root if bus == 0 else f"pci.{bus}"}
        if addr.get("multifunction") == "on":
            out["multifunction"] = True
        out["addr"] = f"0x{slot:x}" if fn == 0 else f"0x{slot:x}.0x{fn:x}"
        return out


def _machine_family(machine: str) -> str:
    if "q35" in machine:
        return "q35"
    if machine == "virt" or machine.startswith("virt-"):
        return "virt"
    return "pc"


def domain_argv(text: str) -> DomainArgv:
    """The command line libvirt would run for domain XML `text` (DomainXmlError if it is
    not a domain XML qmpguard can read).

    Rendered in libvirt's order: the vIOMMU first (it may be a machine option instead),
    the PCI controllers by index, the other controllers, then the other devices in
    document order.
    """
    dom = _parse_domain(text)
    name = (dom.findtext("name") or "").strip() or "domain"
    machine, arch = _os_type(dom)
    devices = dom.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    emulator = (devices.findtext("emulator") or "").strip() or f"qemu-system-{arch}"
    r = _Render(_machine_family(machine))
    machine_opts = [machine]
    for iommu in devices.findall("iommu"):
        _iommu(r, iommu, machine_opts)
    for c in _pci_controllers(devices):
        _controller(r, c)
    _device_controllers(r, devices)
    _endpoints(r, devices)
    argv = [emulator, "-name", f"guest={name},debug-threads=on", "-S"]
    argv += ["-machine", ",".join(machine_opts), "-nodefaults"]
    for dev in r.devices:
        argv += ["-device", json.dumps(dev, separators=(",", ":"))]
    start = len(argv)
    argv += _qemu_commandline(dom)
    argv += list(LIBVIRT_TAIL)
    return DomainArgv(name, tuple(argv), start, tuple(r.notes))


def _parse_domain(text: str) -> ET.Element:
    """The <domain> element of `text`, read without network or entity expansion: a
    DOCTYPE or ENTITY is refused before parsing (libvirt writes none), and so is XML
    larger than MAX_XML_BYTES."""
    if len(text.encode("utf-8", "replace")) > MAX_XML_BYTES:
        raise DomainXmlError(f"domain XML larger than {MAX_XML_BYTES} bytes")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise DomainXmlError(
            "domain XML with a DOCTYPE or entity declaration (libvirt writes none)"
        )
    try:
        dom = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DomainXmlError(f"not well-formed XML: {exc}") from None
    if dom.tag != "domain":
        raise DomainXmlError(f"root element is <{dom.tag}>, not <domain>")
    return dom


def _os_type(dom: ET.Element) -> tuple[str, str]:
    """(machine, arch) of <os><type>, libvirt's defaults where absent: pc, x86_64."""
    ostype = dom.find("os/type")
    attrs = ostype.attrib if ostype is not None else {}
    return attrs.get("machine") or "pc", attrs.get("arch") or "x86_64"


def _pci_controllers(devices: ET.Element) -> list[ET.Element]:
    """The PCI controllers, by index: libvirt creates pci.N in that order, so a
    controller's bus (a lower index) exists before it."""
    pci = (c for c in devices.findall("controller") if c.get("type") == "pci")
    return sorted(pci, key=lambda c: _int(c.get("index")))


#: Controllers the machine itself creates, for which libvirt writes no -device: q35's
#: AHCI (00:1f.2) and i440fx's PIIX3 IDE. Seen in `virsh domxml-to-native` of libvirt
#: 9.0: a usb, scsi or virtio-serial controller is a -device, these two are not.
_BUILT_IN_CONTROLLERS = frozenset({("sata", 0), ("ide", 0)})


def _device_controllers(r: _Render, devices: ET.Element) -> None:
    """The controllers libvirt creates with -device other than PCI ones (usb, scsi,
    virtio-serial...), in document order: PCI functions like any endpoint, which may
    share a requester ID with a vfio device behind a conventional bridge."""
    for el in devices.findall("controller"):
        key = (el.get("type") or "", _int(el.get("index")))
        if key[0] != "pci" and key not in _BUILT_IN_CONTROLLERS:
            _other(r, el)


def _endpoints(r: _Render, devices: ET.Element) -> None:
    """Every device other than the vIOMMU and controllers, in document order.

    Hostdevs are numbered hostdev0, hostdev1, ... over all of them (libvirt's aliases),
    though only PCI ones become vfio-pci devices.
    """
    hostdevs = 0
    for el in devices:
        if el.tag == "hostdev":
            _hostdev(r, el, hostdevs)
            hostdevs += 1
        elif el.tag not in ("controller", "iommu", "emulator"):
            _other(r, el)


def _hostdev(r: _Render, el: ET.Element, n: int) -> None:
    """<hostdev> number `n`: vfio-pci if it passes a PCI device through (subsystem mode)."""
    if el.get("type") != "pci" or el.get("mode", "subsystem") != "subsystem":
        return
    dev: dict[str, object] = {"driver": "vfio-pci", "id": f"hostdev{n}"}
    r.devices.append(dev | r.address(el, f"<hostdev> {n}"))


def _qemu_commandline(dom: ET.Element) -> list[str]:
    """The <qemu:commandline> arguments, verbatim: libvirt appends them after its own."""
    cmdline = dom.find(f"{{{QEMU_NS}}}commandline")
    if cmdline is None:
        return []
    return [a.get("value", "") for a in cmdline.findall(f"{{{QEMU_NS}}}arg")]


def _iommu(r: _Render, el: ET.Element, machine_opts: list[str]) -> None:
    """<iommu model=...>: a -device with id iommu0, or for smmuv3 a machine option."""
    model = el.get("model")
    if model == "intel":
        r.devices.append(_intel_iommu(el))
    elif model == "virtio":
        r.devices.append(
            {"driver": "virtio-iommu-pci", "id": "iommu0"} | r.address(el, "<iommu model='virtio'>")
        )
    elif model == "smmuv3":
        machine_opts.append("iommu=smmuv3")
    elif model == "amd":
        r.devices.append({"driver": "amd-iommu", "id": "iommu0"})
    else:
        r.notes.append(f"<iommu model='{model}'> is unknown to qmpguard")


#: <iommu model='intel'><driver ATTR='on|off'> -> intel-iommu's property.
_INTEL_SWITCHES = (
    ("intremap", "intremap"),
    ("caching_mode", "caching-mode"),
    ("eim", "eim"),
    ("iotlb", "device-iotlb"),
)


def _intel_iommu(el: ET.Element) -> dict[str, object]:
    """intel-iommu with the <driver> attributes libvirt passes on: the switches as booleans
    (intremap as libvirt writes it, 'on', when on), aw_bits as a number."""
    drv = el.find("driver")
    attrs = drv.attrib if drv is not None else {}
    dev: dict[str, object] = {"driver": "intel-iommu", "id": "iommu0"}
    for attr, prop in _INTEL_SWITCHES:
        value = _onoff(attrs.get(attr))
        if value is not None:
            dev[prop] = "on" if prop == "intremap" and value else value
    if attrs.get("aw_bits"):
        dev["aw-bits"] = _int(attrs.get("aw_bits"))
    return dev


def _controller(r: _Render, el: ET.Element) -> None:
    model = el.get("model") or ""
    index = _int(el.get("index"))
    if model in ("pci-root", "pcie-root") or index == 0:
        return
    named = el.find("model")
    driver = (named.get("name") if named is not None else None) or _CONTROLLER_DRIVERS.get(model)
    if driver is None:
        r.notes.append(f"<controller type='pci' model='{model}'> is unknown to qmpguard")
        return
    dev: dict[str, object] = {"driver": driver, "id": f"pci.{index}"}
    target = el.find("target")
    if driver in ("pxb", "pxb-pcie"):
        dev["bus_nr"] = _int(target.get("busNr") if target is not None else None)
    r.devices.append(dev | r.address(el, f"<controller index='{index}'>"))


def _other(r: _Render, el: ET.Element) -> None:
    """A device other than a controller or hostdev: PCI if it has a PCI address."""
    addr = el.find("address")
    if addr is None or addr.get("type") != "pci":
        return
    driver = _driver_of(el)
    dev: dict[str, object] = {"driver": driver}
    alias = el.find("alias")
    if alias is not None and alias.get("name"):
        dev["id"] = alias.get("name")
    drv = el.find("driver")
    if drv is not None and drv.get("iommu") == "on":
        dev["iommu_platform"] = True
    r.devices.append(dev | r.address(el, f"<{el.tag}>"))


def _driver_of(el: ET.Element) -> str:
    """The QEMU device type libvirt uses for a PCI device element (a stand-in ending in
    -pci where qmpguard does not know it: a PCI device that creates no bus)."""
    model = el.find("model")
    mtype = model.get("type") if model is not None else el.get("model")
    if el.tag == "interface":
        return _NIC_MODELS.get(mtype or "", mtype or "libvirt-interface-pci")
    if el.tag == "disk" and (t := el.find("target")) is not None and t.get("bus") == "virtio":
        return "virtio-blk-pci"
    if el.tag == "controller":
        kind, cmodel = el.get("type"), el.get("model") or ""
        known = {
            ("scsi", "virtio-scsi"): "virtio-scsi-pci",
            ("scsi", "lsilogic"): "lsi53c895a",
            ("usb", "qemu-xhci"): "qemu-xhci",
            ("usb", "nec-xhci"): "nec-usb-xhci",
            ("usb", "ich9-ehci1"): "ich9-usb-ehci1",
            ("usb", "piix3-uhci"): "piix3-usb-uhci",
            ("sata", ""): "ich9-ahci",
            ("virtio-serial", ""): "virtio-serial-pci",
        }
        return known.get((kind or "", cmodel), f"libvirt-{kind}-controller-pci")
    if el.get("model") == "virtio" or mtype == "virtio":
        return {
            "memballoon": "virtio-balloon-pci",
            "rng": "virtio-rng-pci",
            "video": "virtio-vga",
        }.get(el.tag, f"virtio-{el.tag}-pci")
    if el.tag == "video":
        return {"vga": "VGA", "qxl": "qxl-vga", "cirrus": "cirrus-vga"}.get(mtype or "", "VGA")
    return f"libvirt-{el.tag}-pci"
