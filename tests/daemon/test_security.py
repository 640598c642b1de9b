"""Security: only the daemon's user reaches it, it writes only where that user could, no TCP.

The tests with a second user run a real client process as ``nobody`` against a
real daemon running as root; they need root (CI runs as root) and skip
otherwise.

How the ``nobody`` client is started: the child interpreter starts as root,
imports what the client needs, then drops to ``nobody`` (``setgroups([])``,
``setresgid``, ``setresuid``: what ``setpriv --reuid=nobody --regid=nogroup
--clear-groups`` does) before it creates any socket.  It cannot simply be
exec'd as ``nobody``: this interpreter, its standard library and its
site-packages (pyzmq, msgpack) may live where ``nobody`` cannot read (on the
project machine, pyenv under ``/root``, mode 0700), and no ``sys.path`` entry
fixes an unreadable standard library.  Every connection the child makes
carries uid 65534 in the kernel's peer credentials, which is what the daemon
checks; the child reports its uids so the test can see the switch happened.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kohakuboard.client import Board
from kohakuboard.protocol import messages as m
from kohakuboard.protocol.endpoint import resolve
from kohakuboard.protocol.errors import StorageError
from kohakuboard.storage.reader import RunReader
from kohakuboard.testing import daemon_status, wait_until

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover - every Debian has it
    NOBODY = None

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="needs root and a 'nobody' user: the test runs a client process as a second uid (nobody)",
)

# Run by the child as root, before the switch: import everything the client
# code touches (lazy imports included), then become nobody.
_PRELUDE = """
import hashlib, json, os, secrets, socket, string, subprocess, sys, time, traceback
import msgpack, zmq
from zmq.utils.monitor import recv_monitor_message
import kohakuboard.client
from kohakuboard.client import _board, _capture, _config, _encoding, _notices, _outbox, _revival, _rich, _sender, _values
from kohakuboard.protocol import binning, codec, control, endpoint, errors, items, messages as m, peer, runpath
from kohakuboard.client import Board

os.chdir("/")
os.setgroups([])
os.setresgid({gid}, {gid}, {gid})
os.setresuid({uid}, {uid}, {uid})
report = {{"resuid": list(os.getresuid()), "resgid": list(os.getresgid()), "groups": os.getgroups()}}

def outcome(fn):
    t0 = time.monotonic()
    try:
        value = fn()
        return {{"ok": True, "value": value, "elapsed": time.monotonic() - t0}}
    except BaseException as exc:
        return {{"ok": False, "error": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - t0}}
"""


def as_user(code: str, *, uid: int, gid: int, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter as ``uid``/``gid``; return its ``report`` dict."""
    full = _PRELUDE.format(uid=uid, gid=gid) + code + "\nprint('REPORT ' + json.dumps(report))\n"
    proc = subprocess.run(
        [sys.executable, "-c", full], env=dict(os.environ), capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["resuid"] == [uid] * 3 and report["resgid"] == [gid] * 3, report
    return report


def as_nobody(code: str, timeout: float = 60) -> dict:
    assert NOBODY is not None
    report = as_user(code, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, timeout=timeout)
    assert report["groups"] == [], report
    return report


@pytest.fixture
def nobody_dir():
    """A directory nobody owns and may write (outside tmp_path, whose parents are 0700)."""
    d = tempfile.mkdtemp(prefix="kobo-nobody-", dir="/tmp")
    if NOBODY is not None and os.geteuid() == 0:
        os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _open_up(endpoint) -> None:
    """What a careless admin might do: make the endpoint usable by everyone, as far as files go."""
    os.chmod(endpoint.directory, 0o777)
    for path in (endpoint.data_addr[6:], endpoint.control_addr[6:]):
        os.chmod(path, 0o666)
    for path in (endpoint.lock_path, endpoint.pid_path):
        os.chmod(path, 0o644)  # so the client sees the daemon alive and does not start its own


# ------------------------------------------------------------- permissions


def test_socket_directory_and_sockets_are_private(daemon, endpoint):
    """The endpoint directory is 0700 and both sockets 0600, owned by the daemon's user."""
    assert daemon_status(endpoint)["pid"] == daemon.pid  # serving (and past its signal-handler setup)
    st = os.stat(endpoint.directory)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    for addr in (endpoint.data_addr, endpoint.control_addr):
        st = os.stat(addr[len("ipc://") :])
        assert stat.S_ISSOCK(st.st_mode), addr
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{addr}: {stat.S_IMODE(st.st_mode):o}"
        assert st.st_uid == os.geteuid()
    for name in os.listdir(endpoint.directory):
        mode = stat.S_IMODE(os.lstat(os.path.join(endpoint.directory, name)).st_mode)
        assert not mode & 0o022, f"{name} is writable by others: {mode:o}"


def test_loose_directory_and_umask_do_not_open_the_endpoint(daemon_factory, tmp_path):
    """A pre-existing 0755 directory is tightened and a umask of 0 still gives 0600 sockets."""
    sock_dir = tempfile.mkdtemp(prefix="kobo-loose-", dir="/tmp")
    try:
        os.chmod(sock_dir, 0o755)
        ep = resolve(f"ipc://{sock_dir}/kobo", os.environ)
        old = os.umask(0)
        try:
            d = daemon_factory(ep, "--endpoint", str(ep))
        finally:
            os.umask(old)
        assert daemon_status(ep)["pid"] == d.pid  # it serves: the tightened directory is in use
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
        for addr in (ep.data_addr, ep.control_addr):
            assert stat.S_IMODE(os.stat(addr[6:]).st_mode) == 0o600
        code = d.terminate()
        assert code == 0, Path(d.log_path).read_text(errors="replace")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# ------------------------------------------------------------- other users


@needs_root
@pytest.mark.own_daemon
def test_other_user_cannot_log_with_default_permissions(daemon, endpoint, nobody_dir):
    """Another user's script gets a clear error at once; its raw requests reach nothing."""
    report = as_nobody(
        f"""
def open_board():
    with Board(name="intruder", base_dir={str(nobody_dir)!r}, capture_output=False, timeout=5) as b:
        b.log(evil=1.0)
report["board"] = outcome(open_board)

ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.connect({endpoint.control_addr!r})
dealer.send_multipart(codec.encode(m.StatusRequest(m.Envelope(seq=1))))
report["raw_answered"] = bool(dealer.poll(1500))
dealer.close(0)
ctx.term()
"""
    )
    board = report["board"]
    assert not board["ok"]
    assert board["error"] == "PermissionError", board
    assert endpoint.directory in board["message"] and "belongs to uid 0" in board["message"], board
    assert board["elapsed"] < 5, board  # an error, not a hang
    assert report["raw_answered"] is False
    assert list(nobody_dir.iterdir()) == []
    # The filesystem stopped it before the daemon ever saw a connection.
    info = daemon_status(endpoint)
    assert info["rejected"].get("PeerUid", 0) == 0
    assert info["runs"] == []


@needs_root
@pytest.mark.own_daemon
def test_daemon_refuses_other_uid_even_when_files_allow_it(daemon, endpoint, base_dir, nobody_dir):
    """With the endpoint opened up to everyone, the daemon itself refuses another uid's connections.

    The other user's data for an open run is not written, its requests get no
    answer, its Board times out; the owner's client keeps working; the refusals
    are counted in ``kobo-daemon status`` and logged.
    """
    owner = Board(name="shared", run_id="shared", base_dir=base_dir, capture_output=False)
    owner.log(a=1.0)
    owner.flush()
    _open_up(endpoint)

    report = as_nobody(
        f"""
report["fs_allows"] = all(os.access(p, os.R_OK | os.W_OK) for p in ({endpoint.data_addr[6:]!r}, {endpoint.control_addr[6:]!r}))
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH)
push.connect({endpoint.data_addr!r})
for seq in range(1, 4):
    push.send_multipart(codec.encode_log({owner.path!r}, "intruder", seq, 0, 10 + seq, 0, time.time(), {{"evil": 666.0}}))
dealer = ctx.socket(zmq.DEALER)
dealer.connect({endpoint.control_addr!r})
dealer.send_multipart(codec.encode(m.StatusRequest(m.Envelope(seq=1))))
asked = time.monotonic()

def open_board():
    with Board(name="intruder", base_dir={str(nobody_dir)!r}, capture_output=False, timeout=2) as b:
        b.log(evil=1.0)
report["board"] = outcome(open_board)
# no answer to the raw request within 2 s of sending it (most of them went by while the Board waited)
report["raw_answered"] = bool(dealer.poll(max(0, int((2.0 - (time.monotonic() - asked)) * 1000))))
# a flood of connections: each is refused, the log is not flooded
flood = [ctx.socket(zmq.DEALER) for _ in range(30)]
# each socket's first refusal (the daemon's ZAP handler answering 400 for the peer's uid); waiting only
# for the connection to be made let some close before the handler saw them (fewer than 33 counted under load)
watch = [s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH) for s in flood]
for s in flood:
    s.connect({endpoint.control_addr!r})
for mon in watch:
    assert mon.poll(30000), "a flood connection was never refused"
    event = recv_monitor_message(mon)
    assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400, event
    mon.close(0)
for s in flood:
    s.disable_monitor()
    s.close(0)
push.close(500)
dealer.close(0)
ctx.term()
"""
    )
    assert report["fs_allows"] is True  # the files no longer protect the daemon
    assert report["raw_answered"] is False
    board = report["board"]
    assert not board["ok"] and board["error"] == "KoboTimeoutError", board
    assert "did not answer open" in board["message"]
    assert board["elapsed"] < 10, board

    # The same messages from the daemon's own user are written: the refusal above
    # is about who sent them, nothing else.
    as_user(
        f"""
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH)
push.connect({endpoint.data_addr!r})
push.send_multipart(codec.encode_log({owner.path!r}, "control", 1, 0, 20, 0, time.time(), {{"control": 1.0}}))
push.close(2000)
ctx.term()
""",
        uid=os.geteuid(),
        gid=os.getegid(),
    )

    owner.log(a=2.0)
    owner.finish()
    with RunReader(owner.path) as r:
        metrics = r.list_metrics()
        assert r.series("a")["value"].tolist() == [1.0, 2.0]
    assert "control" in metrics
    assert "evil" not in metrics
    assert list(nobody_dir.iterdir()) == []

    # data socket, raw control connection, the Board's control connection, the flood
    wait_until(lambda: daemon_status(endpoint)["rejected"].get("PeerUid", 0) >= 33, message="33 refusals counted")
    cli = subprocess.run(
        [sys.executable, "-m", "kohakuboard.daemon", "status"], capture_output=True, text=True, timeout=30
    )
    assert cli.returncode == 0 and "PeerUid" in cli.stdout, cli.stdout + cli.stderr
    log = daemon.output()
    assert f"refused a connection: uid {NOBODY.pw_uid}" in log
    assert 1 <= log.count("refused a connection") <= 10, log  # at most one line a second


# ---------------------------------------------------------------- run paths


def _foreign_dir(parent: Path) -> Path:
    """A directory the test's user may not write by its permission bits (owned by nobody when root)."""
    d = parent / "foreign"
    d.mkdir()
    if os.geteuid() == 0 and NOBODY is not None:
        os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
        os.chmod(d, 0o755)
    else:
        os.chmod(d, 0o555)
    return d


def test_board_refuses_a_base_dir_its_user_cannot_write(daemon, tmp_path):
    """Board(base_dir=<another user's 0755 dir>) raises a StorageError naming the path; a normal one works."""
    foreign = _foreign_dir(tmp_path)
    with pytest.raises(StorageError) as err:
        Board(name="x", run_id="r1", base_dir=foreign, capture_output=False)
    text = str(err.value)
    assert str(foreign / "default" / "r1") in text
    assert f"{foreign} (owner uid" in text and "is not writable by uid" in text
    assert list(foreign.iterdir()) == []

    mine = tmp_path / "mine"
    with Board(name="x", run_id="r1", base_dir=mine, capture_output=False) as b:
        b.log(loss=0.5)
    with RunReader(mine / "default" / "r1") as r:
        assert r.series("loss")["value"].tolist() == [0.5]


def test_daemon_refuses_relative_and_dotdot_run_paths(daemon, endpoint, tmp_path):
    """A raw OpenRun with '..' or a relative path is refused with the reason; nothing is created."""
    from kohakuboard.protocol.control import ControlClient

    inside = tmp_path / "inside"
    inside.mkdir()
    sneaky = f"{inside}/../escaped/run"
    conn = ControlClient(endpoint)
    try:
        for path, reason in ((sneaky, "'..'"), ("relative/run", "absolute")):
            with pytest.raises(StorageError) as err:
                conn.request(
                    m.OpenRun, m.Envelope(run=path, client="c1"), 5.0, "n", "p", "r", {}, os.getpid(), 0, "h", 1
                )
            assert path in str(err.value) and reason in str(err.value)
    finally:
        conn.close()
    assert not (tmp_path / "escaped").exists()
    opened = [r["path"] for r in daemon_status(endpoint)["runs"]]
    assert not [p for p in opened if p.startswith(str(tmp_path)) or not p.startswith("/")], opened


@pytest.mark.own_daemon
def test_daemon_refuses_data_and_requests_for_a_foreign_run_folder(daemon, endpoint, tmp_path):
    """Data for an existing run folder its user could not write is dropped and counted, not written."""
    import zmq

    from kohakuboard.protocol import codec
    from kohakuboard.protocol.control import ControlClient

    mine = tmp_path / "mine"
    with Board(name="x", run_id="r1", base_dir=mine, capture_output=False) as b:
        b.log(loss=0.5)
    foreign = _foreign_dir(tmp_path)
    os.chmod(foreign, 0o755)
    run = foreign / "r1"
    shutil.copytree(mine / "default" / "r1", run)
    if os.geteuid() == 0 and NOBODY is not None:
        for p in [run, *run.rglob("*")]:
            os.chown(p, NOBODY.pw_uid, NOBODY.pw_gid)
    else:
        for p in [run, *run.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o555)
        os.chmod(foreign, 0o555)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(endpoint.data_addr)
        push.send_multipart(codec.encode_log(str(run), "other", 1, 0, 1, 0, time.time(), {"evil": 1.0}))
        wait_until(lambda: daemon_status(endpoint)["rejected"].get("RunPath", 0) >= 1, message="RunPath refusal")
    finally:
        push.close(0)
        ctx.term()

    conn = ControlClient(endpoint)
    try:
        with pytest.raises(StorageError) as err:
            conn.request(m.FlushRequest, m.Envelope(run=str(run), client="other"), 5.0, 1)
        assert str(run) in str(err.value) and "not writable" in str(err.value)
    finally:
        conn.close()
    info = daemon_status(endpoint)
    assert all(r["path"] != str(run) for r in info["runs"])
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert "rejected message (RunPath)" in daemon.output()


# --------------------------------------------------------------------- TCP


def _listening_tcp_inodes() -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def test_daemon_listens_on_no_tcp_port(daemon, endpoint, base_dir):
    """With the default configuration the daemon has no listening TCP socket (IPv4 or IPv6)."""
    # The method sees a listener when there is one: ours.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    probe.listen()
    try:
        assert _socket_inodes(os.getpid()) & _listening_tcp_inodes()
    finally:
        probe.close()

    with Board(name="x", base_dir=base_dir, capture_output=False) as b:  # every socket is set up
        b.log(loss=1.0)
        b.flush()
        daemon_sockets = _socket_inodes(daemon.pid)
        assert daemon_sockets, "the daemon should at least hold its Unix sockets"
        assert not daemon_sockets & _listening_tcp_inodes()
    if shutil.which("ss"):
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout
        assert f"pid={daemon.pid}," not in out, out
