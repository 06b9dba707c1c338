"""Target strings -> Target: `/path.qmp`, `unix:/path`, `tcp:host:port`, `libvirt:dom[@uri]`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

TargetKind = Literal["unix", "tcp", "libvirt"]
DEFAULT_LIBVIRT_URI = "qemu:///system"


class TargetError(ValueError):
    """A target string that cannot be parsed."""


@dataclass(frozen=True)
class Target:
    """Where a QEMU monitor is reached."""

    kind: TargetKind
    address: str  # socket path, "host:port", or libvirt domain name
    uri: str | None = None  # libvirt connection URI

    @property
    def name(self) -> str:
        """A stable, human name for reports and metrics."""
        if self.kind == "libvirt":
            return f"libvirt:{self.address}" + (
                f"@{self.uri}" if self.uri and self.uri != DEFAULT_LIBVIRT_URI else ""
            )
        return f"{self.kind}:{self.address}"

    @property
    def tcp_host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


def _unix(text: str, path: str) -> Target:
    if not path:
        raise TargetError("unix: target without a path")
    return Target("unix", path)


def _tcp(text: str, hostport: str) -> Target:
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"tcp target must be tcp:HOST:PORT, got {text!r}")
    return Target("tcp", hostport)


def _libvirt(text: str, rest: str) -> Target:
    dom, _, uri = rest.partition("@")
    if not dom:
        raise TargetError("libvirt target must be libvirt:DOMAIN[@URI]")
    return Target("libvirt", dom, uri or DEFAULT_LIBVIRT_URI)


#: A target's explicit kind prefix and how the rest is read (TargetError if it cannot).
_PREFIXES: tuple[tuple[str, Callable[[str, str], Target]], ...] = (
    ("unix:", _unix),
    ("tcp:", _tcp),
    ("libvirt:", _libvirt),
)


def parse_target(text: str) -> Target:
    """Parse one target string; raise TargetError with a one-line reason.

    A bare socket path (absolute, relative with ./ or ../, or ending in .qmp/.sock) is
    a unix target, so a path from `ps` or libvirt's XML can be pasted as it is."""
    if not text or text != text.strip():
        raise TargetError(f"empty or padded target: {text!r}")
    for prefix, parse in _PREFIXES:
        if text.startswith(prefix):
            return parse(text, text[len(prefix) :])
    if text.startswith(("/", "./", "../")) or text.endswith((".qmp", ".sock")):
        return Target("unix", text)
    raise TargetError(
        f"cannot parse target {text!r}: use a socket path, unix:PATH, tcp:HOST:PORT "
        "or libvirt:DOMAIN[@URI]"
    )
