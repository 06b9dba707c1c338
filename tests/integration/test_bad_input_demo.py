"""The demo never loads a VFIO emulation library another user could have planted.

Before issue 12 it preloaded `$TMPDIR/qmpguard-demo-cache/fakevfio-<sha>.so` into QEMU
whoever owned it: a library planted there by `nobody` ran as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpguard.demo.fakevfio import SOURCE, cached_name
from tests.conftest import requires_qemu
from tests.integration.support import assert_one_line_error, qmpguard

pytestmark = pytest.mark.integration
NOBODY = 65534

PLANTED_C = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    int fd = open(MARKER, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0) close(fd);
}
"""


def plant_library(path: Path, marker: Path, tmp: Path) -> None:
    """A library owned by `nobody` whose constructor creates `marker` when loaded."""
    src = tmp / "planted.c"
    src.write_text(PLANTED_C)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(path), str(src)],
        check=True,
        capture_output=True,
    )
    path.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A $TMPDIR short enough for the demo's QMP sockets wherever pytest puts tmp_path
    (a pytest-xdist worker's tmp_path is deeper than the 107 bytes a socket path may have)."""
    path = Path(tempfile.mkdtemp(prefix="qg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant as nobody")


@root_only
@requires_qemu
@pytest.mark.parametrize("where", ["old-tmp-cache", "private-cache"])
def test_demo_never_loads_a_planted_library(tmp_path: Path, short_tmp: Path, where: str) -> None:
    tmpdir, cache = short_tmp, tmp_path / "cache"
    marker = tmp_path / "PLANTED-LIBRARY-RAN"
    name = cached_name(SOURCE, "fakevfio", ".so")
    if where == "old-tmp-cache":  # the shared path older demos used: anyone could create it
        planted = tmpdir / "qmpguard-demo-cache" / name
        plant_library(planted, marker, tmp_path)
        os.chown(planted.parent, NOBODY, NOBODY)
    else:  # our own cache directory, but the file in it is not ours
        planted = cache / "qmpguard" / name
        planted.parent.mkdir(parents=True, mode=0o700)
        plant_library(planted, marker, tmp_path)
    proc = qmpguard(
        "demo",
        "--format",
        "json",
        env={"TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(cache)},
        timeout=120,
        limit_memory=False,  # QEMU's TCG reserves 1 GiB
    )
    assert not marker.exists(), "the planted library was loaded into QEMU"
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    built = cache / "qmpguard" / name
    assert built.stat().st_uid == os.geteuid() and not built.stat().st_mode & 0o022
    assert (cache / "qmpguard").stat().st_mode & 0o777 == 0o700


@root_only
@pytest.mark.parametrize("problem", ["owned-by-nobody", "group-writable"])
def test_demo_refuses_a_cache_directory_others_can_write(tmp_path: Path, problem: str) -> None:
    cache = tmp_path / "cache"
    marker = tmp_path / "PLANTED-LIBRARY-RAN"
    planted = cache / "qmpguard" / cached_name(SOURCE, "fakevfio", ".so")
    plant_library(planted, marker, tmp_path)
    if problem == "owned-by-nobody":
        os.chown(planted.parent, NOBODY, NOBODY)
        planted.parent.chmod(0o755)
        needle = f"owned by uid {NOBODY}, not by uid 0"
    else:
        os.chown(planted, 0, 0)
        planted.parent.chmod(0o775)
        needle = "writable by group or others (mode 775)"
    proc = qmpguard("demo", env={"XDG_CACHE_HOME": str(cache)}, timeout=60)
    assert not marker.exists()
    line = assert_one_line_error(proc, needle)
    assert line.startswith(f"qmpguard demo: refusing build cache {cache / 'qmpguard'}")
    assert proc.stdout == ""


def test_demo_refuses_a_temporary_directory_too_deep_for_a_socket(tmp_path: Path) -> None:
    """A $TMPDIR deeper than a unix socket path allows: one line, exit 3, no QEMU started.

    Before, QEMU's socket was bound in the forked child and the failure surfaced as a
    traceback ("Exception occurred in preexec_fn")."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    proc = qmpguard("demo", env={"TMPDIR": str(deep)}, timeout=60)
    line = assert_one_line_error(proc, "a unix socket path is at most 107")
    assert line.startswith(f"qmpguard demo: QMP socket path {deep}/qmpguard-demo-")
    assert proc.stdout == ""
