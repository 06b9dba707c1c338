"""tests/conftest.py's session rules: only the whole suite, on the whole QEMU matrix, passed,
rewrites README.md's compatibility table; which tests pytest-xdist keeps on one worker."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import (
    COMPAT_END,
    COMPAT_START,
    ReadmeTable,
    RunScope,
    partial_run_reason,
    rewrite_readme_table,
    xdist_scope,
)

FULL = RunScope(selected=frozenset({"tests"}), testpaths=frozenset({"tests"}))


def test_the_whole_suite_on_the_whole_matrix_passed_is_a_full_run() -> None:
    assert partial_run_reason(FULL) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"selected": frozenset({"tests/unit"})}, "tests selected (tests/unit)"),
        ({"selected": frozenset({"tests", "tests/unit"})}, "tests selected"),
        ({"selected": frozenset({"tests/integration/test_daemon.py::test_tls"})}, "selected"),
        ({"keyword": "daemon"}, "-k/-m"),
        ({"markexpr": "not integration"}, "-k/-m"),
        ({"deselected": 1}, "1 tests deselected"),
        ({"reruns_only_some": True}, "--lf/--sw"),
        ({"missing_qemu": frozenset({"10.0 (x86_64)"})}, "no 10.0 (x86_64)"),
        ({"prerequisite_skips": 3}, "3 tests skipped for want of a tool or service"),
        ({"passed": False}, "did not pass"),
    ],
)
def test_anything_less_is_partial(change: dict[str, object], reason: str) -> None:
    got = partial_run_reason(replace(FULL, **change))  # type: ignore[arg-type]
    assert got is not None and reason in got


def test_the_table_is_rewritten_between_the_markers_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{COMPAT_START}\n| old |\n{COMPAT_END}\ntail\n")
    assert rewrite_readme_table(readme, "| new |") is ReadmeTable.REWRITTEN
    assert readme.read_text() == f"# x\n{COMPAT_START}\n| new |\n{COMPAT_END}\ntail\n"
    assert rewrite_readme_table(readme, "| new |") is ReadmeTable.UNCHANGED
    readme.write_text("no markers\n")
    assert rewrite_readme_table(readme, "| new |") is ReadmeTable.NO_MARKERS
    assert readme.read_text() == "no markers\n"


def test_libvirt_modules_are_one_unit_of_work_and_other_tests_their_own() -> None:
    libvirt = [
        "tests/integration/test_libvirt.py::test_libvirt_without_viommu",
        "tests/integration/test_discovery_libvirt.py::test_x[a]",
        "tests/integration/test_preflight_libvirt.py::test_y",
    ]
    assert {xdist_scope(n) for n in libvirt} == {"libvirtd"}
    other = "tests/integration/test_check_live.py::test_z[qemu-10.0]"
    assert xdist_scope(other) == other
