"""``kobo-serve`` in a real browser: the login page, who is logged in, log out, and a ``--base-url``.

Debian's chromium driven by Playwright over a real ``kobo-serve`` process with
real accounts (``kobo-serve user add --password-stdin``): ``/`` lands on the
login page, a wrong password shows its error in the page, the right one shows
the run list of the projects the user may see with the user's name and a Log
out button, Log out goes back to the login page (and ``/`` stays there), a
user removed while the page is open is sent to the login page by the next API
answer (401).  Under ``--base-url /kobo`` every request the page makes stays
under ``/kobo/`` (API, static files, the live stream, media).  Under ``kobo
open`` the page asks nothing about a session and a refused request shows a
banner saying to open the printed URL again.

The pages run with their Content-Security-Policy enforced (no string JS in
``wait_for_function``; ``page.evaluate`` goes through the DevTools protocol).
No JavaScript error: the only console error allowed is the browser's "Failed
to load resource" line for the 401 a test provokes on purpose (a wrong
password, a removed user, cleared cookies), matched by status and URL.

Screenshots go to the test's tmp dir, and with ``UPDATE_DOCS_SCREENSHOTS=1``
to ``docs/viewer-login.png`` and ``docs/viewer-serve-runs.png``.

Chromium: ``KOBO_CHROMIUM`` or ``/usr/bin/chromium``; without it the tests skip, except under CI.
"""

from __future__ import annotations

import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import playwright_or_skip, save_for_docs, settle
from .test_serve_security import PASSWORD, Server, cli

PlaywrightError = playwright_or_skip().Error

ALL_RUNS = {"default/rich", "default/ddp", "other/crashed"}
UNAUTHORIZED = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"


@pytest.fixture(scope="module")
def team_dirs(viewer_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two projects' runs; alice sees every project, bob only ``other``."""
    root = tmp_path_factory.mktemp("serve-browser")
    data = root / "data"
    for key in sorted(ALL_RUNS):
        shutil.copytree(viewer_runs / key, data / key)
    config = root / "config"
    r = cli(config, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    r = cli(config, "user", "add", "bob", "--projects", "other", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    return {"data": data, "config": config}


class Page:
    """A browser context on a server: JS errors, console errors (with their URL) and every request URL."""

    def __init__(self, browser: Any, shots: Path) -> None:
        self.shots = shots
        self.ctx = browser.new_context(viewport={"width": 1280, "height": 760})
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.console: list[tuple[str, str]] = []  # (text, url) of console errors
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on(
            "console", lambda m: self.console.append((m.text, m.location.get("url", ""))) if m.type == "error" else None
        )
        self.page.on("request", lambda r: self.requests.append(r.url))

    def expect_401(self, url: str) -> None:
        """The browser's console line for one expected 401 answer to ``url``: taken off the list (it must be there)."""
        hit = (UNAUTHORIZED, url)
        assert hit in self.console, (hit, self.console)
        self.console.remove(hit)

    def js_errors(self) -> list[str]:
        return self.errors + [f"console: {text} ({url})" for text, url in self.console]

    def page_errors(self) -> list[str]:
        """What the viewer page itself reported (window.koboState.errors)."""
        return [e["message"] for e in self.page.evaluate("window.koboState.errors.map(e => ({message: e.message}))")]

    def wait_until(self, expr: str, timeout: float = 15.0) -> Any:
        """Poll ``expr`` with page.evaluate (wait_for_function with a string needs eval, which the CSP refuses)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.page.evaluate(expr)
            except Exception:  # a navigation in between: the next poll sees the new page
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expr} at {self.page.url}")
            time.sleep(0.1)

    def shot(self, name: str, docs_name: str | None = None) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        if docs_name:
            save_for_docs(path, docs_name)
        return path

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Callable[[], Page]]:
    pages: list[Page] = []

    def make() -> Page:
        p = Page(browser, tmp_path)
        pages.append(p)
        return p

    yield make
    for p in pages:
        p.close()


@pytest.fixture
def serve(team_dirs: dict[str, Path]) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: str) -> Server:
        s = Server(team_dirs["data"], team_dirs["config"], *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def login(p: Page, user: str, password: str = PASSWORD) -> None:
    """On the login page: fill the form and submit it."""
    p.page.wait_for_selector("#login-form")
    p.page.fill("#login-user", user)
    p.page.fill("#login-password", password)
    p.page.click("#login-submit")


def run_list(p: Page, app: str) -> set[str]:
    """Wait for the viewer page at ``app`` to list its runs; their keys."""
    p.page.wait_for_url(app, timeout=15_000)
    p.page.wait_for_selector("tr.run-row", timeout=15_000)
    p.wait_until("window.koboState.ready === true && window.koboState.view === 'runs'")
    return set(p.page.eval_on_selector_all("tr.run-row", "rows => rows.map(r => r.dataset.run)"))


def logged_in_as(p: Page, user: str) -> None:
    p.page.wait_for_selector("#user-box", state="visible", timeout=10_000)
    assert p.page.inner_text("#user-name") == user
    assert p.page.is_visible("button#logout-btn") and p.page.inner_text("button#logout-btn") == "Log out"
    assert p.page.evaluate("window.koboState.user") == user


def log_out(p: Page, login_url: str) -> None:
    p.page.click("button#logout-btn")
    p.page.wait_for_url(login_url, timeout=10_000)
    p.page.wait_for_selector("#login-form")


@pytest.mark.parametrize("base", ["", "/kobo"], ids=["root", "base-url"])
def test_login_run_list_and_logout(serve, page, base):
    s = serve(*(["--base-url", base] if base else []))
    app = f"{s.origin}{base}/"
    login_url = f"{s.origin}{base}/login"
    p = page()

    # not logged in: the page is the login page
    p.page.goto(app)
    p.page.wait_for_url(login_url)
    p.page.wait_for_selector("#login-form")
    assert p.page.title() == "Log in · KohakuBoard"
    p.page.wait_for_load_state("networkidle")
    p.shot("login", "viewer-login.png" if not base else None)

    # a wrong password: the server's message in the page, still on the login page
    login(p, "alice", "not her password")
    p.page.wait_for_selector("#login-error", state="visible", timeout=10_000)
    assert "wrong user name or password" in p.page.inner_text("#login-error")
    assert p.page.url == login_url
    p.expect_401(f"{app}api/login")
    p.shot("login-wrong-password")

    # the right password: every run, the user's name and Log out in the top bar
    p.page.fill("#login-password", PASSWORD)
    p.page.click("#login-submit")
    assert run_list(p, app) == ALL_RUNS
    logged_in_as(p, "alice")
    assert p.page.is_hidden("#auth-error")
    settle(p.page)
    p.shot("serve-runs", "viewer-serve-runs.png" if not base else None)
    assert p.page_errors() == []

    # log out: the login page; the viewer's address leads there again
    log_out(p, login_url)
    p.page.goto(app)
    p.page.wait_for_url(login_url)
    p.page.wait_for_selector("#login-form")

    # bob was created with --projects other: only that project's runs
    login(p, "bob")
    assert run_list(p, app) == {"other/crashed"}
    logged_in_as(p, "bob")
    assert p.page.is_hidden("#project-filter")  # one project: no project select
    assert p.page_errors() == []
    log_out(p, login_url)
    p.page.goto(app)
    p.page.wait_for_url(login_url)
    p.page.wait_for_selector("#login-form")
    assert p.js_errors() == []

    if base:
        outside = sorted(
            {
                u
                for u in p.requests
                if urllib.parse.urlsplit(u).scheme in ("http", "https")
                and not urllib.parse.urlsplit(u).path.startswith(base + "/")
            }
        )
        assert outside == [], outside


def test_base_url_run_view_requests_stay_under_the_base(serve, page):
    """Scalars, the live stream, CSV links and media URLs (sent by the server as /media/...) under /kobo/."""
    s = serve("--base-url", "/kobo")
    app = f"{s.origin}/kobo/"
    p = page()
    p.page.goto(app)
    p.page.wait_for_url(app + "login")
    login(p, "alice")
    assert run_list(p, app) == ALL_RUNS
    p.page.click('tr.run-row[data-run="default/rich"] a.run-link')
    p.page.wait_for_selector('.chart-card[data-metric="train/loss"][data-drawn="1"]', timeout=30_000)
    p.wait_until("window.koboState.sse === 'open'")
    csv = p.page.get_attribute('.chart-card[data-metric="train/loss"] a.csv-link', "href")
    assert csv and not csv.startswith("/"), csv  # relative to the page
    assert p.page.evaluate(f"new URL({csv!r}, location.href).pathname").startswith(
        "/kobo/api/runs/default/rich/series.csv"
    )
    p.page.click('nav#tabs button.tab[data-tab="media"]')
    p.page.wait_for_selector('.item-card[data-item="sample"][data-drawn="1"]', timeout=20_000)
    p.wait_until(
        "[...document.querySelectorAll('.item-card[data-item=\"sample\"] img')]"
        ".some(i => i.complete && i.naturalWidth === 64)"
    )
    paths = [urllib.parse.urlsplit(u).path for u in p.requests if urllib.parse.urlsplit(u).scheme in ("http", "https")]
    assert any(x.startswith("/kobo/media/default/rich/") for x in paths), paths
    assert any(x.startswith("/kobo/api/runs/default/rich/series") for x in paths), paths
    assert "/kobo/api/events" in paths and "/kobo/static/app.js" in paths
    assert [x for x in paths if not x.startswith("/kobo/")] == []
    logged_in_as(p, "alice")
    assert p.page_errors() == []
    assert p.js_errors() == []


def test_removed_user_is_sent_to_the_login_page(serve, page, team_dirs):
    """The next API answer after ``kobo-serve user remove`` is 401: the page goes to the login page."""
    config = team_dirs["config"]
    r = cli(config, "user", "add", "carol", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    try:
        s = serve()
        app = f"{s.origin}/"
        p = page()
        p.page.goto(app)
        login(p, "carol")
        assert run_list(p, app) == ALL_RUNS
        logged_in_as(p, "carol")
        assert cli(config, "user", "remove", "carol").returncode == 0
        try:
            p.page.fill("#run-filter", "rich", timeout=3000)  # the list asks api/runs again: 401
        except PlaywrightError:
            pass  # a live refresh of the list (event: runs) was refused first: the page already left
        p.page.wait_for_url(app + "login", timeout=10_000)
        p.page.wait_for_selector("#login-form")
        refused = [c for c in p.console if c[0] == UNAUTHORIZED and c[1] in (f"{app}api/runs", f"{app}api/runs?q=rich")]
        assert refused, p.console
        p.console = [c for c in p.console if c not in refused]
        assert p.js_errors() == []
    finally:
        cli(config, "user", "remove", "carol")


def test_kobo_open_has_no_session_and_a_refusal_says_to_reopen_the_url(open_server, page, viewer_runs):
    """``kobo open``: no api/session request, no user box; a 401 shows the banner instead of a login page."""
    s = open_server(viewer_runs)
    p = page()
    p.page.goto(s.url)
    p.page.wait_for_url(f"{s.origin}/")
    assert len(run_list(p, f"{s.origin}/")) == 4
    settle(p.page)
    assert p.page.is_hidden("#user-box") and p.page.is_hidden("#auth-error")
    assert p.page.evaluate("window.koboState.user") is None
    assert not [u for u in p.requests if "api/session" in u]
    assert p.js_errors() == [] and p.page_errors() == []

    p.ctx.clear_cookies()
    with p.page.expect_response(lambda r: r.url == f"{s.origin}/api/runs?q=rich") as refused:
        p.page.fill("#run-filter", "rich")  # the list asks api/runs again, without a cookie
    assert refused.value.status == 401
    p.page.wait_for_selector("#auth-error", state="visible", timeout=10_000)
    assert "kobo open" in p.page.inner_text("#auth-error")
    p.shot("open-auth-error")
    assert p.page.evaluate("location.pathname") == "/" and p.page.is_visible("#runs-table")  # no login page here
    p.expect_401(f"{s.origin}/api/runs?q=rich")
    p.expect_401(f"{s.origin}/api/session")  # asked once: not a kobo-serve
    # a live refresh of the list (event: runs; with or without the filter, by when it came) may have been
    # refused too: the same 401, no other error
    refreshes = {(UNAUTHORIZED, f"{s.origin}/api/runs"), (UNAUTHORIZED, f"{s.origin}/api/runs?q=rich")}
    p.console = [c for c in p.console if c not in refreshes]
    assert p.js_errors() == []
