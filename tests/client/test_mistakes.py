"""Every ordinary mistake of issue 10 point 2 raises where it is made, names the key, and sends nothing.

One table, one row per mistake.  ``where`` says what the mistake is made in:

* ``log``: a call on an open Board (after ``setup``).  The mistaken call also
  carries a good scalar ``companion``; afterwards the run must hold no
  ``companion``, nothing of the bad key from that call, and the next good call
  gets the step the bad one would have had.
* ``board``: ``Board(...)`` itself.  No run folder may exist afterwards, and no
  daemon may have been started for it.
* ``cli``: a command line (``kobo export`` on a real run; ``kobo-daemon run``).
  It must exit non-zero, name the key on stderr, and write nothing (no output
  file, no daemon).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.client import Board, Histogram, KernelDensity, Media, Table, TensorLog
from kohakuboard.protocol.endpoint import daemon_alive
from kohakuboard.storage.reader import RunReader

IMG = np.zeros((4, 4, 3), np.uint8)


@dataclass
class Mistake:
    id: str
    where: str  # "log", "board" or "cli"
    call: Callable[..., Any]
    exc: type[BaseException] | int  # an exception type, or a CLI exit code
    names: str  # regex: the key (and what was wrong) the message must name
    setup: Callable[[Board], None] | None = None
    resume: bool = False  # log: the mistake is made in a second Board resuming the finished run
    bad_key: str = ""  # log: the key whose value is wrong (must hold nothing of the call)
    extra: dict[str, Any] = field(default_factory=dict)


def _empty_file(tmp: Path) -> str:
    p = tmp / "empty.png"
    p.write_bytes(b"")
    return str(p)


MISTAKES = [
    # --- unknown keyword arguments of the value types
    Mistake(
        "media-unknown-kwarg",
        "log",
        lambda b, t: b.log(companion=1.0, sample=Media(IMG, captoin="x")),
        TypeError,
        r"Media\(\) got an unknown keyword argument 'captoin' \(did you mean 'caption'\?\)",
        bad_key="sample",
    ),
    Mistake(
        "table-unknown-kwarg",
        "log",
        lambda b, t: b.log(companion=1.0, preds=Table(colums=["a"], rows=[[1]])),
        TypeError,
        r"unknown keyword argument 'colums' \(did you mean 'columns'\?\)",
        bad_key="preds",
    ),
    Mistake(
        "histogram-unknown-kwarg",
        "log",
        lambda b, t: b.log(companion=1.0, grads=Histogram(np.ones(3), num_bin=8)),
        TypeError,
        r"unknown keyword argument 'num_bin' \(did you mean 'num_bins'\?\)",
        bad_key="grads",
    ),
    Mistake(
        "tensorlog-unknown-kwarg",
        "log",
        lambda b, t: b.log(companion=1.0, attn=TensorLog(np.eye(2), meta={"head": 1})),
        TypeError,
        r"unknown keyword argument 'meta' \(did you mean 'metadata'\?\)",
        bad_key="attn",
    ),
    Mistake(
        "kde-unknown-kwarg",
        "log",
        lambda b, t: b.log(companion=1.0, logits=KernelDensity(values=np.ones(3), grid_sise=64)),
        TypeError,
        r"unknown keyword argument 'grid_sise' \(did you mean 'grid_size'\?\)",
        bad_key="logits",
    ),
    # --- nothing where a value is required
    Mistake(
        "histogram-of-none",
        "log",
        lambda b, t: b.log(companion=1.0, **{"grad/fc.weight": Histogram(None)}),
        TypeError,
        r"cannot log 'grad/fc\.weight': Histogram\(None\) has no values \(a gradient before backward",
        bad_key="grad/fc.weight",
    ),
    Mistake(
        "zero-byte-image-file",
        "log",
        lambda b, t: b.log(companion=1.0, sample=Media(_empty_file(t))),
        ValueError,
        r"cannot log 'sample': media file '.*empty\.png' is empty \(0 bytes\)",
        bad_key="sample",
    ),
    Mistake(
        "empty-array-as-scalar",
        "log",
        lambda b, t: b.log(companion=1.0, loss=np.array([], np.float32)),
        TypeError,
        r"cannot log 'loss': the numpy array is empty",
        bad_key="loss",
    ),
    Mistake(
        "empty-array-as-image",
        "log",
        lambda b, t: b.log(companion=1.0, sample=Media(np.zeros((0, 4, 3)))),
        ValueError,
        r"cannot log 'sample': image is empty",
        bad_key="sample",
    ),
    # --- one name, one kind
    Mistake(
        "scalar-then-image",
        "log",
        lambda b, t: b.log(companion=1.0, sample=Media(IMG)),
        TypeError,
        r"cannot log 'sample' as media .*already has 'sample' as a scalar",
        setup=lambda b: b.log(sample=0.5),
        bad_key="sample",
    ),
    Mistake(
        "image-then-scalar",
        "log",
        lambda b, t: b.log(companion=1.0, sample=0.5),
        TypeError,
        r"cannot log 'sample' as a scalar: this run already has 'sample' as media",
        setup=lambda b: b.log(sample=Media(IMG)),
        bad_key="sample",
    ),
    Mistake(
        "histogram-then-table-after-resume",
        "log",
        lambda b, t: b.log(companion=1.0, grads=Table([{"a": 1}])),
        TypeError,
        r"cannot log 'grads' as a Table: this run already has 'grads' as a Histogram",
        setup=lambda b: b.log(grads=Histogram(np.arange(5.0))),
        resume=True,
        bad_key="grads",
    ),
    # --- log()'s own argument as a metric name
    Mistake(
        "metric-named-auto_step",
        "log",
        lambda b, t: b.log(companion=1.0, **{"auto_step": 0.5}),
        TypeError,
        r"auto_step must be True or False, got float 0\.5.*a metric cannot be named 'auto_step'",
    ),
    # --- config that msgpack cannot carry or JSON cannot store
    Mistake(
        "config-set",
        "board",
        lambda t: Board(run_id="cfg", config={"optim": {"betas": {0.9, 0.99}}}),
        TypeError,
        r"config\['optim'\]\['betas'\] cannot be stored in the run's config: set",
    ),
    Mistake(
        "config-bytes",
        "board",
        lambda t: Board(run_id="cfg", config={"data": {"salt": b"\x00"}}),
        TypeError,
        r"config\['data'\]\['salt'\] cannot be stored in the run's config: bytes",
    ),
    Mistake(
        "config-int-beyond-64-bits",
        "board",
        lambda t: Board(run_id="cfg", config={"seeds": [1, 2**70]}),
        TypeError,
        r"config\['seeds'\]\[1\] is an integer too large to store",
    ),
    Mistake(
        "config-object",
        "board",
        lambda t: Board(run_id="cfg", config={"model": {"act": object()}}),
        TypeError,
        r"config\['model'\]\['act'\] cannot be stored in the run's config: object",
    ),
    Mistake(
        "config-not-a-dict",
        "board",
        lambda t: Board(run_id="cfg", config=[("lr", 0.1)]),
        TypeError,
        r"config must be a dict, got list",
    ),
    # --- names that cannot be a folder: refused with the reason, never rewritten
    Mistake(
        "project-dotdot",
        "board",
        lambda t: Board(run_id="p", project=".."),
        ValueError,
        r"project='\.\.' cannot name the run's folder: '\.\.' is not a folder name but the parent",
    ),
    Mistake(
        "project-dot",
        "board",
        lambda t: Board(run_id="p", project="."),
        ValueError,
        r"project='\.' cannot name the run's folder: '\.' is not a folder name but this",
    ),
    Mistake(
        "project-slash",
        "board",
        lambda t: Board(run_id="p", project="team/a"),
        ValueError,
        r"project='team/a' cannot name the run's folder: it contains '/'",
    ),
    Mistake(
        "project-empty",
        "board",
        lambda t: Board(run_id="p", project=""),
        ValueError,
        r"project='' cannot name the run's folder: it is empty",
    ),
    Mistake(
        "run-id-newline",
        "board",
        lambda t: Board(run_id="a\nb"),
        ValueError,
        r"run_id='a\\nb' cannot name the run's folder: it contains control characters",
    ),
    # --- a daemon endpoint that depends on the working directory, or has no scheme
    Mistake(
        "endpoint-relative",
        "board",
        lambda t: Board(run_id="ep"),
        ValueError,
        r"KOBO_DAEMON_ENDPOINT='ipc://kobo-here/kobo' is a relative path",
        extra={"env": {"KOBO_DAEMON_ENDPOINT": "ipc://kobo-here/kobo"}},
    ),
    Mistake(
        "endpoint-no-scheme",
        "board",
        lambda t: Board(run_id="ep"),
        ValueError,
        r"KOBO_DAEMON_ENDPOINT='/tmp/kobo-noscheme/kobo' has no scheme: write it as ipc:///tmp/kobo-noscheme/kobo",
        extra={"env": {"KOBO_DAEMON_ENDPOINT": "/tmp/kobo-noscheme/kobo"}},
    ),
    # --- command lines
    Mistake(
        "export-missing-rank",
        "cli",
        ["export", "cli", "--rank", "7"],
        1,
        r"no scalars from rank 7 \(ranks with scalars: 0\)",
    ),
    Mistake("export-missing-metric", "cli", ["export", "cli", "--metric", "nope"], 1, r"'nope'"),
    Mistake(
        "export-missing-metric-and-rank",
        "cli",
        ["export", "cli", "--metric", "loss", "--rank", "3"],
        1,
        r"loss.*rank 3|rank 3.*loss",
    ),
    Mistake(
        "daemon-log-level",
        "cli",
        ["kobo-daemon", "run", "--log-level", "FOO"],
        2,
        r"Invalid value for '--log-level': 'FOO'",
    ),
]


def _check_log_mistake(case: Mistake, tmp_path: Path) -> None:
    run_id = f"m-{case.id}"
    b = Board(run_id=run_id, capture_output=False)
    if case.setup is not None:
        case.setup(b)
    if case.resume:
        b.finish()
        b = Board(run_id=run_id, capture_output=False)
    b.flush()
    before = b.current_step
    with RunReader(b.path) as r:
        items_before = {k: {n: _count(r, k, n) for n in v} for k, v in r.list_items().items()}
        metrics_before = {n: r.num_points(n) for n in r.list_metrics()}
    with pytest.raises(case.exc) as info:  # type: ignore[call-overload]
        case.call(b, tmp_path)
    assert re.search(case.names, str(info.value)), str(info.value)
    assert b.current_step == before  # the failed call took no step
    b.log(after=1.0)
    b.finish()
    with RunReader(b.path) as r:
        assert "companion" not in r.list_metrics(rank=None)
        assert "auto_step" not in r.list_metrics(rank=None)
        assert r.series("after")["step"].tolist() == [before + 1]
        assert {n: r.num_points(n) for n in r.list_metrics() if n != "after"} == metrics_before
        items_after = {k: {n: _count(r, k, n) for n in v} for k, v in r.list_items().items()}
        assert items_after == items_before
        if case.bad_key and case.bad_key not in metrics_before:
            assert case.bad_key not in r.list_metrics(rank=None)


def _count(r: RunReader, kind: str, name: str) -> int:
    return len(
        {"media": r.media, "table": r.tables, "histogram": r.histograms, "tensor": r.tensors, "kde": r.kde}[kind](name)
    )


def _check_board_mistake(case: Mistake, tmp_path: Path, base_dir: Path, endpoint: Any, monkeypatch) -> None:
    for key, value in case.extra.get("env", {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(case.exc) as info:  # type: ignore[call-overload]
        case.call(tmp_path)
    assert re.search(case.names, str(info.value)), str(info.value)
    assert not base_dir.exists() or not any(base_dir.rglob("metadata.json"))
    assert not daemon_alive(endpoint)
    assert not (tmp_path / "kobo-here").exists()  # nothing created relative to the working directory
    assert not os.path.exists("/tmp/kobo-noscheme")


def _check_cli_mistake(case: Mistake, tmp_path: Path, base_dir: Path, endpoint: Any) -> None:
    if case.call[0] == "kobo-daemon":
        proc = subprocess.run(
            [sys.executable, "-m", "kohakuboard.daemon", *case.call[1:]], capture_output=True, text=True, timeout=60
        )
        code, err = proc.returncode, proc.stderr
        assert not daemon_alive(endpoint)
    else:
        with Board(run_id="cli", capture_output=False) as b:
            b.log(loss=0.5)
        out = tmp_path / "out.csv"
        res = CliRunner().invoke(kobo, [*case.call, "--dir", str(base_dir), "-o", str(out)])
        code, err = res.exit_code, res.output
        assert not out.exists()  # nothing written, not an empty file
    assert code == case.exc, err
    assert re.search(case.names, err), err


def _cases(where: str) -> Any:
    cases = [c for c in MISTAKES if c.where == where]
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


@_cases("log")
def test_mistake_raises_where_made_naming_the_key_and_sends_nothing(case, daemon, tmp_path):
    _check_log_mistake(case, tmp_path)


@_cases("board")
def test_mistake_in_board_raises_naming_the_key_and_starts_nothing(case, tmp_path, base_dir, endpoint, monkeypatch):
    _check_board_mistake(case, tmp_path, base_dir, endpoint, monkeypatch)


@_cases("cli")
def test_mistake_on_the_command_line_exits_naming_the_key_and_writes_nothing(case, tmp_path, base_dir, endpoint):
    _check_cli_mistake(case, tmp_path, base_dir, endpoint)


def test_config_values_with_an_obvious_form_are_converted(daemon, base_dir):
    """pathlib.Path -> str, numpy scalars -> numbers, NaN/inf kept (as the strings JSON allows), tuples -> lists."""
    cfg = {
        "out": Path("/data/out"),
        "lr": np.float32(0.5),
        "steps": np.int64(10),
        "ok": np.bool_(True),
        "clip": float("inf"),
        "floor": -float("inf"),
        "warm": float("nan"),
        "betas": (0.9, np.float64(0.99)),
        "nested": {"nan": np.float32("nan")},
    }
    with Board(run_id="conv", config=cfg, capture_output=False) as b:
        b.log(x=1.0)
    with RunReader(b.path) as r:
        assert r.config == {
            "out": "/data/out",
            "lr": 0.5,
            "steps": 10,
            "ok": True,
            "clip": "Infinity",
            "floor": "-Infinity",
            "warm": "NaN",
            "betas": [0.9, 0.99],
            "nested": {"nan": "NaN"},
        }


def test_resuming_a_finished_run_keeps_its_kinds_and_other_names_stay_free(daemon):
    """The refusal knows the run's names after a resume; other names and the same kind are accepted."""
    with Board(run_id="kinds", capture_output=False) as b:
        b.log(loss=0.5, sample=Media(IMG))
    with Board(run_id="kinds", capture_output=False) as b:
        b.log(loss=0.4, sample=Media(IMG), other=Histogram(np.ones(4)))
        with pytest.raises(TypeError, match="'loss' as a Histogram"):
            b.log(loss=Histogram(np.ones(4)))
    with RunReader(b.path) as r:
        assert r.series("loss")["value"].tolist() == [0.5, 0.4]
        assert len(r.media("sample")) == 2 and len(r.histograms("other")) == 1
