"""The systemd side: Type=notify readiness over $NOTIFY_SOCKET, and the unit files."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kohakuboard.daemon import units
from kohakuboard.daemon.config import DaemonConfig
from kohakuboard.protocol.endpoint import resolve

ROOT = Path(__file__).resolve().parents[2]


def test_notify_socket_gets_ready_and_stopping(endpoint, tmp_path):
    """The daemon sends READY=1 once it serves and STOPPING=1 on SIGTERM, then exits 0."""
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=addr)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kohakuboard.daemon", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert sock.recv(256) == b"READY=1"
        # ready means ready: the control socket answers at once
        from kohakuboard.testing import daemon_status

        assert daemon_status(endpoint, timeout=2.0)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_unit_files_run_the_daemon_with_notify_and_restart():
    """Both units start `kobo-daemon run` as Type=notify, restart on failure, and stop slower than the drain."""
    for name in ("kobo-daemon.service", "kobo-daemon@.service"):
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        cp.read(ROOT / "systemd" / name)
        svc = cp["Service"]
        assert svc["Type"] == "notify"
        assert svc["ExecStart"].endswith("kobo-daemon run")
        assert svc["Restart"] == "on-failure"
        assert "3" in svc["RestartPreventExitStatus"].split()
        assert int(svc["TimeoutStopSec"]) > 30  # the daemon's graceful drain is 30 s
    assert cp["Service"]["User"] == "%i"


# ---------------------------------------------------------------- install-systemd


def install_systemd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``kobo-daemon install-systemd ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "kohakuboard.daemon", "install-systemd", *args],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )


def service_section(text: str) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp["Service"]


def test_install_user_unit_runs_this_interpreter_and_prints_how_to_enable(tmp_path, endpoint):
    """--user writes $XDG_CONFIG_HOME/systemd/user/kobo-daemon.service whose ExecStart really starts the daemon."""
    config_home = tmp_path / "config"
    res = install_systemd("--user", env={"XDG_CONFIG_HOME": str(config_home)})
    assert res.returncode == 0, res.stderr
    unit = config_home / "systemd" / "user" / "kobo-daemon.service"
    assert f"wrote {unit}" in res.stdout
    assert "systemctl --user daemon-reload" in res.stdout
    assert "systemctl --user enable --now kobo-daemon" in res.stdout
    assert oct(unit.stat().st_mode & 0o777) == "0o644"

    argv = shlex.split(service_section(unit.read_text())["ExecStart"])
    # the interpreter that installed it, by absolute path: a venv's bin/ is not on systemd's PATH
    assert argv == [sys.executable, "-m", "kohakuboard.daemon", "run"]

    # and that command line is a working Type=notify service
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(20)
    proc = subprocess.Popen(
        argv, env=dict(os.environ, NOTIFY_SOCKET=addr), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert sock.recv(256) == b"READY=1"
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_install_refuses_to_overwrite_a_different_unit_without_force(tmp_path):
    """An edited unit is kept (clear error naming --force); rerunning on an identical one is fine."""
    dest = tmp_path / "units"
    first = install_systemd("--dest", str(dest))
    assert first.returncode == 0, first.stderr
    unit = dest / "kobo-daemon@.service"
    generated = unit.read_text()
    assert "(not where systemd looks: copy it to /etc/systemd/system/" in first.stdout

    again = install_systemd("--dest", str(dest))
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout and unit.read_text() == generated

    edited = generated.replace("RestartSec=2", "RestartSec=5")
    unit.write_text(edited)
    refused = install_systemd("--dest", str(dest))
    assert refused.returncode != 0
    assert str(unit) in refused.stderr and "--force" in refused.stderr
    assert unit.read_text() == edited
    assert not [p.name for p in dest.iterdir() if p.name != unit.name]  # no temp file left behind

    forced = install_systemd("--dest", str(dest), "--force")
    assert forced.returncode == 0, forced.stderr
    assert unit.read_text() == generated


def test_print_writes_the_unit_to_stdout_and_no_file(tmp_path):
    """--print is the unit and nothing else (pipe it to `sudo tee`); no file is written."""
    dest = tmp_path / "units"
    res = install_systemd("--user", "--print", "--dest", str(dest))
    assert res.returncode == 0, res.stderr
    assert not dest.exists()
    assert res.stdout == units.render(units.USER, units.exec_start())
    assert service_section(res.stdout)["ExecStart"].startswith(sys.executable + " ")


def test_system_template_socket_matches_the_endpoint_it_tells_the_user_to_export(tmp_path):
    """`sudo kobo-daemon install-systemd` names the invoking user and the KOBO_DAEMON_ENDPOINT her scripts need."""
    res = install_systemd("--dest", str(tmp_path), env={"SUDO_USER": "alice"})
    assert res.returncode == 0, res.stderr
    assert "systemctl enable --now kobo-daemon@alice" in res.stdout
    exported = "export KOBO_DAEMON_ENDPOINT=ipc:///run/kohakuboard/alice/kobo"
    assert exported in res.stdout

    svc = service_section((tmp_path / "kobo-daemon@.service").read_text())
    assert svc["User"] == "%i"
    env = dict(v.split("=", 1) for v in shlex.split(svc["Environment"]))
    daemon_ep = resolve(env["KOBO_DAEMON_ENDPOINT"].replace("%i", "alice"), {})
    client_ep = resolve(exported.split("=", 1)[1], {})
    assert daemon_ep == client_ep
    # the socket directory is the unit's RuntimeDirectory (under /run, owned by the user, 0700)
    assert daemon_ep.directory == "/run/" + svc["RuntimeDirectory"].replace("%i", "alice")
    assert svc["RuntimeDirectoryMode"] == "0700"


def test_units_keep_user_run_dirs_writable_and_outlast_the_drain():
    """Hardening must not hide /tmp or home (runs live there); stop timeout exceeds graceful_timeout."""
    for kind in (units.USER, units.SYSTEM):
        svc = service_section((ROOT / "systemd" / kind.name).read_text())
        assert int(svc["TimeoutStopSec"]) >= DaemonConfig().graceful_timeout + 15
        assert svc["NoNewPrivileges"] == "yes"
        assert svc.get("PrivateTmp", "no") == "no"
        assert svc.get("ProtectHome", "no") == "no"
        assert svc.get("ProtectSystem", "no") in ("no", "yes", "full")  # strict would make run dirs read-only
        assert "ReadOnlyPaths" not in svc and "InaccessiblePaths" not in svc
        assert "3" in svc["RestartPreventExitStatus"].split()


def test_shipped_units_are_what_install_systemd_writes_apart_from_exec_start():
    """systemd/*.service == `kobo-daemon install-systemd --print` with the shipped ExecStart."""
    for kind, flags in ((units.USER, ["--user"]), (units.SYSTEM, [])):
        shipped = (ROOT / "systemd" / kind.name).read_text()
        printed = install_systemd(*flags, "--print")
        assert printed.returncode == 0, printed.stderr
        ours = printed.stdout.replace(f"ExecStart={units.exec_start()}\n", f"ExecStart={units.SHIPPED_EXEC_START}\n")
        assert ours != printed.stdout
        assert shipped == ours, (
            f"systemd/{kind.name} is out of date; regenerate it with: python -c "
            "\"from kohakuboard.daemon import units; units.write_shipped('systemd')\""
        )


# ----------------------------------------------------------- systemd-analyze verify


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(
            "systemd-analyze is missing although we run as root with apt-get: "
            "install Debian's systemd package (.ci/run does)"
        )
    pytest.skip(
        "systemd-analyze is not installed and cannot be installed here (not root, or no apt-get); "
        "install the systemd package to run this check"
    )


def verify(path: Path, *, user: bool, tmp_path: Path) -> None:
    """`systemd-analyze verify` the unit file; fail on any complaint about it, not just on the exit code.

    verify exits 0 on unknown keys or unparsable values and only prints a warning,
    so the output is checked too.  It also checks that ExecStart's binary exists.
    A user manager needs $XDG_RUNTIME_DIR, which a container or CI job may lack.
    """
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_COLOR="0", SYSTEMD_LOG_LEVEL="info")
    res = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--user" if user else "--system", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = res.stdout + res.stderr
    about_unit = [line for line in out.splitlines() if path.name in line]
    assert res.returncode == 0 and not about_unit, f"systemd-analyze verify {path}:\n{out}"


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """The check below is not vacuous: a misspelled value (exit 0, just a warning) and a missing binary fail it."""
    good = units.render(units.USER, units.exec_start())
    for broken in (
        good.replace("Restart=on-failure", "Restart=onfailure"),
        good.replace(units.exec_start(), "/nonexistent/python -m kohakuboard.daemon run"),
    ):
        path = tmp_path / "kobo-daemon.service"
        path.write_text(broken)
        with pytest.raises(AssertionError, match="systemd-analyze verify"):
            verify(path, user=True, tmp_path=tmp_path)


def test_shipped_and_installed_units_pass_systemd_analyze_verify(tmp_path):
    """The repository's units and what install-systemd writes load cleanly in systemd (user and system managers)."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(ROOT / "systemd" / "kobo-daemon.service", shipped / "kobo-daemon.service")
    # a template is verified as an instance
    shutil.copy(ROOT / "systemd" / "kobo-daemon@.service", shipped / "kobo-daemon@alice.service")
    verify(shipped / "kobo-daemon.service", user=True, tmp_path=tmp_path)
    verify(shipped / "kobo-daemon@alice.service", user=False, tmp_path=tmp_path)

    installed = tmp_path / "installed"
    for flags in (["--user"], []):
        res = install_systemd(*flags, "--dest", str(installed))
        assert res.returncode == 0, res.stderr
    verify(installed / "kobo-daemon.service", user=True, tmp_path=tmp_path)
    shutil.copy(installed / "kobo-daemon@.service", installed / "kobo-daemon@alice.service")
    verify(installed / "kobo-daemon@alice.service", user=False, tmp_path=tmp_path)


def test_exec_start_with_spaces_and_percent_in_the_interpreter_path(tmp_path):
    """A venv under a path with spaces or % still yields a unit systemd resolves to that interpreter."""
    odd = tmp_path / "my envs 100%" / "bin"
    odd.mkdir(parents=True)
    (odd / "python").symlink_to(sys.executable)
    line = units.exec_start(str(odd / "python"))
    assert line.startswith('"') and "100%%" in line
    path = tmp_path / "kobo-daemon.service"
    path.write_text(units.render(units.USER, line))
    verify(path, user=True, tmp_path=tmp_path)  # fails if systemd cannot find the binary
    missing = tmp_path / "kobo-daemon.service"
    missing.write_text(units.render(units.USER, units.exec_start(str(tmp_path / "my envs 100" / "bin" / "python"))))
    with pytest.raises(AssertionError, match="not executable"):
        verify(missing, user=True, tmp_path=tmp_path)
