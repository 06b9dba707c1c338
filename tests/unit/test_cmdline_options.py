"""What each command-line option that bears on DMA binding records
(qmpguard/analysis/cmdline.py, one handler per option): one argv per row, one expected
record. test_cmdline_parse covers whole command lines and the -readconfig/-set rules."""

from __future__ import annotations

import pytest

from qmpguard.analysis.cmdline import CliFacts, DeviceSyntax, parse_cmdline


def parse(*args: str) -> CliFacts:
    return parse_cmdline(["qemu-system-x86_64", *args])


@pytest.mark.parametrize(
    ("case", "args", "devices"),
    [
        pytest.param(
            "key=val, driver implied first",
            ("-device", "vfio-pci,id=h0,bus=pcie.0"),
            [("vfio-pci", "h0", DeviceSyntax.KEYVAL, "argv[2]")],
            id="keyval",
        ),
        pytest.param(
            "key=val, driver named",
            ("-device", "id=v,driver=virtio-iommu-pci"),
            [("virtio-iommu-pci", "v", DeviceSyntax.KEYVAL, "argv[2]")],
            id="keyval-driver-named",
        ),
        pytest.param(
            "JSON",
            ("-device", '{"driver":"vfio-pci","id":"h1"}'),
            [("vfio-pci", "h1", DeviceSyntax.JSON, "argv[2]")],
            id="json",
        ),
        pytest.param(
            "--device is -device",
            ("--device", "e1000e,id=n"),
            [("e1000e", "n", DeviceSyntax.KEYVAL, "argv[2]")],
            id="double-dash",
        ),
        pytest.param("an empty -device is no device", ("-device", ""), [], id="empty"),
    ],
)
def test_device_option(
    case: str, args: tuple[str, ...], devices: list[tuple[str, str, DeviceSyntax, str]]
) -> None:
    cli = parse(*args)
    assert [(d.driver, d.id, d.syntax, d.source) for d in cli.devices] == devices


@pytest.mark.parametrize(
    ("case", "args", "gap"),
    [
        pytest.param(
            "JSON qmpguard cannot parse",
            ("-device", '{"driver":'),
            "argv[2]: a JSON -device qmpguard cannot parse",
            id="json-broken",
        ),
        pytest.param(
            "key=val without a driver",
            ("-m", "64", "-device", "id=x"),
            "argv[4]: a -device without a driver",
            id="no-driver",
        ),
        pytest.param(
            "-drive if=virtio",
            ("-drive", "file=a.img,if=virtio"),
            "argv[2]: -drive if=virtio creates an anonymous device implicitly",
            id="drive-virtio",
        ),
        pytest.param(
            "-virtfs",
            ("-virtfs", "local,path=/x,mount_tag=m"),
            "argv[2]: -virtfs creates an anonymous device implicitly",
            id="virtfs",
        ),
    ],
)
def test_options_that_leave_a_gap(case: str, args: tuple[str, ...], gap: str) -> None:
    cli = parse(*args)
    assert cli.gaps == (gap,)
    assert cli.devices == ()


@pytest.mark.parametrize(
    "args",
    [("-drive", "file=a.img,if=none"), ("-drive", "virtio"), ("-global", "x.y=z"), ("-m", "64")],
    ids=["drive-if-none", "drive-file-named-virtio", "global", "memory"],
)
def test_options_that_record_nothing(args: tuple[str, ...]) -> None:
    assert parse(*args) == parse()


@pytest.mark.parametrize(
    ("case", "args", "machine"),
    [
        pytest.param("type implied", ("-M", "q35"), {"type": "q35"}, id="M"),
        pytest.param(
            "later ones win, key by key",
            ("-machine", "q35,kernel-irqchip=split", "-machine", "type=pc,accel=kvm"),
            {"type": "pc", "kernel-irqchip": "split", "accel": "kvm"},
            id="merged",
        ),
    ],
)
def test_machine_option(case: str, args: tuple[str, ...], machine: dict[str, str]) -> None:
    assert dict(parse(*args).machine_opts) == machine


@pytest.mark.parametrize(
    ("value", "name"),
    [("guest=vm1,debug-threads=on", "vm1"), ("web", "web"), ("debug-threads=on", None)],
)
def test_name_option(value: str, name: str | None) -> None:
    assert parse("-name", value).name == name


def test_readconfig_option_reads_the_file_the_process_saw() -> None:
    text = '[device "rp9"]\n  driver = "pcie-root-port"\n'
    cli = parse_cmdline(["qemu", "-readconfig", "/etc/q.cfg"], {"/etc/q.cfg": text})
    assert cli.readconfig_files == ("/etc/q.cfg",)
    assert [(d.driver, d.id, d.syntax) for d in cli.devices] == [
        ("pcie-root-port", "rp9", DeviceSyntax.READCONFIG)
    ]


def test_set_option_refers_to_an_earlier_device() -> None:
    cli = parse("-device", "vfio-pci,id=h0", "-set", "device.h0.addr=0x5")
    assert cli.refusals == () and cli.gaps == ()
    later = parse("-set", "device.h0.addr=0x5", "-device", "vfio-pci,id=h0")
    assert len(later.refusals) == 1 and "argv[2]: -set device.h0.addr=0x5" in later.refusals[0]
