"""Python side of the VFIO emulation (fakevfio.c): build it, describe devices, read its log."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fakevfio.c")
_LOG_LINE = re.compile(
    r"(map|unmap) c=(\d+) iova=0x([0-9a-f]+) size=0x([0-9a-f]+)(?: vaddr=0x[0-9a-f]+)?"
)
_GROUP_LINE = re.compile(r"(attach|detach) g=(\d+) c=(-?\d+)")


class UnsafeCacheError(RuntimeError):
    """A build cache directory another user could write: nothing in it may be loaded."""


def private_cache_dir() -> Path:
    """$XDG_CACHE_HOME/qmpguard (or ~/.cache/qmpguard), created 0700 and checked private.

    UnsafeCacheError if it exists but is not ours alone; OSError if it cannot be made.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    cache = root / "qmpguard"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_private_dir(cache)
    return cache


def ensure_private_dir(path: Path) -> None:
    """UnsafeCacheError unless `path` is a directory owned by us, writable by no one else."""
    st = os.stat(path)
    problem = _not_private(st, stat.S_ISDIR, "a directory")
    if problem:
        raise UnsafeCacheError(f"refusing build cache {path}: {problem}")


def _not_private(st: os.stat_result, is_kind: Callable[[int], bool], kind: str) -> str | None:
    if not is_kind(st.st_mode):
        return f"not {kind}"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def cached_name(source: Path, stem: str, suffix: str) -> str:
    """The file name a build of `source` is cached under (a hash of the source)."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return f"{stem}-{digest}{suffix}"


def _build_cached(source: Path, cache_dir: Path, stem: str, suffix: str, flags: list[str]) -> Path:
    """Compile `source` with gcc into cache_dir, named by a hash of the source; reuse it.

    What is built here is loaded into QEMU (LD_PRELOAD), so the directory must be private
    (UnsafeCacheError otherwise) and a cached file is reused only if it is a regular file
    of ours that no one else can write; anything else is replaced by a fresh build.
    """
    ensure_private_dir(cache_dir)
    out = cache_dir / cached_name(source, stem, suffix)
    with contextlib.suppress(FileNotFoundError):
        if _not_private(os.lstat(out), stat.S_ISREG, "a regular file") is None:
            return out
        out.unlink()  # not ours (or writable by others): never loaded, rebuilt
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            ["gcc", *flags, "-o", str(tmp), str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.name} failed: {proc.stderr.strip()}")
        tmp.chmod(0o755)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def build_emulation(cache_dir: Path) -> Path:
    """The LD_PRELOAD library built from fakevfio.c."""
    return _build_cached(
        SOURCE,
        cache_dir,
        "fakevfio",
        ".so",
        ["-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-ldl"],
    )


@dataclass(frozen=True)
class VfioDeviceSpec:
    """One emulated assignable device: its sysfs-style name and IOMMU group number."""

    name: str  # e.g. "0000:01:00.0"; QEMU uses the directory's basename as the device name
    group: int


def create_sysfs_device(root: Path, spec: VfioDeviceSpec) -> Path:
    """Create DIR for `-device vfio-pci,sysfsdev=DIR` (an `iommu_group` symlink in it)."""
    device_dir = root / spec.name
    device_dir.mkdir(parents=True, exist_ok=True)
    link = device_dir / "iommu_group"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(f"../../../kernel/iommu_groups/{spec.group}")
    return device_dir


def emulation_env(so_path: Path, dma_log: Path) -> dict[str, str]:
    """Environment for a QEMU process that should see the emulated VFIO devices."""
    return {"LD_PRELOAD": str(so_path), "QMPGUARD_VFIO_DMA_LOG": str(dma_log)}


def mapped_bytes(dma_log: Path) -> dict[int, int]:
    """Bytes still DMA-mapped per container at the end of the log (maps minus unmaps).

    Intervals are tracked exactly, so partial unmaps (which type1 allows) are honoured.
    """
    maps: dict[int, list[tuple[int, int]]] = {}
    if not dma_log.exists():
        return {}
    for line in dma_log.read_text().splitlines():
        m = _LOG_LINE.fullmatch(line.strip())
        if not m:
            continue
        op, container = m.group(1), int(m.group(2))
        start, size = int(m.group(3), 16), int(m.group(4), 16)
        ranges = maps.setdefault(container, [])
        if op == "map":
            ranges.append((start, start + size))
            continue
        end = start + size
        kept = []
        for a, b in ranges:
            if b <= start or a >= end:
                kept.append((a, b))
                continue
            if a < start:
                kept.append((a, start))
            if b > end:
                kept.append((end, b))
        maps[container] = kept
    return {c: sum(b - a for a, b in r) for c, r in maps.items()}


def attached_groups(dma_log: Path) -> dict[int, int]:
    """Group -> the container it is attached to at the end of the log (detached: absent).

    QEMU attaches each group of a vfio device to the container of the device's DMA
    address space (sharing one container between groups in the same space).
    """
    groups: dict[int, int] = {}
    if not dma_log.exists():
        return groups
    for line in dma_log.read_text().splitlines():
        m = _GROUP_LINE.fullmatch(line.strip())
        if not m:
            continue
        group, container = int(m.group(2)), int(m.group(3))
        if m.group(1) == "attach":
            groups[group] = container
        elif groups.get(group) == container:
            del groups[group]
    return groups


def mapped_bytes_by_group(dma_log: Path) -> dict[int, int]:
    """Bytes still DMA-mapped for each attached group: those of the container it is in."""
    per_container = mapped_bytes(dma_log)
    return {g: per_container.get(c, 0) for g, c in attached_groups(dma_log).items()}


GUEST_SOURCE = Path(__file__).with_name("vtd_guest.S")


def build_vtd_guest(cache_dir: Path) -> Path:
    """The multiboot guest that enables VT-d translation, built from vtd_guest.S."""
    return _build_cached(
        GUEST_SOURCE,
        cache_dir,
        "vtd-guest",
        ".elf",
        [
            "-m32",
            "-nostdlib",
            "-static",
            "-ffreestanding",
            "-Wl,-Ttext=0x100000",
            "-Wl,--build-id=none",
            "-Wl,-e,_start",
            "-Wl,-z,max-page-size=0x1000",
        ],
    )


AMD_GUEST_SOURCE = Path(__file__).with_name("amd_guest.S")


def build_amd_guest(cache_dir: Path) -> Path:
    """The multiboot guest that enables AMD-Vi DMA translation, built from amd_guest.S."""
    return _build_cached(
        AMD_GUEST_SOURCE,
        cache_dir,
        "amd-guest",
        ".elf",
        [
            "-m32",
            "-nostdlib",
            "-static",
            "-ffreestanding",
            "-Wl,-Ttext=0x100000",
            "-Wl,--build-id=none",
            "-Wl,-e,_start",
            "-Wl,-z,max-page-size=0x1000",
        ],
    )
