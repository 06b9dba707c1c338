"""The command-line parser reads what QEMU accepts, and says where it cannot be sure."""

from __future__ import annotations

import pytest

from qmpguard.analysis.cmdline import DeviceSyntax, parse_cmdline, qemu_json_loads

PVE_CFG = """\
[device "ehci"]
  driver = "ich9-usb-ehci1"
  multifunction = "on"

[device "ich9-pcie-port-1"]
  driver = "pcie-root-port"
  bus = "pcie.0"
  addr = "1c.0"
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'driver':'vfio-pci','id':'a'}", {"driver": "vfio-pci", "id": "a"}),
        (r"""{"driver": 'it\'s'}""", {"driver": "it's"}),
        (r"""{'id': 'say "hi"'}""", {"id": 'say "hi"'}),
        (r'{"id": "a\nb"}', {"id": "a\nb"}),
        ('{"addr": 3, "on": true}', {"addr": 3, "on": True}),
    ],
)
def test_qemu_json_accepts_what_qemu_accepts(text: str, expected: object) -> None:
    assert qemu_json_loads(text) == expected


@pytest.mark.parametrize("text", ["{'a': %d}", "{'a\n': 1}", "{'a", r"{'a\q': 1}"])
def test_qemu_json_rejects_what_qemu_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        qemu_json_loads(text)


def test_relaxed_json_device_is_kept_in_place() -> None:
    cli = parse_cmdline(
        ["kvm", "-device", "{'driver':'vfio-pci'}", "-device", "intel-iommu,caching-mode=on"]
    )
    by_position = sorted(cli.devices, key=lambda d: d.argument)
    assert [(d.driver, d.syntax, d.realize_rank) for d in by_position] == [
        ("vfio-pci", DeviceSyntax.JSON, 1),
        ("intel-iommu", DeviceSyntax.KEYVAL, 0),
    ]
    assert by_position[0].source == "argv[2]"
    assert cli.complete


def test_unparsable_json_device_is_a_gap_not_a_silent_drop() -> None:
    cli = parse_cmdline(["qemu-system-x86_64", "-device", "{'driver':", "-device", "e1000e"])
    assert [d.driver for d in cli.devices] == ["e1000e"]
    assert not cli.complete and "argv[2]" in cli.gaps[0]


def test_readconfig_devices_join_the_keyval_list_in_place() -> None:
    argv = [
        "/usr/bin/kvm",
        "-device",
        "intel-iommu,id=vi",
        "-readconfig",
        "/usr/share/qemu-server/pve-q35-4.0.cfg",
        "-device",
        '{"driver":"e1000e","id":"n"}',
        "-device",
        "vfio-pci,id=hostpci0,bus=ich9-pcie-port-1",
    ]
    cli = parse_cmdline(argv, {"/usr/share/qemu-server/pve-q35-4.0.cfg": PVE_CFG})
    order = sorted(cli.devices, key=lambda d: d.realize_rank)
    assert [d.id for d in order] == ["vi", "ehci", "ich9-pcie-port-1", "hostpci0", "n"]
    assert order[1].syntax is DeviceSyntax.READCONFIG
    assert order[1].source == '/usr/share/qemu-server/pve-q35-4.0.cfg [device "ehci"]'
    assert cli.complete


def test_readconfig_whitespace_as_qemu_reads_it() -> None:
    """QEMU's sscanf format takes any whitespace (tabs too) around `=` and in headers."""
    text = '[device\t"gpu"]\n\tdriver\t=\t"vfio-pci"\n  bus =  "pcie.0"\n'
    text += '[device]\ndriver = "e1000e"\n'
    cli = parse_cmdline(["kvm", "-readconfig", "/c.cfg"], {"/c.cfg": text})
    assert [(d.driver, d.id) for d in cli.devices] == [("vfio-pci", "gpu"), ("e1000e", None)]
    assert cli.complete


def test_virtfs_makes_anonymous_matching_uncertain() -> None:
    cli = parse_cmdline(["qemu", "-virtfs", "local,path=/x,mount_tag=t", "-device", "vfio-pci"])
    assert not cli.complete


def test_unreadable_readconfig_is_a_gap() -> None:
    cli = parse_cmdline(["kvm", "-readconfig", "/nope.cfg", "-device", "e1000e"])
    assert not cli.complete and "/nope.cfg" in cli.gaps[0]


def test_unknown_flag_before_an_option_does_not_swallow_it() -> None:
    cli = parse_cmdline(["qemu", "-some-new-flag", "-device", "vfio-pci,id=a", "-name", "vm1"])
    assert [d.id for d in cli.devices] == ["a"]
    assert cli.name == "vm1"
    assert not cli.complete


def test_drive_if_virtio_makes_anonymous_matching_uncertain() -> None:
    cli = parse_cmdline(["qemu", "-drive", "file=a.img,if=virtio", "-device", "vfio-pci"])
    assert not cli.complete
