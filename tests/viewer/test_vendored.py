"""The vendored chart library is exactly the released uPlot its VERSION file names, licence included."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import kohakuboard.viewer

UPLOT = Path(kohakuboard.viewer.__file__).parent / "static" / "vendor" / "uplot"
# uPlot 1.6.32's dist/uPlot.iife.min.js as published on the npm registry (pinned here too, so a
# refresh that changes the file must change this test on purpose).
PINNED_JS = "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f"


def test_vendored_files_match_their_recorded_sha256():
    text = (UPLOT / "VERSION").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})\s+(\S+)", text, re.M))
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    for name, digest in recorded.items():
        assert hashlib.sha256((UPLOT / name).read_bytes()).hexdigest() == digest, name
    assert recorded["uPlot.iife.min.js"] == PINNED_JS
    assert "MIT" in (UPLOT / "LICENSE").read_text() and "1.6.32" in text


def test_page_loads_nothing_from_outside():
    """No CDN: every script and stylesheet the page names is served from static/ (relative: a --base-url works)."""
    static = UPLOT.parents[1]
    html = (static / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith(("static/", "#", "data:")) for r in refs), refs
    for js in static.glob("*.js"):
        assert not re.search(r"https?://", js.read_text().replace("http://www.w3.org/2000/svg", "")), js.name


def test_page_preloads_every_module():
    """index.html names every module app.js imports (directly or not), so they load in one wave."""
    static = UPLOT.parents[1]
    html = (static / "index.html").read_text()
    preloaded = set(re.findall(r'rel="modulepreload" href="static/([^"]+)"', html))
    seen, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        for dep in re.findall(r'^import .* from "\./([^"]+)";', (static / name).read_text(), re.M):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    assert seen and seen <= preloaded, sorted(seen - preloaded)
