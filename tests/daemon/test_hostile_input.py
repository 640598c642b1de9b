"""Garbage on the daemon's sockets is counted and logged; the daemon keeps serving."""

from __future__ import annotations

import time

import msgpack
import zmq

from kohakuboard.client import Board
from kohakuboard.protocol import codec
from kohakuboard.protocol import messages as m
from kohakuboard.storage.reader import RunReader


def _status(endpoint) -> dict:
    from kohakuboard.protocol.control import ControlClient

    conn = ControlClient(endpoint)
    try:
        return conn.request(m.StatusRequest, m.Envelope(), 5.0).info
    finally:
        conn.close()


def test_garbage_truncated_and_unknown_version_are_rejected(daemon, endpoint, base_dir):
    """Bad frames on both sockets are counted by reason, logged, and a valid client still works."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint.data_addr)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint.control_addr)
    valid = codec.encode_log("/nonexistent/run", "c", 1, 0, 0, 0, 0.0, {"x": 1.0})[0]
    future = msgpack.packb([99, 0, *msgpack.unpackb(valid)[2:]])
    bad = [
        [b"\x00\xff garbage"],
        [valid[: len(valid) // 2]],  # truncated
        [future],  # unknown protocol major
        [msgpack.packb({"not": "a list"})],
        [msgpack.packb([1, 0, "log", "r", "c", "not-an-int", 0, 0, 0, 0.0, [{}]])],
        [b""],
    ]
    for frames in bad:
        push.send_multipart(frames)
        dealer.send_multipart(frames)
    dealer.send_multipart(codec.encode(m.StatusRequest(m.Envelope(seq=7))))
    # the daemon answers each bad request with an error; the status request still gets its reply
    replies = []
    deadline = time.monotonic() + 10
    while len(replies) < len(bad) + 1 and time.monotonic() < deadline:
        if dealer.poll(200):
            replies.append(codec.decode(dealer.recv_multipart()))
    assert sum(isinstance(r, m.ErrorReply) for r in replies) == len(bad)
    assert any(isinstance(r, m.StatusReply) and r.env.seq == 7 for r in replies)
    assert any("version" in r.message for r in replies if isinstance(r, m.ErrorReply))
    push.close(0)
    dealer.close(0)
    ctx.term()

    deadline = time.monotonic() + 5
    while sum(_status(endpoint)["rejected"].values()) < 2 * len(bad):
        assert time.monotonic() < deadline, _status(endpoint)
        time.sleep(0.05)
    rejected = _status(endpoint)["rejected"]
    assert rejected["VersionMismatch"] == 2
    assert rejected["MalformedMessage"] >= 8

    with Board(name="after", run_id="after", capture_output=False) as board:
        board.log(ok=1.0)
        board.flush()
    with RunReader(base_dir / "default" / "after") as r:
        assert r.series("ok")["value"].tolist() == [1.0]
    assert "rejected message" in daemon.output()
