"""The disk fills up under a running Board: the error reaches the script, nothing is lost.

A real daemon writes to a small tmpfs (mounted here, so the test needs root, as
CI has); a filler file leaves it almost full.  Scalars and images are logged
until ``flush()`` says the disk is full; the daemon must stay up and show the
error; once the filler is deleted the same Board carries on, and every value
logged before, during and after the outage is in the run exactly once, in order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kohakuboard.client import Board, Media
from kohakuboard.protocol.errors import StorageError
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.verify import verify_run
from kohakuboard.testing import daemon_status, wait_until

FS_BYTES = 24 << 20
LEFT_FREE = 256 << 10  # what the filler leaves: a few images' worth
# small_fs is unmounted after the daemon stopped: each test has a daemon of its own
pytestmark = pytest.mark.own_daemon


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs of its own, unmounted afterwards (the daemon is stopped before that)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free."""
    filler = mnt / "filler.bin"
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_disk_full_is_reported_then_logging_resumes_without_loss(small_fs, daemon):
    """flush() raises 'disk full', the daemon survives and shows it; after space is freed
    flush() succeeds and every scalar and image is there exactly once, in order."""
    base = small_fs / "runs"
    board = Board(name="full", run_id="full", base_dir=base, capture_output=False)
    try:
        _fill_log_recover(small_fs, daemon, board)
    finally:
        try:
            board.finish(timeout=5)  # before the daemon fixture stops the daemon
        except Exception:
            pass


def _fill_log_recover(small_fs: Path, daemon, board: Board) -> None:
    board.log(x=0.0)  # the run's files exist before the disk is filled
    board.flush()
    filler = _fill(small_fs, LEFT_FREE)
    rng = np.random.default_rng(7)
    n = 1
    images = 0
    error = None
    while n < 20_000 and error is None:
        if n % 20 == 0:  # incompressible 64x64 RGB: ~12 KB per PNG
            board.log(x=float(n), img=Media(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            images += 1
        else:
            board.log(x=float(n))
        n += 1
        if n % 50 == 0:
            try:
                board.flush(timeout=30)
            except StorageError as exc:
                error = exc
    assert error is not None, f"logged {n} values and {images} images into {LEFT_FREE} free bytes without an error"

    # Logging goes on while the disk is full: the values wait in the daemon.
    for _ in range(100):
        board.log(x=float(n))
        n += 1
    assert daemon.proc.poll() is None, f"daemon died on a full disk: {daemon.output()}"
    shown = {r["path"]: r for r in daemon_status(daemon.endpoint)["runs"]}
    assert board.path in shown, f"run not in daemon status: {shown}"
    status_error = shown[board.path]["error"]
    assert status_error, f"daemon status shows no error for the run: {shown[board.path]}"

    filler.unlink()

    def flushed() -> bool:
        try:
            board.flush(timeout=10)
        except StorageError:
            return False
        return True

    wait_until(flushed, timeout=30, interval=0.1, message="flush() still fails after space was freed")
    shown = {r["path"]: r for r in daemon_status(daemon.endpoint)["runs"]}
    assert shown[board.path]["error"] is None, shown[board.path]

    for _ in range(100):  # and after the outage
        board.log(x=float(n))
        n += 1
    board.finish()
    assert daemon.proc.poll() is None

    with RunReader(board.path) as r:
        assert r.status == "finished"
        x = r.series("x")
        assert x["value"].tolist() == [float(i) for i in range(n)], "values lost, doubled or out of order"
        assert x["step"].tolist() == list(range(n))
        media = r.media("img")
        assert [m["step"] for m in media] == [20 * k for k in range(1, images + 1)]
        for m in media:
            assert os.path.getsize(m["path"]) == m["size"]
    report = verify_run(board.path)
    assert report.exit_code == 0, "\n".join(map(str, report.findings))
    assert not [f for f in os.listdir(os.path.join(board.path, "media")) if ".tmp" in f], "temporary media files left"

    # Last, the wording (everything above is checked first, so a wording bug hides no data loss).
    for where, text in (("flush()", str(error)), ("kobo-daemon status", status_error)):
        if "disk full" not in text.lower():
            raise AssertionError(f"{where} does not say the disk is full: {text!r}")


def test_a_run_blocked_by_a_full_disk_resumes_by_itself_when_space_is_freed(small_fs, daemon):
    """TensorLogs fill the disk until log() blocks (policy block); freeing about the space the
    blocked data needs lets the run carry on by itself: the blocked log() returns, and every
    tensor is stored once, in order (the stores' write-ahead logs do not eat the freed space)."""
    import threading

    from kohakuboard.client import TensorLog

    tensor_bytes = 256 << 10
    calls = 40  # 10 MiB
    board = Board(
        name="tfull", run_id="tfull", base_dir=small_fs / "runs", capture_output=False, max_inflight_bytes=4 << 20
    )
    try:
        board.log(t=TensorLog(np.full(tensor_bytes // 4, -1.0, np.float32)))
        board.flush()
        big = _fill(small_fs, 1 << 20)  # 1 MiB left: a few tensors fit, then the disk is full
        done = threading.Event()

        def train() -> None:
            for i in range(calls):
                board.log(t=TensorLog(np.full(tensor_bytes // 4, float(i), np.float32)))
            done.set()

        t = threading.Thread(target=train, daemon=True)
        t.start()

        def disk_full_and_blocked() -> bool:
            assert not done.is_set(), "all calls returned although the disk is full"
            return bool(_run_error(daemon, board.path)) and board.stats()["inflight_bytes"] >= 3 << 20

        wait_until(disk_full_and_blocked, interval=0.05, message="the disk never filled")
        assert "disk full" in _run_error(daemon, board.path).lower()
        # Free what the rest needs: the calls not yet stored, x1.3 (the size target), nothing more.
        stats = board.stats()
        left = (calls + 1 - stats["acknowledged"]) * tensor_bytes
        with open(big, "r+b") as f:
            f.truncate(os.path.getsize(big) - int(1.3 * left))
        assert done.wait(60), f"log() still blocked 60 s after space was freed: {board.stats()}"
        board.flush(timeout=30)
        assert _run_error(daemon, board.path) is None
        board.finish()
    finally:
        try:
            board.finish(timeout=5)
        except Exception:
            pass
    with RunReader(board.path) as r:
        ts = r.tensors("t")
        assert [float(x["array"][0]) for x in ts] == [-1.0] + [float(i) for i in range(calls)], (
            "lost, doubled or reordered"
        )
        assert all(x["array"].shape == (tensor_bytes // 4,) for x in ts)
    report = verify_run(board.path)
    assert report.exit_code == 0, "\n".join(map(str, report.findings))


def _run_error(daemon, path: str) -> str | None:
    return {r["path"]: r for r in daemon_status(daemon.endpoint)["runs"]}.get(path, {}).get("error")
