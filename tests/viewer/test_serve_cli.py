"""``kobo-serve`` end to end: the real command in a subprocess (``python -m kohakuboard.viewer.serve_cli``).

Accounts live in ``--config-dir`` under ``tmp_path``; the server runs over an
empty data dir on a loopback port; units are checked with ``systemd-analyze
verify`` (skipped where it is missing, as in ``tests/daemon/test_systemd.py``).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kohakuboard.viewer import units

from .conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PW = "correct horse battery"
MODULE = "kohakuboard.viewer.serve_cli"


def kobo_serve(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    argv0: tuple[str, ...] = (sys.executable, "-m", MODULE),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv0, *args], input=stdin, capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {}))
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "serve-config"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    (d / "vision").mkdir(parents=True)
    return d


def add_user(config: Path, name: str = "alice", *extra: str) -> None:
    res = kobo_serve("user", "add", name, "--password-stdin", "--config-dir", str(config), *extra, stdin=PW + "\n")
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- users and tokens


def test_user_add_list_passwd_remove(config):
    res = kobo_serve(
        "user",
        "add",
        "alice",
        "--password-stdin",
        "--projects",
        "vision,nlp",
        "--config-dir",
        str(config),
        stdin=PW + "\n",
    )
    assert res.returncode == 0, res.stderr
    assert "added user alice (sees vision, nlp)" in res.stdout
    add_user(config, "bob")

    listed = kobo_serve("user", "list", "--config-dir", str(config))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["USER", "PROJECTS", "CREATED", "TOKENS"]
    assert lines[1].split()[:2] == ["alice", "vision,nlp"] and lines[1].split()[-1] == "0"
    assert lines[2].split()[:2] == ["bob", "*"]
    stored = json.loads((config / "accounts.json").read_text())
    for secret in (
        PW,
        stored["users"]["alice"]["password"]["hash"],
        stored["users"]["alice"]["password"]["salt"],
        "scrypt",
    ):
        assert secret not in listed.stdout + listed.stderr

    # --config-dir before the subcommand works too, and so does $KOBO_SERVE_CONFIG
    assert "alice" in kobo_serve("--config-dir", str(config), "user", "list").stdout
    assert "alice" in kobo_serve("user", "list", env={"KOBO_SERVE_CONFIG": str(config)}).stdout

    dup = kobo_serve("user", "add", "alice", "--password-stdin", "--config-dir", str(config), stdin=PW + "\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr

    pw = kobo_serve(
        "user", "passwd", "alice", "--password-stdin", "--config-dir", str(config), stdin="a different one\r\n"
    )
    assert pw.returncode == 0, pw.stderr
    from kohakuboard.viewer.accounts import Accounts

    acc = Accounts(config)
    assert acc.verify_password("alice", "a different one") and not acc.verify_password("alice", PW)

    proj = kobo_serve("user", "projects", "alice", "--all", "--config-dir", str(config))
    assert proj.returncode == 0 and "every project" in proj.stdout and acc.get_user("alice").projects is None

    gone = kobo_serve("user", "remove", "bob", "--config-dir", str(config))
    assert gone.returncode == 0 and "removed user bob" in gone.stdout
    again = kobo_serve("user", "remove", "bob", "--config-dir", str(config))
    assert again.returncode == 1 and "no user named 'bob'" in again.stderr


def test_user_add_refuses_bad_names_and_passwords(config):
    short = kobo_serve("user", "add", "alice", "--password-stdin", "--config-dir", str(config), stdin="1234567\n")
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    bad = kobo_serve("user", "add", "al ice", "--password-stdin", "--config-dir", str(config), stdin=PW + "\n")
    assert bad.returncode == 2 and "invalid user name" in bad.stderr
    empty = kobo_serve("user", "add", "alice", "--password-stdin", "--config-dir", str(config), stdin="")
    assert empty.returncode == 2 and "nothing on standard input" in empty.stderr
    proj = kobo_serve(
        "user", "add", "alice", "--password-stdin", "--projects", ",", "--config-dir", str(config), stdin=PW + "\n"
    )
    assert proj.returncode == 2 and "--projects needs at least one project" in proj.stderr
    assert not (config / "accounts.json").exists()


def test_password_prompt_asks_twice(config):
    """Without --password-stdin the password is typed twice (click.prompt, hidden input); a mismatch asks again."""
    typed = f"{PW}\nsomething else\n{PW}\n{PW}\n"
    res = kobo_serve("user", "add", "alice", "--config-dir", str(config), stdin=typed)
    assert res.returncode == 0, res.stderr
    assert "Repeat the password" in res.stdout + res.stderr
    assert PW not in res.stdout + res.stderr  # hidden input: never echoed
    from kohakuboard.viewer.accounts import Accounts

    assert Accounts(config).verify_password("alice", PW) is not None


def test_token_create_list_revoke(config):
    add_user(config)
    made = kobo_serve("token", "create", "alice", "--label", "nightly eval", "--config-dir", str(config))
    assert made.returncode == 0, made.stderr
    tok = made.stdout.strip()
    assert re.fullmatch(r"kobo_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", tok)  # stdout is the token alone
    assert "will not be shown again" in made.stderr and tok not in made.stderr
    tid = tok.split("_")[1]
    assert tok not in (config / "accounts.json").read_text()

    listed = kobo_serve("token", "list", "--config-dir", str(config))
    assert listed.returncode == 0, listed.stderr
    assert tid in listed.stdout and "nightly eval" in listed.stdout and tok not in listed.stdout
    assert tok.split("_", 2)[2] not in listed.stdout
    assert tid in kobo_serve("token", "list", "alice", "--config-dir", str(config)).stdout
    assert kobo_serve("token", "list", "nobody", "--config-dir", str(config)).returncode == 1
    users = kobo_serve("user", "list", "--config-dir", str(config)).stdout.splitlines()
    assert users[1].split()[-1] == "1"

    nouser = kobo_serve("token", "create", "bob", "--config-dir", str(config))
    assert nouser.returncode == 1 and "no user named 'bob'" in nouser.stderr

    gone = kobo_serve("token", "revoke", tid, "--config-dir", str(config))
    assert gone.returncode == 0 and f"revoked token {tid} of alice" in gone.stdout
    assert "no tokens" in kobo_serve("token", "list", "--config-dir", str(config)).stdout
    twice = kobo_serve("token", "revoke", tid, "--config-dir", str(config))
    assert twice.returncode == 1 and "no token with id" in twice.stderr


def test_version_and_the_kobo_serve_alias(config):
    from importlib.metadata import version

    res = kobo_serve("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"kobo-serve {version('kohakuboard')}"
    add_user(config)
    alias = kobo_serve(
        "serve", "user", "list", "--config-dir", str(config), argv0=(sys.executable, "-m", "kohakuboard.cli.main")
    )
    assert alias.returncode == 0, alias.stderr
    assert "alice" in alias.stdout
    helped = kobo_serve("serve", "--help", argv0=(sys.executable, "-m", "kohakuboard.cli.main"))
    assert helped.returncode == 0 and "--data-dir" in helped.stdout and "install-systemd" in helped.stdout


# ---------------------------------------------------------------- refusing to start


def test_non_loopback_bind_without_users_refuses_to_start(config, data_dir):
    res = kobo_serve("--data-dir", str(data_dir), "--host", "0.0.0.0", "--port", "0", "--config-dir", str(config))
    assert res.returncode == 2
    assert "kobo-serve user add NAME" in res.stderr and "refusing to listen on 0.0.0.0" in res.stderr
    assert not config.exists()  # the server created nothing
    # the same through the environment variable for the data dir
    res = kobo_serve(
        "--host", "0.0.0.0", "--port", "0", "--config-dir", str(config), env={"KOBO_SERVE_DATA_DIR": str(data_dir)}
    )
    assert res.returncode == 2 and "kobo-serve user add NAME" in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "missing --data-dir"),
        (("--data-dir", "/nonexistent/runs"), "is not a directory"),
        (("--data-dir", "{data}", "--base-url", "kobo"), "must start with '/'"),
        (("--data-dir", "{data}", "--base-url", "/a/../b"), "'..' segments"),
        (("--data-dir", "{data}", "--base-url", "/a?b"), "cannot have"),
        (("--data-dir", "{data}", "--certfile", "{data}/../cert.pem"), "both --certfile and --keyfile"),
        (("--data-dir", "{data}", "--certfile", "/nonexistent.pem", "--keyfile", "/nonexistent.key"), "is not a file"),
    ],
)
def test_bad_server_options_exit_2(config, data_dir, args, message):
    args = tuple(a.replace("{data}", str(data_dir)) for a in args)
    res = kobo_serve(*args, "--port", "0", "--config-dir", str(config))
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_a_world_readable_accounts_file_not_ours_refuses_to_start(config, data_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another owner")
    add_user(config)
    os.chmod(config / "accounts.json", 0o644)
    os.chown(config / "accounts.json", 65534, 65534)
    res = kobo_serve("--data-dir", str(data_dir), "--port", "0", "--config-dir", str(config))
    assert res.returncode == 2 and "accessible to other users" in res.stderr


def test_base_url_normalization():
    from kohakuboard.viewer.serve_cli import normalize_base_url

    assert normalize_base_url("/") == "/" and normalize_base_url("") == "/"
    assert normalize_base_url("/kobo/") == "/kobo" and normalize_base_url("//kobo//runs/") == "/kobo/runs"


# ---------------------------------------------------------------- running


class Server(ServerProcess):
    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url.rstrip("/") + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_takes_tokens_and_sees_cli_changes_without_restart(config, data_dir, servers):
    """A running kobo-serve accepts a token the CLI made and refuses it once the CLI revoked it."""
    add_user(config)
    tok = kobo_serve("token", "create", "alice", "--config-dir", str(config)).stdout.strip()
    before = (config / "accounts.json").stat()
    s = Server([sys.executable, "-m", MODULE, "--data-dir", str(data_dir), "--port", "0", "--config-dir", str(config)])
    servers.append(s)
    assert s.url.startswith("http://127.0.0.1:") and "token=" not in s.url
    assert s.get("/healthz")[0] == 200
    assert s.get("/api/runs")[0] == 401
    status, body = s.get("/api/runs", tok)
    assert status == 200 and json.loads(body)["total"] == 0

    tok2 = kobo_serve("token", "create", "alice", "--config-dir", str(config)).stdout.strip()
    assert s.get("/api/runs", tok2)[0] == 200  # made after the server started
    assert kobo_serve("token", "revoke", tok.split("_")[1], "--config-dir", str(config)).returncode == 0
    assert s.get("/api/runs", tok)[0] == 401
    assert s.get("/api/runs", tok2)[0] == 200
    # a failed login reaches the log (stderr: the journal under systemd), the password does not
    import httpx

    origin = s.url.rstrip("/")
    with httpx.Client(base_url=origin, timeout=10) as c:
        csrf = c.get("/api/session").json()["csrf"]
        r = c.post(
            "/api/login",
            json={"user": "alice", "password": "not her password"},
            headers={"X-Kobo-CSRF": csrf, "Origin": origin},
        )
        assert r.status_code == 401
    assert kobo_serve("user", "remove", "alice", "--config-dir", str(config)).returncode == 0
    assert s.get("/api/runs", tok2)[0] == 401
    out = s.stop()
    assert tok.split("_", 2)[2] not in out and tok2.split("_", 2)[2] not in out
    assert re.search(r"WARNING kohakuboard\.\S+: failed login for 'alice'", out), out
    assert "not her password" not in out and PW not in out
    # the server itself wrote nothing: the accounts file changed only through the CLI
    assert sorted(p.name for p in config.iterdir()) == ["accounts.json", "accounts.lock"]
    assert os.listdir(data_dir) == ["vision"] and os.listdir(data_dir / "vision") == []
    assert before.st_ino != (config / "accounts.json").stat().st_ino


MDWE = r"""
import ctypes, mmap, runpy, sys
# PR_SET_MDWE = 65, PR_MDWE_REFUSE_EXEC_GAIN = 1: what MemoryDenyWriteExecute=yes enforces
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    print("NO-MDWE", flush=True)
    sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("W+X ALLOWED", flush=True)
    sys.exit(0)
except OSError:
    pass
sys.argv = ["kobo-serve", *sys.argv[1:]]
runpy.run_module("kohakuboard.viewer.serve_cli", run_name="__main__")
"""


def test_installed_exec_start_runs_the_server_under_memory_deny_write_execute(config, data_dir, tmp_path, servers):
    """The command line install-systemd writes starts a working server, even with W+X memory forbidden.

    MemoryDenyWriteExecute= is emulated with prctl(PR_SET_MDWE) (Linux >= 6.3): numpy,
    SQLite, scrypt and uvicorn must all run without writable-and-executable pages.
    """
    add_user(config)
    tok = kobo_serve("token", "create", "alice", "--config-dir", str(config)).stdout.strip()
    port = free_port()
    res = kobo_serve(
        "install-systemd",
        "--user",
        "--print",
        "--data-dir",
        str(data_dir),
        "--config-dir",
        str(config),
        "--port",
        str(port),
    )
    assert res.returncode == 0, res.stderr
    argv = shlex.split(service_section(res.stdout)["ExecStart"])
    assert argv[:3] == [sys.executable, "-m", MODULE]
    assert argv[3:] == ["--data-dir", str(data_dir), "--config-dir", str(config), "--port", str(port)]
    s = Server([sys.executable, "-c", MDWE, *argv[3:]])
    servers.append(s)
    if "NO-MDWE" in "".join(s.lines):
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert "W+X ALLOWED" not in "".join(s.lines)
    assert s.url == f"http://127.0.0.1:{port}/"
    assert s.get("/healthz")[0] == 200
    status, body = s.get("/api/runs", tok)
    assert status == 200 and json.loads(body)["projects"] == []  # an empty project holds no runs
    assert s.get("/api/runs")[0] == 401
    status, body = s.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert status == 200 and len(body) > 10_000


# ---------------------------------------------------------------- install-systemd


def service_section(text: str) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(interpolation=None, strict=False, empty_lines_in_values=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp["Service"]


def service_account() -> str:
    """An ordinary account for User= (systemd calls root and nobody unsafe): a login user if there is one."""
    import pwd

    usable = sorted((p.pw_uid < 1000, p.pw_uid, p.pw_name) for p in pwd.getpwall() if p.pw_uid not in (0, 65534))
    if not usable:
        pytest.skip("no account other than root and nobody on this machine")
    return usable[0][2]


def system_args(data_dir: Path, config: Path) -> list[str]:
    return ["install-systemd", "--run-as", service_account(), "--data-dir", str(data_dir), "--config-dir", str(config)]


def test_print_is_the_rendered_unit_and_writes_nothing(config, data_dir, tmp_path):
    dest = tmp_path / "units"
    res = kobo_serve(*system_args(data_dir, config), "--print", "--dest", str(dest))
    assert res.returncode == 0, res.stderr
    assert not dest.exists()
    exec_start = units.exec_start(["--data-dir", str(data_dir), "--config-dir", str(config)])
    assert res.stdout == units.render(exec_start, user=service_account())
    svc = service_section(res.stdout)
    assert shlex.split(svc["ExecStart"]) == [
        sys.executable,
        "-m",
        MODULE,
        "--data-dir",
        str(data_dir),
        "--config-dir",
        str(config),
    ]
    assert svc["User"] == service_account()

    # server options go into ExecStart
    res = kobo_serve(
        *system_args(data_dir, config),
        "--print",
        "--host",
        "10.1.2.3",
        "--port",
        "8443",
        "--base-url",
        "/kobo/",
        "--allowed-host",
        "kobo.lab.example",
    )
    assert res.returncode == 0, res.stderr
    assert shlex.split(service_section(res.stdout)["ExecStart"])[7:] == [
        "--host",
        "10.1.2.3",
        "--port",
        "8443",
        "--base-url",
        "/kobo",
        "--allowed-host",
        "kobo.lab.example",
    ]


def test_install_refuses_root_and_unknown_accounts(config, data_dir):
    res = kobo_serve("install-systemd", "--run-as", "root", "--print", "--data-dir", str(data_dir))
    assert res.returncode == 2 and "not run the server as root" in res.stderr
    res = kobo_serve("install-systemd", "--run-as", "nobody", "--print", "--data-dir", str(data_dir))
    assert res.returncode == 2 and "useradd --system kohakuboard" in res.stderr
    res = kobo_serve("install-systemd", "--run-as", "no-such-account-here", "--print", "--data-dir", str(data_dir))
    assert res.returncode == 2 and "no such account" in res.stderr
    res = kobo_serve("install-systemd", "--print", "--run-as", service_account(), "--data-dir", "/nonexistent")
    assert res.returncode == 2 and "is not a directory" in res.stderr
    res = kobo_serve(
        "install-systemd", "--print", "--run-as", service_account(), "--data-dir", str(data_dir), "--port", "443"
    )
    assert res.returncode == 2  # no capabilities in the unit: no privileged port


def test_install_refuses_to_overwrite_a_different_unit_without_force(config, data_dir, tmp_path):
    dest = tmp_path / "units"
    first = kobo_serve(*system_args(data_dir, config), "--host", "0.0.0.0", "--dest", str(dest))
    assert first.returncode == 0, first.stderr
    unit = dest / "kobo-serve.service"
    assert f"wrote {unit}" in first.stdout and oct(unit.stat().st_mode & 0o777) == "0o644"
    assert "not where systemd looks" in first.stdout
    assert "systemctl enable --now kobo-serve" in first.stdout
    # no user yet and a public address: it says so, and how to add one for that config dir
    assert f"sudo -u {service_account()} kobo-serve --config-dir {config} user add NAME" in first.stdout
    assert "refuses to start" in first.stdout
    generated = unit.read_text()

    again = kobo_serve(*system_args(data_dir, config), "--host", "0.0.0.0", "--dest", str(dest))
    assert again.returncode == 0 and "unchanged" in again.stdout and unit.read_text() == generated

    edited = generated.replace("RestartSec=2", "RestartSec=5")
    unit.write_text(edited)
    refused = kobo_serve(*system_args(data_dir, config), "--host", "0.0.0.0", "--dest", str(dest))
    assert refused.returncode != 0
    assert str(unit) in refused.stderr and "--force" in refused.stderr
    assert unit.read_text() == edited
    assert [p.name for p in dest.iterdir()] == [unit.name]  # no temp file left behind

    forced = kobo_serve(*system_args(data_dir, config), "--host", "0.0.0.0", "--dest", str(dest), "--force")
    assert forced.returncode == 0, forced.stderr
    assert unit.read_text() == generated


def test_user_unit_goes_to_the_user_manager_dir(config, data_dir, tmp_path):
    home = tmp_path / "xdg"
    res = kobo_serve(
        "install-systemd",
        "--user",
        "--data-dir",
        str(data_dir),
        "--config-dir",
        str(config),
        env={"XDG_CONFIG_HOME": str(home)},
    )
    assert res.returncode == 0, res.stderr
    unit = home / "systemd" / "user" / "kobo-serve.service"
    assert f"wrote {unit}" in res.stdout and "systemctl --user enable --now kobo-serve" in res.stdout
    svc = service_section(unit.read_text())
    assert "User" not in svc and "ProtectSystem" not in svc  # a user manager cannot sandbox the file system
    assert svc["NoNewPrivileges"] == "yes" and svc["MemoryDenyWriteExecute"] == "yes"


def test_shipped_unit_is_the_render_and_is_hardened():
    shipped = (ROOT / "systemd" / "kobo-serve.service").read_text()
    assert shipped == units.render_shipped(), (
        "systemd/kobo-serve.service is out of date; regenerate it with: python -c "
        "\"from kohakuboard.viewer import units; units.write_shipped('systemd')\""
    )
    # and it is what install-systemd prints, apart from the ExecStart and User lines
    printed = kobo_serve(
        "install-systemd",
        "--print",
        "--run-as",
        service_account(),
        "--data-dir",
        "/",
        "--config-dir",
        "/etc/kohakuboard/serve",
    )
    assert printed.returncode == 0, printed.stderr
    ours = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={units.SHIPPED_EXEC_START}", printed.stdout)
    ours = re.sub(rf"(?m)^User={re.escape(service_account())}$", f"User={units.SHIPPED_USER}", ours)
    assert ours == shipped

    svc = service_section(shipped)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "StandardOutput": "journal",
        "StandardError": "journal",
        "UMask": "0077",
        "User": units.SHIPPED_USER,
    }
    assert {k: svc.get(k) for k in expected} == expected
    # the server writes nowhere: no writable path at all, and no restart loop on a refused configuration
    assert "ReadWritePaths" not in svc and "StateDirectory" not in svc
    assert svc["RestartPreventExitStatus"] == "2"
    assert shlex.split(svc["ExecStart"]) == [
        "/usr/bin/env",
        "kobo-serve",
        "--data-dir",
        "/var/lib/kohakuboard",
        "--config-dir",
        "/etc/kohakuboard/serve",
    ]


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
    pytest.skip("systemd-analyze is not installed and cannot be installed here (not root, or no apt-get)")


def verify(path: Path, *, user: bool, tmp_path: Path) -> None:
    """`systemd-analyze verify`: exit 0 and not one line of output about the unit (warnings exit 0 too)."""
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
    """Not vacuous: a misspelled value and a missing interpreter fail the check."""
    good = units.render(units.exec_start(["--data-dir", "/"]), user="kohakuboard")
    for broken in (
        good.replace("ProtectSystem=strict", "ProtectSystem=stricter"),
        good.replace(sys.executable, "/nonexistent/python"),
    ):
        path = tmp_path / "kobo-serve.service"
        path.write_text(broken)
        with pytest.raises(AssertionError, match="systemd-analyze verify"):
            verify(path, user=False, tmp_path=tmp_path)


def test_shipped_and_installed_units_pass_systemd_analyze_verify(config, data_dir, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(ROOT / "systemd" / "kobo-serve.service", shipped / "kobo-serve.service")
    verify(shipped / "kobo-serve.service", user=False, tmp_path=tmp_path)

    system = tmp_path / "system"
    res = kobo_serve(*system_args(data_dir, config), "--host", "0.0.0.0", "--dest", str(system))
    assert res.returncode == 0, res.stderr
    verify(system / "kobo-serve.service", user=False, tmp_path=tmp_path)

    user = tmp_path / "user"
    res = kobo_serve(
        "install-systemd", "--user", "--data-dir", str(data_dir), "--config-dir", str(config), "--dest", str(user)
    )
    assert res.returncode == 0, res.stderr
    verify(user / "kobo-serve.service", user=True, tmp_path=tmp_path)
