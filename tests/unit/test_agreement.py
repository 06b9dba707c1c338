"""The rule every live VM is held to (tests/agreement.py, issue 16), without QEMU.

`compare` is the verdict rule; `pair` matches preflight's vfio devices with check's by
QOM path, leaving out what a test hot-plugged or unplugged. Check's side is stood in for
by the analysis of another command line (the same rules judge both).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from qmpguard.analysis.model import BindingKind, Verdict
from qmpguard.analysis.preflight import preflight
from qmpguard.analysis.vm import VmAnalysis
from tests.agreement import (
    HotPlug,
    KnownDisagreement,
    Match,
    Side,
    Skip,
    Tally,
    VmOutcome,
    compare,
    hotplug_of_trace,
    is_stopped,
    pair,
    side_of,
    side_of_json,
    trace_of,
)

OK = Side(Verdict.OK, BindingKind.VIOMMU, "09.0", "09.0", ("cmdline: after: x",), "")
MISBOUND = replace(OK, verdict=Verdict.MISBOUND, evidence=("cmdline: before: x",))
UNVERIFIED = replace(OK, verdict=Verdict.UNVERIFIED, reason="its bus is unknown")

INTEL = "intel-iommu,caching-mode=on"
VFIO = "vfio-pci,id=hostdev0,host=01:00.0,bus=pcie.0,addr=9.0"
VIOMMU_FIRST = ["qemu-system-x86_64", "-M", "q35", "-device", INTEL, "-device", VFIO]
VFIO_FIRST = ["qemu-system-x86_64", "-M", "q35", "-device", VFIO, "-device", INTEL]


@pytest.mark.parametrize(
    ("live", "pre", "match"),
    [
        (OK, OK, Match.SAME),
        (MISBOUND, MISBOUND, Match.SAME),
        (UNVERIFIED, UNVERIFIED, Match.SAME),
        (OK, UNVERIFIED, Match.PREFLIGHT_UNVERIFIED),
        (MISBOUND, UNVERIFIED, Match.PREFLIGHT_UNVERIFIED),
        (UNVERIFIED, OK, Match.CHECK_UNVERIFIED),
        (UNVERIFIED, MISBOUND, Match.CHECK_UNVERIFIED),
    ],
)
def test_allowed(live: Side, pre: Side, match: Match) -> None:
    result = compare("dev", live, pre)
    assert result.match is match and result.problems == ()
    assert (result.note != "") == (match is not Match.SAME)


@pytest.mark.parametrize(("live", "pre"), [(OK, MISBOUND), (MISBOUND, OK)])
def test_ok_against_misbound_never(live: Side, pre: Side) -> None:
    result = compare("hostdev0", live, pre)
    assert result.match is Match.DISAGREE
    assert result.problems == (
        f"hostdev0: check says {live.verdict}, preflight says {pre.verdict}; "
        f"preflight evidence: {list(pre.evidence)}",
    )


def test_preflight_unverified_needs_its_reason() -> None:
    result = compare("dev", OK, replace(UNVERIFIED, reason=""))
    assert result.match is Match.DISAGREE and len(result.problems) == 1


@pytest.mark.parametrize(
    ("pre", "wrong"),
    [
        (replace(OK, kind=BindingKind.MEMORY, requester_devfn=None), "expects viommu"),
        (replace(OK, devfn="0a.0"), "devfn 09.0 live, 0a.0 preflight"),
        (replace(OK, requester_devfn="00.0"), "requester 09.0 live, 00.0 preflight"),
    ],
)
def test_same_verdict_different_binding(pre: Side, wrong: str) -> None:
    result = compare("dev", OK, pre)
    assert result.match is Match.SAME
    assert len(result.problems) == 1 and wrong in result.problems[0]


def _live(argv: list[str], hotplugged: bool = False) -> VmAnalysis:
    """A stand-in for check's analysis: another command line's, hot-plugged if asked."""
    a = preflight(argv).analysis()
    devices = [replace(d, device=replace(d.device, hotplugged=hotplugged)) for d in a.devices]
    return replace(a, devices=devices)


def test_pair_names_the_device_and_both_verdicts() -> None:
    out = VmOutcome("vm")
    pair(out, preflight(VFIO_FIRST), _live(VIOMMU_FIRST), HotPlug())
    assert out.matches == [("vfio-pci hostdev0", Match.DISAGREE)]
    assert out.verdicts == ["ok/misbound"]
    assert len(out.problems) == 1
    assert out.problems[0].startswith(
        "vfio-pci hostdev0: check ok (viommu, 09.0), preflight misbound (viommu, 09.0): "
        "check says ok, preflight says misbound"
    )


def test_pair_agreeing() -> None:
    out = VmOutcome("vm")
    pair(out, preflight(VFIO_FIRST), _live(VFIO_FIRST), HotPlug())
    assert out.matches == [("vfio-pci hostdev0", Match.SAME)] and not out.problems


def test_pair_leaves_out_hot_unplugged_and_hot_plugged_devices() -> None:
    unplugged = VmOutcome("vm")
    pair(
        unplugged,
        preflight(VFIO_FIRST),
        _live(VIOMMU_FIRST),
        HotPlug(removed=frozenset({"hostdev0"})),
    )
    assert unplugged.device_skips == [("vfio-pci hostdev0", Skip.HOT_UNPLUGGED)]
    assert not unplugged.matches and not unplugged.problems
    # re-plugged under the same id: check sees another device at the same path
    replugged = VmOutcome("vm")
    pair(replugged, preflight(VFIO_FIRST), _live(VIOMMU_FIRST, hotplugged=True), HotPlug())
    assert replugged.device_skips == [("vfio-pci hostdev0", Skip.HOTPLUGGED)]
    # hot-plugged, not on the command line at all
    plugged = VmOutcome("vm")
    no_vfio = ["qemu-system-x86_64", "-M", "q35", "-device", INTEL]
    pair(plugged, preflight(no_vfio), _live(VIOMMU_FIRST, hotplugged=True), HotPlug())
    assert plugged.device_skips == [("vfio-pci hostdev0", Skip.HOTPLUGGED)]
    assert not plugged.problems


def test_pair_missing_on_either_side_is_a_disagreement() -> None:
    no_vfio = ["qemu-system-x86_64", "-M", "q35", "-device", INTEL]
    out = VmOutcome("vm")
    pair(out, preflight(no_vfio), _live(VIOMMU_FIRST), HotPlug())
    assert out.problems == [
        "vfio-pci hostdev0 (/machine/peripheral/hostdev0): check ok, missing from preflight"
    ]
    out = VmOutcome("vm")
    pair(out, preflight(VIOMMU_FIRST), _live(no_vfio), HotPlug())
    assert out.problems == [
        "vfio-pci hostdev0 (/machine/peripheral/hostdev0): in preflight, missing from check"
    ]


def test_pair_devices_preflight_says_it_cannot_see() -> None:
    hidden = ["qemu-system-x86_64", "-M", "q35", "-readconfig", "/gone.cfg"]
    out = VmOutcome("vm")
    pair(out, preflight(hidden, unreadable={"/gone.cfg": "gone"}), _live(VIOMMU_FIRST), HotPlug())
    assert out.device_skips == [("vfio-pci hostdev0", Skip.UNSEEN)] and not out.problems


def test_known_disagreement_covers_only_its_own_case() -> None:
    known = KnownDisagreement(
        "x", "why", ("intel-iommu",), "vfio-pci", Verdict.OK, Verdict.MISBOUND
    )
    assert known.covers(VFIO_FIRST, "vfio-pci", OK, MISBOUND)
    assert not known.covers(VFIO_FIRST, "vfio-pci", MISBOUND, OK)
    assert not known.covers(VFIO_FIRST, "vfio-pci-nohotplug", OK, MISBOUND)
    assert not known.covers(["qemu-system-x86_64", "-device", VFIO], "vfio-pci", OK, MISBOUND)


def test_hotplug_of_trace(tmp_path: Path) -> None:
    trace = tmp_path / "vm.qmp-trace.log"
    reqs = [
        {"execute": "device_add", "arguments": {"driver": "vfio-pci", "id": "hot0"}},
        {"execute": "device_add", "arguments": {"driver": "e1000e"}},
        {"execute": "device_del", "arguments": {"id": "/machine/peripheral-anon/device[0]"}},
        {"execute": "query-status"},
    ]
    trace.write_text(
        "".join(f"123@1.0:handle_qmp_command mon 0x55aa req: {json.dumps(r)}\n" for r in reqs)
    )
    assert trace_of(["-m", "64", "-trace", f"handle_qmp_command,file={trace}"]) == trace
    assert hotplug_of_trace(trace) == HotPlug(
        frozenset({"hot0"}), True, frozenset({"/machine/peripheral-anon/device[0]"})
    )
    assert hotplug_of_trace(None) == HotPlug()


def test_tally_file(tmp_path: Path) -> None:
    tally = Tally()
    compared = VmOutcome("vm", matches=[("d", Match.SAME)], verdicts=["ok/ok"])
    compared.device_skips.append(("e", Skip.HOTPLUGGED))
    tally.add(compared, "t1")
    tally.add(VmOutcome("vm2", skipped=Skip.NO_VFIO), "t2")
    doc = json.loads(tally.write(tmp_path).read_text())
    assert doc["vms"] == {"compared": 1, "skipped": {"no-vfio-device": 1}}
    assert doc["devices"]["compared"] == 1
    assert doc["devices"]["by_verdicts"] == {"ok/ok": 1}
    assert doc["devices"]["skipped"] == {"hot-plugged": 1}
    assert doc["devices"]["by_file"] == {"t1": 1}
    assert doc["disagreements"] == [] and doc["allowed"] == []
    allowed = VmOutcome("vm3", matches=[("d", Match.CHECK_UNVERIFIED)], notes=["d: why"])
    tally.add(allowed, "t3")
    doc = json.loads(tally.write(tmp_path).read_text())
    assert doc["allowed"] == [{"test": "t3", "vm": "vm3", "notes": ["d: why"]}]
    assert doc["devices"]["by_match"] == {"same": 1, "check-unverified": 1}


def test_side_of_json_matches_side_of() -> None:
    from qmpguard.report.document import device_json

    dev = next(d for d in preflight(VFIO_FIRST).analysis().devices if d.device.vfio)
    assert side_of(dev) == side_of_json(json.loads(json.dumps(device_json(dev))))


def test_a_stopped_process_is_not_inspected() -> None:
    """A SIGSTOPped QEMU (the timeout tests) would only make check time out."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert not is_stopped(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        os.waitpid(proc.pid, os.WUNTRACED)  # returns once the kernel has stopped it
        assert is_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()
