"""``kobo-serve`` attacked from outside: a real server process, real accounts, plain HTTP requests.

Every refusal is checked for its status and for what the body does *not*
contain (no run data, no file contents, no account details).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess

PASSWORD = "correct horse battery"


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kohakuboard.viewer.serve_cli", "--config-dir", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


class Server(ServerProcess):
    """A real ``kobo-serve`` over ``data`` with the accounts in ``config``."""

    def __init__(self, data: Path, config: Path, *args: str) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "kohakuboard.viewer.serve_cli",
                "--data-dir",
                str(data),
                "--config-dir",
                str(config),
                "--port",
                "0",
                *args,
            ]
        )

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.origin, timeout=20, follow_redirects=False, **kw)


@pytest.fixture(scope="module")
def team(viewer_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A data dir with two projects (and a symlink out), two users, a token, and a running kobo-serve."""
    root = tmp_path_factory.mktemp("team")
    data = root / "data"
    for project, run in (("default", "rich"), ("default", "ddp"), ("other", "crashed")):
        shutil.copytree(viewer_runs / project / run, data / project / run)
    secret = root / "outside" / "secret"
    secret.mkdir(parents=True)
    (secret / "metadata.json").write_text('{"name": "TOPSECRET", "run_id": "secret"}')
    os.symlink(secret, data / "default" / "escape")
    config = root / "config"
    assert cli(config, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    r = cli(config, "user", "add", "bob", "--projects", "other", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    token = cli(config, "token", "create", "alice", "--label", "ci").stdout.strip()
    assert token.startswith("kobo_")
    token2 = cli(config, "token", "create", "alice", "--label", "raw").stdout.strip()
    server = Server(data, config, "--session-idle", "3")
    try:
        yield {"server": server, "config": config, "data": data, "token": token, "token2": token2}
    finally:
        server.stop()


def test_the_server_gives_way_to_training(team):
    """By default every thread of kobo-serve runs under SCHED_IDLE at nice +10: training on the node comes first."""
    pid = team["server"].proc.pid
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert len(tids) > 1  # the event loop and the read threads
    for tid in tids:
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE, tid
        assert os.getpriority(os.PRIO_PROCESS, tid) >= 10, tid


def test_no_sched_idle_keeps_the_normal_policy(tmp_path, viewer_runs):
    server, _ = own_server(tmp_path, viewer_runs, "carol", "--nice", "0", "--no-sched-idle")
    try:
        pid = server.proc.pid
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        out = server.stop()
    assert "CPU priority: normal priority" in out


def own_server(tmp_path: Path, viewer_runs: Path, user: str, *args: str) -> tuple[Server, Path]:
    """A server of the test's own (one run, one user): for tests whose side effects must not reach others."""
    data = tmp_path / "data"
    shutil.copytree(viewer_runs / "default" / "ddp", data / "default" / "ddp")
    config = tmp_path / "config"
    assert cli(config, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    return Server(data, config, *args), config


def login(c: httpx.Client, user: str, password: str = PASSWORD, origin: str | None = None) -> httpx.Response:
    csrf = c.get("/api/session").json()["csrf"]
    return c.post(
        "/api/login",
        json={"user": user, "password": password},
        headers={"x-kobo-csrf": csrf, "origin": origin or str(c.base_url).rstrip("/")},
    )


def no_leak(r: httpx.Response) -> None:
    for secret in ("TOPSECRET", "epoch 0 starting", "optimizer", "root:x:", "scrypt", PASSWORD):
        assert secret not in r.text, (r.request.url, secret)


def test_no_credentials(team):
    with team["server"].client() as c:
        page = c.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        for url in (
            "/api/runs",
            "/api/runs/default/rich",
            "/api/runs/default/rich/series?metric=val/acc",
            "/api/events",
            "/api/stats",
        ):
            r = c.get(url)
            assert r.status_code == 401, url
            no_leak(r)
        login_page = c.get("/login")
        assert login_page.status_code == 200 and 'id="login-form"' in login_page.text
        assert "default-src 'self'" in login_page.headers["content-security-policy"]
        assert c.get("/healthz").json() == {"ok": True}


def test_login_session_and_logout(team):
    with team["server"].client() as c:
        r = login(c, "alice")
        assert r.status_code == 200 and r.json()["user"] == "alice"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        csrf = r.json()["csrf"]
        assert c.get("/api/runs").json()["total"] == 3
        assert c.get("/").status_code == 200
        # logout needs the CSRF token and a same-origin Origin
        assert c.post("/api/logout", headers={"origin": team["server"].origin}).status_code == 403
        assert (
            c.post("/api/logout", headers={"x-kobo-csrf": "forged", "origin": team["server"].origin}).status_code == 403
        )
        assert c.post("/api/logout", headers={"x-kobo-csrf": csrf, "origin": "http://evil.example"}).status_code == 403
        assert c.get("/api/runs").status_code == 200  # none of those logged out
        r = c.post("/api/logout", headers={"x-kobo-csrf": csrf, "origin": team["server"].origin})
        assert r.status_code == 200
        assert c.get("/api/runs").status_code == 401


def test_logged_out_session_id_stays_dead(team):
    with team["server"].client() as c:
        r = login(c, "alice")
        sid = c.cookies.get("kobo_session")
        c.post("/api/logout", headers={"x-kobo-csrf": r.json()["csrf"], "origin": team["server"].origin})
    with team["server"].client() as c2:
        r = c2.get("/api/runs", headers={"cookie": f"kobo_session={sid}"})
        assert r.status_code == 401
        no_leak(r)


def test_idle_session_expires(tmp_path, viewer_runs):
    """Its own server, with sessions idle for 1 s expiring (the shared one's are 3 s)."""
    s, _ = own_server(tmp_path, viewer_runs, "alice", "--session-idle", "1")
    try:
        with s.client() as c:
            assert login(c, "alice").status_code == 200
            assert c.get("/api/runs").status_code == 200
            time.sleep(1.5)  # idle for longer than --session-idle
            assert c.get("/api/runs").status_code == 401
    finally:
        s.stop()


def test_wrong_password_backs_off_and_is_logged(tmp_path, viewer_runs):
    """Its own server: the back-off it provokes must not lock the other tests' logins out."""
    s, config = own_server(tmp_path, viewer_runs, "alice")
    try:
        with s.client() as c:
            codes = [login(c, "alice", "wrong password!").status_code for _ in range(4)]
            assert codes[:3] == [401, 401, 401] and codes[3] in (401, 429)
            r = login(c, "alice", "wrong password!")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            r = login(c, "alice")  # the right password too must wait: no guessing around the back-off
            assert r.status_code == 429
            no_leak(r)
            assert login(c, "mallory", "whatever123").status_code == 429
    finally:
        out = s.stop()
    assert "failed login for 'alice' from 127.0.0.1" in out
    assert PASSWORD not in out and "wrong password!" not in out


def test_cross_origin_and_csrf_on_login(tmp_path, viewer_runs):
    """A login form posted from another site, or without the token, is refused before the password is checked."""
    s, config = own_server(tmp_path, viewer_runs, "alice")
    try:
        with s.client() as c:
            csrf = c.get("/api/session").json()["csrf"]
            body = {"user": "alice", "password": PASSWORD}
            assert (
                c.post(
                    "/api/login", json=body, headers={"x-kobo-csrf": csrf, "origin": "http://evil.example"}
                ).status_code
                == 403
            )
            assert c.post("/api/login", json=body, headers={"x-kobo-csrf": csrf}).status_code == 403  # no Origin
            assert c.post("/api/login", json=body, headers={"origin": s.origin}).status_code == 403  # no token
            assert (
                c.post("/api/login", json=body, headers={"x-kobo-csrf": "forged", "origin": s.origin}).status_code
                == 403
            )
        with s.client() as fresh:  # no pre-login session cookie at all
            assert (
                fresh.post("/api/login", json=body, headers={"x-kobo-csrf": csrf, "origin": s.origin}).status_code
                == 403
            )
        with s.client() as c:
            assert login(c, "alice").status_code == 200
            for method in ("PUT", "DELETE", "PATCH"):
                assert c.request(method, "/api/runs").status_code == 405
            assert c.post("/api/runs").status_code == 405
    finally:
        out = s.stop()
    assert "PASSWORD" not in out and PASSWORD not in out


def test_tokens_and_revocation(team):
    token = team["token"]
    with team["server"].client() as c:
        assert c.get("/api/runs", headers={"authorization": f"Bearer {token}"}).json()["total"] == 3
        assert c.get("/api/runs", headers={"authorization": "Bearer kobo_000000000000_forged"}).status_code == 401
        token_id = token.split("_")[1]
        assert cli(team["config"], "token", "revoke", token_id).returncode == 0
        r = c.get("/api/runs", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401
        no_leak(r)


def test_wrong_host_is_refused(team):
    with team["server"].client() as c:
        r = c.get("/api/runs", headers={"host": "rebind.attacker.example", "authorization": f"Bearer {team['token']}"})
        assert r.status_code == 403
        no_leak(r)


def test_no_cors_headers(team):
    with team["server"].client() as c:
        login(c, "alice")
        r = c.get("/api/runs", headers={"origin": "http://evil.example"})
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        pre = c.options("/api/runs", headers={"origin": "http://evil.example", "access-control-request-method": "GET"})
        assert pre.status_code == 405 and not [h for h in pre.headers if h.lower().startswith("access-control-")]


@pytest.mark.parametrize(
    "url",
    [
        "/api/runs/../../etc/passwd",
        "/api/runs/%2E%2E/%2E%2E",
        "/api/runs/default/%2E%2E",
        "/api/runs/%252E%252E/default",
        "/api/runs/default/..%2F..%2Fetc",
        "/api/runs/%2Fetc/passwd",
        "/api/runs/default/escape",
        "/api/runs/default/escape/series?metric=loss",
        "/api/runs/default/rich/media?name=..%2F..%2Fmetadata.json",
        "/media/default/rich/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/media/default/rich/%2E%2E%2Fmetadata.json",
        "/media/default/escape/" + "0" * 64 + ".png",
        "/media/%2Fetc/passwd/x.png",
        "/static/..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/%2E%2E/app.py",
        "/static/%252E%252E/app.py",
        "/media/default/rich/" + "0" * 64 + ".png",  # a well-formed hash the run's media table does not hold
        "/api/events?runs=..%2F..%2Fetc",
        "/api/events?runs=default/..",
        "/api/events?runs=%2Fetc/passwd",
        "/api/events?runs=default/escape",
        "/api/events?runs=default/%2E%2E%2F%2E%2E",
    ],
)
def test_traversal_in_every_path_parameter(team, url):
    with team["server"].client() as c:
        login(c, "alice")
        r = c.get(url)
        assert r.status_code in (400, 404), (url, r.status_code)
        no_leak(r)
        assert "def create_app" not in r.text


RAW_TRAVERSALS = [
    "/api/runs/../../etc/passwd",
    "/api/runs/default/../../../etc",
    "/api/runs/default/rich/../../../../etc/passwd/series?metric=loss",
    "/api/runs/default/escape/logs",
    "/media/default/rich/../../../../etc/passwd",
    "/media/../../etc/passwd/x.png",
    "/static/../app.py",
    "/static/../../viewer/app.py",
    "/static//etc/passwd",
    "/api/events?runs=../../etc",
]


def raw_get(origin: str, target: str, token: str) -> tuple[int, str]:
    """GET ``target`` exactly as written (an HTTP client would remove the dot segments first)."""
    import socket

    host, port = origin.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.mark.parametrize("target", RAW_TRAVERSALS)
def test_literal_dot_segments_sent_as_is(team, target):
    status, body = raw_get(team["server"].origin, target, team["token2"])
    assert status in (400, 404), (target, status, body[:200])
    for secret in ("TOPSECRET", "root:x:", "def create_app", "epoch 0 starting"):
        assert secret not in body, (target, secret)


def test_https_cookie_is_secure_host_prefixed_and_http_origins_are_refused(tmp_path, viewer_runs):
    """Under --certfile/--keyfile the session cookie is `__Host-` and `Secure`, and an http:// Origin is cross-origin."""
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    data = tmp_path / "data"
    shutil.copytree(viewer_runs / "default" / "ddp", data / "default" / "ddp")
    config = tmp_path / "config"
    assert cli(config, "user", "add", "erin", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    s = Server(data, config, "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert s.origin.startswith("https://127.0.0.1:")
        with httpx.Client(base_url=s.origin, verify=ssl.create_default_context(cafile=str(cert)), timeout=20) as c:
            csrf = c.get("/api/session").json()["csrf"]
            plain = s.origin.replace("https://", "http://")
            r = c.post(
                "/api/login",
                json={"user": "erin", "password": PASSWORD},
                headers={"x-kobo-csrf": csrf, "origin": plain},
            )
            assert r.status_code == 403  # an http:// page is not this https:// origin
            r = login(c, "erin")
            assert r.status_code == 200
            cookie = r.headers["set-cookie"]
            assert cookie.startswith("__Host-kobo_session=")
            for attr in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
                assert attr in cookie.split("; "), cookie
            assert "Domain=" not in cookie
            assert c.get("/api/runs").json()["total"] == 1
        with httpx.Client(base_url=s.origin.replace("https://", "http://"), timeout=5) as c:
            with pytest.raises(httpx.HTTPError):
                c.get("/api/runs")  # no plain HTTP on the TLS port
    finally:
        s.stop()


def test_a_project_the_user_may_not_see_is_like_one_that_does_not_exist(team):
    with team["server"].client() as c:
        assert login(c, "bob").status_code == 200
        runs = c.get("/api/runs").json()
        assert [(r["project"], r["run_id"]) for r in runs["runs"]] == [("other", "crashed")]
        assert [p["name"] for p in runs["projects"]] == ["other"]
        hidden = c.get("/api/runs/default/rich")
        missing = c.get("/api/runs/nope/rich")
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"].replace("'default'", "'X'") == missing.json()["error"].replace("'nope'", "'X'")
        for url in (
            "/api/runs/default/rich/series?metric=val/acc",
            "/api/runs/default/rich/media?name=sample",
            "/api/runs/default/rich/logs",
            "/api/events?runs=default/rich",
            "/api/runs/default/rich/series.csv?metric=val/acc",
        ):
            r = c.get(url)
            assert r.status_code == 404, url
            no_leak(r)
        with team["server"].client() as alice:
            login(alice, "alice")
            media_url = alice.get("/api/runs/default/rich/media?name=sample").json()["rows"][0]["url"]
        assert c.get(media_url).status_code == 404
        assert c.get("/api/runs/other/crashed").status_code == 200


class Stream:
    """An open ``/api/events`` stream read in a thread: ``ended`` is set when the server ends it."""

    def __init__(self, server: Server, **headers: str) -> None:
        import threading

        self.ended = threading.Event()
        self.status = 0
        self.client = server.client(headers=headers)
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.opened.wait(10) and self.status == 200, self.status

    def _read(self) -> None:
        try:
            with self.client.stream("GET", "/api/events?runs=default/ddp") as r:
                self.status = r.status_code
                self.opened.set()
                for _ in r.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass
        finally:
            self.opened.set()
            self.ended.set()

    def close(self) -> None:
        self.client.close()


def test_a_removed_user_is_logged_out(tmp_path, viewer_runs):
    """`user remove` ends her sessions and her open event streams, cookie or token, in a running server."""
    s, config = own_server(tmp_path, viewer_runs, "carol")
    token = cli(config, "token", "create", "carol").stdout.strip()
    try:
        with s.client() as c:
            assert login(c, "carol").status_code == 200
            assert c.get("/api/runs").status_code == 200
            by_cookie = Stream(s, cookie=f"kobo_session={c.cookies.get('kobo_session')}")
            by_token = Stream(s, authorization=f"Bearer {token}")
            time.sleep(1.2)
            assert not by_cookie.ended.is_set() and not by_token.ended.is_set()
            assert cli(config, "user", "remove", "carol").returncode == 0
            assert c.get("/api/runs").status_code == 401
            assert c.get("/api/runs", headers={"authorization": f"Bearer {token}"}).status_code == 401
            assert by_cookie.ended.wait(3) and by_token.ended.wait(3), "streams outlived the user"
            by_cookie.close()
            by_token.close()
    finally:
        out = s.stop()
    assert "ended a session of 'carol': the user was removed" in out


def test_a_new_password_ends_the_users_sessions(tmp_path, viewer_runs):
    """`user passwd` ends every session of that user (both browsers, the open stream); her tokens stay."""
    s, config = own_server(tmp_path, viewer_runs, "dave")
    token = cli(config, "token", "create", "dave").stdout.strip()
    try:
        with s.client() as c1, s.client() as c2, s.client() as other:
            assert login(c1, "dave").status_code == 200 and login(c2, "dave").status_code == 200
            stream = Stream(s, cookie=f"kobo_session={c1.cookies.get('kobo_session')}")
            assert c1.get("/api/runs").status_code == c2.get("/api/runs").status_code == 200
            r = cli(config, "user", "passwd", "dave", "--password-stdin", stdin="a new password\n")
            assert r.returncode == 0, r.stderr
            for c in (c1, c2):
                r = c.get("/api/runs")
                assert r.status_code == 401
                no_leak(r)
            assert stream.ended.wait(3), "the event stream outlived the old password"
            stream.close()
            assert login(other, "dave").status_code == 401  # the old password is gone
            assert login(other, "dave", "a new password").status_code == 200
            assert other.get("/api/runs").status_code == 200
            assert c1.get("/api/runs", headers={"authorization": f"Bearer {token}"}).status_code == 200
    finally:
        out = s.stop()
    assert "ended a session of 'dave': the password changed" in out


def test_logout_and_token_revoke_end_open_streams(team):
    """A stream is not a way around logout or revocation: it ends within seconds of either."""
    s = team["server"]
    tok = cli(team["config"], "token", "create", "alice", "--label", "stream").stdout.strip()
    with s.client() as c:
        r = login(c, "alice")
        by_cookie = Stream(s, cookie=f"kobo_session={c.cookies.get('kobo_session')}")
        by_token = Stream(s, authorization=f"Bearer {tok}")
        time.sleep(1.2)
        assert not by_cookie.ended.is_set() and not by_token.ended.is_set()
        assert c.post("/api/logout", headers={"x-kobo-csrf": r.json()["csrf"], "origin": s.origin}).status_code == 200
        assert cli(team["config"], "token", "revoke", tok.split("_")[1]).returncode == 0
        t0 = time.monotonic()
        assert by_cookie.ended.wait(3) and by_token.ended.wait(3)
        assert time.monotonic() - t0 < 3
        by_cookie.close()
        by_token.close()
