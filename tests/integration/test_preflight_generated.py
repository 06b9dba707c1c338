"""The preflight contract (issue 16), on every live scenario of the generator: the
regression corpus and a fixed set of generated scenarios per QEMU build.

1. `preflight` of the scenario's command line and `check` of the running VM agree on
   every vfio verdict (tests/generator/preflight_runs.py, agreement()): the same verdict;
   or preflight unverified with its reason while check concludes; never ok against
   misbound. Where both conclude, the expected binding agrees too, and preflight's
   conclusions agree with the DMA log.
2. Every fix is proven: for each scenario with a vfio device realized before its
   vIOMMU, preflight's corrected command line is started with the VFIO emulation (the
   VT-d guest for intel-iommu, boot-bypass=false for virtio-iommu-pci); the DMA log
   shows 0 bytes mapped for every vfio device behind a vIOMMU, and `check` says ok.

A scenario added to the corpus (tests/generator/corpus.py) or to the strategies is
checked both ways without touching this file.
"""

from __future__ import annotations

import json
import re
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from qmpguard.analysis.model import Verdict
from tests.conftest import QEMU_MATRIX, requires_qemu
from tests.generator.corpus import CASES, KNOWN_OPEN, Case
from tests.generator.model import QemuBinary, RenderContext, Scenario, render
from tests.generator.preflight_runs import (
    Agreement,
    agreement,
    prove_fix,
    rendered_preflight,
)
from tests.generator.runner import Built, accepts_unusual_ids, run_scenario
from tests.generator.strategies import scenarios

pytestmark = [pytest.mark.integration, requires_qemu]

#: generated scenarios per QEMU build for the agreement (about 0.4 s each)
AGREEMENT_EXAMPLES = 40
#: generated scenarios per QEMU build drawn for fixes (only the misbound ones run: twice)
FIX_EXAMPLES = 40


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built.build(tmp_path_factory.mktemp("fakevfio"))


def _unusual(scn: Scenario) -> bool:
    return any(d.id is not None and not re.fullmatch(r"[A-Za-z][\w.-]*", d.id) for d in scn.devices)


#: corpus cases open against the DMA log: preflight agrees with check on them, not the log
OPEN = {k.name for k in KNOWN_OPEN}


def _corpus() -> list[Any]:
    params = []
    for case in CASES:
        slug = re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")[:60]
        for label in QEMU_MATRIX:
            # a case open against the DMA log (corpus.KNOWN_OPEN) is open for preflight too
            open_on = case.name in OPEN and (label in case.failing_on or "all" in case.failing_on)
            marks = [pytest.mark.xfail(strict=True, reason=case.name)] if open_on else []
            params.append(pytest.param(case, label, id=f"{slug}-qemu-{label}", marks=marks))
    return params


def _explain(scn: Scenario, argv: list[str], result: Agreement | None = None) -> str:
    rec: dict[str, Any] = {"scenario": scn.to_json(), "argv": argv}
    if result is not None:
        rec |= {"problems": result.problems, "allowed": result.allowed}
    return json.dumps(rec, indent=1)


def _agree(scn: Scenario, qemu: QemuBinary, workdir: Path, built: Built) -> Agreement | str:
    run = run_scenario(scn, qemu, workdir, built)
    if run.status != "ran":
        return f"{run.status}: {run.detail}"
    if run.inspection_error is not None or run.doc is None:
        # check itself failed: the DMA-log oracle (test_generated.py) reports that
        return f"check failed: {run.inspection_error}"
    result = agreement(scn, run, workdir)
    assert not result.problems, _explain(scn, run.argv, result)
    return result


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_preflight_agrees_with_check_on_generated_scenarios(
    label: str, built: Built, tmp_path: Path
) -> None:
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    numbers = count()
    compared: list[int] = []
    skipped: list[str] = []

    @settings(
        max_examples=AGREEMENT_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(scenarios(unusual_ids=accepts_unusual_ids(qemu)))
    def agrees(scn: Scenario) -> None:
        result = _agree(scn, qemu, tmp_path / f"s{next(numbers)}", built)
        if isinstance(result, str):
            skipped.append(result)
        else:
            compared.append(result.compared)

    agrees()
    assert sum(compared) >= AGREEMENT_EXAMPLES // 2, (compared, skipped)
    # QEMU refusing a generated line is test_generated.py's failure; here it only must
    # not hide the whole run
    assert len(skipped) <= AGREEMENT_EXAMPLES // 4, skipped


@pytest.mark.parametrize(("case", "label"), _corpus())
def test_preflight_agrees_with_check_on_corpus(
    case: Case, label: str, built: Built, tmp_path: Path
) -> None:
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    if _unusual(case.scenario) and not accepts_unusual_ids(qemu):
        pytest.skip("this QEMU refuses ids outside id_wellformed() (Invalid qdev ID)")
    result = _agree(case.scenario, qemu, tmp_path, built)
    if isinstance(result, str):
        pytest.skip(result)
    assert (
        result.compared
        or not case.truth
        or all(op.group in case.truth for op in case.scenario.hotplug)
    ), "no vfio device compared"


def _misbound_by_preflight(scn: Scenario, qemu: QemuBinary, workdir: Path, built: Built) -> bool:
    """Pure: would preflight find a vfio device realized before its vIOMMU? (No QEMU.)"""
    argv = render(scn, RenderContext(workdir, qemu, built.guest, 1, built.amd_guest)).argv
    devices = rendered_preflight(scn, argv, workdir, built).analysis().devices
    return any(d.verdict is Verdict.MISBOUND for d in devices)


def _assert_proven(scn: Scenario, qemu: QemuBinary, workdir: Path, built: Built) -> str:
    proof = prove_fix(scn, qemu, workdir, built)
    if proof.status in ("rejected", "harness-error", "check-failed"):
        return f"{proof.status}: {proof.detail}"
    if (
        proof.status == "nothing-to-fix"
        and "unverified" in proof.detail
        and "ok" not in (proof.detail.replace("unverified", ""))
    ):
        # preflight cannot see the misordering (it says why): there is no fix to prove
        return f"preflight cannot conclude: {proof.detail}"
    argv = proof.after.argv if proof.after else (proof.before.argv if proof.before else [])
    assert proof.status == "proven", f"{proof.status}: {proof.detail}\n{proof.fixes}\n" + _explain(
        scn, argv
    )
    # the DMA log proves it either way; check may be unable to order anonymous devices
    # next to an implicit one (-drive if=virtio): then it says unverified, with why
    return "proven, check ok" if not proof.check_unverified else "proven, check unverified"


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_fixes_proven_on_generated_scenarios(label: str, built: Built, tmp_path: Path) -> None:
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    numbers = count()
    outcomes: list[str] = []

    @settings(
        max_examples=FIX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(scenarios(unusual_ids=accepts_unusual_ids(qemu)))
    def fixed(scn: Scenario) -> None:
        workdir = tmp_path / f"s{next(numbers)}"
        if not _misbound_by_preflight(scn, qemu, workdir / "probe", built):
            return
        outcomes.append(_assert_proven(scn, qemu, workdir, built))

    fixed()
    assert all(o.startswith("proven") for o in outcomes), outcomes
    assert outcomes.count("proven, check ok") >= 3, outcomes


@pytest.mark.parametrize(
    ("case", "label"),
    [p for p in _corpus() if "misbound" in p.values[0].verdicts.values()],
)
def test_fixes_proven_on_corpus(case: Case, label: str, built: Built, tmp_path: Path) -> None:
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    if _unusual(case.scenario) and not accepts_unusual_ids(qemu):
        pytest.skip("this QEMU refuses ids outside id_wellformed() (Invalid qdev ID)")
    outcome = _assert_proven(case.scenario, qemu, tmp_path, built)
    if not outcome.startswith("proven"):
        pytest.skip(outcome)
    assert outcome == "proven, check ok"
