"""Preflight (qmpguard/analysis/preflight.py): a command line alone -> the same verdicts.

Table tests of each rule preflight models (machines, realize order, bus lookup, automatic
bus names, expanders, bypass, defaults, implicit devices), of what it refuses to guess
(unverified with the reason), and an offline agreement with `check` on every recorded
snapshot that carries its QEMU's command line. The same rules against live QEMU 7.2, 10.0
and 11.1: tests/integration/test_preflight_topology.py and test_preflight_generated.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from qmpguard.analysis.model import BindingKind, Verdict
from qmpguard.analysis.preflight import (
    ARM_VIRT,
    I440FX,
    Q35,
    Preflight,
    canonical_driver,
    machine_model,
    parse_addr,
    preflight,
    read_config_files,
)
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis, analyse
from qmpguard.snapshot import load_snapshot

DATA = Path(__file__).resolve().parents[1] / "data"
VFIO = "vfio-pci,host=0000:01:00.0"


def run(line: str, files: dict[str, str] | None = None) -> tuple[Preflight, VmAnalysis]:
    pf = preflight(shlex.split(line), files or {})
    return pf, pf.analysis()


def dev(vm: VmAnalysis, label: str) -> DeviceAnalysis:
    return next(d for d in vm.devices if d.device.label == label)


def codes(vm: VmAnalysis) -> list[str]:
    return sorted(f.code for f in vm.findings)


def bus_name(d: DeviceAnalysis) -> str:
    return d.device.bus.rsplit("/", 1)[-1]


# ------------------------------------------------------------------ machines


@pytest.mark.parametrize(
    ("machine", "binary", "model"),
    [
        ("q35", "qemu-system-x86_64", Q35),
        ("pc-q35-7.2", "qemu-system-x86_64", Q35),
        ("pc-q35-8.1+pve0", "/usr/bin/kvm", Q35),  # Proxmox VE's machine names
        ("pc", "qemu-system-x86_64", I440FX),
        ("pc-i440fx-10.0", "qemu-system-x86_64", I440FX),
        (None, "qemu-system-x86_64", I440FX),  # x86's default machine
        (None, "kvm", I440FX),
        ("virt", "qemu-system-aarch64", ARM_VIRT),
        ("virt-9.2", "qemu-system-aarch64", ARM_VIRT),
    ],
)
def test_machine_models(machine: str | None, binary: str, model: object) -> None:
    assert machine_model(machine, binary) == (model, "")


@pytest.mark.parametrize(
    ("machine", "binary", "why"),
    [
        ("microvm", "qemu-system-x86_64", "machine type 'microvm' is unknown"),
        ("virt", "qemu-system-x86_64", "machine type 'virt' is unknown"),
        (None, "qemu-wrapper", "no -machine type given"),
    ],
)
def test_unknown_machines_say_why(machine: str | None, binary: str, why: str) -> None:
    model, reason = machine_model(machine, binary)
    assert model is None and why in reason


def test_unknown_machine_leaves_every_vfio_device_unverified_with_the_reason() -> None:
    pf, vm = run(f"qemu-system-x86_64 -M microvm -device intel-iommu -device {VFIO},id=h0")
    d = dev(vm, "h0")
    assert d.verdict is Verdict.UNVERIFIED
    assert codes(vm) == ["QG002"]
    assert "machine type 'microvm' is unknown" in vm.findings[0].message
    assert "machine type 'microvm' is unknown" in pf.notes[0]


@pytest.mark.parametrize(
    ("text", "devfn"),
    [("9", 0x48), ("0x9", 0x48), ("9.1", 0x49), ("0x1.0x2", 0x0A), ("1f.7", 0xFF), ("20", None)],
)
def test_addr_parsing(text: str, devfn: int | None) -> None:
    assert parse_addr(text) == devfn


def test_aliases_resolve_to_the_qom_type() -> None:
    assert canonical_driver("virtio-iommu") == "virtio-iommu-pci"  # libvirt writes this
    assert canonical_driver("virtio-net") == "virtio-net-pci"
    assert canonical_driver("vfio-pci") == "vfio-pci"
    _, vm = run(
        "qemu-system-x86_64 -M q35 -device virtio-iommu,bus=pcie.0,addr=3 "
        f"-device {VFIO},id=h0,bus=pcie.0,addr=9"
    )
    assert [v.type for v in vm.viommus] == ["virtio-iommu-pci"]
    assert dev(vm, "h0").verdict is Verdict.OK


# ------------------------------------------------------------------ realize order


@pytest.mark.parametrize(
    ("line", "verdict", "said"),
    [
        (f"-device {VFIO},id=h0 -device intel-iommu,caching-mode=on", "misbound", ""),
        (f"-device intel-iommu,caching-mode=on -device {VFIO},id=h0", "ok", ""),
        # a JSON vIOMMU is realized after every key=val device, wherever it is written
        (
            f'-device \'{{"driver":"intel-iommu","caching-mode":true}}\' -device {VFIO},id=h0',
            "misbound",
            "before the JSON ones",
        ),
        (
            "-device intel-iommu,caching-mode=on -device "
            '\'{"driver":"vfio-pci","host":"0000:01:00.0","id":"h0"}\'',
            "ok",
            "before the JSON ones",
        ),
    ],
)
def test_realize_order_is_qemus(line: str, verdict: str, said: str) -> None:
    _, vm = run(f"qemu-system-x86_64 -M q35 {line}")
    d = dev(vm, "h0")
    assert d.verdict == verdict
    assert said in " ".join(e.detail for e in d.order.evidence)


def test_readconfig_devices_join_the_keyval_list_at_their_position() -> None:
    cfg = '[device "h0"]\n  driver = "vfio-pci"\n  host = "0000:01:00.0"\n  bus = "pcie.0"\n'
    line = "qemu-system-x86_64 -M q35 -readconfig /x.cfg -device intel-iommu,caching-mode=on"
    _, vm = run(line, {"/x.cfg": cfg})
    assert dev(vm, "h0").verdict is Verdict.MISBOUND
    before = "qemu-system-x86_64 -M q35 -device intel-iommu -readconfig /x.cfg"
    assert dev(run(before, {"/x.cfg": cfg})[1], "h0").verdict is Verdict.OK


def test_implicit_virtio_drives_are_realized_after_the_keyval_list() -> None:
    """-drive if=virtio: anonymous, after every key=val device, before the JSON ones."""
    pf, vm = run(
        "qemu-system-x86_64 -M q35 -nodefaults -drive if=virtio,file=a.img "
        '-device e1000e,bus=pcie.0 -device \'{"driver":"e1000e","bus":"pcie.0"}\''
    )
    anon = {d.device.path: (d.device.type, d.device.devfn_text) for d in vm.devices}
    assert anon["/machine/peripheral-anon/device[0]"] == ("e1000e", "01.0")
    assert anon["/machine/peripheral-anon/device[1]"] == ("virtio-blk-pci", "02.0")
    assert anon["/machine/peripheral-anon/device[2]"] == ("e1000e", "03.0")
    assert pf.hidden == ()  # an implicit disk cannot be a vIOMMU


# ------------------------------------------------------------------ buses


def test_bridges_without_id_name_their_bus_from_a_counter_per_bus_type() -> None:
    _, vm = run(
        "qemu-system-x86_64 -M q35 -nodefaults -device pcie-root-port,chassis=1 "
        "-device pcie-pci-bridge "
        "-device pci-bridge,chassis_nr=2 -device pcie-root-port,chassis=3 "
        "-device e1000,bus=pci.1 -device e1000e,bus=pcie.1"
    )
    kinds = {d.device.type: bus_name(d) for d in vm.devices if d.device.type.startswith("e1000")}
    assert kinds == {"e1000": "pci.1", "e1000e": "pcie.1"}


def test_the_i440fx_root_bus_takes_the_first_automatic_pci_name() -> None:
    _, vm = run(
        "qemu-system-x86_64 -M pc -nodefaults -device pci-bridge,chassis_nr=1 "
        "-device e1000,bus=pci.1,addr=3"
    )
    assert bus_name(next(d for d in vm.devices if d.device.type == "e1000")) == "pci.1"


def test_a_name_two_buses_carry_resolves_as_qemus_search_does() -> None:
    """qbus_find_recursive: depth first, newest device first. Proxmox VE names a bridge
    pci.0 on q35, which an anonymous conventional bus also gets."""
    _, vm = run(
        "qemu-system-x86_64 -M q35 -device pcie-pci-bridge "
        "-device pci-bridge,id=pci.0,chassis_nr=7,bus=pcie.0 -device e1000,id=n,bus=pci.0,addr=3"
    )
    n = dev(vm, "n")
    assert n.device.bus == "/machine/peripheral/pci.0/pci.0"  # the newer bridge's bus


def test_a_newer_expander_host_is_searched_first() -> None:
    """bus=pcie.0 finds an anonymous root port's bus behind a newer pxb-pcie first."""
    _, vm = run(
        "qemu-system-x86_64 -M q35 -device intel-iommu -device "
        "pxb-pcie,id=px,bus_nr=32,bus=pcie.0,bypass_iommu=on "
        "-device pcie-root-port,bus=px,chassis=1 "
        f"-device {VFIO},id=h0,bus=pcie.0"
    )
    h0 = dev(vm, "h0")
    assert h0.binding.kind is BindingKind.MEMORY  # behind the bypass expander
    assert codes(vm) == ["QG003"]


def test_pxb_bypass_and_requester_aliasing() -> None:
    _, vm = run(
        "qemu-system-x86_64 -M pc -device virtio-iommu-pci,bus=pci.0,addr=4 "
        "-device pxb,id=px,bus_nr=32,bus=pci.0,addr=9,bypass_iommu=on "
        f"-device {VFIO},id=h0,bus=px,addr=1 -device {VFIO},id=h1,bus=px,addr=2"
    )
    # conventional expander: the requester is the pxb's own devfn on the root bus, whose
    # host does not bypass: translated, and shared
    for label in ("h0", "h1"):
        d = dev(vm, label)
        assert d.binding.kind is BindingKind.VIOMMU
        assert d.binding.requester is not None and d.binding.requester.devfn_text == "09.0"
    assert codes(vm) == ["QG004", "QG004"]


@pytest.mark.parametrize(("machine", "kind"), [("q35", "memory"), ("pc", "viommu")])
def test_default_bus_bypass_iommu_is_ignored_by_i440fx(machine: str, kind: str) -> None:
    """q35 copies the machine property to its host; i440fx does not (its qtree shows
    bypass-iommu = false)."""
    bus = "pcie.0" if machine == "q35" else "pci.0"
    _, vm = run(
        f"qemu-system-x86_64 -M {machine},default-bus-bypass-iommu=on "
        f"-device virtio-iommu-pci,bus={bus},addr=4 -device {VFIO},id=h0,bus={bus},addr=9"
    )
    assert dev(vm, "h0").binding.kind == kind


def test_default_devices_take_slots_before_any_option() -> None:
    """Without -nodefaults the board creates VGA and a NIC first (pc_vga_init, then
    pc_nic_init): an auto-placed device gets the slot after them."""
    _, vm = run("qemu-system-x86_64 -M q35 -device e1000,id=n")
    assert dev(vm, "n").device.devfn_text == "03.0"
    _, vm = run("qemu-system-x86_64 -M q35 -nodefaults -device e1000,id=n")
    assert dev(vm, "n").device.devfn_text == "01.0"
    _, vm = run("qemu-system-x86_64 -M pc -vga none -nic none -device e1000,id=n")
    assert dev(vm, "n").device.devfn_text == "02.0"  # PIIX3 is at 01.0


def test_amd_iommu_puts_its_pci_function_on_the_root_bus() -> None:
    _, vm = run("qemu-system-x86_64 -M q35 -nodefaults -device amd-iommu -device e1000,id=n")
    assert {d.device.type: d.device.devfn_text for d in vm.devices}["AMDVI-PCI"] == "01.0"
    assert dev(vm, "n").device.devfn_text == "02.0"


def test_arm_virt_smmuv3_from_the_machine_and_as_a_device() -> None:
    _, vm = run(f"qemu-system-aarch64 -M virt,iommu=smmuv3 -device {VFIO},id=h0")
    assert dev(vm, "h0").verdict is Verdict.OK  # created with the board, before any -device
    _, vm = run(
        f"qemu-system-aarch64 -M virt -device {VFIO},id=h0 -device arm-smmuv3,primary-bus=pcie.0"
    )
    assert dev(vm, "h0").verdict is Verdict.MISBOUND
    # reordering is no fix for the emulated SMMUv3: the finding says what works instead
    assert "virtio-iommu-pci" in vm.findings[0].message


# ------------------------------------------------------------------ what it will not guess


def test_unreadable_readconfig_may_hide_a_viommu() -> None:
    pf = preflight(
        shlex.split(f"qemu-system-x86_64 -M q35 -readconfig /gone.cfg -device {VFIO},id=h0"),
        {},
        {"/gone.cfg": "-readconfig /gone.cfg could not be read (No such file or directory)"},
    )
    vm = pf.analysis()
    d = dev(vm, "h0")
    assert d.verdict is Verdict.UNVERIFIED
    assert "No such file or directory" in vm.findings[0].message
    assert pf.hidden and "No such file" in pf.hidden[0]
    # with a vIOMMU in sight, hidden devices cannot change its order against h0
    pf = preflight(
        shlex.split(
            f"qemu-system-x86_64 -M q35 -device intel-iommu -readconfig /gone.cfg "
            f"-device {VFIO},id=h0"
        )
    )
    assert dev(pf.analysis(), "h0").verdict is Verdict.OK


def test_a_bus_no_option_creates() -> None:
    _, vm = run(f"qemu-system-x86_64 -M q35 -device intel-iommu -device {VFIO},id=h0,bus=nowhere")
    d = dev(vm, "h0")
    assert d.verdict is Verdict.UNVERIFIED
    assert "no option qmpguard understands creates a bus named nowhere" in vm.findings[0].message
    # no vIOMMU at all: nothing can translate it, wherever it is
    _, vm = run(f"qemu-system-x86_64 -M q35 -device {VFIO},id=h0,bus=nowhere")
    assert dev(vm, "h0").verdict is Verdict.OK


def test_an_automatic_bus_name_next_to_an_unknown_bus_maker() -> None:
    """A device type qmpguard does not know may create buses: an automatic name (pci.N)
    may then be another bus, here one behind a bypass expander."""
    line = (
        "qemu-system-x86_64 -M q35 -device intel-iommu -device pcie-pci-bridge,bus=pcie.0 "
        "-device pxb-pcie,id=px,bus_nr=32,bus=pcie.0,bypass_iommu=on "
        "-device mystery-bridge,bus=px "
        f"-device {VFIO},id=h0,bus=pci.0,addr=1"
    )
    _, vm = run(line)
    d = dev(vm, "h0")
    assert d.verdict is Verdict.UNVERIFIED
    assert "mystery-bridge" in vm.findings[0].message
    # the same name with only known bus makers: certain
    _, vm = run(line.replace("-device mystery-bridge,bus=px ", ""))
    assert dev(vm, "h0").verdict is Verdict.OK


def test_a_doubtful_bus_that_cannot_change_the_binding_is_no_doubt() -> None:
    _, vm = run(
        "qemu-system-x86_64 -M q35 -device intel-iommu -device pcie-pci-bridge,bus=pcie.0 "
        f"-device mystery-bridge,bus=pcie.0 -device {VFIO},id=h0,bus=pci.0,addr=1"
    )
    assert dev(vm, "h0").verdict is Verdict.OK  # every bus here is translated by it


# ------------------------------------------------------------------ reading files


def test_readconfig_files_are_read_bounded_and_regular_only(tmp_path: Path) -> None:
    good = tmp_path / "a.cfg"
    good.write_text('[device "x"]\n  driver = "e1000"\n')
    big = tmp_path / "big.cfg"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    argv = [
        "qemu-system-x86_64",
        "-readconfig",
        "a.cfg",
        "-readconfig",
        str(big),
        "-readconfig",
        str(tmp_path),
        "-readconfig",
        "/dev/zero",
    ]
    files, problems = read_config_files(argv, str(tmp_path))
    assert files == {"a.cfg": good.read_text()}
    assert "larger than" in problems[str(big)]
    assert (
        "not a regular file" in problems[str(tmp_path)]
        or "Is a directory" in problems[str(tmp_path)]
    )
    assert "not a regular file" in problems["/dev/zero"]


# ------------------------------------------------------------------ the same verdicts as check


def _snapshots_with_cmdline() -> list[Path]:
    out = []
    for path in sorted(DATA.glob("*.json")):
        if path.name.endswith(".truth.json"):
            continue
        snap = load_snapshot(path)
        if snap.cmdline and any("vfio-pci" in a for a in snap.cmdline):
            out.append(path)
    return out


@pytest.mark.parametrize("path", _snapshots_with_cmdline(), ids=lambda p: p.stem)
def test_preflight_agrees_with_check_on_recorded_snapshots(path: Path) -> None:
    """Offline, every recorded VM: preflight of its command line and check of its replies
    agree on every vfio verdict they both conclude, and never say ok against misbound."""
    snap = load_snapshot(path)
    live = {d.device.path: d for d in analyse(snap).devices if d.device.vfio}
    pf = preflight(snap.cmdline or [], snap.files)
    pre = {d.device.path: d for d in pf.analysis().devices if d.device.vfio}
    assert live, "no vfio device in the snapshot"
    for p, d in live.items():
        if d.device.hotplugged:
            assert p not in pre or pre[p].verdict is not Verdict.MISBOUND
            continue
        mine = pre[p]
        if Verdict.UNVERIFIED not in (d.verdict, mine.verdict):
            assert mine.verdict == d.verdict, (p, d.order, mine.order)
            assert mine.binding.kind == d.binding.kind
            assert mine.device.devfn == d.device.devfn
