"""Process discovery: every QEMU on the host, wherever its monitor lives.

QEMU processes are found in /proc by executable; each one's command line names its
monitors (-qmp, -chardev socket + -mon mode=control, fd= sockets resolved through
/proc/PID/fd and the socket table) and its -name. A socket in another mount namespace
is reached through /proc/PID/root. A libvirt-managed QEMU is inspected through its
libvirt daemon (found in the same root), never through libvirt's monitor; a QEMU with
a free monitor of its own on that monitor; any other is reported with the reason.

Layout: `model` (typed records), `monitors` and `classify` (pure), `procfs` and `probe`
(the I/O edge), `scan` (the pipeline), `render` and `command` (`qmpguard discover`).
"""

from qmpguard.discovery.model import DiscoveredVM, Route, Unavailable
from qmpguard.discovery.scan import SOURCES, ProcessTargets, discover

__all__ = ["SOURCES", "DiscoveredVM", "ProcessTargets", "Route", "Unavailable", "discover"]
