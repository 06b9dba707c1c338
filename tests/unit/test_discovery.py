"""Process discovery's pure core: command lines -> monitors, facts -> how to inspect."""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

import pytest

from qmpguard.discovery.classify import classify, monitor_addresses
from qmpguard.discovery.model import (
    Manager,
    MonitorOwner,
    MonitorProtocol,
    MonitorState,
    NamespaceRelation,
    PathKind,
    ProbeFailure,
    ProbeOutcome,
    ProbeResult,
    ProcessFacts,
    Route,
    Transport,
    Unavailable,
    UnixSocketEntry,
    VisiblePath,
)
from qmpguard.discovery.monitors import guest_name, monitors
from qmpguard.discovery.procfs import parse_unix_table, resolve_in_root
from qmpguard.discovery.render import discover_json, render_table

LIBVIRT_ARGV = (
    "/usr/bin/qemu-system-x86_64 -name guest=web1,debug-threads=on -S "
    "-chardev socket,id=charmonitor,fd=29,server=on,wait=off "
    "-mon chardev=charmonitor,id=monitor,mode=control -no-shutdown"
)
MONITOR = "/var/lib/libvirt/qemu/domain-3-web1/monitor.sock"


def argv(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))


def facts(
    text: str,
    *,
    mount_ns: NamespaceRelation = NamespaceRelation.SAME,
    net_ns: NamespaceRelation = NamespaceRelation.SAME,
    fds: dict[int, int] | None = None,
    table: tuple[UnixSocketEntry, ...] | None = (),
    visible: dict[str, VisiblePath] | None = None,
) -> ProcessFacts:
    return ProcessFacts(
        pid=42,
        argv=argv(text),
        exe="qemu-system-x86_64",
        mount_ns=mount_ns,
        net_ns=net_ns,
        socket_fds=fds,
        unix_sockets=table,
        visible=visible or {},
    )


def sock(here: str) -> VisiblePath:
    return VisiblePath(here, PathKind.SOCKET)


# ------------------------------------------------------------------ command line


def test_every_monitor_form_is_read() -> None:
    specs = monitors(
        argv(
            "qemu -append '-qmp unix:/not/an/option,server' "
            "-qmp unix:/run/a.qmp,server,nowait -qmp-pretty unix:/run/b.qmp,server=on "
            "-qmp tcp::4444,server=on,wait=off -qmp tcp:10.0.0.1:5,server=off "
            "-chardev socket,id=c1,path=/run/c.sock,server=on,wait=off "
            "-mon chardev=c1,mode=control -chardev socket,id=h,path=/run/h.sock,server=on "
            "-mon chardev=h -monitor stdio -monitor none -chardev pty,id=p "
            "-mon chardev=p,mode=control -mon chardev=missing,mode=control"
        )
    )
    rows = [(s.option, s.protocol, s.transport, s.path, s.port, s.server) for s in specs]
    qmp, hmp = MonitorProtocol.QMP, MonitorProtocol.HMP
    assert rows == [
        ("-qmp", qmp, Transport.UNIX, "/run/a.qmp", None, True),
        ("-qmp-pretty", qmp, Transport.UNIX, "/run/b.qmp", None, True),
        ("-qmp", qmp, Transport.TCP, None, 4444, True),
        ("-qmp", qmp, Transport.TCP, None, 5, False),
        ("-mon", qmp, Transport.UNIX, "/run/c.sock", None, True),
        ("-mon", hmp, Transport.UNIX, "/run/h.sock", None, True),
        ("-monitor", hmp, Transport.OTHER, None, None, True),
        ("-mon", qmp, Transport.OTHER, None, None, True),
        ("-mon", qmp, Transport.OTHER, None, None, True),
    ]
    assert specs[-1].detail == "no such -chardev"
    assert specs[-2].detail == "pty"


def test_libvirt_command_line() -> None:
    (spec,) = monitors(argv(LIBVIRT_ARGV))
    assert (spec.transport, spec.fd, spec.chardev, spec.server) == (
        Transport.FD,
        29,
        "charmonitor",
        True,
    )
    assert guest_name(argv(LIBVIRT_ARGV)) == "web1"
    assert guest_name(argv("qemu -name plain")) == "plain"
    assert guest_name(argv("qemu -m 64")) is None


def test_commas_in_paths_are_escaped_as_qemu_escapes_them() -> None:
    (spec,) = monitors(argv("qemu -qmp unix:/run/a,,b.qmp,server=on"))
    assert spec.path == "/run/a,b.qmp"


# ------------------------------------------------------------------ /proc readers


def test_unix_table_parses_listening_accepted_and_waiting() -> None:
    table = parse_unix_table(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000: 00000002 00000000 00010000 0001 01  7849 /run/libvirt/libvirt-sock\n"
        "0000: 00000003 00000000 00000000 0001 03 160368 /tmp/a b.sock\n"
        "0000: 00000003 00000000 00000000 0001 02     0 /tmp/a b.sock\n"
        "0000: 00000003 00000000 00000000 0001 03 133694\n"
        "garbage\n"
    )
    assert table == (
        UnixSocketEntry(7849, "/run/libvirt/libvirt-sock", True, 1),
        UnixSocketEntry(160368, "/tmp/a b.sock", False, 3),
        UnixSocketEntry(0, "/tmp/a b.sock", False, 2),
        UnixSocketEntry(133694, "", False, 3),
    )


def test_paths_resolve_inside_the_other_root(tmp_path: Path) -> None:
    """Debian's /var/run -> /run is absolute: through /proc/PID/root it must not land in
    our own /run."""
    root = tmp_path / "root"
    (root / "run" / "libvirt").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var" / "run")
    os.symlink("../../run/libvirt", root / "var" / "lv")
    os.symlink("loop", root / "loop")
    got = resolve_in_root(str(root), "/var/run/libvirt/virtqemud-sock")
    assert got == f"{root}/run/libvirt/virtqemud-sock"
    assert resolve_in_root(str(root), "/var/lv/x") == f"{root}/run/libvirt/x"
    assert resolve_in_root(str(root), "/../../etc/x") == f"{root}/etc/x"
    with pytest.raises(OSError):
        resolve_in_root(str(root), "/loop/x")


# ------------------------------------------------------------------ classification


def test_libvirt_fd_monitor_resolved_and_routed_through_libvirt() -> None:
    vm = classify(
        facts(
            LIBVIRT_ARGV,
            fds={29: 100},
            table=(UnixSocketEntry(100, MONITOR, True, 1),),
            visible={"/run/libvirt/libvirt-sock": sock("/run/libvirt/libvirt-sock")},
        ),
        {},
    )
    assert (vm.route, vm.target, vm.manager) == (Route.LIBVIRT, "libvirt:web1", Manager.LIBVIRT)
    (mon,) = vm.monitors
    assert (mon.state, mon.owner, mon.path, mon.address) == (
        MonitorState.LIBVIRT,
        MonitorOwner.LIBVIRT,
        MONITOR,
        None,
    )


def test_libvirt_in_another_mount_namespace_uses_its_daemon_socket() -> None:
    here = "/proc/42/root/run/libvirt/virtqemud-sock"
    vm = classify(
        facts(
            LIBVIRT_ARGV,
            mount_ns=NamespaceRelation.OTHER,
            visible={"/run/libvirt/virtqemud-sock": sock(here)},
        ),
        {},
    )
    # fds unreadable here: libvirt's chardev name still says whose monitor it is
    assert vm.route is Route.LIBVIRT
    assert vm.target == f"libvirt:web1@qemu+unix:///system?socket={here}"


def test_libvirt_session_daemon_uri() -> None:
    path = "/var/run/kubevirt-private/libvirt/qemu/lib/domain-1-ns_vm/monitor.sock"
    here = "/proc/42/root/run/libvirt/virtqemud-sock"
    vm = classify(
        facts(
            LIBVIRT_ARGV,
            mount_ns=NamespaceRelation.OTHER,
            fds={29: 7},
            table=(UnixSocketEntry(7, path, True, 1),),
            visible={"/var/run/libvirt/virtqemud-sock": sock(here)},
        ),
        {},
    )
    assert vm.target == f"libvirt:web1@qemu+unix:///session?socket={here}"


def test_libvirt_without_daemon_or_name_says_why() -> None:
    vm = classify(facts(LIBVIRT_ARGV), {})
    assert (vm.route, vm.unavailable) == (Route.NONE, Unavailable.NO_LIBVIRT_DAEMON)
    nameless = LIBVIRT_ARGV.replace("-name guest=web1,debug-threads=on ", "")
    vm = classify(facts(nameless), {})
    assert vm.unavailable is Unavailable.NO_DOMAIN_NAME


def test_libvirt_monitor_path_is_never_probed() -> None:
    f = facts(
        f"qemu -chardev socket,id=m,path={MONITOR},server=on -mon chardev=m,mode=control",
        visible={MONITOR: sock(MONITOR)},
    )
    assert monitor_addresses(f) == []
    assert classify(f, {}).monitors[0].state is MonitorState.LIBVIRT


def test_own_monitor_in_another_mount_namespace() -> None:
    here = "/proc/42/root/run/vm.qmp"
    f = facts(
        "qemu -name guest=ns -qmp unix:/run/vm.qmp,server=on,wait=off",
        mount_ns=NamespaceRelation.OTHER,
        visible={"/run/vm.qmp": sock(here)},
    )
    assert monitor_addresses(f) == [f"unix:{here}"]
    greeted = {f"unix:{here}": ProbeResult(ProbeOutcome.GREETED)}
    vm = classify(f, greeted)
    assert (vm.route, vm.target, vm.name) == (Route.MONITOR, f"unix:{here}", "ns")
    assert vm.monitors[0].state is MonitorState.FREE
    assert classify(f, {}).monitors[0].state is MonitorState.LISTENING


def test_held_monitor_seen_in_the_socket_table() -> None:
    f = facts(
        "qemu -qmp unix:/run/vm.qmp,server=on",
        fds={3: 10, 9: 11},
        table=(
            UnixSocketEntry(10, "/run/vm.qmp", True, 1),
            UnixSocketEntry(11, "/run/vm.qmp", False, 3),
            UnixSocketEntry(0, "/run/vm.qmp", False, 2),
        ),
        visible={"/run/vm.qmp": sock("/run/vm.qmp")},
    )
    assert monitor_addresses(f) == ["unix:/run/vm.qmp"]
    busy = ProbeResult(ProbeOutcome.FAILED, ProbeFailure.BUSY, "no QMP greeting within 0.5s")
    for probes in ({}, {"unix:/run/vm.qmp": busy}):  # without a probe, or confirmed by one
        vm = classify(f, probes)
        assert (vm.route, vm.unavailable) == (Route.NONE, Unavailable.BUSY)
        assert vm.monitors[0].owner is MonitorOwner.ANOTHER_CLIENT
        assert "1 more waiting" in vm.monitors[0].reason
    # The holder had just gone: the probe was greeted.
    vm = classify(f, {"unix:/run/vm.qmp": ProbeResult(ProbeOutcome.GREETED)})
    assert vm.route is Route.MONITOR


def test_busy_by_probe_and_a_second_free_monitor_wins() -> None:
    f = facts(
        "qemu -qmp unix:/run/a.qmp,server=on -qmp unix:/run/b.qmp,server=on",
        visible={"/run/a.qmp": sock("/run/a.qmp"), "/run/b.qmp": sock("/run/b.qmp")},
    )
    busy = ProbeResult(ProbeOutcome.FAILED, ProbeFailure.BUSY, "no QMP greeting within 0.5s")
    vm = classify(f, {"unix:/run/a.qmp": busy})
    assert (vm.route, vm.target) == (Route.MONITOR, "unix:/run/b.qmp")
    vm = classify(f, {"unix:/run/a.qmp": busy, "unix:/run/b.qmp": busy})
    assert (vm.route, vm.unavailable) == (Route.NONE, Unavailable.BUSY)


def test_unreachable_and_private_monitors() -> None:
    vm = classify(
        facts(
            "qemu -qmp tcp:127.0.0.1:4444,server=on -qmp unix:/x.qmp "
            "-qmp unix:/gone.qmp,server=on -monitor stdio",
            net_ns=NamespaceRelation.OTHER,
            visible={"/gone.qmp": VisiblePath("/gone.qmp", PathKind.MISSING)},
        ),
        {},
    )
    states = [m.state for m in vm.monitors]
    assert states == [
        MonitorState.UNREACHABLE,
        MonitorState.CLIENT_MODE,
        MonitorState.UNREACHABLE,
        MonitorState.HMP,
    ]
    assert vm.unavailable is Unavailable.UNREACHABLE
    assert "network namespace" in vm.message
    assert vm.notes and "HMP" in vm.notes[0]


def test_tcp_wildcard_is_reached_on_loopback() -> None:
    f = facts("qemu -qmp tcp::4444,server=on -qmp tcp:[::]:5555,server=on")
    assert monitor_addresses(f) == ["tcp:127.0.0.1:4444", "tcp:[::1]:5555"]


def test_only_hmp_is_no_qmp_monitor() -> None:
    vm = classify(facts("qemu -monitor unix:/run/h.sock,server=on"), {})
    assert vm.unavailable is Unavailable.NO_QMP_MONITOR
    assert "HMP" in vm.message


def test_fd_monitor_of_a_connected_socket_is_private() -> None:
    vm = classify(
        facts(
            "qemu -chardev socket,id=m,fd=5 -mon chardev=m,mode=control",
            fds={5: 9},
            table=(UnixSocketEntry(9, "", False, 3),),
        ),
        {},
    )
    assert vm.monitors[0].state is MonitorState.PRIVATE
    assert vm.monitors[0].owner is MonitorOwner.PARENT


def test_renderers_print_every_process() -> None:
    vm = classify(facts("qemu -name 'a\x1b[31m' -qmp unix:/x,server=on"), {})
    doc = discover_json([vm])
    assert doc["schema"] == "qmpguard.discover/1"
    (proc,) = doc["processes"]
    assert proc["unavailable"] == "unreachable"
    assert proc["monitors"][0]["state"] == "unreachable"
    table = render_table([vm])
    assert "\x1b" not in table and "42" in table
    assert render_table([]) == "no QEMU processes found\n"


def test_daemon_gets_targets_and_hears_of_the_rest_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qmpguard.discovery import scan

    free = classify(
        facts("qemu -qmp unix:/run/a.qmp,server=on", visible={"/run/a.qmp": sock("/run/a.qmp")}),
        {},
    )
    busy = classify(facts("qemu -monitor stdio"), {})
    calls: list[bool] = []

    async def fake_discover(*, probe_monitors: bool = True, **_: object) -> list[object]:
        calls.append(probe_monitors)
        return [free, busy]

    said: list[dict[str, object]] = []
    monkeypatch.setattr(scan, "discover", fake_discover)
    monkeypatch.setattr(scan.log, "info", lambda event, **kw: said.append({"event": event, **kw}))
    monkeypatch.setattr(
        scan.log, "warning", lambda event, **kw: said.append({"event": event, **kw})
    )
    targets = scan.ProcessTargets()
    for _ in range(3):
        assert [t.name for t in asyncio.run(targets())] == ["unix:/run/a.qmp"]
    assert calls == [False, False, False]  # no probe on a rescan
    assert [(s["event"], s["reason"]) for s in said] == [("qemu_not_inspectable", "no-qmp-monitor")]

    async def no_fds(**_: object) -> list[object]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(scan, "discover", no_fds)
    assert [t.name for t in asyncio.run(targets())] == ["unix:/run/a.qmp"]  # kept
    assert said[-1]["event"] == "process_discovery_failed"


def test_daemon_setting_discover() -> None:
    from qmpguard.daemon.settings import ConfigError, Settings, settings_from_toml

    assert Settings().discover == ()
    assert settings_from_toml('discover = ["proc"]').discover == ("proc",)
    with pytest.raises(ConfigError, match=r"config:2: 'discover' takes \['proc'\], not \['ps'\]"):
        settings_from_toml('watch = []\ndiscover = ["ps"]')
    with pytest.raises(ConfigError, match="'discover' must be a list"):
        settings_from_toml('discover = "proc"')
