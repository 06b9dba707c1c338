"""The read-only allow-list refuses every command that could change a VM, before sending."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qmpguard.qmp.allowlist import ForbiddenCommand, check_command
from qmpguard.qmp.guard import Timeouts
from qmpguard.qmp.transport import QMPSession
from qmpguard.targets import parse_target

ALLOWED: list[tuple[str, Any]] = [
    ("qmp_capabilities", None),
    ("query-version", None),
    ("query-pci", None),
    ("qom-list", {"path": "/machine"}),
    ("qom-get", {"path": "/machine", "property": "type"}),
    ("qom-list-get", {"paths": ["/machine/q35/pcie.0", "/machine/peripheral/rp1/rp1"]}),
    ("qom-list-get", {"paths": ["/", "/machine/unattached"]}),
    ("human-monitor-command", {"command-line": "info mtree -f"}),
    ("human-monitor-command", {"command-line": "info qtree"}),
]

FORBIDDEN: list[tuple[str, Any]] = [
    ("quit", None),
    ("qom-list-types", {"implements": "pci-device"}),  # loads every QOM module
    ("device-list-properties", {"typename": "e1000"}),
    ("stop", None),
    ("cont", None),
    ("system_reset", None),
    ("device_add", {"driver": "e1000"}),
    ("device_del", {"id": "x"}),
    ("qom-set", {"path": "/machine", "property": "x", "value": 1}),
    ("migrate", {"uri": "exec:true"}),
    ("human-monitor-command", {"command-line": "quit"}),
    ("human-monitor-command", {"command-line": "info mtree -f; quit"}),
    ("human-monitor-command", {"command-line": "info mtree -f\nquit"}),
    ("human-monitor-command", {"command-line": "info qtree\x00quit"}),
    ("human-monitor-command", {"command-line": "info  qtree"}),
    ("human-monitor-command", {"command-line": "info qtree", "cpu-index": 0}),
    ("human-monitor-command", {"command-line": ["info qtree"]}),
    ("human-monitor-command", None),
    ("query-version\nquit", None),
    ("query-", None),
    ("Query-version", None),
    ("qom-get ", None),
    # qom-list-get calls every getter of each path: /machine's `iommu` aborts ARM virt
    ("qom-list-get", {"paths": ["/machine"]}),
    ("qom-list-get", {"paths": ["/machine/q35/pcie.0", "/machine/"]}),
    ("qom-list-get", {"paths": ["//machine"]}),
    ("qom-list-get", {"paths": ["machine"]}),  # a relative path is a search: /machine
    ("qom-list-get", {"paths": []}),
    ("qom-list-get", {"paths": "/machine/peripheral"}),
    ("qom-list-get", {"paths": [7]}),
    ("qom-list-get", {"paths": ["/machine/peripheral"], "path": "/machine"}),
    ("qom-list-get", None),
    ("qom-get", {"path": "/machine/", "property": "iommu"}),
    ("qom-get", {"path": "machine", "property": "iommu"}),
    ("qom-get", {"property": "iommu"}),
    ("qom-list", {"path": "peripheral"}),
]


@pytest.mark.parametrize(("command", "args"), ALLOWED)
def test_read_only_commands_pass(command: str, args: dict[str, Any] | None) -> None:
    check_command(command, args)


@pytest.mark.parametrize(("command", "args"), FORBIDDEN)
def test_everything_else_is_refused(command: str, args: dict[str, Any] | None) -> None:
    with pytest.raises(ForbiddenCommand):
        check_command(command, args)


class _ExplodingClient:
    """Stands in for qemu.qmp's client: any attempt to send is a test failure."""

    async def execute(self, *_: Any) -> Any:
        raise AssertionError("a forbidden command reached the wire")


@pytest.mark.parametrize(("command", "args"), FORBIDDEN)
def test_session_refuses_before_writing(command: str, args: dict[str, Any] | None) -> None:
    session = QMPSession(parse_target("/x.qmp"), Timeouts(), _ExplodingClient())  # type: ignore[arg-type]
    with pytest.raises(ForbiddenCommand):
        asyncio.run(session.execute(command, args))
    assert session.commands_sent == 0


def test_qom_get_that_aborts_arm_virt_is_refused() -> None:
    """ARM virt's `iommu` getter asserts when a virtio-iommu-pci exists: never read it."""
    with pytest.raises(ForbiddenCommand):
        check_command("qom-get", {"path": "/machine", "property": "iommu"})
    check_command("qom-get", {"path": "/machine/peripheral/vi", "property": "hotplugged"})
