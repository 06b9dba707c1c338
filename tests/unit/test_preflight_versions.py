"""Preflight applies check's per-model vIOMMU rules (qmpguard/analysis/viommu_models.py)
with the version of the QEMU that will run the command line, and concludes nothing a
version decides when that version is unknown.

The rules themselves were measured live with the VFIO emulation's DMA log
(tests/integration/test_vfio_ground_truth_amd_arm.py); the property defaults per version
are `-device amd-iommu,help` of 7.2.22, 10.0.2 and 11.1.3. intel-iommu without
caching-mode=on, seen with the VFIO emulation: 11.1.3 refuses vfio-pci realized after it
("Device assignment is not allowed without enabling caching-mode=on") and runs the
misorder with all guest RAM mapped; 10.0.2 exits at machine-done in the misorder too
("We need to set caching-mode=on"). The fixed amd-iommu command
line is proven on the DMA log in tests/integration/test_preflight_fix_amd.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from qmpguard.analysis.model import EvidenceSource, Verdict
from qmpguard.analysis.preflight import QemuVersion, preflight
from qmpguard.analysis.viommu_models import parse_version, rule_properties
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis
from qmpguard.fix import fixes
from qmpguard.preflight_command import InputError, qemu_version

Q35 = "qemu-system-x86_64 -M q35 -nodefaults"
VFIO = "vfio-pci,host=0000:01:00.0,id=hostdev0,bus=pcie.0,addr=9"
AMD = "amd-iommu,id=viommu"
ARM = "qemu-system-aarch64 -M virt -nodefaults"
SMMU = "arm-smmuv3,id=smmu0,primary-bus=pcie.0"


def line(*devices: str, head: str = Q35) -> list[str]:
    return shlex.split(head) + [a for d in devices for a in ("-device", d)]


def hostdev(vm: VmAnalysis) -> DeviceAnalysis:
    return next(d for d in vm.devices if d.device.label == "hostdev0")


def judged(argv: list[str], version: str | None) -> tuple[DeviceAnalysis, VmAnalysis]:
    vm = preflight(argv, version=QemuVersion(version)).analysis()
    return hostdev(vm), vm


def codes(vm: VmAnalysis) -> list[str]:
    return sorted(f.code for f in vm.findings if f.device and f.device.endswith("hostdev0"))


@pytest.mark.parametrize(
    ("given", "version", "props"),
    [
        ({}, (7, 2), {"pt": True}),
        ({"pt": "off"}, (10, 0), {"pt": False}),
        ({}, (11, 1), {"dma-remap": False}),
        ({"dma-remap": "on"}, (11, 1), {"dma-remap": True}),
        ({"dma-remap": "on"}, None, {}),  # which of the two exists: the version decides
    ],
)
def test_amd_properties_are_what_check_would_read(
    given: dict[str, str], version: tuple[int, int] | None, props: dict[str, object]
) -> None:
    assert rule_properties("amd-iommu", given, version) == props


@pytest.mark.parametrize(
    ("viommu", "version"),
    [
        (AMD, "7.2.22"),
        (f"{AMD},pt=off", "10.0.2"),
        (f"{AMD},dma-remap=on", "11.1.3"),
        (f"{AMD},dma-remap=on", None),
    ],
)
def test_amd_misordered_is_misbound_on_every_version(viommu: str, version: str | None) -> None:
    d, vm = judged(line(VFIO, viommu), version)
    assert d.verdict is Verdict.MISBOUND and codes(vm) == ["QG001"]


def test_amd_on_72_refused_order_and_no_reorder_fix() -> None:
    argv = line(VFIO, AMD)
    d, vm = judged(argv, "7.2.22")
    assert EvidenceSource.REFUSED_ORDER in {e.source for e in d.order.evidence}
    (fix,) = fixes(vm)
    assert fix.argv is None and fix.language == "none"
    assert "10.1" in fix.text and "dma-remap=on" in fix.text


def test_amd_on_111_with_dma_remap_is_fixed_by_reordering() -> None:
    argv = line(VFIO, f"{AMD},dma-remap=on")
    _, vm = judged(argv, "11.1.3")
    (fix,) = fixes(vm)
    assert fix.argv is not None
    after, vm_after = judged(list(fix.argv), "11.1.3")
    assert after.verdict is Verdict.OK and codes(vm_after) == []


def test_amd_fix_without_a_version_says_the_version_decides() -> None:
    """Reordering either binds it right or makes QEMU refuse loudly, never binds it
    wrongly: offered, with what the version decides."""
    _, vm = judged(line(VFIO, f"{AMD},dma-remap=on"), None)
    (fix,) = fixes(vm)
    assert fix.argv is not None and "depends on its version" in fix.text


@pytest.mark.parametrize(
    ("viommu", "version", "verdict", "found"),
    [
        (f"{AMD},dma-remap=on", "11.1.3", Verdict.OK, []),
        (AMD, "11.1.3", Verdict.OK, ["QG003"]),  # pass-through without dma-remap
        (AMD, "10.0.2", Verdict.OK, ["QG003"]),  # pt=on, 10.0's default
        (f"{AMD},dma-remap=on", None, Verdict.UNVERIFIED, ["QG002"]),
        (AMD, None, Verdict.UNVERIFIED, ["QG002"]),
    ],
)
def test_amd_correct_order(
    viommu: str, version: str | None, verdict: Verdict, found: list[str]
) -> None:
    d, vm = judged(line(viommu, VFIO), version)
    assert d.verdict is verdict and codes(vm) == found
    if version is None:
        assert d.binding.viommu is not None and "QEMU version is unknown" in d.binding.viommu.label


@pytest.mark.parametrize(("viommu", "version"), [(AMD, "7.2.22"), (f"{AMD},pt=off", "10.0.2")])
def test_amd_correct_order_that_qemu_refuses_is_said(viommu: str, version: str) -> None:
    pf = preflight(line(viommu, VFIO), version=QemuVersion(version))
    assert any(f"QEMU {version} will refuse to start" in r for r in pf.refusals), pf.refusals
    assert hostdev(pf.analysis()).verdict is not Verdict.OK  # the evidence conflicts


@pytest.mark.parametrize("version", ["11.1.3", None])
def test_arm_smmuv3_device_refused_order_and_no_reorder_fix(version: str | None) -> None:
    """Version-independent: the user-creatable SMMUv3 (10.2+) refuses the right order."""
    argv = line(
        "pcie-root-port,id=rp1,chassis=1", VFIO.replace("pcie.0,addr=9", "rp1"), SMMU, head=ARM
    )
    d, vm = judged(argv, version)
    assert d.verdict is Verdict.MISBOUND
    assert EvidenceSource.REFUSED_ORDER in {e.source for e in d.order.evidence}
    (fix,) = fixes(vm)
    assert fix.argv is None and "virtio-iommu" in fix.text


def test_intel_caching_mode_rules() -> None:
    uncached, cached = "intel-iommu,id=vi", "intel-iommu,id=vi,caching-mode=on"
    # from 10.2 the misorder boots silently: misbound, and reordering alone is refused
    d, vm = judged(line(VFIO, uncached), "11.1.3")
    assert d.verdict is Verdict.MISBOUND
    (fix,) = fixes(vm)
    assert fix.argv is None and "caching-mode=on" in fix.text
    # up to 10.1 QEMU exits whatever the order
    pf = preflight(line(uncached, VFIO), version=QemuVersion("10.0.2"))
    assert any("exit at machine-done" in r for r in pf.refusals), pf.refusals
    # unknown version: the right order is refused on every version
    pf = preflight(line(uncached, VFIO))
    assert any("QEMU will refuse to start" in r for r in pf.refusals), pf.refusals
    (fix,) = fixes(preflight(line(VFIO, uncached)).analysis())
    assert fix.argv is None and "caching-mode=on" in fix.text
    # caching-mode=on: no rule, ok on every version
    for version in ("7.2.22", "11.1.3", None):
        d, vm = judged(line(cached, VFIO), version)
        assert d.verdict is Verdict.OK and codes(vm) == []


def test_versions_are_read_as_qemu_prints_them() -> None:
    assert parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0)
    assert parse_version("11.1.3") == (11, 1) and parse_version("7.2") == (7, 2)
    assert parse_version("unknown") is None


def test_the_version_comes_from_the_binary_or_the_option() -> None:
    assert qemu_version("qemu-system-x86_64", None, "11.1").text == "11.1"
    assert qemu_version("qemu-system-x86_64", None, "none").text is None
    with pytest.raises(InputError):
        qemu_version("qemu-system-x86_64", None, "eleven")
    not_qemu = qemu_version(sys.executable, None, None)  # never run: not a QEMU name
    assert not_qemu.text is None and "not a QEMU binary name" in not_qemu.missing
    missing = qemu_version("/nonexistent/qemu-system-x86_64", None, None)
    assert missing.text is None and "give --qemu-version" in missing.missing


def test_the_system_qemu_says_its_own_version() -> None:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except FileNotFoundError:
        pytest.skip("no system QEMU")
    found = qemu_version("qemu-system-x86_64", None, None)
    assert found.text is not None and f"version {found.text}" in out
