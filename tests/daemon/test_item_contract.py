"""The daemon applies the client's item rule to what arrives on its socket (issue 9, parts 1 and 2).

Every malformed shape of every rich item kind (each node of the item's meta
replaced by each hostile value, each key renamed, each blob emptied or
poisoned, and the issue's own cases such as a histogram with 3 edges for 3
counts) is sent on the data socket of one run, each in a message that also
carries a scalar.  Then: the scalar of every message is stored, each item is
either stored or rejected with a ``rejected_item`` event (never a "BUG"), every
stored item reads back, and ``kobo verify`` passes on the run.
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.protocol import codec
from kohakuboard.protocol import messages as m
from kohakuboard.storage.reader import RunReader

# the header mutator the fuzz test uses: every node of a decoded header, and a copy with one replaced
from .test_fuzz import _paths, _replaced

_HOSTILE = [
    None,
    True,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x" * 5000,
    b"",
    b"\xff" * 9,
    [],
    [[]],
    [1, "a"],
    {},
    {"k": [None]},
    {"": 1.0},
    1e30,
    0.4,
]
_HOSTILE_KEYS = ["", "x" * 2000, "ref"]
_WORDS = [struct.pack("<d", x) for x in (math.nan, math.inf, -math.inf, 1e30, 0.4)] + [struct.pack("<q", -1)]


def _base_items() -> list[tuple[list[Any], list[bytes]]]:
    """One item of each kind and form, encoded by the client's own code."""
    from kohakuboard.client import Histogram, KernelDensity, Media, Table, TensorLog
    from kohakuboard.client._board import _encode_rich

    rich = [
        ("img", Media(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), caption="c")),
        ("png", Media(_png_bytes(), caption="file")),
        ("tab", Table(columns=["a", "b"], rows=[[1, "x"], [2, Media(np.zeros((2, 2), np.uint8))]])),
        ("hist", Histogram(np.arange(10.0))),
        ("binned", Histogram(np.arange(10.0), num_bins=4).compute_bins()),
        ("compact", Histogram(bins=[0.0, 1.0, 2.0], counts=[5, 7], precision="compact")),
        ("t", TensorLog(np.ones((2, 2)), metadata={"k": 1}, namespace="ns")),
        ("t0", TensorLog(np.array(2.5))),
        ("kde", KernelDensity(np.arange(5.0))),
        ("kdegrid", KernelDensity(grid=[0.0, 1.0, 2.0], density=[0.1, 0.5, 0.1])),
    ]
    out = []
    for name, value in rich:
        items, blobs = _encode_rich([(name, value)])
        out.append((items[0], [bytes(b) for b in blobs]))
    return out


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _variants() -> list[tuple[str, list[Any], list[bytes]]]:
    out: list[tuple[str, list[Any], list[bytes]]] = []
    for item, blobs in _base_items():
        name, kind, meta, refs = item
        out.append((f"{name} as logged", item, blobs))
        for path in _paths(meta)[1:]:
            for v in _HOSTILE:
                out.append(
                    (f"{name} meta{list(path)} = {v!r:.20}", [name, kind, _replaced(meta, path, value=v), refs], blobs)
                )
            if isinstance(path[-1], str):
                for k in _HOSTILE_KEYS:
                    if k != path[-1]:
                        out.append(
                            (
                                f"{name} meta key {path[-1]!r} renamed",
                                [name, kind, _replaced(meta, path, key=k), refs],
                                blobs,
                            )
                        )
        for i, blob in enumerate(blobs):
            for bad in [b"", blob[:-1], blob + b"\0"] + [w + blob[8:] for w in _WORDS if len(blob) >= 8]:
                out.append((f"{name} blob {i} poisoned", item, [*blobs[:i], bad, *blobs[i + 1 :]]))

    # the cases, as a hostile client would send them (log() refuses each)
    def binned(edges: list[float], counts: list[float], precision: str = "exact") -> tuple[list[Any], list[bytes]]:
        e, c = np.array(edges, "<f8"), np.array(counts, "<f8")
        meta = {
            "precision": precision,
            "num_bins": 64,
            "binned": True,
            "edges": {"dtype": "<f8", "shape": [len(e)], "ref": 0},
            "counts": {"dtype": "<f8", "shape": [len(c)], "ref": 1},
        }
        return ["issue", "histogram", meta, [0, 1]], [e.tobytes(), c.tobytes()]

    for what, args in {
        "3 edges for 3 counts": ([0, 1, 2], [1, 2, 3]),
        "count 1e30": ([0, 1], [1e30]),
        "count 3e9": ([0, 1], [3e9]),
        "count 0.4": ([0, 1], [0.4]),
        "compact count 1e30": ([0, 1], [1e30], "compact"),
        "1 edge for 0 counts": ([0], []),
    }.items():
        item, blobs = binned(*args)
        out.append((what, item, blobs))
    return out


class _Raw:
    def __init__(self, endpoint: Any) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(endpoint.data_addr)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.connect(endpoint.control_addr)

    def request(self, msg: Any, timeout: float = 60.0) -> Any:
        self.dealer.send_multipart(codec.encode(msg))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.dealer.poll(int(left * 1000) + 1), f"no reply to {msg.KIND}"
            reply = codec.decode(self.dealer.recv_multipart())
            if reply.env.seq == msg.env.seq:
                return reply

    def close(self) -> None:
        self.push.close(0)
        self.dealer.close(0)
        self.ctx.term()


def _read_everything(r: RunReader) -> int:
    """Read every stored item of every kind; return how many there are."""
    n = 0
    readers = {"media": r.media, "table": r.tables, "histogram": r.histograms, "tensor": r.tensors, "kde": r.kde}
    for kind, names in r.list_items().items():
        for name in names:
            rows = readers[kind](name)
            n += len(rows)
            for row in rows:
                if kind == "media":
                    assert len(r.media_bytes(row)) == row["size"]
                if kind == "histogram":
                    assert row["counts"].size == max(row["edges"].size - 1, 0)
    return n


@pytest.mark.timeout(180)
@pytest.mark.own_daemon
def test_malformed_items_on_the_socket_never_damage_the_run(daemon, endpoint, base_dir):
    variants = _variants()
    run = str(base_dir / "default" / "hostile")
    raw = _Raw(endpoint)
    try:
        opened = raw.request(m.OpenRun(m.Envelope(run=run, client="h", seq=1), name="hostile", run_id="hostile"))
        assert isinstance(opened, m.RunOpened), opened
        for i, (_, item, blobs) in enumerate(variants):
            env = m.Envelope(run=run, client="h", seq=i + 1, step=i, wall=1.7e9 + i)
            raw.push.send_multipart(codec.encode(m.LogMessage(env, {"x": float(i)}, [item], blobs)))
        reply = raw.request(m.FlushRequest(m.Envelope(run=run, client="h", seq=10**9), last_seq=len(variants)))
        assert isinstance(reply, m.Flushed) and reply.durable_seq == len(variants), (reply, daemon.output()[-2000:])
        raw.request(m.FinishRun(m.Envelope(run=run, client="h", seq=10**9 + 1), len(variants), "finished"))
    finally:
        raw.close()
    assert daemon.terminate() == 0
    assert "Traceback" not in Path(daemon.log_path).read_text(errors="replace")

    res = CliRunner().invoke(kobo, ["verify", run])
    assert res.exit_code == 0, res.output
    with RunReader(run) as r:
        assert r.series("x")["value"].tolist() == [float(i) for i in range(len(variants))]
        events = [e["detail"] for e in r.events() if e["kind"] == "rejected_item"]
        assert not [e for e in events if e.startswith("BUG")], [e for e in events if e.startswith("BUG")][:5]
        stored = _read_everything(r)
    print(f"{len(variants)} variants: {stored} stored, {len(events)} rejected")
    assert stored + len(events) == len(variants)
    # every unmodified item is stored; each issue case is rejected, by name
    assert stored >= len(_base_items()) and len(events) > 1000, (stored, len(events))
    for what in (
        "3 bin edges for 3 counts",
        "over 2147483647",
        "whole numbers",
        "over 9007199254740992",
        "1 bin edge(s) but no counts",
    ):
        assert any(what in e for e in events), what


def test_run_paths_the_daemon_cannot_hold_are_refused_with_a_reason(daemon, endpoint, tmp_path):
    """A 1,500-component path and a folder holding other files: an error reply, nothing created, no traceback."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "photo.jpg").write_bytes(b"\xff\xd8")
    raw = _Raw(endpoint)
    try:
        cases = {
            str(tmp_path) + "/d" * 1500: r"bytes long; a run's databases \(SQLite\) need it to be at most 460 bytes",
            str(
                taken
            ): r"refusing to create a run in .*taken: the folder already exists, holds other files \(photo\.jpg\)",
        }
        for k, (path, why) in enumerate(cases.items()):
            reply = raw.request(m.OpenRun(m.Envelope(run=path, client="p", seq=k + 1), name="x", run_id="x"))
            assert isinstance(reply, m.ErrorReply), reply
            import re

            assert re.search(why, reply.message), reply.message
    finally:
        raw.close()
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in taken.iterdir()) == ["photo.jpg"]
    assert "Traceback" not in daemon.output() and "RecursionError" not in daemon.output()


@pytest.mark.own_daemon
def test_a_reader_skips_a_malformed_record_reports_it_and_reads_the_rest(daemon, base_dir):
    """A histogram row an older daemon wrote unchecked (3 edges for 3 counts): the reader gives the
    good rows and names the bad one in ``skipped``; ``kobo verify`` names it too."""
    import sqlite3

    from kohakuvault import ColumnVault

    from kohakuboard.client import Board, Histogram
    from kohakuboard.storage import format as fmt

    with Board(run_id="old", capture_output=False) as b:
        b.log(h=Histogram(bins=[0, 1, 2], counts=[1, 2]))
        b.log(h=Histogram(bins=[0, 1, 2], counts=[3, 4]))
    assert daemon.terminate() == 0
    # the size of a 2-bin row, but its header says 3 bins (a row a buggy writer packed wrong)
    bad = (
        struct.pack(fmt.HISTOGRAM_HEADER, 2, 0, 1.7e9, 3, 0, 0, 0, 6, 1.0)
        + np.zeros(3, "<f8").tobytes()
        + np.array([1, 2], "<i4").tobytes()
    )
    rel = fmt.HISTOGRAM_FILES["exact"]
    with ColumnVault(str(Path(b.path) / rel)) as cv:
        dtype = {c: d for c, d, _ in cv.list_columns()}["0/h"]
        assert dtype == f"vec:u8:{len(bad)}"  # fixed-size records
        col = cv.ensure("0/h", dtype)
        col.append_array(np.frombuffer(bad, np.uint8).reshape(1, -1))
        n = len(col)
    db = sqlite3.connect(Path(b.path) / fmt.METADATA_DB)
    with db:
        db.execute("UPDATE committed SET length=? WHERE file=? AND name=?", (n, rel, "0/h"))
    db.close()
    with RunReader(b.path) as r:
        assert [h["counts"].tolist() for h in r.histograms("h")] == [[1, 2], [3, 4]]
        assert len(r.skipped) == 1 and r.skipped[0]["name"] == "h"
        assert "row 2: header says 3 bins" in r.skipped[0]["reason"]
    res = CliRunner().invoke(kobo, ["verify", b.path])
    assert res.exit_code == 1 and "histogram record" in res.output, res.output


@pytest.mark.own_daemon
def test_a_reader_skips_a_table_row_whose_json_is_damaged(daemon, base_dir):
    """A tables row with JSON that does not parse (a damaged or foreign write): skipped and named."""
    import sqlite3

    from kohakuboard.client import Board, Table
    from kohakuboard.storage import format as fmt

    with Board(run_id="tabs", capture_output=False) as b:
        for i in range(3):
            b.log(tab=Table([{"i": i}]))
    assert daemon.terminate() == 0
    db = sqlite3.connect(Path(b.path) / fmt.METADATA_DB)
    with db:
        db.execute("UPDATE tables SET rows='[[1' WHERE step=1")
    db.close()
    with RunReader(b.path) as r:
        assert [t["rows"] for t in r.tables("tab")] == [[[0]], [[2]]]
        assert [(s["kind"], s["step"]) for s in r.skipped] == [("table", 1)]
    # the viewer sends the good rows and names the bad one (its card says so)
    from kohakuboard.viewer.app import Viewer

    shown = Viewer(str(base_dir)).table_rows("default", "tabs", "tab", 0, None, None)
    assert [t["step"] for t in shown["rows"]] == [0, 2]
    assert [(s["kind"], s["step"]) for s in shown["skipped"]] == [("table", 1)]


@pytest.mark.own_daemon
def test_a_refused_message_takes_its_place_in_the_sequence(daemon, endpoint, base_dir):
    """A data message the daemon cannot decode (a client bug) is never sent again: it is counted as a
    dropped call with a ``refused`` event, so the calls after it become durable at once instead of the
    client's flush() waiting for a number that is never coming."""
    import msgpack

    run = str(base_dir / "default" / "holey")
    raw = _Raw(endpoint)
    try:
        opened = raw.request(m.OpenRun(m.Envelope(run=run, client="h", seq=1), name="holey", run_id="holey"))
        assert isinstance(opened, m.RunOpened), opened
        for seq in (1, 2, 3):
            frames = codec.encode(
                m.LogMessage(m.Envelope(run=run, client="h", seq=seq, step=seq, wall=1.7e9), {"x": 1.0 * seq})
            )
            if seq == 2:  # its header is fine, its payload is not
                header = msgpack.unpackb(frames[0], raw=False)
                header[10] = "not a payload"
                frames = [msgpack.packb(header, use_bin_type=True), *frames[1:]]
            raw.push.send_multipart(frames)
        reply = raw.request(m.FlushRequest(m.Envelope(run=run, client="h", seq=2), last_seq=3), timeout=5)
        assert isinstance(reply, m.Flushed) and reply.durable_seq == 3, reply
        raw.request(m.FinishRun(m.Envelope(run=run, client="h", seq=3), 3, "finished"))
    finally:
        raw.close()
    with RunReader(run) as r:
        assert r.series("x")["value"].tolist() == [1.0, 3.0]
        assert r.clients()[0]["dropped_calls"] == 1
        (refused,) = [e for e in r.events() if e["kind"] == "refused"]
        assert "message #2 refused" in refused["detail"] and "counted as dropped" in refused["detail"]
        assert r.status == "finished"
