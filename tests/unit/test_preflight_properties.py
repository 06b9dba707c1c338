"""Properties of preflight and its fixes over the scenario generator's command lines
(tests/generator), rendered without running anything: preflight and the fixes never
raise; a vIOMMU realized before every vfio device (or none at all) leaves nothing
misbound; every corrected command line is free of QG001 by preflight's own reading.
Live agreement with check and the DMA log: tests/integration/test_preflight_generated.py.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings

from qmpguard.analysis.model import Verdict
from qmpguard.analysis.preflight import preflight
from qmpguard.fix import fixes
from tests.generator.model import QemuBinary, RenderContext, Scenario, render
from tests.generator.strategies import scenarios

WORKDIR = Path("/nonexistent-qmpguard-preflight-properties")


def _preflight_of(scn: Scenario) -> tuple[list[str], dict[str, str]]:
    ctx = RenderContext(
        WORKDIR, QemuBinary("qemu-system-x86_64", "qemu-system-x86_64"), WORKDIR / "g", 1
    )
    rendered = render(scn, ctx)
    files = {str(p): text for p, text in rendered.files.items()}
    files |= {p.name: text for p, text in rendered.files.items()}  # relative -readconfig
    return rendered.argv, files


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios(unusual_ids=True))
def test_preflight_and_its_fixes_on_generated_command_lines(scn: Scenario) -> None:
    argv, files = _preflight_of(scn)
    vm = preflight(argv, files).analysis()
    misbound = [d for d in vm.devices if d.verdict is Verdict.MISBOUND]
    if scn.viommu is None or scn.placement() == "before":
        assert not misbound, [d.device.label for d in misbound]
    for fix in fixes(vm):
        if fix.argv is None:
            continue
        after = preflight(list(fix.argv), files).analysis()
        still = [d.device.label for d in after.devices if d.verdict is Verdict.MISBOUND]
        assert not still, (fix.text, still)
