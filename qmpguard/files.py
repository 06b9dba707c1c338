"""Bounded reads of input files: regular files only, a size limit, never a hang.

`/dev/zero` would grow memory without bound and a FIFO would block the reader for ever;
both are refused before a byte is read. Errors are `InputFileError` with a one-line
message naming the file.
"""

from __future__ import annotations

import errno
import os
import stat

KIB = 1024
MIB = 1024 * KIB


class InputFileError(ValueError):
    """An input file that cannot be used: unreadable, not a regular file, too big, not text."""


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n} bytes"


def read_bytes_bounded(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The contents of regular file `path`, at most `limit` bytes; InputFileError otherwise.

    Opened with O_NONBLOCK so a FIFO cannot block the open; its type is checked on the
    open descriptor (no race with a rename); the read stops one byte past the limit.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # open() of a UNIX socket
            raise InputFileError(f"{what} {name} is a socket, not a regular file") from None
        raise InputFileError(f"cannot read {what} {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{what} {name} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise InputFileError(f"{what} {name} is larger than {_size(limit)}")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(limit + 1 - total, MIB))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # grew while being read
            raise InputFileError(f"{what} {name} is larger than {_size(limit)}")
        return b"".join(chunks)
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_text_bounded(path: str | os.PathLike[str], limit: int, what: str) -> str:
    """Like read_bytes_bounded, decoded as UTF-8 (InputFileError if it is not)."""
    data = read_bytes_bounded(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{what} {os.fspath(path)} is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None
