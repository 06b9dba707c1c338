"""The DMA log decides; qmpguard's verdict must agree with it.

Per vfio device (truth from the DMA log only):
  translated  0 bytes mapped: its container follows the vIOMMU
  all-ram     at least all guest RAM mapped: plain guest memory
  other       anything else (never expected; reported)
Then (a) never `ok` for an all-ram device, unless the same VM with the vIOMMU realized
first (a reference run, only when needed) still maps all RAM for it: then the device is
not translatable at all (bypass bus, no vIOMMU on its path) and `ok` is right; (b) never
`misbound` for a translated device; (c) every vfio device is in the report; (d)
`unverified` only with a stated reason; (e) the inspection never fails on a valid VM.
Also checked: `misbound` (QG001, "reorder the options") for a device that maps all RAM
even with the vIOMMU first is a false alarm (misbound-untranslatable); and every evidence
source's own conclusion must match the DMA log (evidence-wrong), even when other sources
outvote it into a conflict: on a VM where they cannot speak, it would decide alone.

amd-iommu (runner.amd_mode tells what the build does): with dma-remap=on (10.1+) the
AMD-Vi guest switches every device to translation, so the rules above apply as they are.
Where QEMU refuses vfio behind it (7.2), a vIOMMU-first reference that QEMU refuses with
its notifier error counts as translated: QEMU would have put the device behind the
vIOMMU, and only the wrong order runs. In pass-through (10.0's pt=on, 10.1+ without
dma-remap) every device keeps all guest RAM in either order, so `ok` must come with QG003
for the device (the guest cannot isolate it) or it is wrong-ok -- unless the DMA log shows
nothing mapped: a device at 00:14.0 on 10.0.0-10.0.3 lands in the IOAPIC's space, which
amd-iommu made before guest memory existed (docs/design.md, amd-ioapic-space), and there
no QG003 is right. The order itself is told
where the build has dma-remap (10.1+) by the twin: the same VM with dma-remap=on, judged
by the rules above (ok where the twin maps all RAM but its vIOMMU-first reference
translates: wrong-ok; misbound where the twin translates: wrong-misbound). 10.0 has no
twin: there the order is not checked under pass-through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from tests.generator.model import (
    MAP_NOTIFIER_REFUSAL,
    NOTIFIER_REFUSAL,
    RAM,
    AmdMode,
    QemuBinary,
    Scenario,
)
from tests.generator.runner import Built, RunResult, VfioPresent, amd_mode, run_scenario

Truth = Literal["translated", "all-ram", "other"]
CLASSES = (
    "wrong-ok",
    "wrong-misbound",
    "missing",
    "unverified-without-reason",
    "inspection-error",
    "misbound-untranslatable",  # beyond the brief: QG001 where reordering cannot help
    "evidence-wrong",  # beyond the brief: one source concluded against the DMA log
    "finding-wrong",  # QG003 (all guest RAM stays mapped) on a device with 0 bytes mapped
)


def truth_of(mapped: int | None) -> Truth:
    if mapped == 0:
        return "translated"
    if mapped is not None and mapped >= RAM:
        return "all-ram"
    return "other"


@dataclass(frozen=True)
class Disagreement:
    cls: str  # one of CLASSES (or "reference-failed", "audit")
    device: str
    detail: str


@dataclass(frozen=True)
class DeviceOutcome:
    path: str
    group: int
    truth: Truth
    verdict: str | None  # None: not in the report
    reference: Truth | None = None  # truth in the vIOMMU-first reference run, if run


@dataclass
class Outcome:
    """One scenario judged: rejected by QEMU, or agreement / disagreements per device."""

    status: Literal["agree", "disagree", "rejected", "harness-error"]
    detail: str = ""
    devices: list[DeviceOutcome] = field(default_factory=list)
    disagreements: list[Disagreement] = field(default_factory=list)
    run: RunResult | None = None
    reference_run: RunResult | None = None

    @property
    def unverified(self) -> int:
        return sum(1 for d in self.devices if d.verdict == "unverified")

    def classes(self) -> set[str]:
        return {d.cls for d in self.disagreements}


def _wrong_sources(
    entry: dict[str, Any], truth: Truth, reference: Callable[[], Truth | None]
) -> list[str]:
    """Evidence sources whose conclusion contradicts the DMA log."""
    out = []
    for e in entry["order"]["evidence"]:
        said = e.get("conclusion")
        if said == "before" and truth == "translated":
            out.append(f"{e['source']} said before: {e['detail']}")
        elif said == "after" and truth == "all-ram" and reference() == "translated":
            out.append(f"{e['source']} said after: {e['detail']}")
    return out


def _report_device(doc: dict[str, Any], dev: VfioPresent) -> dict[str, Any] | None:
    return next((d for d in doc["devices"] if d["path"] == dev.path), None)


def _codes_on(doc: dict[str, Any], path: str) -> set[str]:
    return {f["code"] for f in doc.get("findings", []) if f["device"] == path}


def refused_behind_viommu(scn: Scenario, run: RunResult) -> bool:
    """QEMU refused the VM because a vfio device came after a vIOMMU that cannot notify
    it (amd-iommu on 7.2 or 10.0 with pt=off; -device arm-smmuv3): QEMU's own rule, not
    the generator's mistake."""
    if run.status != "rejected":
        return False
    if scn.viommu_model == "smmu":
        return MAP_NOTIFIER_REFUSAL in run.detail and "Region smmuv3-iommu" in run.detail
    return (
        scn.viommu_model == "amd"
        and not scn.amd_remap
        and NOTIFIER_REFUSAL in run.detail
        and "Region amd_iommu" in run.detail
    )


def judge(
    scn: Scenario,
    run: RunResult,
    reference: Callable[[Scenario], RunResult],
    amd: AmdMode | None = None,
) -> Outcome:
    """Compare qmpguard's report in `run` with the DMA log; `reference` runs a scenario;
    `amd`: what this build does with vfio behind amd-iommu (runner.amd_mode)."""
    if run.status != "ran":
        return Outcome(run.status, run.detail, run=run)  # type: ignore[arg-type]
    out = Outcome("agree", run=run)
    if run.audit_refused:
        out.disagreements.append(Disagreement("audit", "", "; ".join(run.audit_refused)))
    if run.inspection_error is not None or run.doc is None:
        out.disagreements.append(
            Disagreement("inspection-error", "", run.inspection_error or "no report")
        )
        out.devices = [
            DeviceOutcome(v.path, v.group, truth_of(run.mapped.get(v.group)), None)
            for v in run.present
        ]
        out.status = "disagree"
        return out
    ref: list[RunResult] = []
    passthrough = scn.amd_passthrough(amd)
    twin_scn = scn.with_dma_remap() if passthrough and amd is AmdMode.REMAP else None
    twin: list[RunResult] = []

    def twin_truth(group: int, path: str) -> Truth | None:
        """The group's truth in the dma-remap twin (run once, only when needed)."""
        assert twin_scn is not None
        if not twin:
            twin.append(reference(twin_scn))
        if twin[0].status != "ran":
            out.disagreements.append(
                Disagreement("reference-failed", path, f"twin {twin[0].status}: {twin[0].detail}")
            )
            return None
        return truth_of(twin[0].mapped.get(group))

    def reference_truth(group: int, path: str) -> Truth | None:
        """The group's truth with the vIOMMU realized first (run once, only when needed)."""
        if scn.viommu is None:
            return "all-ram"  # no vIOMMU at all: nothing could translate it
        if passthrough and twin_scn is None:
            return None  # all guest RAM in either order: a reference cannot tell
        if not ref:
            ref.append(reference((twin_scn or scn).with_viommu_first()))
            out.reference_run = ref[0]
        if refused_behind_viommu(scn, ref[0]):
            return "translated"  # QEMU would put it behind the vIOMMU (and refuses to)
        if ref[0].status != "ran":
            out.disagreements.append(
                Disagreement("reference-failed", path, f"{ref[0].status}: {ref[0].detail}")
            )
            return None
        return truth_of(ref[0].mapped.get(group))

    for v in run.present:
        truth = truth_of(run.mapped.get(v.group))
        entry = _report_device(run.doc, v)
        verdict = entry["verdict"] if entry else None
        ref_truth: Truth | None = None
        if entry is None:
            out.disagreements.append(Disagreement("missing", v.path, f"group {v.group}"))
        elif (
            passthrough
            and verdict == "ok"
            and truth != "translated"  # 0 bytes mapped (00:14.0 on 10.0.2): nothing to say
            and "QG003" not in _codes_on(run.doc, v.path)
        ):
            out.disagreements.append(
                Disagreement(
                    "wrong-ok",
                    v.path,
                    f"ok without QG003 under amd-iommu pass-through ({truth}, "
                    f"{run.mapped.get(v.group)} bytes mapped); evidence: "
                    f"{entry['order']['evidence']}",
                )
            )
        elif passthrough:
            pass  # all guest RAM in either order: the order is the twin's to tell (below)
        elif verdict == "ok" and truth == "all-ram":
            ref_truth = reference_truth(v.group, v.path)
            if ref_truth is not None and ref_truth != "all-ram":
                out.disagreements.append(
                    Disagreement(
                        "wrong-ok",
                        v.path,
                        f"all guest RAM mapped ({run.mapped.get(v.group)} bytes), "
                        f"{ref_truth} with the vIOMMU first; evidence: "
                        f"{entry['order']['evidence']}",
                    )
                )
        elif verdict == "misbound" and truth == "translated":
            out.disagreements.append(
                Disagreement(
                    "wrong-misbound",
                    v.path,
                    f"0 bytes mapped; evidence: {entry['order']['evidence']}",
                )
            )
        elif verdict == "misbound" and truth == "all-ram":
            # misbound says "reorder and it will be translated": the reference run tells
            ref_truth = reference_truth(v.group, v.path)
            if ref_truth == "all-ram":
                out.disagreements.append(
                    Disagreement(
                        "misbound-untranslatable",
                        v.path,
                        "all guest RAM mapped with the vIOMMU first too: no reordering helps; "
                        f"evidence: {entry['order']['evidence']}",
                    )
                )
        elif verdict == "unverified" and not any(
            (e.get("detail") or "").strip() for e in entry["order"]["evidence"]
        ):
            out.disagreements.append(
                Disagreement("unverified-without-reason", v.path, str(entry["order"]))
            )
        by_twin: Truth | None = None
        if twin_scn is not None and entry is not None:
            by_twin = twin_truth(v.group, v.path)
            ref_truth = _judge_order_by_twin(
                out, v, entry, by_twin, partial(reference_truth, v.group, v.path)
            )
        if entry is not None and truth == "translated" and "QG003" in _codes_on(run.doc, v.path):
            out.disagreements.append(
                Disagreement(
                    "finding-wrong",
                    v.path,
                    f"QG003 says all guest RAM stays mapped, the DMA log maps 0 bytes "
                    f"(verdict {verdict})",
                )
            )
        order_truth = by_twin if passthrough else truth  # pass-through: the twin's
        if entry is not None and order_truth is not None:
            # every source's own conclusion must agree with the DMA log too: one that
            # contradicts it is only outvoted today (a conflict), and decides alone on a
            # VM where the others cannot speak
            wrong = _wrong_sources(entry, order_truth, partial(reference_truth, v.group, v.path))
            if wrong:
                out.disagreements.append(
                    Disagreement(
                        "evidence-wrong",
                        v.path,
                        f"{truth} by the DMA log, verdict {verdict}; " + "; ".join(wrong),
                    )
                )
        out.devices.append(DeviceOutcome(v.path, v.group, truth, verdict, ref_truth))
    if out.disagreements:
        out.status = "disagree"
    return out


def _judge_order_by_twin(
    out: Outcome,
    v: VfioPresent,
    entry: dict[str, Any],
    twin: Truth | None,
    reference: Callable[[], Truth | None],
) -> Truth | None:
    """Pass-through hides the order: the dma-remap twin's DMA log tells it. Returns the
    vIOMMU-first (twin) reference's truth if it was needed."""
    verdict, evidence = entry["verdict"], entry["order"]["evidence"]
    if verdict == "misbound" and twin == "translated":
        out.disagreements.append(
            Disagreement(
                "wrong-misbound",
                v.path,
                f"pass-through; the dma-remap twin maps 0 bytes for it; evidence: {evidence}",
            )
        )
    if verdict == "ok" and twin == "all-ram":
        ref_truth = reference()
        if ref_truth == "translated":
            out.disagreements.append(
                Disagreement(
                    "wrong-ok",
                    v.path,
                    "pass-through; the dma-remap twin maps all guest RAM for it and "
                    f"translates it with the vIOMMU first; evidence: {evidence}",
                )
            )
        return ref_truth
    return None


def evaluate(scn: Scenario, qemu: QemuBinary, workdir: Path, built: Built) -> Outcome:
    """Run `scn` (and, only when needed, its vIOMMU-first reference) and judge it."""
    run = run_scenario(scn, qemu, workdir / "run", built)
    amd = amd_mode(qemu) if scn.viommu_model == "amd" else None
    return judge(scn, run, lambda ref: run_scenario(ref, qemu, workdir / "reference", built), amd)


def _evidence(run: RunResult | None, path: str) -> list[str]:
    """The order evidence qmpguard gave a device (for unverified ones in records)."""
    doc = run.doc if run else None
    dev = next((d for d in (doc or {}).get("devices", []) if d["path"] == path), None)
    return [
        f"{e['source']}: {e['conclusion'] or 'inconclusive'}: {e['detail']}"
        for e in (dev or {}).get("order", {}).get("evidence", [])
    ]


def summary(out: Outcome) -> dict[str, Any]:
    """A plain-data record of one judged run (for bench results and failure messages)."""
    run = out.run
    return {
        "status": out.status,
        "detail": out.detail,
        "disagreements": [
            {"class": d.cls, "device": d.device, "detail": d.detail} for d in out.disagreements
        ],
        "devices": [
            {
                "path": d.path,
                "group": d.group,
                "truth": d.truth,
                "verdict": d.verdict,
                "reference": d.reference,
                **({"evidence": _evidence(run, d.path)} if d.verdict == "unverified" else {}),
            }
            for d in out.devices
        ],
        "argv": run.argv if run else [],
        "readconfig": run.readconfig if run else "",
        "seconds": (run.seconds if run else 0.0)
        + (out.reference_run.seconds if out.reference_run else 0.0),
        "findings": [
            {"code": f["code"], "device": f["device"]} for f in (run.doc or {}).get("findings", [])
        ]
        if run and run.doc
        else [],
    }
