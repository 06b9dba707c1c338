"""Preflight reads `-set device.ID.KEY=VALUE` and JSON integer addresses as QEMU does.

Both checked against QEMU 7.2.22, 10.0.2 and 11.1.3 (`info pci` with -S): `-set` changes
the key=val or -readconfig device with that id defined before it (the last -set wins,
bus= moves the device), and QEMU refuses a -set before its device or on a JSON one;
a JSON `"addr": 24` is devfn 24 (03.0) while key=val `addr=24` is slot 0x24 (invalid).
"""

from __future__ import annotations

import shlex

import pytest

from qmpguard.analysis.cmdline import parse_cmdline
from qmpguard.analysis.model import Verdict
from qmpguard.analysis.preflight import preflight
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis
from qmpguard.fix import _json_text, _typed, keyval_text

Q35 = "qemu-system-x86_64 -M q35 -nodefaults"
VFIO = "vfio-pci,host=0000:01:00.0"


def analysed(line: str, files: dict[str, str] | None = None) -> VmAnalysis:
    return preflight(shlex.split(line), files or {}).analysis()


def dev(vm: VmAnalysis, label: str) -> DeviceAnalysis:
    return next(d for d in vm.devices if d.device.label == label)


def test_set_changes_the_address_of_an_earlier_keyval_device() -> None:
    vm = analysed(f"{Q35} -device e1000,id=n0,addr=5 -set device.n0.addr=7")
    assert dev(vm, "n0").device.devfn_text == "07.0"


def test_the_last_set_wins_and_reaches_readconfig_devices() -> None:
    cfg = '[device "n3"]\n  driver = "e1000"\n  addr = "0x6"\n'
    line = f"{Q35} -readconfig r.cfg -set device.n3.addr=9 -set device.n3.addr=0xb.0"
    assert dev(analysed(line, {"r.cfg": cfg}), "n3").device.devfn_text == "0b.0"


def test_set_bus_moves_a_vfio_device_behind_a_root_port() -> None:
    line = (
        f"{Q35} -device intel-iommu,caching-mode=on -device pcie-root-port,id=rp,chassis=1 "
        f"-device {VFIO},id=hostdev0,bus=pcie.0,addr=9 -set device.hostdev0.bus=rp "
        "-set device.hostdev0.addr=0"
    )
    d = dev(analysed(line), "hostdev0")
    assert d.device.bus.endswith("/rp") and d.device.devfn == 0
    assert d.verdict is Verdict.OK


def test_set_of_the_driver_makes_another_device_type() -> None:
    cli = parse_cmdline(shlex.split(f"{Q35} -device e1000,id=x -set device.x.driver={VFIO}"))
    assert cli.devices[0].driver == VFIO


@pytest.mark.parametrize(
    "line",
    [
        f"{Q35} -set device.n0.addr=7 -device e1000,id=n0",  # before its device
        f'{Q35} -device \'{{"driver":"e1000","id":"n0"}}\' -set device.n0.addr=7',
        f"{Q35} -set device.nobody.addr=7",
    ],
    ids=["before", "json", "missing"],
)
def test_a_set_qemu_refuses_is_said_and_changes_nothing(line: str) -> None:
    pf = preflight(shlex.split(line))
    assert pf.cli.complete, pf.cli.gaps  # every device option was read
    assert any("-set device." in n and "refuses" in n for n in pf.notes), pf.notes
    assert all(d.prop("addr") is None for d in pf.cli.devices)


def test_set_of_the_id_is_a_gap_not_a_guess() -> None:
    cli = parse_cmdline(shlex.split(f"{Q35} -device e1000,id=a -set device.a.id=b"))
    assert cli.gaps and cli.devices[0].id == "a"


@pytest.mark.parametrize(
    ("addr", "devfn"),
    [("24", "03.0"), ("5", "00.5"), ("0", "00.0"), ('"0x18"', "18.0"), ('"3.2"', "03.2")],
)
def test_a_json_integer_addr_is_the_devfn_a_string_the_slot(addr: str, devfn: str) -> None:
    vm = analysed(f'{Q35} -device \'{{"driver":"e1000","id":"n1","addr":{addr}}}\'')
    assert dev(vm, "n1").device.devfn_text == devfn


def test_a_json_addr_of_minus_one_lets_qemu_pick() -> None:
    vm = analysed(f'{Q35} -device \'{{"driver":"e1000","id":"n1","addr":-1}}\'')
    assert dev(vm, "n1").device.devfn_text == "01.0"


def test_a_json_vfio_device_at_integer_addr_binds_as_placed() -> None:
    line = (
        f'{Q35} -device \'{{"driver":"vfio-pci","host":"0000:01:00.0","id":"h",'
        '"addr":72}\' -device \'{"driver":"virtio-iommu-pci","id":"v","addr":"0x9.0x1"}\''
    )
    vm = analysed(line)
    assert dev(vm, "h").device.devfn_text == "09.0"
    assert dev(vm, "h").verdict is Verdict.MISBOUND


def test_rewriting_keeps_what_a_json_integer_addr_means() -> None:
    json_dev = next(
        d
        for d in parse_cmdline(
            shlex.split(f'{Q35} -device \'{{"driver":"virtio-iommu-pci","id":"v","addr":24}}\'')
        ).devices
    )
    assert keyval_text(json_dev) == "virtio-iommu-pci,id=v,addr=0x3.0x0"
    assert '"addr":24' in _json_text(json_dev)
    keyval_dev = parse_cmdline(shlex.split(f"{Q35} -device e1000,id=n,addr=5")).devices[0]
    assert '"addr":"5"' in _json_text(keyval_dev)  # as a JSON number it would be devfn 5
    assert _typed("addr", "5") == "5" and _typed("bus-nr", "5") == 5
