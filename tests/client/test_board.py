"""The Board contract of PRODUCT §2 for scalars, against a real daemon."""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings

import numpy as np
import pytest

from kohakuboard.client import Board
from kohakuboard.protocol.errors import BoardClosedError, DaemonUnavailable
from kohakuboard.storage.reader import RunReader
from kohakuboard.testing import wait_until


def test_default_run_id_shape_and_folder(daemon, base_dir):
    """The default run id is YYYYmmdd_HHMMSS_xxxxxx (UTC) and the folder follows PRODUCT §5."""
    with Board(name="shape", capture_output=False) as b:
        assert re.fullmatch(r"\d{8}_\d{6}_[a-z0-9]{6}", b.run_id)
        assert b.run_id[:8] == time.strftime("%Y%m%d", time.gmtime())
        b.log(x=1)
    run = base_dir / "default" / b.run_id
    for part in ("metadata.json", "data/metrics", "data/metadata.db", "logs/writer.log"):
        assert (run / part).exists(), part
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["status"] == "finished" and meta["finished_at"]


def test_steps_and_global_steps(daemon, base_dir):
    """step numbers every log() call, auto_step=False reuses it, global_step moves only with step()."""
    with Board(run_id="steps", capture_output=False) as b:
        b.log(a=1)  # step 0, global 0
        b.log(a=2, auto_step=False)  # step 0
        b.step()
        b.log(a=3)  # step 1, global 1
        b.step(increment=5)
        b.log(**{"train/loss": 0.5, "val/accuracy": 0.95})  # step 2, global 6
        b.flush()
        with RunReader(b.path) as r:
            a = r.series("a")
            assert a["step"].tolist() == [0, 0, 1]
            assert a["global_step"].tolist() == [0, 0, 1]
            loss = r.series("train/loss")
            assert loss["step"].tolist() == [2] and loss["global_step"].tolist() == [6]
            assert r.series("val/accuracy")["value"].tolist() == [0.95]


def test_values_of_every_numeric_kind_and_non_finite_are_kept(daemon):
    """Python, numpy and 1-element array values are stored; NaN and +-inf survive unchanged."""
    with Board(run_id="kinds", capture_output=False) as b:
        b.log(
            i=3,
            f=0.1,
            t=True,
            n32=np.float32(0.5),
            n64=np.int64(2**40),
            arr=np.array([7.5]),
            zero_d=np.array(1.25),
            nan=float("nan"),
            pinf=float("inf"),
            ninf=-math.inf,
            big=10**300,
        )
        b.flush()
        with RunReader(b.path) as r:
            got = {
                k: r.series(k)["value"][0]
                for k in ("i", "f", "t", "n32", "n64", "arr", "zero_d", "pinf", "ninf", "big")
            }
            assert math.isnan(r.series("nan")["value"][0])
    assert got == {
        "i": 3.0,
        "f": 0.1,
        "t": 1.0,
        "n32": 0.5,
        "n64": 2.0**40,
        "arr": 7.5,
        "zero_d": 1.25,
        "pinf": math.inf,
        "ninf": -math.inf,
        "big": 1e300,
    }


@pytest.mark.parametrize(
    "bad, exc, text",
    [
        ("0.5", TypeError, "str is not a number"),
        (None, TypeError, "NoneType"),
        ([1.0], TypeError, "list"),
        (np.zeros(3), TypeError, "shape (3,)"),
        (np.array(["a"]), TypeError, "not a number"),
        (10**400, ValueError, "too large"),
    ],
)
def test_bad_value_raises_naming_key_and_sends_nothing(daemon, bad, exc, text):
    """A value that cannot be logged raises in the caller, names the key, and no part of the call is stored."""
    with Board(run_id="bad", capture_output=False) as b:
        with pytest.raises(exc, match=re.escape(text)) as info:
            b.log(good=1.0, broken=bad)
        assert "'broken'" in str(info.value)
        b.log(good=2.0)
        b.flush()
        with RunReader(b.path) as r:
            assert r.series("good")["value"].tolist() == [2.0]
            assert r.series("good")["step"].tolist() == [0]
            assert "broken" not in r.list_metrics()


def test_bad_names_raise(daemon):
    """An empty or control-character metric name is refused with the name in the message."""
    with Board(run_id="names", capture_output=False) as b:
        with pytest.raises(ValueError, match="empty"):
            b.log(**{"": 1.0})
        with pytest.raises(ValueError, match="control characters"):
            b.log(**{"a\nb": 1.0})
        with pytest.raises(ValueError, match="not valid Unicode"):
            b.log(**{"bad\udc80": 1.0})
        b.log(**{"odd name/with spaces ü 🙂 %": 1.0})
        b.flush()
        with RunReader(b.path) as r:
            assert r.list_metrics() == ["odd name/with spaces ü 🙂 %"]


def test_config_must_be_json_serialisable_before_anything_is_created(endpoint, base_dir):
    """A bad config raises TypeError naming the key, and no daemon or folder is created."""
    with pytest.raises(TypeError, match=r"config\['opt'\]\['fn'\]"):
        Board(run_id="cfg", config={"lr": np.float32(0.1), "opt": {"fn": object()}})
    assert not (base_dir / "default" / "cfg").exists()
    from kohakuboard.protocol.endpoint import daemon_alive

    assert not daemon_alive(endpoint)


def test_numpy_config_values_are_converted(daemon, base_dir):
    """numpy scalars and arrays in config are stored as plain JSON numbers and lists."""
    with Board(
        run_id="npcfg", config={"lr": np.float32(0.5), "dims": np.arange(3), "n": np.int64(4)}, capture_output=False
    ):
        pass
    meta = json.loads((base_dir / "default" / "npcfg" / "metadata.json").read_text())
    assert meta["config"] == {"lr": 0.5, "dims": [0, 1, 2], "n": 4}


def test_resume_appends_and_continues_counters(daemon, base_dir):
    """Passing an existing run id resumes the run: points are appended, steps continue."""
    with Board(run_id="resume", capture_output=False) as b:
        for _ in range(3):
            b.step()
            b.log(loss=1.0)
    with Board(board_id="resume", capture_output=False) as b2:
        assert b2.resumed
        b2.step()
        b2.log(loss=2.0)
        b2.flush()
        with RunReader(b2.path) as r:
            s = r.series("loss")
            assert s["step"].tolist() == [0, 1, 2, 3]
            assert s["global_step"].tolist() == [1, 2, 3, 4]
            assert s["value"].tolist() == [1.0, 1.0, 1.0, 2.0]
            assert r.status == "running"
    with RunReader(base_dir / "default" / "resume") as r:
        assert r.status == "finished"


def test_log_after_finish_raises_and_finish_is_idempotent(daemon):
    """log() and flush() after finish() raise a clear error; finish() twice is harmless."""
    b = Board(run_id="closed", capture_output=False)
    b.finish()
    b.finish()
    with pytest.raises(BoardClosedError, match="finished"):
        b.log(x=1)
    with pytest.raises(BoardClosedError):
        b.flush()


def test_mutating_after_log_does_not_change_what_is_stored(daemon):
    """What is stored is the value at the call, even if the array changes right after."""
    arr = np.array([1.0])
    with Board(run_id="mut", capture_output=False) as b:
        b.log(x=arr)
        arr[0] = 99.0
        b.flush()
        with RunReader(b.path) as r:
            assert r.series("x")["value"].tolist() == [1.0]


def test_data_is_durable_within_half_a_second_without_flush(daemon):
    """An idle board's data reaches the run folder without any flush(): the daemon writes a run's batch at
    most ``flush_interval`` after its first message, an interval held below 0.5 s to leave room for the write."""
    with Board(run_id="idle", capture_output=False) as b:
        b.log(x=1.0)

        def durable() -> bool:
            with RunReader(b.path) as r:
                return "x" in r.list_metrics() and len(r.series("x")) == 1

        wait_until(durable, message="an idle board's data never became durable without flush()")
    from kohakuboard.daemon.config import DaemonConfig

    assert 0 < DaemonConfig().flush_interval <= 0.45


@pytest.mark.own_daemon
def test_finish_with_dead_daemon_returns_quickly_and_warns(daemon, endpoint, monkeypatch):
    """With no daemon coming back, finish() returns within its timeout and says how much was not written."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    b = Board(run_id="orphan", capture_output=False)
    b.log(x=1.0)
    b.flush()
    daemon.kill()
    b.log(x=2.0)
    b.log(x=3.0)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b.finish(timeout=3)
    assert time.monotonic() - t0 < 5
    messages = [str(w.message) for w in caught]
    assert any("2 log() call(s) were not written" in t and "not running" in t for t in messages), messages


@pytest.mark.own_daemon
def test_finish_after_daemon_kill_writes_everything(daemon, endpoint, base_dir):
    """kill -9 of the daemon before finish(): the client starts a new one and re-sends, nothing is lost."""
    b = Board(run_id="lazarus", capture_output=False)
    b.log(x=1.0)
    b.flush()
    daemon.kill()
    b.log(x=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.finish(timeout=20)
    with RunReader(base_dir / "default" / "lazarus") as r:
        assert r.series("x")["value"].tolist() == [1.0, 2.0]
        assert r.status == "finished"


@pytest.mark.own_daemon
def test_flush_on_dead_daemon_raises(daemon, monkeypatch):
    """flush() tells the user the daemon is gone (autostart off) instead of hanging."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    b = Board(run_id="deadflush", capture_output=False)
    daemon.kill()
    b.log(x=1.0)
    with pytest.raises(DaemonUnavailable, match="not running"):
        b.flush(timeout=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.finish(timeout=0.1)  # (cleanup: the daemon is gone)


def test_no_autostart_gives_clear_error(endpoint, monkeypatch):
    """With autostart off and no daemon, Board() says how to start one."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    with pytest.raises(DaemonUnavailable, match="kobo-daemon start"):
        Board(run_id="x")


def test_read_only_base_dir_is_a_clear_error(daemon, tmp_path):
    """A base dir the daemon cannot write gives a StorageError at Board(), naming the folder."""
    if os.geteuid() == 0:
        target = "/proc/kobo-not-writable"  # root ignores permission bits; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = str(ro)
    from kohakuboard.protocol.errors import StorageError

    with pytest.raises(StorageError, match="cannot create run folder|is not writable"):
        Board(run_id="ro", base_dir=target)


def test_board_usable_from_several_threads(daemon):
    """log() from 4 threads at once loses nothing and keeps one sequence of steps."""
    import threading

    with Board(run_id="threads", capture_output=False) as b:

        def work(k: int) -> None:
            for i in range(2000):
                b.log(**{f"t{k}": float(i)})

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        b.flush()
        with RunReader(b.path) as r:
            steps = []
            for k in range(4):
                s = r.series(f"t{k}")
                assert s["value"].tolist() == [float(i) for i in range(2000)]
                steps += s["step"].tolist()
            assert sorted(steps) == list(range(8000))


def test_fast_loop_with_changing_names_keeps_every_call_in_order(daemon):
    """Calls queued faster than they are sent (batched on the wire) keep their order and steps, even when names vary."""
    with Board(run_id="mixed", capture_output=False) as b:
        for i in range(12_000):
            if i % 3 == 0:
                b.log(a=float(i), b=-float(i))
            elif i % 3 == 1:
                b.log(a=float(i))
            else:
                b.log(b=float(i), a=float(i), c=0.5, auto_step=False)
        b.flush()
        with RunReader(b.path) as r:
            a = r.series("a")
            assert a["value"].tolist() == [float(i) for i in range(12_000)]
            assert (np.diff(a["step"]) >= 0).all()
            assert len(r.series("b")) == 8_000 and len(r.series("c")) == 4_000
            # auto_step=False rows reuse the previous call's step
            c_steps = r.series("c")["step"]
            assert c_steps[0] == 1 and c_steps[1] == 3


@pytest.mark.own_daemon
def test_logging_survives_a_killed_daemon(daemon, endpoint, base_dir):
    """kill -9 of the daemon mid-run: log() never raises or hangs, a new daemon is started, logging carries on."""
    from kohakuboard.protocol.endpoint import daemon_alive

    with Board(run_id="phoenix", capture_output=False) as b:
        for i in range(100):
            b.log(x=float(i))
        b.flush()
        daemon.kill()
        assert not daemon_alive(endpoint)
        t0 = time.monotonic()
        for i in range(100, 3100):
            b.log(x=float(i))
            if i % 100 == 0:
                time.sleep(0.01)  # a training loop does other work too
        assert time.monotonic() - t0 < 30
        b.flush(timeout=30)
        assert daemon_alive(endpoint), "the client should have started a new daemon"
        with RunReader(b.path) as r:
            values = r.series("x")["value"].tolist()
    # acknowledged delivery with replay: every value exactly once, in order
    assert values == [float(i) for i in range(3100)]
    with RunReader(base_dir / "default" / "phoenix") as r:
        assert r.status == "finished"
