"""The viewer run by another user over runs it may read but not write (root's 0755/0644 folders).

The server process starts as root, imports everything it will use (this
interpreter's files may be unreadable for ``nobody``, see
``tests/daemon/test_security.py``), drops to ``nobody`` and serves.  The test
reads the run list, a summary, a series, media, a histogram and a tensor
through HTTP, and checks that not one file in the folder changed.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from kohakuboard.viewer import reduce as R

from .conftest import snapshot

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover
    NOBODY = None

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="needs root and a 'nobody' user: the viewer runs as a second uid (nobody)",
)

SERVER = """
import asyncio, email.utils, encodings.idna, json, mimetypes, os, sqlite3, sys, urllib.parse
import anyio, anyio._backends._asyncio, anyio._core._fileio, concurrent.futures.thread, h11, numpy, numpy.ma, kohakuvault, struct, difflib, hashlib, shutil, tempfile
import uvicorn, uvicorn.config, uvicorn.server, uvicorn.main, uvicorn.loops.auto, uvicorn.loops.asyncio
import uvicorn.protocols.http.auto, uvicorn.protocols.http.h11_impl, uvicorn.protocols.websockets.auto
import uvicorn.lifespan.off, uvicorn.lifespan.on, uvicorn.middleware.proxy_headers
try:
    import uvicorn.protocols.http.httptools_impl
except ImportError:
    pass
import starlette.applications, starlette.responses, starlette.routing, starlette.staticfiles
import starlette.middleware.errors, starlette.middleware.exceptions
from kohakuboard.storage import reader, export, format
from kohakuboard.viewer import app, auth, index, reduce, serve
mimetypes.init()
os.chdir("/")
os.setgroups([])
os.setresgid({gid}, {gid}, {gid})
os.setresuid({uid}, {uid}, {uid})
print("uid", os.getuid(), flush=True)
serve.serve({base!r}, port=0, token=None, log_level="warning")
"""


@needs_root
def test_viewer_as_another_user_reads_root_owned_runs_and_changes_nothing(viewer_runs):
    shared = Path(tempfile.mkdtemp(prefix="kobo-shared-", dir="/tmp"))
    try:
        base = shared / "kohakuboard"
        for run in ("rich", "ddp"):
            shutil.copytree(viewer_runs / "default" / run, base / "default" / run)
        for p in [shared, *shared.rglob("*")]:
            os.chown(p, 0, 0)
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        before = snapshot(base)
        code = SERVER.format(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, base=str(base))
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            lines = []
            url = None
            deadline = time.monotonic() + 30
            while url is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                m = re.search(r"(http://[^/\s]+)", line)
                url = m.group(1) if m else None
            assert url, "".join(lines)
            assert f"uid {NOBODY.pw_uid}\n" in lines
            with httpx.Client(base_url=url, timeout=20) as c:
                runs = c.get("/api/runs").json()["runs"]
                assert {(r["run_id"], r["status"], r["error"]) for r in runs} == {
                    ("rich", "finished", None),
                    ("ddp", "finished", None),
                }
                s = c.get("/api/runs/default/rich").json()
                assert [m["name"] for m in s["metrics"]] == ["train/grad_norm", "train/loss", "train/lr", "val/acc"]
                header, a = R.decode(c.get("/api/runs/default/rich/series?metric=val/acc").content)
                assert header["total"] == 300 and a["y"][-1] == pytest.approx(299 / 300)
                header, _ = R.decode(c.get("/api/runs/default/ddp/series?metric=loss&rank=band").content)
                assert header["ranks"] == [0, 1]
                media = c.get("/api/runs/default/rich/media?name=sample").json()["rows"]
                assert c.get(media[0]["url"]).content[:4] == b"\x89PNG"
                assert len(c.get("/api/runs/default/rich/histograms?name=grads").json()["rows"]) == 6
                assert c.get("/api/runs/default/rich/tensors?name=attn").json()["rows"][0]["shape"] == [6, 6]
                assert "epoch 0 starting" in c.get("/api/runs/default/rich/logs").json()["text"]
        except Exception as exc:
            proc.terminate()
            out, _ = proc.communicate(timeout=15)
            raise AssertionError(f"server output:\n{''.join(lines)}{out[-4000:]}") from exc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
        assert snapshot(base) == before
    finally:
        shutil.rmtree(shared, ignore_errors=True)
