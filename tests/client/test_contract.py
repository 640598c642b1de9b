"""What log() accepts is stored and read back exactly; what it cannot store raises at the call (issue 9).

One table: every case of the issue (and its neighbours) is either an error at the
call site, naming the key, or a value that a real daemon stores and
``RunReader`` gives back exactly.  Never accepted and then dropped: after all
cases the run has no ``rejected_item`` event, every accepted case reads back,
and ``kobo verify`` passes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.client import Board, Histogram, KernelDensity, Media, Table, TensorLog
from kohakuboard.protocol.errors import StorageError
from kohakuboard.storage.reader import RunReader


@dataclass
class Case:
    id: str
    value: Callable[[], Any]  # what is logged under the case's key
    error: str | None = None  # regex of the call-site error; None: stored
    check: Callable[[RunReader, str], None] | None = None  # reads the stored value back


def _hist(r: RunReader, key: str) -> dict[str, Any]:
    (h,) = r.histograms(key)
    return h


def _exact_hist(edges: list[float], counts: list[int]) -> Callable[[RunReader, str], None]:
    def check(r: RunReader, key: str) -> None:
        h = _hist(r, key)
        assert h["edges"].tolist() == edges and h["counts"].tolist() == counts and h["total"] == sum(counts)

    return check


def _compact_3e9(r: RunReader, key: str) -> None:
    h = _hist(r, key)
    assert h["precision"] == "compact" and h["total"] == 3_000_000_001
    assert h["counts"][0] == pytest.approx(3e9, rel=1e-12) and h["counts"][1] > 0


def _kde_extremes(r: RunReader, key: str) -> None:
    (k,) = r.kde(key)
    assert k["count"] == 2 and len(k["grid"]) == 256 and np.all(np.isfinite(k["grid"]))
    assert k["grid"][0] <= -1e308 and k["grid"][-1] >= 1e308 and np.all(np.isfinite(k["density"]))


def _tensor(expected: np.ndarray) -> Callable[[RunReader, str], None]:
    def check(r: RunReader, key: str) -> None:
        (t,) = r.tensors(key)
        assert t["array"].shape == expected.shape and t["array"].dtype == expected.dtype
        assert t["array"].tobytes() == expected.tobytes()

    return check


def _scalar(expected: float) -> Callable[[RunReader, str], None]:
    def check(r: RunReader, key: str) -> None:
        assert r.series(key)["value"].tolist() == [expected]

    return check


def _listed_media(r: RunReader, key: str) -> None:
    assert key in r.list_items()["media"] and len(r.media(key)) == 1


def _table_not_its_cell(r: RunReader, key: str) -> None:
    items = r.list_items()
    assert key in items["table"] and f"{key}#0" not in items["media"]
    assert len(r.tables(key)) == 1


def _image(shape_hwc: tuple[int, int, int]) -> Callable[[RunReader, str], None]:
    def check(r: RunReader, key: str) -> None:
        (m,) = r.media(key)
        assert (m["height"], m["width"]) == shape_hwc[:2]

    return check


CASES = [
    # --- histograms: counts must be whole numbers within what the precision stores
    Case(
        "hist-count-1e30-exact",
        lambda: Histogram(bins=[0, 1], counts=[1e30]),
        r"count 1e\+30 \(bin 0\) is over 2147483647, the largest a exact histogram stores",
    ),
    Case(
        "hist-count-3e9-exact",
        lambda: Histogram(bins=[0, 1, 2], counts=[3e9, 1]),
        r"count 3e\+09 \(bin 0\) is over 2147483647.*precision='compact'",
    ),
    Case(
        "hist-count-1e30-compact",
        lambda: Histogram(bins=[0, 1], counts=[1e30], precision="compact"),
        r"count 1e\+30 \(bin 0\) is over 9007199254740992",
    ),
    Case(
        "hist-count-0.4", lambda: Histogram(bins=[0, 1], counts=[0.4]), r"counts must be whole numbers; count 0 is 0\.4"
    ),
    Case("hist-3-edges-3-counts", lambda: Histogram(bins=[0, 1, 2], counts=[1, 2, 3]), r"3 bin edges for 3 counts"),
    Case("hist-negative-count", lambda: Histogram(bins=[0, 1], counts=[-1]), r"counts must be >= 0"),
    Case("hist-nan-edge", lambda: Histogram(bins=[0, np.nan], counts=[1]), r"bin edges must be finite"),
    Case("hist-edges-backwards", lambda: Histogram(bins=[1, 0], counts=[1]), r"edges must be in increasing order"),
    Case(
        "hist-count-int32-max",
        lambda: Histogram(bins=[0, 1], counts=[2**31 - 1]),
        check=_exact_hist([0.0, 1.0], [2**31 - 1]),
    ),
    Case(
        "hist-count-3e9-compact",
        lambda: Histogram(bins=[0, 1, 2], counts=[3e9, 1], precision="compact"),
        check=_compact_3e9,
    ),
    Case(
        "hist-integral-floats",
        lambda: Histogram(bins=[0.0, 0.5, 1.0], counts=np.array([3.0, 0.0])),
        check=_exact_hist([0.0, 0.5, 1.0], [3, 0]),
    ),
    # --- KDE near the float64 limits is computed, not dropped
    Case("kde-plus-minus-1e308", lambda: KernelDensity(values=[1e308, -1e308]), check=_kde_extremes),
    Case(
        "kde-grid-density-lengths",
        lambda: KernelDensity(grid=[0, 1, 2], density=[1, 2]),
        r"KDE grid has 3 points but density has 2",
    ),
    # --- tensors keep their shape, 0-d included
    Case("tensor-0d", lambda: TensorLog(np.array(2.5)), check=_tensor(np.array(2.5))),
    Case("tensor-0d-int", lambda: TensorLog(np.int16(-3)), check=_tensor(np.array(-3, np.int16))),
    Case("tensor-empty", lambda: TensorLog(np.zeros((0, 3), np.float32)), check=_tensor(np.zeros((0, 3), np.float32))),
    # --- media names ending in '#<number>' name table cells
    Case(
        "media-named-like-a-cell",
        lambda: Media(np.zeros((4, 4, 3), np.uint8)),
        r"media name 'pic#0' ends in '#<number>', which names a cell of table 'pic'",
    ),
    Case("media-hash-not-a-cell", lambda: Media(np.zeros((4, 4, 3), np.uint8)), check=_listed_media),
    Case(
        "table-with-a-media-cell",
        lambda: Table([{"img": Media(np.zeros((8, 8, 3), np.uint8))}]),
        check=_table_not_its_cell,
    ),
    # --- image shapes: HWC or CHW when it is clear, else an error (never a silent guess)
    Case("image-4x4x2", lambda: Media(np.zeros((4, 4, 2), np.uint8)), r"\(4, 4, 2\) is ambiguous"),
    Case("image-4x4x5", lambda: Media(np.zeros((4, 4, 5), np.uint8)), r"\(4, 4, 5\) is ambiguous"),
    Case("image-chw-3x8x6", lambda: Media(np.zeros((3, 8, 6), np.uint8)), check=_image((8, 6, 3))),
    Case("image-hwc-4x4x3", lambda: Media(np.zeros((4, 4, 3), np.uint8)), check=_image((4, 4, 3))),
    # --- text that msgpack and JSON cannot carry is refused here, not lost in the sender thread
    Case(
        "table-column-lone-surrogate",
        lambda: Table([{"a\udc80": 1}]),
        r"table column name 'a\\udc80' is not valid Unicode",
    ),
    Case(
        "caption-lone-surrogate",
        lambda: Media(np.zeros((4, 4, 3), np.uint8), caption="x\udc80"),
        r"media caption 'x\\udc80' is not valid Unicode",
    ),
    # --- one call must fit in one message (else the daemon's decoder would refuse all of it)
    Case(
        "table-of-5000-images",
        lambda: Table([{"img": Media(np.zeros((2, 2, 3), np.uint8))} for _ in range(5000)]),
        r"the call carries 5000 arrays or files, more than the 4095 one log\(\) call may carry",
    ),
    # --- scalars beyond float64 are refused alike, infinities are kept
    Case("scalar-longdouble-1e4000", lambda: np.longdouble("1e4000"), r"too large for a float64"),
    Case("scalar-int-10-400", lambda: 10**400, r"too large for a float64"),
    Case("scalar-longdouble-inf", lambda: np.longdouble("inf"), check=_scalar(math.inf)),
    Case("scalar-longdouble-small", lambda: np.longdouble("1.5"), check=_scalar(1.5)),
]

_KEYS = {"media-named-like-a-cell": "pic#0", "media-hash-not-a-cell": "pic#x"}


def _key(case: Case) -> str:
    return _KEYS.get(case.id, case.id)


def test_every_value_is_refused_at_the_call_or_stored_and_read_back(daemon, tmp_path):
    refused: dict[str, str] = {}
    with Board(run_id="contract", capture_output=False) as b:
        for case in CASES:
            key = _key(case)
            step = b.current_step
            if case.error is not None:
                with pytest.raises((ValueError, TypeError)) as info:
                    b.log(companion=1.0, **{key: case.value()})
                refused[case.id] = str(info.value)
                assert b.current_step == step, case.id  # nothing of the call was sent
            else:
                b.log(**{key: case.value()})
        b.flush()
    wrong = {
        cid: msg
        for cid, msg in refused.items()
        if not (
            re.search(next(c.error for c in CASES if c.id == cid), msg)
            and f"cannot log {_key(next(c for c in CASES if c.id == cid))!r}" in msg
        )
    }
    assert not wrong, wrong
    with RunReader(b.path) as r:
        assert "companion" not in r.list_metrics()
        rejected = [e["detail"] for e in r.events() if e["kind"] == "rejected_item"]
        assert not rejected, rejected  # nothing accepted by log() was dropped by the daemon
        for case in CASES:
            if case.check is not None:
                case.check(r, _key(case))
    res = CliRunner().invoke(kobo, ["verify", b.path])
    assert res.exit_code == 0, res.output


BOARD_MISTAKES = [
    (dict(run_id=""), ValueError, r"run_id='' cannot name the run's folder: it is empty; omit run_id"),
    (
        dict(run_id=None, board_id=""),
        ValueError,
        r"board_id='' cannot name the run's folder: it is empty; omit board_id",
    ),
    (dict(max_queue=-1), ValueError, r"max_queue must be at least 1, got -1"),
    (dict(max_queue=0), ValueError, r"max_queue must be at least 1, got 0"),
    (dict(max_queue=2.5), TypeError, r"max_queue must be an integer, got float"),
    (dict(max_inflight_bytes=0), ValueError, r"max_inflight_bytes must be at least 1"),
    (dict(timeout=-1), ValueError, r"timeout must be a finite number of seconds > 0, got -1\.0"),
    (dict(timeout=float("nan")), ValueError, r"timeout must be a finite number of seconds > 0, got nan"),
    (dict(timeout="10"), TypeError, r"timeout must be a number of seconds, got str"),
    (dict(capture_output="no"), TypeError, r"capture_output must be True or False, got str"),
    (dict(base_dir=b"/tmp/x"), TypeError, r"base_dir must be a path \(str or os.PathLike\), got bytes"),
    (dict(config={"a": {}}), None, None),  # placeholder replaced below: a 5,000-deep config
]


def _deep(n: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for _ in range(n):
        d = {"k": d}
    return d


BOARD_MISTAKES[-1] = (
    dict(config=_deep(5000)),
    TypeError,
    r"config\['k'\]\['k'\].*nests deeper than 100 levels of dicts and lists",
)


@pytest.mark.parametrize(
    "kwargs, exc, msg", BOARD_MISTAKES, ids=[f"{list(k)[-1]}-{i}" for i, (k, _, _) in enumerate(BOARD_MISTAKES)]
)
def test_board_arguments_are_checked_where_given(kwargs, exc, msg, base_dir, endpoint):
    with pytest.raises(exc, match=msg):
        Board(**{"run_id": "args", "capture_output": False, **kwargs})
    assert not base_dir.exists()


def test_global_step_stays_within_what_the_daemon_stores(daemon):
    """board.step(2**63) would make every later log() a message the daemon must refuse: raised at once."""
    with Board(run_id="gstep", capture_output=False) as b:
        b.step(2**62)
        with pytest.raises(
            ValueError, match=r"step\(9223372036854775807\) would move global_step to .* beyond a 64-bit"
        ):
            b.step(2**63 - 1)
        b.log(x=1.0)
    with RunReader(b.path) as r:
        assert r.series("x")["global_step"].tolist() == [2**62]


def test_deep_config_within_the_limit_is_stored_exactly(daemon):
    cfg = _deep(99)
    with Board(run_id="deep", config=cfg, capture_output=False) as b:
        b.log(x=1.0)
    with RunReader(b.path) as r:
        assert r.config == cfg


def test_flush_and_finish_timeouts_are_checked(daemon):
    b = Board(run_id="timeouts", capture_output=False)
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0, got 0\.0"):
        b.flush(timeout=0)
    with pytest.raises(TypeError, match=r"timeout must be a number of seconds, got str"):
        b.finish(timeout="5")
    b.finish()


def test_a_run_is_created_only_in_a_new_empty_or_run_folder(daemon, base_dir):
    """A folder holding somebody else's files is refused with the reason; nothing is written into it."""
    taken = base_dir / "default" / "taken"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(
        StorageError,
        match=r"refusing to create a run in .*taken: the folder already exists, "
        r"holds other files \(notes\.txt\) and is not a KohakuBoard run",
    ):
        Board(run_id="taken", capture_output=False)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]

    empty = base_dir / "default" / "empty"
    empty.mkdir()
    with Board(run_id="empty", capture_output=False) as b:
        b.log(x=1.0)
    with Board(run_id="empty", capture_output=False) as b:  # a run of this format: resumed
        b.log(x=2.0)
    with RunReader(b.path) as r:
        assert r.series("x")["value"].tolist() == [1.0, 2.0]


def test_a_run_path_too_long_for_its_databases_is_refused_at_the_call(base_dir, endpoint, tmp_path):
    """1,500 components (or any path over 460 bytes): ValueError in Board(), nothing created, no daemon."""
    deep = str(tmp_path) + "/d" * 1500
    with pytest.raises(
        ValueError,
        match=r"the run folder's path is 30\d\d bytes long; a run's databases \(SQLite\) "
        r"need it to be at most 460 bytes: use a shorter base_dir",
    ):
        Board(run_id="r", base_dir=deep, capture_output=False)
    assert not os.path.exists(str(tmp_path) + "/d")
