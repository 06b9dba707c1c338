"""What a reload (SIGHUP) may change, and the checks a config passes before it is used.

Every setting applies at run time except the listening address: the token and TLS
files on the next request or connection, discovery (globs, targets, libvirt URIs,
process discovery, hold) at the next rescan, interval, timeouts and concurrency at once.
A config that fails any check here is refused whole: the running one stays.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import fields

from qmpguard.daemon.settings import Settings

#: Settings a running daemon does not (fully) take, and why: named in one log line.
NOT_AT_RUN_TIME = {
    "listen": "the listening socket is bound at start: restart to move it",
    # Applied for discovery (the rescan lists the new URIs' domains), but libvirt's
    # lifecycle events stay subscribed to the URIs the daemon started with.
    "libvirt_uris": "start/stop events only for the URIs given at start until a restart "
    "(domains of new URIs are found by the rescan)",
}
#: Never logged by value.
SECRET = frozenset({"token"})


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """Names of the settings whose values differ (values are not returned: the token)."""
    return [f.name for f in fields(Settings) if getattr(old, f.name) != getattr(new, f.name)]


def not_applied(old: Settings, new: Settings) -> dict[str, str]:
    """The changed settings that take effect only after a restart (or only in part),
    each with the reason."""
    changed = set(changed_settings(old, new))
    return {name: why for name, why in NOT_AT_RUN_TIME.items() if name in changed}


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context for `settings` (None without TLS). Reads the files: run it
    off the event loop on reload. OSError or ssl.SSLError if they cannot be used."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def is_loopback(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address ("" and 0.0.0.0
    are every interface). Resolves names: call it before serving, not per request."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False  # cannot tell: treat as exposed
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%", 1)[0]).is_loopback for a in addresses
    )


def exposure_problem(settings: Settings, loopback: bool) -> str | None:
    """Why the daemon must not serve `settings` on an address that is `loopback` or not:
    beyond loopback, without a token, unless `allow_unauthenticated` says so."""
    if loopback or settings.token is not None or settings.allow_unauthenticated:
        return None
    return (
        f"listening on {settings.listen} (beyond loopback) without a token: set "
        "[http] token_file, listen on 127.0.0.1, or allow it explicitly with "
        "--allow-unauthenticated ([http] allow_unauthenticated = true)"
    )
