"""Run folders for the viewer tests, written once per session by real scripts through a real daemon.

``viewer_runs`` is a base dir holding:

* ``default/spikes``: ``loss`` with 1,000,000 points (a decaying curve plus
  noise) and 20 one-point spikes of +5 at :data:`SPIKES`;
* ``default/rich``: scalars in two namespaces with NaN/+inf/-inf, an image
  series, a table with an image cell, a histogram, a KDE, tensors, output;
* ``default/ddp``: two ranks (RANK=0/1, WORLD_SIZE=2) logging ``loss`` into one run;
* ``other/crashed``: a script that died of an exception (status crashed).

The scripts use their own daemon endpoint, stopped before the tests start, so
the folders are finished and nothing writes them while the viewer reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

N_SPIKE_POINTS = 1_000_000
SPIKES = sorted(np.random.default_rng(7).choice(np.arange(1000, N_SPIKE_POINTS - 1000), 20, replace=False).tolist())

SPIKE_SCRIPT = f"""
import numpy as np
from kohakuboard.client import Board
n = {N_SPIKE_POINTS}
rng = np.random.default_rng(1)
y = np.exp(-np.arange(n) / 200000.0) + rng.random(n) * 0.05
y[{SPIKES!r}] += 5.0
with Board(name="spikes", run_id="spikes", config={{"kind": "spikes", "lr": 0.01}}, capture_output=False) as b:
    for v in y.tolist():
        b.log(loss=v)
"""

RICH_SCRIPT = """
import math
import numpy as np
from kohakuboard.client import Board, Histogram, KernelDensity, Media, Table, TensorLog
rng = np.random.default_rng(2)
with Board(name="rich", run_id="rich", config={"kind": "rich", "optimizer": {"name": "adamw", "lr": 3e-4}}) as b:
    print("epoch 0 starting", flush=True)
    for i in range(300):
        b.step()
        loss = 2.0 * math.exp(-i / 80) + 0.3 + 0.08 * rng.random()
        if i == 100:
            loss = float("nan")
        if i == 150:
            loss = float("inf")
        if i == 200:
            loss = float("-inf")
        b.log(**{"train/loss": loss, "train/lr": 3e-4 * (1 - i / 300), "val/acc": i / 300,
                 "train/grad_norm": 1.0 + 0.5 * math.sin(i / 9) + 0.2 * rng.random()})
        if i % 50 == 0:
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, : (i // 5) % 64] = (255, 120, 0)
            b.log(sample=Media(img, caption=f"step {i}"),
                  grads=Histogram(rng.normal(i / 100, 1, 5000)),
                  logits=KernelDensity(values=rng.normal(0, 1 + i / 300, 2000)),
                  attn=TensorLog(rng.random((6, 6)).astype(np.float32), namespace="layer1", metadata={"head": 0}),
                  preds=Table([{"image": Media(img[:16, :16]), "label": "cat", "p": 0.9},
                               {"image": Media(255 - img[:16, :16]), "label": "dog", "p": 0.1}]))
    print("done", flush=True)
"""

DDP_SCRIPT = """
import os
from kohakuboard.client import Board
rank = int(os.environ["RANK"])
with Board(name="ddp", run_id="ddp", config={"kind": "ddp"}, capture_output=False) as b:
    for i in range(400):
        b.step()
        b.log(loss=1.0 / (i + 1) + rank * 0.5)
"""

CRASH_SCRIPT = """
from kohakuboard.client import Board
b = Board(name="will-crash", run_id="crashed", project="other", config={"kind": "crash"})
for i in range(10):
    b.log(loss=float(i))
raise RuntimeError("boom")
"""


def _env(base: Path, sock_dir: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KOBO_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
    }
    env.update(KOBO_DAEMON_ENDPOINT=f"ipc://{sock_dir}/kobo", KOBO_BASE_DIR=str(base), **extra)
    return env


def _run(code: str, env: dict[str, str], cwd: Path, expect_ok: bool = True) -> None:
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


@pytest.fixture(scope="session")
def viewer_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("viewer")
    base = root / "kohakuboard"
    sock_dir = tempfile.mkdtemp(prefix="kobo-v-", dir="/tmp")
    env = _env(base, sock_dir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # the first script starts the daemon (autostart); the others, independent runs, then write at once
        _run(CRASH_SCRIPT, env, root, expect_ok=False)
        for code, extra in [
            (SPIKE_SCRIPT, {}),
            (RICH_SCRIPT, {}),
            (DDP_SCRIPT, {"RANK": "0", "WORLD_SIZE": "2"}),
            (DDP_SCRIPT, {"RANK": "1", "WORLD_SIZE": "2"}),
        ]:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    env={**env, **extra},
                    cwd=root,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, out.decode()[-2000:] + err.decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
        subprocess.run([sys.executable, "-m", "kohakuboard.daemon", "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(sock_dir, ignore_errors=True)
    yield base


def snapshot(path: Path) -> dict[str, Any]:
    """Every file under ``path`` with its size, mtime and bytes: to prove a reader changed nothing."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


class ServerProcess:
    """A real server process (``kobo open``, ``kobo-serve``) started from ``argv``.

    Waits up to 30 s for the URL it prints: ``url`` (as printed, token and
    all) and ``origin`` (scheme, host and port).  ``stop()`` ends it and
    returns everything it printed.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        import re
        import time

        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"(https?://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        assert self.url, f"no URL printed by {argv[2:4]}: {''.join(self.lines)}"
        self.origin = re.match(r"https?://[^/]+", self.url).group(0)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5)
        return "".join(self.lines) + (out or "")


class OpenServer(ServerProcess):
    """A real ``kobo open`` process; ``token`` is the one in the URL it printed (None with --no-token)."""

    def __init__(self, base: Path, *args: str, env: dict[str, str] | None = None) -> None:
        import re

        super().__init__(
            [sys.executable, "-m", "kohakuboard.cli.main", "open", str(base), "--port", "0", *args], env=env
        )
        m = re.search(r"\?token=(\S+)", self.url)
        self.token = m.group(1) if m else None

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


@pytest.fixture
def open_server() -> Iterator[Any]:
    """``open_server(base, *args)`` starts ``kobo open``; every one started is stopped afterwards."""
    started: list[OpenServer] = []

    def start(base: Path, *args: str, env: dict[str, str] | None = None) -> OpenServer:
        s = OpenServer(base, *args, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()


# ------------------------------------------------------------------ browser

CHROMIUM = os.environ.get("KOBO_CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"


def playwright_or_skip() -> Any:
    """``playwright.sync_api``, or skip the calling test module when there is no chromium (except under CI).

    Chromium is Debian's (``.ci/run`` installs it); ``playwright install`` is never run.
    """
    if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)
    return pytest.importorskip("playwright.sync_api")


# Resolves once the page is still: web fonts loaded, every finite CSS animation or transition
# finished, and two frames painted after that.  Waited on before a screenshot, instead of a pause.
SETTLED_JS = """async () => {
  await document.fonts.ready;
  const finite = document.getAnimations().filter((a) => a.effect && a.effect.getComputedTiming().endTime !== Infinity);
  await Promise.all(finite.map((a) => a.finished.catch(() => null)));
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
}"""


def settle(page: Any) -> None:
    """Wait until ``page`` (a Playwright page) is still (:data:`SETTLED_JS`)."""
    page.evaluate(SETTLED_JS)


def save_for_docs(path: Path, name: str) -> None:
    """With ``UPDATE_DOCS_SCREENSHOTS=1``, copy a screenshot the tests took to ``docs/name`` (the README's)."""
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium through Playwright, one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
