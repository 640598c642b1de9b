"""The viewer in a real browser: Debian's chromium driven by Playwright over a real ``kobo open``.

Each test checks what a user sees: the run list with the right statuses, a
1M-point chart whose received data holds every spike, zoom that fetches full
resolution, a flushed point appearing on an open page, media, tables and
histograms drawn, and no JavaScript error.  Pixel checks on screenshots back
up what the page reports.  Screenshots are written to the test's tmp dir, and
to ``docs/`` when ``UPDATE_DOCS_SCREENSHOTS=1`` (the README's pictures).

Chromium: ``KOBO_CHROMIUM`` or ``/usr/bin/chromium`` (``.ci/run`` installs it;
never ``playwright install``).  Without it the tests skip, except under CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kohakuboard.viewer import reduce as R

from .conftest import SPIKES, OpenServer, playwright_or_skip, save_for_docs, settle

playwright_or_skip()
Image = pytest.importorskip("PIL.Image")


class Page:
    """A browser page on a ``kobo open`` server, recording JS errors and series responses."""

    def __init__(
        self, browser: Any, server: Any, shots: Path, width: int = 1400, height: int = 900, bypass_csp: bool = True
    ) -> None:
        self.server = server
        self.shots = shots
        # Playwright evaluates the tests' JS snippets with eval, which the page's CSP forbids;
        # test_page_runs_under_its_content_security_policy loads the page with the CSP enforced.
        self.ctx = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=bypass_csp)
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.series: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("response", self._on_response)

    def _on_response(self, resp: Any) -> None:
        if "/series?" in resp.url and resp.status == 200:
            try:
                header, arrays = R.decode(resp.body())
            except Exception as exc:  # the page would fail too; make the test say so
                self.errors.append(f"undecodable series response {resp.url}: {exc}")
                return
            self.series.append((resp.url, header, arrays))

    def goto(self, hash_: str = "") -> None:
        s = self.server
        if s.token:
            self.page.goto(f"{s.origin}/?token={s.token}")  # exchanged for the session cookie
            assert self.page.url == f"{s.origin}/", self.page.url  # the token left the address bar
        self.page.goto(f"{s.origin}/{hash_}")
        self.wait_ready()

    def wait_ready(self, timeout: float = 30_000) -> None:
        self.page.wait_for_function("window.koboState && window.koboState.ready === true", timeout=timeout)

    def state(self) -> dict[str, Any]:
        return self.page.evaluate("JSON.parse(JSON.stringify(window.koboState))")

    def shot(self, name: str, locator: Any = None, full_page: bool = False) -> Any:
        path = self.shots / f"{name}.png"
        if locator is not None:
            locator.screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path), full_page=full_page)
        save_for_docs(path, f"viewer-{name}.png")
        return Image.open(path).convert("RGB")

    def js_errors(self) -> list[str]:
        return self.errors + [e["message"] for e in self.state()["errors"]]

    def close(self) -> None:
        self.ctx.close()


def colours(img: Any) -> int:
    """Distinct colours in an image (a blank canvas has one or two)."""
    return len(set(np.asarray(img).reshape(-1, 3).view("u1,u1,u1").ravel().tolist()))


def ink(img: Any, background: tuple[int, int, int] = (255, 255, 255)) -> float:
    """Fraction of pixels that differ from the background."""
    a = np.asarray(img).astype(int)
    return float((np.abs(a - np.array(background)).sum(axis=2) > 30).mean())


@pytest.fixture(scope="module")
def viewer_server(viewer_runs) -> Iterator[Any]:
    """One ``kobo open`` on the viewer runs for the tests that only read them (each page has a browser
    context, so a session, of its own)."""
    s = OpenServer(viewer_runs)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def page(browser, tmp_path) -> Iterator[Any]:
    pages: list[Page] = []

    def make(server: Any, **kw: Any) -> Page:
        p = Page(browser, server, tmp_path, **kw)
        pages.append(p)
        return p

    yield make
    for p in pages:
        p.close()


def test_run_list_shows_every_run_and_its_status(page, viewer_server):
    p = page(viewer_server)
    p.goto()
    rows = p.page.locator("tr.run-row")
    assert rows.count() == 4
    status = {r.get_attribute("data-run"): r.locator(".badge").get_attribute("data-status") for r in rows.all()}
    assert status == {
        "default/spikes": "finished",
        "default/rich": "finished",
        "default/ddp": "finished",
        "other/crashed": "crashed",
    }
    p.page.fill("#run-filter", "optimizer.name=adamw")
    p.page.wait_for_function("document.querySelectorAll('tr.run-row').length === 1", timeout=10_000)
    assert p.page.locator("tr.run-row").get_attribute("data-run") == "default/rich"
    p.page.fill("#run-filter", "")
    p.page.wait_for_function("document.querySelectorAll('tr.run-row').length === 4", timeout=10_000)
    img = p.shot("runs")
    assert colours(img) > 20
    assert p.js_errors() == []


def test_million_point_chart_has_every_spike_and_zoom_fetches_full_resolution(page, viewer_server):
    p = page(viewer_server)
    p.goto("#/run/default/spikes")
    p.page.wait_for_selector('.chart-card[data-metric="loss"][data-drawn="1"]', timeout=30_000)
    chart = p.state()["charts"]["loss"]
    assert chart["reduced"] and 1000 <= chart["points"] <= 20_000
    received = [h for url, h, a in p.series if "metric=loss" in url]
    assert received and received[-1]["total"] == 1_000_000
    xs = set(np.concatenate([a["x"] for url, h, a in p.series if "metric=loss" in url]).astype(int).tolist())
    assert set(SPIKES) <= xs, f"spikes missing from what the page received: {sorted(set(SPIKES) - xs)}"
    img = p.shot("spikes-chart", p.page.locator('.chart-card[data-metric="loss"]'))
    assert colours(img) > 10 and ink(img) > 0.01

    s0 = SPIKES[5]
    with p.page.expect_response(lambda r: "/series?" in r.url and "x0=" in r.url) as zoom_response:
        zoomed = p.page.evaluate(f"window.koboZoom('loss', {s0 - 400}, {s0 + 400})")
    assert zoomed["zoomed"] and not zoomed["reduced"]
    header, arrays = R.decode(zoom_response.value.body())
    assert not header["reduced"] and header["n"] == header["in_range"] == 801
    assert s0 in set(arrays["x"].astype(int).tolist()) and arrays["y"].max() > 5.0
    p.shot("spikes-zoomed", p.page.locator('.chart-card[data-metric="loss"]'))
    assert p.js_errors() == []


def test_rich_run_renders_scalars_nonfinite_media_tables_histograms(page, viewer_server):
    p = page(viewer_server)
    p.goto("#/run/default/rich")
    p.page.wait_for_selector('.chart-card[data-metric="train/loss"][data-drawn="1"]', timeout=30_000)
    assert p.page.locator("details.group").count() >= 2  # train/ and val/
    nf = p.state()["charts"]["train/loss"]["nonfinite"]
    assert nf == {"nan": 1, "posinf": 1, "neginf": 1}
    badges = p.page.locator('.chart-card[data-metric="train/loss"] .nf-badge').all_inner_texts()
    assert sorted(badges) == ["1 +inf", "1 -inf", "1 NaN"]
    img = p.shot("run-scalars")
    assert colours(img) > 30

    def open_tab(tab: str) -> None:
        p.page.click(f'nav#tabs button.tab[data-tab="{tab}"]')
        p.page.wait_for_selector(f'.item-card[data-kind="{tab}"][data-drawn="1"]', timeout=20_000)

    open_tab("media")
    card = p.page.locator('.item-card[data-item="sample"]')
    card.locator("img").first.wait_for(timeout=10_000)
    p.page.wait_for_function(
        "[...document.querySelectorAll('.item-card[data-item=\"sample\"] img')].some(i => i.complete && i.naturalWidth === 64)",
        timeout=10_000,
    )
    assert p.page.evaluate("window.koboSetStep('media', 'sample', 52)")
    p.page.wait_for_function(
        "document.querySelector('.item-card[data-item=\"sample\"] .step-label').textContent.includes('52')",
        timeout=10_000,
    )
    shot = p.shot("media", card)
    assert ink(shot) > 0.02

    open_tab("tables")
    cell = p.page.locator('.item-card[data-item="preds"] table img')
    cell.first.wait_for(timeout=10_000)
    p.page.wait_for_function(
        "[...document.querySelectorAll('.item-card[data-item=\"preds\"] table img')].every(i => i.complete && i.naturalWidth === 16)",
        timeout=10_000,
    )
    assert "dog" in p.page.locator('.item-card[data-item="preds"] table').inner_text()
    p.shot("table", p.page.locator('.item-card[data-item="preds"]'))

    open_tab("histograms")
    hist = p.page.locator('.item-card[data-item="grads"]')
    canvas = hist.locator("canvas").first
    canvas.wait_for(timeout=10_000)
    img = p.shot("histogram", hist)
    assert colours(img) > 10 and ink(img) > 0.05

    for tab, item in (("kde", "logits"), ("tensors", "attn")):
        p.page.click(f'nav#tabs button.tab[data-tab="{tab}"]')
        p.page.wait_for_selector(f'.item-card[data-item="{item}"][data-drawn="1"]', timeout=20_000)
        assert ink(p.shot(tab, p.page.locator(f'.item-card[data-item="{item}"]'))) > 0.02
    p.page.click('nav#tabs button.tab[data-tab="output"]')
    p.page.wait_for_function(
        "document.querySelector('pre#output-text') && document.querySelector('pre#output-text').textContent.includes('epoch 0 starting')",
        timeout=10_000,
    )
    assert p.js_errors() == []


def test_ddp_run_rank_band(page, viewer_server):
    p = page(viewer_server)
    p.goto("#/run/default/ddp?rank=band")
    p.page.wait_for_selector('.chart-card[data-metric="loss"][data-drawn="1"]', timeout=30_000)
    assert any("rank=band" in url for url, _, _ in p.series)
    img = p.shot("ddp-band", p.page.locator('.chart-card[data-metric="loss"]'))
    assert ink(img) > 0.01
    assert p.js_errors() == []


LIVE = """
import sys, time
from kohakuboard.client import Board
b = Board(name="live-run", run_id="live", capture_output=False)
for i in range(100):
    b.step()
    b.log(loss=1.0 / (i + 1))
b.flush()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "end":
        break
    b.step()
    b.log(loss=float(line))
    b.flush()
    print("flushed", time.time(), flush=True)
b.finish()
print("finished", flush=True)
"""


def test_flushed_point_appears_on_the_open_page(open_server, page, daemon, base_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        p = page(open_server(base_dir))
        p.goto("#/run/default/live")
        p.page.wait_for_selector('.chart-card[data-metric="loss"][data-drawn="1"]', timeout=30_000)
        assert p.state()["charts"]["loss"]["points"] == 100
        p.page.wait_for_function("window.koboState.sse === 'open'", timeout=10_000)
        delays = []
        for k, value in enumerate((5.0, 7.0, 9.0)):
            proc.stdin.write(f"{value}\n")
            proc.stdin.flush()
            word, flushed = proc.stdout.readline().split()
            assert word == "flushed"
            p.page.wait_for_function(f"window.koboState.charts.loss.points >= {101 + k}", timeout=10_000)
            delays.append(time.time() - float(flushed))
        assert max(delays) < 3.0 and sorted(delays)[1] < 1.0, delays  # the median within a second
        assert p.state()["liveUpdates"] >= 3
        shot = p.shot("live", p.page.locator('.chart-card[data-metric="loss"]'))
        assert ink(shot) > 0.01
        proc.stdin.write("end\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "finished"
        p.page.wait_for_function(
            "[...document.querySelectorAll('.badge[data-status]')].some(b => b.dataset.status === 'finished')",
            timeout=10_000,
        )
        assert p.js_errors() == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def test_compare_view_overlays_runs(page, viewer_server):
    p = page(viewer_server)
    p.goto("#/compare?runs=default/ddp,other/crashed")
    p.page.wait_for_selector('.chart-card[data-metric="loss"][data-drawn="1"]', timeout=30_000)
    sources = p.state()["charts"]["loss"]["sources"]
    assert {k.split("@")[0] for k in sources} == {"default/ddp", "other/crashed"}
    p.shot("compare")
    assert p.js_errors() == []


def test_overview_screenshot(page, viewer_server):
    """The README's picture: the rich run's scalars with the namespace groups."""
    p = page(viewer_server, width=1400, height=1000)
    p.goto("#/run/default/rich?smooth=0.6")
    p.page.wait_for_selector('.chart-card[data-drawn="1"]', timeout=30_000)
    settle(p.page)
    img = p.shot("overview")
    assert colours(img) > 50
    assert p.js_errors() == []


def test_page_runs_under_its_content_security_policy(page, viewer_server):
    """With the CSP enforced (no eval, no inline script), the run page draws its charts and reports nothing."""
    p = page(viewer_server, bypass_csp=False)
    s = p.server
    p.page.goto(f"{s.origin}/?token={s.token}")
    p.page.goto(f"{s.origin}/#/run/default/rich")
    p.page.wait_for_selector('.chart-card[data-metric="val/acc"][data-drawn="1"]', timeout=30_000)
    p.page.click('nav#tabs button.tab[data-tab="media"]')
    p.page.wait_for_selector('.item-card[data-item="sample"][data-drawn="1"]', timeout=20_000)
    assert p.errors == []


def test_a_run_page_opened_directly_has_its_first_charts_with_the_page(page, viewer_server):
    """The page's boot script asks for the summary and the first charts before the modules load.

    Under the enforced CSP (the inline boot script is allowed by its hash, nothing else inline):
    the 1M-point chart is drawn from that early answer, with every spike in it, and the page
    does not ask for the same series again; a page on another tab asks for no chart early.
    """
    p = page(viewer_server, bypass_csp=False)
    s = p.server
    p.page.goto(f"{s.origin}/?token={s.token}")
    early: list[str] = []
    p.page.on("request", lambda r: early.append(r.url) if "/first-charts?" in r.url else None)
    p.page.goto("about:blank")
    p.page.goto(f"{s.origin}/#/run/default/spikes")  # a new document: the boot script runs
    p.page.wait_for_selector('.chart-card[data-metric="loss"][data-drawn="1"]', timeout=30_000)
    st = p.page.evaluate("JSON.parse(JSON.stringify(window.koboState.charts.loss))")
    width = p.page.evaluate(
        "Math.round(document.querySelector('.chart-card[data-metric=\"loss\"] .chart-plot')"
        ".clientWidth * devicePixelRatio)"
    )
    assert len(early) == 1 and "rank=0" in early[0] and "x=step" in early[0]
    assert st["lastFetch"]["early"] is True and st["lastFetch"]["total"] == 1_000_000, (st["lastFetch"], width)
    used = int(st["lastFetch"]["url"].rsplit("width=", 1)[1])
    assert width <= used <= 2 * width, (width, used)  # reduced for at least the chart's own width
    # the answer the page read (streamed to a reader, so the browser keeps no copy): asked again, same bytes
    body = p.page.request.get(early[0]).body()
    parts, off = [], 0
    while off < len(body):
        n = int.from_bytes(body[off : off + 4], "little")
        parts.append(body[off + 4 : off + 4 + n])
        off += 4 + n
    assert json.loads(parts[0]) == [{"metric": "loss", "rank": 0}]
    header, arrays = R.decode(parts[1])
    assert header["n"] == st["points"] and set(SPIKES) <= set(arrays["x"].astype(int).tolist())
    assert not [url for url, _, _ in p.series if "/series?" in url and "metric=loss" in url and "x0=" not in url]
    assert p.errors == [] and p.page.evaluate("window.koboState.errors.length") == 0

    # another tab: the summary early, no chart; the media tab still loads
    early.clear()
    p.page.goto("about:blank")
    p.page.goto(f"{s.origin}/#/run/default/rich?tab=media")
    p.page.wait_for_selector('.item-card[data-item="sample"][data-drawn="1"]', timeout=20_000)
    assert early == []
    # smoothing and a rank in the hash are passed on; a rank the run lacks falls back to rank 0
    p.page.goto("about:blank")
    p.page.goto(f"{s.origin}/#/run/default/rich?smooth=0.6&rank=3")
    p.page.wait_for_selector('.chart-card[data-metric="train/loss"][data-drawn="1"]', timeout=30_000)
    st = p.page.evaluate("JSON.parse(JSON.stringify(window.koboState.charts['train/loss']))")
    assert st["lastFetch"]["early"] is True and "smooth=0.6" in st["lastFetch"]["url"]
    assert len(early) == 1 and "smooth=0.6" in early[0]
    assert p.errors == [] and p.page.evaluate("window.koboState.errors.length") == 0


def test_the_page_formats_numbers_like_intl_and_gives_intl_back_after_uplot(page, viewer_server):
    """No ICU start-up on the way to the first chart: uPlot loads with lazy Intl stand-ins, our numbers are
    formatted without Intl, and once the modules run Intl is the browser's own again."""
    p = page(viewer_server)
    p.goto("#/run/default/spikes")
    got = p.page.evaluate(
        """async () => {
          const { fmtInt } = await import("./static/util.js");
          const real = new Intl.NumberFormat("en-US");
          const values = [0, -0, 1, -1, 7, 999, 1000, -1000, 12345, 999999, 1000000, 1234567.891, 0.5, -0.0004,
                          2.0005, 123456789012, Number.MAX_SAFE_INTEGER, NaN, Infinity, -Infinity];
          return {
            mismatches: values.map((v) => [v, fmtInt(v), real.format(v)]).filter(([, a, b]) => a !== b),
            intlIsNative: /\\[native code\\]/.test(String(Intl.NumberFormat)) && /\\[native code\\]/.test(String(Intl.DateTimeFormat)),
            zone: typeof new Intl.DateTimeFormat().resolvedOptions().timeZone,
          };
        }"""
    )
    assert got["mismatches"] == [], got["mismatches"]
    assert got["intlIsNative"] and got["zone"] == "string"
    assert p.js_errors() == []
