"""Generated QEMU scenarios judged by the DMA log (issue 11), and the regression corpus.

Per QEMU build of the test matrix: a fixed set of hypothesis examples (derandomized, so
CI runs the same ones every time; a failure shrinks to a small command line) and every
corpus case. Each VM runs with the VFIO emulation; its DMA log says what each vfio
device really has mapped, and qmpguard's verdicts must agree (tests/generator/oracle.py).
Every command qmpguard sends is audited through QEMU's trace, as in conftest.

More runs, with a table per scenario class: `python -m bench.scenarios`.
"""

from __future__ import annotations

import json
import re
import shutil
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import QEMU_ARM_MATRIX, QEMU_MATRIX, requires_qemu
from tests.generator.corpus import CASES, Case, known_open
from tests.generator.model import AmdMode, QemuBinary, Scenario
from tests.generator.oracle import Outcome, evaluate, refused_behind_viommu, summary
from tests.generator.runner import Built, accepts_unusual_ids, amd_mode, qemu_version
from tests.generator.strategies import arm_scenarios, scenarios

pytestmark = [pytest.mark.integration, requires_qemu]

#: examples per QEMU build: about 0.4 s each on 2 cores, so the whole file (3 builds,
#: corpus included) stays within about 3 minutes
EXAMPLES_PER_QEMU = 40
#: amd-iommu examples per build (the mix above draws hardly any: hypothesis'
#: derandomized start favours the first choices): about 1 s each with the AMD-Vi guest
AMD_EXAMPLES_PER_QEMU = 8
#: aarch64 virt examples per ARM build (under -S: about 0.3 s each)
ARM_EXAMPLES_PER_QEMU = 10


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built.build(tmp_path_factory.mktemp("fakevfio"))


def _explain(out: Outcome) -> str:
    rec = summary(out)
    rec["argv"] = " ".join(a if re.fullmatch(r"[\w./:=,@+-]+", a) else repr(a) for a in rec["argv"])
    return json.dumps(rec, indent=1)


def _agree_on(
    qemu: QemuBinary,
    strategy: st.SearchStrategy[Scenario],
    examples: int,
    built: Built,
    tmp_path: Path,
) -> list[str]:
    """Run `examples` derandomized scenarios of `strategy`; every disagreement fails (but
    an open class with its own strict xfail in the corpus). Returns QEMU's refusals of
    its own version rule (vfio after a 7.2 amd-iommu: not the generator's mistake)."""
    numbers = count()
    rejected: list[str] = []
    refused: list[str] = []

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def scenario_agrees(scn: Scenario) -> None:
        out = evaluate(scn, qemu, tmp_path / f"s{next(numbers)}", built)
        if out.run is not None and refused_behind_viommu(scn, out.run):
            refused.append(out.detail)
            return
        if out.status == "rejected":
            rejected.append(f"{out.detail}\n  {json.dumps(scn.to_json())}")
            return
        assert out.status != "harness-error", out.detail
        if out.disagreements and known_open(scn, out.classes()):
            return  # an open class with its own strict xfail in the corpus
        assert not out.disagreements, _explain(out)

    scenario_agrees()
    # QEMU refusing a generated line is the generator's mistake: never agreement
    assert not rejected, "\n".join(rejected)
    return refused


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_generated_scenarios_agree_with_the_dma_log(
    label: str, built: Built, tmp_path: Path
) -> None:
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    strategy = scenarios(unusual_ids=accepts_unusual_ids(qemu), amd=amd_mode(qemu))
    _agree_on(qemu, strategy, EXAMPLES_PER_QEMU, built, tmp_path)


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_generated_amd_iommu_scenarios_agree_with_the_dma_log(
    label: str, built: Built, tmp_path: Path
) -> None:
    """amd-iommu as this build has it: dma-remap=on translating (10.1+), pass-through
    (10.0; 10.1+ without dma-remap), or refusing vfio realized after it (7.2)."""
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    mode = amd_mode(qemu)
    strategy = scenarios(accepts_unusual_ids(qemu), amd=mode, only=("amd",))
    refused = _agree_on(qemu, strategy, AMD_EXAMPLES_PER_QEMU, built, tmp_path)
    if mode is not AmdMode.REFUSES:
        assert not refused, refused  # only 7.2 refuses vfio behind its amd-iommu


@pytest.mark.parametrize("label", list(QEMU_ARM_MATRIX), ids=lambda lb: f"aarch64-{lb}")
def test_generated_arm_scenarios_agree_with_the_dma_log(
    label: str, built: Built, tmp_path: Path
) -> None:
    """aarch64 virt: virtio-iommu-pci anywhere in the order, and from 10.2 a
    `-device arm-smmuv3`, which QEMU refuses vfio realized after."""
    path = QEMU_ARM_MATRIX[label]
    if shutil.which(path) is None and not Path(path).exists():
        pytest.skip(f"{path} not installed")
    qemu = QemuBinary.resolve(path)
    smmu = qemu_version(qemu) >= (10, 2)
    refused = _agree_on(qemu, arm_scenarios(smmu=smmu), ARM_EXAMPLES_PER_QEMU, built, tmp_path)
    assert smmu or not refused, refused  # only the SMMUv3 device refuses


def _corpus_params() -> list[Any]:
    params = []
    for case in CASES:
        for label in QEMU_MATRIX:
            marks = (
                [pytest.mark.xfail(strict=True, reason=case.name)]
                if label in case.failing_on or "all" in case.failing_on
                else []
            )
            slug = re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")[:60]
            params.append(pytest.param(case, label, marks=marks, id=f"{slug}-qemu-{label}"))
    return params


@pytest.mark.parametrize(("case", "label"), _corpus_params())
def test_corpus(case: Case, label: str, built: Built, tmp_path: Path) -> None:
    qemu = QemuBinary.resolve(QEMU_MATRIX[label])
    if case.amd and amd_mode(qemu) not in case.amd:
        pytest.skip(f"describes amd-iommu on {[m.value for m in case.amd]} builds only")
    unusual = any(
        d.id is not None and not re.fullmatch(r"[A-Za-z][\w.-]*", d.id)
        for d in case.scenario.devices
    )
    if unusual and not accepts_unusual_ids(qemu):
        pytest.skip("this QEMU refuses ids outside id_wellformed() (Invalid qdev ID)")
    out = evaluate(case.scenario, qemu, tmp_path, built)
    assert out.status in ("agree", "disagree"), f"{out.status}: {out.detail}"
    by_group = {d.group: d for d in out.devices}
    # the case is what it claims: QEMU's DMA log per group
    assert {g: by_group[g].truth for g in case.truth if g in by_group} == case.truth, _explain(out)
    problems = [f"{d.cls}: {d.device!r} {d.detail}" for d in out.disagreements]
    problems += [
        f"group {g}: verdict {by_group[g].verdict}, expected {v}"
        for g, v in case.verdicts.items()
        if by_group[g].verdict != v
    ]
    assert out.run is not None and out.run.doc is not None
    for check in case.checks:
        problems += check(out.run.doc)
    assert not problems, "\n".join(problems) + "\n" + _explain(out)


def test_dma_log_maps_groups_to_their_container_bytes(tmp_path: Path) -> None:
    """fakevfio's attach/detach lines tie each group to a container and its bytes."""
    from qmpguard.demo.fakevfio import attached_groups, mapped_bytes_by_group

    log = tmp_path / "dma.log"
    log.write_text(
        "attach g=1 c=1\n"
        "map c=1 iova=0x0 size=0x4000000 vaddr=0x7f0000000000\n"
        "attach g=2 c=2\n"
        "attach g=3 c=1\n"  # shares container 1 (same address space)
        "map c=2 iova=0x0 size=0x1000 vaddr=0x7f0000000000\n"
        "unmap c=2 iova=0x0 size=0x1000\n"
        "detach g=3 c=1\n"
        "attach g=4 c=3\n"
        "detach g=4 c=3\n"
        "attach g=4 c=1\n"  # re-plugged
    )
    assert attached_groups(log) == {1: 1, 2: 2, 4: 1}
    assert mapped_bytes_by_group(log) == {1: 0x4000000, 2: 0, 4: 0x4000000}


def test_scenarios_round_trip_through_json() -> None:
    """A failing scenario written by bench/scenarios.py replays as the same scenario."""
    for case in CASES:
        again = Scenario.from_json(json.loads(json.dumps(case.scenario.to_json())))
        assert again == case.scenario
