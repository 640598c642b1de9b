"""The viewer's HTTP API over run folders written by a real daemon (the app in-process, no socket).

What a user relies on: every run listed with its status, every spike of a
1M-point series in what the page receives, zoom at full resolution, NaN and
infinities counted and placed, smoothing as TensorBoard computes it, CSV equal
to ``kobo export``, rich values readable, and no way out of the folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.storage.reader import RunReader
from kohakuboard.viewer import reduce as R
from kohakuboard.viewer.app import create_app

from .conftest import SPIKES, snapshot

TOKEN = "test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Api:
    """A synchronous client over the ASGI app (each call its own event loop)."""

    def __init__(self, base: Path, token: str | None = TOKEN) -> None:
        self.app = create_app(str(base), token=token)

    def get(self, url: str, headers: dict[str, str] | None = None, auth: bool = True) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:48889") as c:
                return await c.get(url, headers={**(AUTH if auth else {}), **(headers or {})})

        return asyncio.run(go())

    def json(self, url: str, status: int = 200) -> Any:
        r = self.get(url)
        assert r.status_code == status, (url, r.status_code, r.text)
        return r.json()

    def series(self, url: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        r = self.get(url)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        return R.decode(r.content)


@pytest.fixture(scope="module")
def api(viewer_runs: Path) -> Api:
    return Api(viewer_runs)


def test_run_list_shows_every_run_with_status(api, viewer_runs):
    """All four runs, newest first, with status, last step, ranks and config."""
    d = api.json("/api/runs")
    assert d["total"] == 4
    by_id = {(r["project"], r["run_id"]): r for r in d["runs"]}
    assert set(by_id) == {("default", "spikes"), ("default", "rich"), ("default", "ddp"), ("other", "crashed")}
    assert by_id[("default", "spikes")]["status"] == "finished"
    assert by_id[("other", "crashed")]["status"] == "crashed"
    assert by_id[("default", "ddp")]["num_ranks"] == 2
    assert by_id[("default", "spikes")]["last_step"] == 999_999
    assert by_id[("default", "rich")]["config"]["optimizer"] == {"name": "adamw", "lr": 3e-4}
    assert all(r["error"] is None for r in d["runs"])
    created = [r["created_at"] for r in d["runs"]]
    assert created == sorted(created, reverse=True)
    assert {p["name"]: p["runs"] for p in d["projects"]} == {"default": 3, "other": 1}


def test_run_filter_text_regex_and_config(api):
    """Filter over name, id and config values; a bad regex is a 400 naming the pattern."""
    assert [r["run_id"] for r in api.json("/api/runs?q=SPIK")["runs"]] == ["spikes"]
    assert {r["run_id"] for r in api.json("/api/runs?q=optimizer.name=adamw")["runs"]} == {"rich"}
    assert {r["run_id"] for r in api.json("/api/runs?q=^(ddp|rich)$&regex=1")["runs"]} == {"ddp", "rich"}
    err = api.json("/api/runs?q=(unclosed&regex=1", status=400)
    assert "(unclosed" in err["error"]


def test_million_points_keep_every_spike(api, viewer_runs):
    """The reduced 1M-point series is small, holds all 20 spikes, and min/max equal the full series'."""
    header, a = api.series("/api/runs/default/spikes/series?metric=loss&width=1000")
    assert header["total"] == 1_000_000 and header["reduced"]
    assert header["n"] <= 4000
    sent_steps = set(a["x"].astype(int).tolist())
    assert set(SPIKES) <= sent_steps, sorted(set(SPIKES) - sent_steps)
    with RunReader(viewer_runs / "default" / "spikes") as r:
        full = r.series("loss")
    assert a["y"].max() == full["value"].max() and a["y"].min() == full["value"].min()
    assert (a["y"] > 4.0).sum() == 20


def test_zoom_returns_full_resolution(api, viewer_runs):
    """A zoomed window of <= 4 points per pixel comes back point for point."""
    s0 = SPIKES[3]
    header, a = api.series(f"/api/runs/default/spikes/series?metric=loss&width=1000&x0={s0 - 1000}&x1={s0 + 999}")
    assert not header["reduced"] and header["n"] == header["in_range"] == 2000
    with RunReader(viewer_runs / "default" / "spikes") as r:
        full = r.series("loss")
    np.testing.assert_array_equal(a["y"], full["value"][s0 - 1000 : s0 + 1000])
    np.testing.assert_array_equal(a["x"], full["step"][s0 - 1000 : s0 + 1000])


def test_nonfinite_values_are_counted_and_marked_never_sent(api, viewer_runs):
    """NaN, +inf and -inf arrive as counts and marks at their steps; y holds no infinity."""
    header, a = api.series("/api/runs/default/rich/series?metric=train/loss&width=200")
    assert header["nonfinite"] == {"nan": 1, "posinf": 1, "neginf": 1}
    with RunReader(viewer_runs / "default" / "rich") as r:
        s = r.series("train/loss")
    where = {
        kind: float(s["step"][test(s["value"])][0])
        for kind, test in (("nan", np.isnan), ("posinf", np.isposinf), ("neginf", np.isneginf))
    }
    marks = {(m["kind"], m["x"]) for m in header["marks"]}
    assert marks == {(kind, x) for kind, x in where.items()}
    assert not np.isinf(a["y"]).any()
    assert np.isnan(a["y"]).sum() == 3  # gaps where the points are


def test_smoothing_is_tensorboards_debiased_ema_over_every_point(api, viewer_runs):
    header, a = api.series("/api/runs/default/rich/series?metric=train/loss&width=1000&smooth=0.9")
    with RunReader(viewer_runs / "default" / "rich") as r:
        v = r.series("train/loss")["value"]
    last, k, ref = 0.0, 0, []
    for y in v:
        if not np.isfinite(y):
            ref.append(np.nan)
            continue
        last = last * 0.9 + 0.1 * y
        k += 1
        ref.append(last / (1 - 0.9**k))
    np.testing.assert_allclose(a["ys"], np.array(ref), rtol=1e-12)
    assert api.get("/api/runs/default/rich/series?metric=train/loss&smooth=1").status_code == 400


def test_live_tail_from_offset(api):
    header, a = api.series("/api/runs/default/rich/series?metric=val/acc&start=290")
    assert header["n"] == 10 and header["start"] == 290 and header["committed"] == 300
    np.testing.assert_allclose(a["y"], np.arange(290, 300) / 300)


def test_ranks_and_band(api):
    """DDP: each rank's series, and a min-max band across ranks."""
    _, r1 = api.series("/api/runs/default/ddp/series?metric=loss&rank=1")
    np.testing.assert_allclose(r1["y"], 1.0 / (np.arange(400) + 1) + 0.5)
    header, band = api.series("/api/runs/default/ddp/series?metric=loss&rank=band&width=100")
    assert header["ranks"] == [0, 1] and header["arrays"] == ["x", "lo", "hi"]
    assert np.all(band["hi"] - band["lo"] >= 0.5 - 1e-9)
    summary = api.json("/api/runs/default/ddp")
    assert summary["ranks"] == [0, 1]
    assert summary["metrics"][0]["points_by_rank"] == {"0": 400, "1": 400}


def test_csv_download_equals_kobo_export(api, viewer_runs):
    r = api.get("/api/runs/default/rich/series.csv?metric=train/loss")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    out = CliRunner().invoke(kobo, ["export", str(viewer_runs / "default" / "rich"), "--metric", "train/loss"])
    assert out.exit_code == 0, out.output
    assert r.text == out.output
    both = api.get("/api/runs/default/ddp/series.csv?metric=loss&rank=all").text.splitlines()
    assert len(both) == 801 and both[1].startswith("loss,0,") and both[-1].startswith("loss,1,")
    # the body is sent in pieces of whole lines: cut anywhere, it is still kobo export's text
    from kohakuboard.storage.export import csv_header, csv_lines
    from kohakuboard.viewer.app import Viewer

    with RunReader(viewer_runs / "default" / "ddp") as reader:
        series = [(rk, np.array(reader.series("loss", rk))) for rk in (0, 1)]
    pieces = list(Viewer.csv_chunks("loss", series, rows=7))
    assert len(pieces) == 1 + 2 * 58 and all(p.endswith("\n") for p in pieces)
    assert "".join(pieces) == csv_header() + "".join("".join(csv_lines("loss", rk, s)) for rk, s in series)
    assert "".join(pieces).splitlines() == both


def test_run_summary_and_rich_values(api):
    """Summary lists metrics and items; media, tables, histograms, KDE, tensors, output and events read back."""
    s = api.json("/api/runs/default/rich")
    assert [m["name"] for m in s["metrics"]] == ["train/grad_norm", "train/loss", "train/lr", "val/acc"]
    assert s["items"]["media"] == [{"name": "sample", "count": 6, "ranks": [0], "counts_by_rank": {"0": 6}}]
    assert s["items"]["histogram"] == [{"name": "grads", "count": 6, "ranks": [0], "counts_by_rank": {"0": 6}}]
    assert s["status"] == "finished" and s["duration"] > 0 and s["last_commit"] >= s["created_at"]
    media = api.json("/api/runs/default/rich/media?name=sample")["rows"]
    assert [m["global_step"] for m in media] == [1, 51, 101, 151, 201, 251]
    assert media[1]["caption"] == "step 50" and media[1]["width"] == 64 and media[1]["height"] == 48
    img = api.get(media[1]["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content[:4] == b"\x89PNG"
    assert img.headers["etag"] == f'"{media[1]["hash"]}"' and "immutable" in img.headers["cache-control"]
    assert api.get(media[1]["url"], headers={"if-none-match": img.headers["etag"]}).status_code == 304
    table = api.json("/api/runs/default/rich/tables?name=preds")["rows"][0]
    assert table["columns"] == ["image", "label", "p"]
    cell = table["rows"][0][0]["$media"]
    assert api.get(cell["url"]).status_code == 200 and table["rows"][1][1] == "dog"
    hist = api.json("/api/runs/default/rich/histograms?name=grads")["rows"]
    assert len(hist) == 6 and sum(hist[0]["counts"]) == 5000 and len(hist[0]["edges"]) == len(hist[0]["counts"]) + 1
    kde = api.json("/api/runs/default/rich/kde?name=logits")["rows"]
    assert len(kde) == 6 and len(kde[0]["grid"]) == len(kde[0]["density"])
    tensors = api.json("/api/runs/default/rich/tensors?name=attn")["rows"]
    assert tensors[0]["shape"] == [6, 6] and tensors[0]["dtype"] == "float32"
    assert tensors[0]["namespace"] == "layer1" and tensors[0]["metadata"] == {"head": 0}
    assert tensors[0]["heatmap"]["rows"] == 6 and len(tensors[0]["heatmap"]["values"]) == 36
    assert 0 <= tensors[0]["stats"]["min"] <= tensors[0]["stats"]["max"] <= 1
    logs = api.json("/api/runs/default/rich/logs")
    assert "epoch 0 starting" in logs["text"] and logs["size"] == logs["end"] == len(logs["text"].encode())
    part = api.json("/api/runs/default/rich/logs?offset=3&limit=5")
    assert (part["offset"], part["end"], part["text"]) == (3, 8, logs["text"][3:8])
    few = api.json("/api/runs/default/rich/histograms?name=grads&max_rows=3")
    steps = [h["step"] for h in few["rows"]]
    assert few["total"] == 6 and len(steps) == 3 and steps == sorted(steps)
    assert steps[0] == hist[0]["step"] and steps[-1] == hist[-1]["step"] and steps[1] in {h["step"] for h in hist}
    kinds = [e["kind"] for e in api.json("/api/runs/default/rich/run-events")["events"]]
    assert kinds[0] == "open" and "finished" in " ".join(kinds + [str(e) for e in kinds])


@pytest.mark.parametrize(
    "url, needle",
    [
        ("/api/runs/nope/rich", "no project 'nope'"),
        ("/api/runs/default/nope", "no run 'nope'"),
        ("/api/runs/default/rich/series?metric=train/los", "did you mean 'train/loss'"),
        ("/api/runs/default/ddp/series?metric=loss&rank=7", "rank(s) 0, 1"),
        ("/api/runs/default/rich/media?name=nope", "no media 'nope'"),
        ("/api/runs/default/rich/histograms?name=nope", "no histogram 'nope'"),
        ("/media/default/rich/" + "0" * 64 + ".png", "holds no media"),
    ],
)
def test_unknown_names_are_404_with_a_message(api, url, needle):
    r = api.get(url)
    assert r.status_code == 404, r.text
    assert needle in r.json()["error"]


@pytest.mark.parametrize(
    "url",
    [
        "/api/runs/%2E%2E/default",
        "/api/runs/default/%2E%2E",
        "/api/runs/default/..%2F..%2Fetc",
        "/api/runs/%2Fetc/passwd",
        "/media/default/rich/..%2F..%2F..%2Fmetadata.json",
        "/media/default/rich/%2E%2E",
        "/media/%2E%2E/%2E%2E/passwd",
        "/static/..%2F..%2Fapp.py",
        "/static/%2E%2E/app.py",
    ],
)
def test_traversal_attempts_are_refused(api, url):
    r = api.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert b"root:" not in r.content and b"def create_app" not in r.content


def test_bad_parameters_are_400(api):
    for url, needle in [
        ("/api/runs/default/rich/series", "'metric' is required"),
        ("/api/runs/default/rich/series?metric=val/acc&width=0", "'width'"),
        ("/api/runs/default/rich/series?metric=val/acc&x=epoch", "'x' must be one of"),
        ("/api/runs/default/rich/series?metric=val/acc&x0=nan", "'x0' must be finite"),
        ("/api/runs/default/rich/series?metric=val/acc&x0=5&x1=1", "smaller than x0"),
        ("/api/runs/default/rich/series?metric=val/acc&start=-1", "'start'"),
    ]:
        r = api.get(url)
        assert r.status_code == 400 and needle in r.json()["error"], (url, r.text)


def test_symlinks_out_of_the_folder_are_not_served(tmp_path, viewer_runs):
    """A project or run folder that is a symlink leading outside DIR is not readable through the viewer."""
    base = tmp_path / "base"
    outside = tmp_path / "outside"
    shutil.copytree(viewer_runs / "default" / "ddp", outside / "proj" / "ddp")
    (base / "default").mkdir(parents=True)
    shutil.copytree(viewer_runs / "default" / "ddp", base / "default" / "ddp")
    os.symlink(outside / "proj", base / "escaped")  # a project symlink out
    os.symlink(outside / "proj" / "ddp", base / "default" / "linked")  # a run symlink out
    os.symlink(base / "default" / "ddp", base / "default" / "inside")  # a symlink within DIR is fine
    api = Api(base)
    runs = {(r["project"], r["run_id"]) for r in api.json("/api/runs")["runs"]}
    assert runs == {("default", "ddp"), ("default", "inside")}  # the ones leading out are not even listed
    assert api.get("/api/runs/escaped/ddp").status_code == 404
    assert api.get("/api/runs/default/linked/series?metric=loss").status_code == 404
    assert api.get("/api/runs/default/inside/series?metric=loss").status_code == 200


def test_tokens_sessions_and_hosts(viewer_runs):
    """No token 401, wrong 403, ?token= becomes an HttpOnly SameSite=Strict session cookie; foreign Host 403."""
    api = Api(viewer_runs)
    assert api.get("/api/runs", auth=False).status_code == 401
    assert api.get("/api/runs", auth=False, headers={"authorization": "Bearer wrong"}).status_code == 403
    assert api.get("/", auth=False).status_code == 401
    assert api.get("/?token=wrong", auth=False).status_code == 403
    r = api.get(f"/?token={TOKEN}", auth=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    sid = cookie.split(";")[0]
    page = api.get("/", auth=False, headers={"cookie": sid})
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert api.get("/api/runs", auth=False, headers={"cookie": sid}).status_code == 200
    assert api.get("/api/runs", auth=False, headers={"cookie": "kobo_session=forged"}).status_code == 403
    rebound = api.get("/api/runs", headers={"host": "attacker.example:48889"})
    assert rebound.status_code == 403 and "attacker.example" in rebound.json()["error"]
    assert Api(viewer_runs, token=None).get("/api/runs", auth=False).status_code == 200
    assert "access-control-allow-origin" not in {k.lower() for k in page.headers}


def test_corrupted_run_is_an_error_for_that_run_only(tmp_path, viewer_runs):
    base = tmp_path / "kohakuboard"
    shutil.copytree(viewer_runs / "default" / "rich", base / "default" / "rich")
    shutil.copytree(viewer_runs / "default" / "ddp", base / "default" / "broken")
    db = base / "default" / "broken" / "data" / "metadata.db"
    db.write_bytes(b"this is not a database" * 100)
    (base / "default" / "halfcopied").mkdir()
    (base / "default" / "halfcopied" / "metadata.json").write_text('{"name": "trunc')
    api = Api(base)
    runs = {r["run_id"]: r for r in api.json("/api/runs")["runs"]}
    assert runs["rich"]["error"] is None and runs["rich"]["status"] == "finished"
    assert "metadata.db" in runs["broken"]["error"]
    assert "metadata.json" in runs["halfcopied"]["error"]
    r = api.get("/api/runs/default/broken")
    assert r.status_code == 500 and "metadata.db" in r.json()["error"]
    assert api.get("/api/runs/default/rich/series?metric=val/acc").status_code == 200


def test_viewer_changes_nothing_in_the_runs(viewer_runs):
    """Listing, summaries, series, media and CSV leave every file of every run as it was."""
    before = snapshot(viewer_runs)
    api = Api(viewer_runs)
    api.json("/api/runs")
    for run in ("spikes", "rich", "ddp"):
        s = api.json(f"/api/runs/default/{run}")
        for m in s["metrics"]:
            api.series(f"/api/runs/default/{run}/series?metric={m['name']}")
    for item in (
        "media?name=sample",
        "tables?name=preds",
        "histograms?name=grads",
        "kde?name=logits",
        "tensors?name=attn",
        "logs",
        "run-events",
    ):
        assert api.get(f"/api/runs/default/rich/{item}").status_code == 200
    assert snapshot(viewer_runs) == before


def test_repeated_chart_requests_are_served_from_the_cache(api):
    """The same chart of an unchanged series is computed once: the second answer is the same bytes, from cache."""
    url = "/api/runs/default/spikes/series?metric=loss&width=700"
    first, second = api.get(url), api.get(url)
    assert first.content == second.content
    assert "reduce;dur=" in first.headers["server-timing"] and second.headers["server-timing"].startswith("cache;")


def test_live_tail_with_relative_time_and_smoothing(api, viewer_runs):
    """A tail in relative time starts from the run's first point; a smoothed tail carries the EMA of every point."""
    with RunReader(viewer_runs / "default" / "rich") as r:
        s = r.series("val/acc")
    header, a = api.series("/api/runs/default/rich/series?metric=val/acc&start=295&x=relative")
    np.testing.assert_allclose(a["x"], s["wall"][295:] - s["wall"][0])
    assert header["x_min"] == 0.0 and header["start"] == 295
    _, full = api.series("/api/runs/default/rich/series?metric=val/acc&smooth=0.5&width=1000")
    _, tail = api.series("/api/runs/default/rich/series?metric=val/acc&smooth=0.5&start=295")
    np.testing.assert_allclose(tail["ys"], full["ys"][295:])


def test_interrupted_and_stale_runs_say_so(tmp_path, viewer_runs, monkeypatch):
    """A run stored as running whose daemon is gone (a copy, a killed node) is listed as running?; interrupted as is."""
    import json as _json

    from kohakuboard.viewer import index

    monkeypatch.setattr(index, "LIVE_COMMIT_S", 0.0)  # its last commit (minutes ago at most) counts as old

    base = tmp_path / "kohakuboard"
    for run, status in (("ddp", "running"), ("rich", "interrupted")):
        dst = base / "default" / run
        shutil.copytree(viewer_runs / "default" / run, dst)
        meta = _json.loads((dst / "metadata.json").read_text())
        meta["status"] = status
        (dst / "metadata.json").write_text(_json.dumps(meta))
    api = Api(base)
    status = {r["run_id"]: r["status"] for r in api.json("/api/runs")["runs"]}
    assert status == {"ddp": "running?", "rich": "interrupted"}
    assert api.json("/api/runs/default/ddp")["status"] == "running?"


def _parts(body: bytes) -> list[bytes]:
    """The framed parts of a first-charts answer (u32 little-endian length, then the bytes)."""
    out, off = [], 0
    while off < len(body):
        n = int.from_bytes(body[off : off + 4], "little")
        out.append(body[off + 4 : off + 4 + n])
        off += 4 + n
    assert off == len(body), "the answer ends inside a part"
    return out


def test_first_charts_are_the_pages_first_charts_with_the_same_bytes(api):
    """One request gives the charts the run page shows first, each byte for byte its /series answer."""
    r = api.get("/api/runs/default/rich/first-charts?rank=0&x=step&width=614&count=3")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    parts = _parts(r.content)
    charts = json.loads(parts[0])
    # the page's order: "general" first, then groups by name, names sorted within a group
    assert charts == [
        {"metric": "train/grad_norm", "rank": 0},
        {"metric": "train/loss", "rank": 0},
        {"metric": "train/lr", "rank": 0},
    ]
    assert len(parts) == 1 + len(charts)
    for c, body in zip(charts, parts[1:]):
        alone = api.get(f"/api/runs/default/rich/series?metric={c['metric']}&rank=0&x=step&width=614")
        assert body == alone.content
    header, arrays = R.decode(parts[2])  # train/loss: its NaN and infinities are counted there too
    assert header["nonfinite"] == {"nan": 1, "posinf": 1, "neginf": 1}
    # smoothing and another x axis pass through; a rank the metric lacks falls back to its lowest
    r = api.get("/api/runs/default/ddp/first-charts?rank=1&x=relative&smooth=0.6&width=300&count=4")
    parts = _parts(r.content)
    assert json.loads(parts[0]) == [{"metric": "loss", "rank": 1}]
    alone = api.get("/api/runs/default/ddp/series?metric=loss&rank=1&x=relative&smooth=0.6&width=300")
    assert parts[1] == alone.content
    r = api.get("/api/runs/default/spikes/first-charts?rank=3&width=1000")
    parts = _parts(r.content)
    assert json.loads(parts[0]) == [{"metric": "loss", "rank": 0}]
    header, arrays = R.decode(parts[1])
    assert header["total"] == 1_000_000 and header["reduced"]


def test_first_charts_bad_input(api):
    assert api.get("/api/runs/default/nope/first-charts").status_code == 404
    for q, needle in [
        ("rank=band", "first-charts takes"),
        ("x0=1&x1=2", "first-charts takes"),
        ("count=0", "count"),
        ("count=99", "count"),
        ("x=epoch", "'x'"),
        ("width=0", "width"),
    ]:
        r = api.get(f"/api/runs/default/rich/first-charts?{q}")
        assert r.status_code == 400 and needle in r.json()["error"], (q, r.text)


def test_the_csp_allows_the_boot_script_by_its_hash_and_nothing_else_inline(api):
    import base64
    import hashlib
    import re

    page = api.get("/")
    csp = page.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    assert len(scripts) == 1 and "koboBoot" in scripts[0]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src")).split()
    assert script_src == ["script-src", "'self'", f"'sha256-{digest}'"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["cache-control"] == "no-store"
    # the page learns from the server that it is under kobo open (no api/session request, no localStorage)
    assert '<html data-kobo="open" lang="en">' in page.text


def test_a_growing_series_is_read_only_from_its_cached_length():
    """A live run's chart is re-reduced after a commit from its cached series grown by the new rows only."""
    from kohakuboard.viewer.app import SeriesCache

    column = np.arange(1000, dtype=np.float64)
    reads: list[tuple[int, int]] = []
    cache = SeriesCache()

    def loader(n):
        def load(m):
            reads.append((m, n))
            return column[m:n].copy()

        return load

    assert cache.get(("run", "loss", 0, 600), loader(600)).tolist() == column[:600].tolist()
    assert cache.get(("run", "loss", 0, 600), loader(600)) is not None and reads == [(0, 600)]
    grown = cache.get(("run", "loss", 0, 750), loader(750))
    assert grown.tolist() == column[:750].tolist() and reads[-1] == (600, 750)
    cache.get(("run", "loss", 1, 10), loader(10))  # another rank: its own rows from 0
    assert reads[-1] == (0, 10)


def test_a_cold_listing_longer_than_the_hang_limit_lists_every_run(tmp_path, viewer_runs, monkeypatch):
    """A listing waits as long as its reads make progress: only a read that finishes nothing for the
    limit counts as hung, so a cold folder of many runs lists every run without an error."""
    from kohakuboard.viewer import index as index_mod

    base = tmp_path / "kohakuboard"
    for i in range(120):
        shutil.copytree(viewer_runs / "default" / "ddp", base / "many" / f"r{i:03d}")
    monkeypatch.setattr(index_mod, "INFO_WAIT_S", 0.02)  # far below the listing's whole time
    t0 = __import__("time").perf_counter()
    runs = index_mod.RunIndex(str(base)).runs()
    took = __import__("time").perf_counter() - t0
    assert len(runs) == 120 and took > 0.02
    assert [r["run_id"] for r in runs if r["error"]] == []
    assert {r["status"] for r in runs} == {"finished"}


def test_a_run_summary_is_read_once_for_requests_that_come_together(tmp_path, viewer_runs, monkeypatch):
    """Pages that ask for a run's summary at the same time (after the same live event) share one read;
    a change to the run's files is a new read."""
    import threading
    import time as _time

    from kohakuboard.viewer.app import Viewer

    base = tmp_path / "kohakuboard"
    shutil.copytree(viewer_runs / "default" / "rich", base / "default" / "rich")
    viewer = Viewer(str(base))
    reads = []
    real = viewer._read_summary

    def slow_read(project, run_id):
        reads.append(run_id)
        _time.sleep(0.3)  # a slow disk: every request arrives while the first read is going on
        return real(project, run_id)

    monkeypatch.setattr(viewer, "_read_summary", slow_read)
    got = []
    threads = [threading.Thread(target=lambda: got.append(viewer.run_summary("default", "rich"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and len(got) == 8 and all(g["version"] == got[0]["version"] for g in got)
    assert viewer.run_summary("default", "rich")["status"] == "finished" and len(reads) == 1
    meta = base / "default" / "rich" / "metadata.json"
    meta.write_text(meta.read_text().replace('"name": "rich"', '"name": "rich-renamed"'))
    assert viewer.run_summary("default", "rich")["name"] == "rich-renamed" and len(reads) == 2


def test_a_live_summary_many_pages_ask_for_is_read_at_most_every_tenth_of_a_second(tmp_path, viewer_runs, monkeypatch):
    """Pages following a run written at full speed ask for its summary after commits that come ~40
    times a second: under that demand a live run is re-read at most every 0.1 s; asked for less
    often (a page refreshes it every 1.5 s), each answer is the latest."""
    import json as _json
    import time as _time

    from kohakuboard.viewer import app as app_mod
    from kohakuboard.viewer import index as index_mod

    assert index_mod.BUSY_MAX_AGE_S == 0.1
    monkeypatch.setattr(index_mod, "BUSY_MAX_AGE_S", 0.5)  # room for a slow machine between the calls
    base = tmp_path / "kohakuboard"
    shutil.copytree(viewer_runs / "default" / "rich", base / "default" / "rich")
    meta = base / "default" / "rich" / "metadata.json"
    data = _json.loads(meta.read_text())
    meta.write_text(_json.dumps({**data, "status": "running"}))
    viewer = app_mod.Viewer(str(base))
    reads = []
    real = viewer._read_summary
    viewer._read_summary = lambda p, r: reads.append(r) or real(p, r)
    assert viewer.run_summary("default", "rich")["name"] == "rich"
    meta.write_text(_json.dumps({**data, "status": "running", "name": "renamed"}))
    assert viewer.run_summary("default", "rich")["name"] == "renamed"  # little demand: the latest
    for _ in range(index_mod.BUSY_PER_S):
        viewer.run_summary("default", "rich")
    meta.write_text(_json.dumps({**data, "status": "running", "name": "renamed-again"}))
    assert viewer.run_summary("default", "rich")["name"] == "renamed"  # busy, and read just now
    _time.sleep(index_mod.BUSY_MAX_AGE_S * 1.5)
    assert viewer.run_summary("default", "rich")["name"] == "renamed-again"
    assert len(reads) == 3


def test_a_live_run_line_many_pages_ask_for_is_read_at_most_every_max_age(tmp_path, viewer_runs, monkeypatch):
    from kohakuboard.viewer import index as index_mod

    """The run list's line of a live run (last step, last commit) follows its commits; asked for by
    many pages at once it is re-read at most every BUSY_MAX_AGE_S, asked for rarely it is the latest."""
    import json as _json
    import time as _time

    assert index_mod.BUSY_MAX_AGE_S == 0.1
    monkeypatch.setattr(index_mod, "BUSY_MAX_AGE_S", 0.5)  # room for a slow machine between the calls
    base = tmp_path / "kohakuboard"
    shutil.copytree(viewer_runs / "default" / "rich", base / "default" / "rich")
    meta = base / "default" / "rich" / "metadata.json"
    data = _json.loads(meta.read_text())
    meta.write_text(_json.dumps({**data, "status": "running"}))
    idx = index_mod.RunIndex(str(base))
    assert idx.info("default", "rich")["name"] == "rich"
    meta.write_text(_json.dumps({**data, "status": "running", "name": "renamed"}))
    assert idx.info("default", "rich")["name"] == "renamed"  # little demand: the latest
    for _ in range(index_mod.BUSY_PER_S):
        idx.runs()
    meta.write_text(_json.dumps({**data, "status": "running", "name": "renamed-again"}))
    assert [r["name"] for r in idx.runs()] == ["renamed"]  # busy, and read just now
    _time.sleep(0.6)
    assert [r["name"] for r in idx.runs()] == ["renamed-again"]
    # the finish shows within the same bound; after it, any change shows at once, however busy
    meta.write_text(_json.dumps({**data, "status": "finished", "name": "done"}))
    _time.sleep(0.6)
    assert idx.info("default", "rich")["name"] == "done"
    meta.write_text(_json.dumps({**data, "status": "finished", "name": "done-renamed"}))
    assert idx.info("default", "rich")["name"] == "done-renamed"


def test_kept_readers_see_a_changed_run_and_a_failed_request_drops_its_reader(tmp_path, viewer_runs):
    """A reader kept open between requests is lent again only while the run's metadata.json is the
    one it read, and a request that failed does not hand its reader on."""
    from kohakuboard.viewer.readers import ReaderPool

    base = tmp_path / "kohakuboard"
    shutil.copytree(viewer_runs / "default" / "rich", base / "default" / "rich")
    path = str(base / "default" / "rich")
    pool = ReaderPool(per_run=2, idle_max=3)
    with pool.borrow(path) as first:
        assert first.name == "rich"
    with pool.borrow(path) as again:
        assert again is first and pool.lent == 1
    meta = base / "default" / "rich" / "metadata.json"
    meta.write_text(meta.read_text().replace('"name": "rich"', '"name": "rich-renamed"'))
    with pool.borrow(path) as fresh:
        assert fresh is not first and fresh.name == "rich-renamed"
    with pytest.raises(KeyError):
        with pool.borrow(path) as failing:
            failing.series("no-such-metric")
    assert pool.idle() == 0
    with pool.borrow(path) as after:
        assert after is not failing and after.metric_overview()
    # bounded: no more than per_run idle readers of one run
    held = [pool.take(path) for _ in range(4)]
    for reader, key in held:
        pool.give(path, key, reader, True)
    assert pool.idle() == 2
    pool.close()
    assert pool.idle() == 0


def test_live_tails_read_each_new_row_once_for_every_page():
    """Pages following a run ask for overlapping tails; the new rows come from disk once."""
    from kohakuboard.viewer.app import TailCache

    column = np.arange(10_000, dtype=np.float64)
    reads: list[tuple[int, int]] = []

    def load(a, b):
        reads.append((a, b))
        return column[a:b].copy()

    tails = TailCache(max_rows=3000)
    assert tails.get("s", 100, 500, load).tolist() == column[100:500].tolist() and reads == [(100, 500)]
    # another page, further behind inside what is held, then both after a commit
    assert tails.get("s", 300, 500, load).tolist() == column[300:500].tolist() and reads == [(100, 500)]
    assert tails.get("s", 500, 800, load).tolist() == column[500:800].tolist() and reads[-1] == (500, 800)
    assert tails.get("s", 300, 800, load).tolist() == column[300:800].tolist() and len(reads) == 2
    assert tails.get("s", 800, 800, load).tolist() == [] and len(reads) == 2
    # a page further back than what is held reads its own range
    assert tails.get("s", 50, 800, load).tolist() == column[50:800].tolist() and reads[-1] == (50, 800)
    # held rows are bounded: old chunks go, and a tail before them is read again
    for end in range(1800, 9001, 1000):
        assert tails.get("s", end - 1000, end, load).tolist() == column[end - 1000 : end].tolist()
    assert tails.get("s", 100, 200, load).tolist() == column[100:200].tolist() and reads[-1] == (100, 200)


def test_a_long_live_tail_comes_reduced_to_the_pages_width(api):
    """A page far behind a fast run gets its new rows reduced like a whole series (spikes kept);
    a short tail, or one asked without a width, is every raw row."""
    header, arrays = api.series("/api/runs/default/spikes/series?metric=loss&start=0&width=100")
    assert header["reduced"] and header["n"] <= 400 and header["in_range"] == 1_000_000
    assert header["start"] == 0 and header["committed"] == 1_000_000
    assert set(SPIKES) <= set(arrays["x"].astype(int).tolist()) and arrays["y"].max() > 5.0
    header, arrays = api.series("/api/runs/default/spikes/series?metric=loss&start=999000&width=1000")
    assert not header["reduced"] and header["n"] == header["in_range"] == 1000
    header, arrays = api.series("/api/runs/default/spikes/series?metric=loss&start=990000")
    assert not header["reduced"] and header["n"] == 10_000
