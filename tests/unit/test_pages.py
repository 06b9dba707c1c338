"""The daemon's pages and the terminal tree and table, as pure functions over recorded
snapshots: order, counts, filter, banner links, folding, and the terminal's rules (problems
first, verdicts in one column, long names shortened in the middle, colour only on a TTY).
The same pages in a real browser: tests/integration/test_browser.py."""

from __future__ import annotations

import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qmpguard.analysis.model import Verdict
from qmpguard.daemon.page import age_text, status_page, topology_html, vm_page
from qmpguard.daemon.results import ResultStore
from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.inspection import analyse_snapshot
from qmpguard.report.document import target_findings
from qmpguard.report.table import render_target
from qmpguard.report.tree import (
    NAME_MAX,
    TreeRow,
    VmState,
    render_tree_target,
    shorten_middle,
    shorten_names,
    tree_rows,
    vm_state,
)
from qmpguard.result import TargetResult
from qmpguard.snapshot import load_snapshot

DATA = Path(__file__).resolve().parents[1] / "data"
SNAPSHOTS = sorted(p for p in DATA.glob("*-10.0.2.json") if not p.name.endswith(".truth.json"))
VOID = {"meta", "br", "col", "img", "input", "hr", "link"}


def result_of(stem: str, target: str | None = None) -> TargetResult:
    snap = load_snapshot(DATA / f"{stem}-10.0.2.json")
    return analyse_snapshot(target or snap.target, snap)


class Checked(HTMLParser):
    """Tags balanced; every id once; every in-page link's target present (in a page)."""

    def __init__(self, text: str, page: bool = True) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.feed(text)
        self.close()
        assert self.stack == [], self.stack
        assert len(self.ids) == len(set(self.ids)), "duplicate ids"
        if page:
            assert set(self.links) <= set(self.ids), set(self.links) - set(self.ids)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if (a.get("href") or "").startswith("#"):
            self.links.append(str(a["href"])[1:])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def test_states_distinguish_no_vfio_from_all_ok() -> None:
    assert vm_state(result_of("i440fx-pci-bridge")) is VmState.NO_VFIO
    assert vm_state(result_of("q35-intel-vfio-first-paused")) is VmState.VFIO_OK
    assert vm_state(result_of("q35-intel-topology")) is VmState.WARNING
    assert vm_state(result_of("q35-intel-vfio-mixed-paused")) is VmState.CRITICAL
    assert vm_state(None) is VmState.UNKNOWN


def fleet(now: float) -> ResultStore:
    """Six VMs whose alphabetical order is the reverse of their states'."""
    store = ResultStore()
    cases = [
        ("unix:/run/a-no-vfio.qmp", result_of("i440fx-pci-bridge", "unix:/run/a-no-vfio.qmp")),
        ("unix:/run/b-ok.qmp", result_of("q35-intel-vfio-first-paused", "unix:/run/b-ok.qmp")),
        ("unix:/run/c-warn.qmp", result_of("q35-intel-topology", "unix:/run/c-warn.qmp")),
        (
            "unix:/run/d-busy.qmp",
            TargetResult(
                "unix:/run/d-busy.qmp",
                None,
                None,
                InspectionError(ErrorReason.BUSY, "monitor busy, held by another client"),
            ),
        ),
        ("unix:/run/e-pending.qmp", None),
        ("unix:/run/z-bad.qmp", result_of("q35-intel-vfio-mixed-paused", "unix:/run/z-bad.qmp")),
    ]
    for name, result in cases:
        store.add(name, "watch")
        if result is not None:
            store.update(name, result, 0.1)
            store.vms[name].last_inspection = now - 125
    return store


def test_status_page_worst_first_with_counts_and_filter() -> None:
    now = 1_800_000_000.0
    store = fleet(now)
    page = status_page(store.vms.values(), now)
    Checked(page)
    order = re.findall(r'data-state="([a-z-]+)" data-name="([^"]+)"', page)
    assert order == [
        ("critical", "unix:/run/z-bad.qmp"),
        ("unknown", "unix:/run/d-busy.qmp"),
        ("unknown", "unix:/run/e-pending.qmp"),
        ("warning", "unix:/run/c-warn.qmp"),
        ("vfio-ok", "unix:/run/b-ok.qmp"),
        ("no-vfio", "unix:/run/a-no-vfio.qmp"),
    ]
    summary = page[page.index('id="summary"') : page.index("</p>", page.index('id="summary"'))]
    for text in (
        "1 critical",
        "2 unknown or not inspected",
        "1 warning",
        "1 vfio devices, all ok",
        "1 no vfio device",
    ):
        assert text in summary
    assert page.index("q35-intel-vfio-mixed-paused") < page.index("q35-intel-topology")
    assert "unix:/run/z-bad.qmp" in page  # the socket, as detail of the name
    assert ">d-busy</a>" in page  # not inspected yet: the label its socket gives
    assert "not inspected now: monitor busy" in page and "not inspected yet" in page
    assert "2 min ago" in page
    assert '<a href="/?problems=1">only the 4 with problems</a>' in page
    assert "<script" not in page
    problems = status_page(store.vms.values(), now, problems_only=True)
    Checked(problems)
    states = re.findall(r'data-state="([a-z-]+)"', problems)
    assert states == ["critical", "unknown", "unknown", "warning"]
    assert "1 vfio devices, all ok" in problems  # the counts stay whole
    assert status_page([], now).count("no VMs found yet") == 1


def test_age_text() -> None:
    assert [age_text(s) for s in (-3, 4, 61, 7200, 3 * 86400)] == [
        "0 s ago",
        "4 s ago",
        "1 min ago",
        "2 h ago",
        "3 d ago",
    ]


@pytest.mark.parametrize("path", SNAPSHOTS, ids=lambda p: p.stem)
def test_vm_page_links_and_verdicts(path: Path) -> None:
    snap = load_snapshot(path)
    result = analyse_snapshot(snap.target, snap)
    page = vm_page(snap.target, result)
    Checked(page)
    assert result.analysis is not None
    banner = page[page.index('<section class="banner') : page.index("</section>")]
    state = vm_state(result)
    assert f'class="banner {state}"' in banner
    vfio = [d for d in result.analysis.devices if d.device.vfio]
    badges = re.findall(r'class="verdict badge [a-z-]+">([^<]+)<', page)
    assert sorted(b.split(" ")[0] for b in badges if not b.startswith("QG")) == sorted(
        {Verdict.OK: "ok", Verdict.MISBOUND: "MISBOUND", Verdict.UNVERIFIED: "UNVERIFIED"}[
            d.verdict
        ]
        for d in vfio
    )
    for d in result.analysis.devices:
        if d.verdict is Verdict.MISBOUND:  # named in the banner, linked to picture and evidence
            assert d.device.label in banner
            assert "in the picture" in banner and "evidence and fix" in banner
    if state is VmState.NO_VFIO:
        assert "no vfio device" in banner


def test_vm_page_not_inspected() -> None:
    error = InspectionError(ErrorReason.BUSY, "monitor busy")
    page = vm_page("unix:/run/qemu-server/101.qmp", TargetResult("x", None, None, error))
    Checked(page)
    assert "<h1>vmid 101</h1>" in page and "UNKNOWN" in page and "monitor busy" in page
    assert "not inspected yet" in vm_page("unix:/run/vm1.qmp", None)


def big_rows() -> list[TreeRow]:
    """A root bus with 30 plain devices, a dull root port with a device behind it, and a
    misbound vfio device last."""
    result = result_of("q35-intel-vfio-mixed-paused")
    assert result.analysis is not None
    rows = tree_rows(result.analysis, target_findings(result))
    bus = rows[0]
    plain = next(r for r in rows if r.kind == "device" and not r.vfio)
    bad = next(r for r in rows if r.verdict is Verdict.MISBOUND)
    out = [bus]
    out += [replace(plain, label=f"plain-{i:02d}", detail=f"{i:02x}.0 - e1000e") for i in range(30)]
    out += [replace(plain, label="rp-dull", detail="1c.0 - pcie-root-port")]
    out += [replace(bus, depth=2, label="rp-dull"), replace(plain, depth=3, label="nic-dull")]
    out += [replace(bad, label="x" * 80 + "-misbound")]
    return out


def test_large_topology_folds_what_has_no_vfio_device() -> None:
    html = topology_html(big_rows())
    Checked(html, page=False)
    assert html.count("<details>") == 1  # one run: 30 devices and the root port (with its bus)
    assert "31 more on this bus (00.0 to 1c.0), 32 devices in all, no vfio device" in html
    folded = html[html.index("<details>") : html.index("</details>")]
    assert "nic-dull" in folded and "plain-29" in folded
    assert "-misbound" not in folded and "MISBOUND (QG001)" in html
    small = topology_html(big_rows()[:5] + big_rows()[-1:])
    assert "<details" not in small  # a small VM is drawn whole


def test_shorten_middle() -> None:
    long = "/machine/peripheral-anon/device[12]"
    short = shorten_middle(long)
    assert len(short) == NAME_MAX and short.startswith("/machine/perip")
    assert short.endswith("device[12]") and "..." in short
    assert shorten_middle("nvidia-a100-passthrough-gpu-0") == "nvidia-a100-passthrough-gpu-0"
    assert shorten_names(f"{long} rid 00.0@pcie.0") == f"{short} rid 00.0@pcie.0"


def test_tree_problems_first_verdict_after_name_and_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    result = result_of("q35-intel-vfio-mixed-paused")
    lines = render_tree_target(result, colour=False).splitlines()
    assert lines[1].startswith("  CRITICAL  2 vfio devices: 1 MISBOUND, 1 ok")
    assert lines[2].startswith("  ! MISBOUND   hostdev0  QG001 critical:")
    first_bus = next(i for i, line in enumerate(lines) if "[bus " in line)
    assert first_bus == 3  # the problems come before the tree
    text = "\n".join(lines)
    assert "    hostdev0  MISBOUND  09.0 00:09.0 vfio-pci  -> viommu" in text  # word first
    assert "    hostdev1  ok  0a.0 00:0a.0 vfio-pci" in text
    assert "/machine/periph...anon/device[0]" in text  # shortened in the middle
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\033[" in render_tree_target(result)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\033[" not in render_tree_target(result)
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert "\033[" not in render_tree_target(result)


def test_table_problems_first_and_verdict_first() -> None:
    lines = render_target(result_of("q35-intel-vfio-mixed-paused")).splitlines()
    assert lines[1].startswith("  CRITICAL") and lines[2].startswith("  ! MISBOUND")
    assert lines[3].split() == [
        "VERDICT",
        "DEVICE",
        "TYPE",
        "BUS",
        "DEVFN",
        "BDF",
        "EXPECTED",
        "DMA",
        "SPACE",
        "ORDER",
    ]
    assert any(line.startswith("  MISBOUND  hostdev0 ") for line in lines)
    assert all(len(line.split("  ")[0]) < 40 for line in lines[4:12])


def test_status_page_keeps_the_last_known_state_of_a_vm_gone_busy() -> None:
    """Critical stays critical while the monitor is busy (the last known truth), with the
    reason it is not inspected now; an ok VM gone busy is unknown."""
    now = 1_800_000_000.0
    store = ResultStore()
    for name, stem in (
        ("unix:/run/bad.qmp", "q35-intel-vfio-mixed-paused"),
        ("unix:/run/ok.qmp", "q35-intel-vfio-first-paused"),
    ):
        store.add(name, "watch")
        store.update(name, result_of(stem, name), 0.1)
        busy = InspectionError(ErrorReason.BUSY, "monitor busy, held by another client")
        store.update(name, TargetResult(name, None, None, busy), 0.1)
    page = status_page(store.vms.values(), now)
    rows = re.findall(r'<tr class="([a-z-]+)" data-state="[a-z-]+" data-name="([^"]+)">', page)
    assert rows == [("critical", "unix:/run/bad.qmp"), ("unknown", "unix:/run/ok.qmp")]
    bad = page[
        page.index('data-name="unix:/run/bad.qmp"') : page.index(
            "</tr>", page.index('data-name="unix:/run/bad.qmp"')
        )
    ]
    assert "not inspected now: monitor busy" in bad and "as last seen:" in bad and "QG001" in bad
    assert ">q35-intel-vfio-mixed-paused</a>" in bad  # the name from the last inspection
