"""The client's outbox on its own (no daemon, no thread): numbering, keeping, acknowledgement, replay.

The outbox (client/_outbox.py) is the only client code that knows about
acknowledgements and replay; these tests drive it the way the sender thread
does (``pump`` with a send function, ``on_reply`` with the daemon's replies)
and check what goes out.  The end-to-end tests of the same promises, through a
real daemon that is killed, are in test_board.py, test_finish.py,
test_backpressure.py and tests/daemon/test_replay.py.
"""

from __future__ import annotations

import logging
import sys
from array import array

from kohakuboard.client import _capture
from kohakuboard.client._encoding import Encoder
from kohakuboard.client._outbox import BLOCKED, SENT, STOP, STOPPING, Outbox
from kohakuboard.protocol import codec
from kohakuboard.protocol import messages as m
from kohakuboard.protocol.endpoint import resolve

RUN = "/tmp/kobo-outbox-test/default/run"


def _outbox(**kw) -> Outbox:
    return Outbox(resolve("ipc:///tmp/kobo-outbox-test/kobo", {}), Encoder(RUN, "c1", 0), 1000, daemon_id="d1", **kw)


class Wire:
    """Stands in for the data socket: records what was sent, can refuse."""

    def __init__(self) -> None:
        self.sent: list = []
        self.full = False

    def __call__(self, frames) -> bool:
        if self.full:
            return False
        self.sent.append(codec.decode(frames))
        return True

    def seqs(self) -> list[int]:
        out = []
        for msg in self.sent:
            if isinstance(msg, m.LogBatch):
                out += array("q", bytes(msg.seqs)).tolist()
            else:
                out.append(msg.env.seq)
        return out


def _acked(out: Outbox, durable: int, daemon: str = "d1") -> None:
    out.on_reply(codec.encode(m.Acked(m.Envelope(RUN, "c1", 0), durable, daemon, 0, "")))


def test_calls_are_numbered_in_order_across_kinds():
    out = _outbox()
    out.put_scalars(0, 0, {"x": 1.0})
    out.put_log(1, 0, {}, [], [])
    out.put_output(1, 0, "stdout", "hello\n")
    out.put_scalars(2, 0, {"x": 2.0})
    assert out.seq == 4
    wire = Wire()
    assert out.pump(wire) == SENT
    assert wire.seqs() == [1, 2, 3, 4]
    assert [type(x).__name__ for x in wire.sent] == ["LogMessage", "LogMessage", "OutputMessage", "LogMessage"]


def test_scalar_calls_queued_together_go_as_one_batch_and_are_kept_until_acknowledged():
    out = _outbox()
    for i in range(5):
        out.put_scalars(i, 0, {"x": float(i)})
    wire = Wire()
    out.pump(wire)
    assert len(wire.sent) == 1 and isinstance(wire.sent[0], m.LogBatch) and wire.seqs() == [1, 2, 3, 4, 5]
    assert out.sent_seq == 5 and out.unacked_calls == 5 and out.unwritten_calls() == 5
    _acked(out, 3)
    assert out.acked_seq == 3 and out.unacked_calls == 5  # one message: kept whole until all of it is durable
    _acked(out, 5)
    assert out.unacked_calls == 0 and out.unacked_bytes == 0 and out.unwritten_calls() == 0


def test_a_new_daemon_gets_what_the_old_one_did_not_make_durable_first(caplog):
    out = _outbox()
    wire = Wire()
    for i in range(1, 5):
        out.put_output(0, 0, "stdout", f"line {i}\n")  # one message per call
        out.pump(wire)
    _acked(out, 2)
    out.put_output(0, 0, "stdout", "line 5\n")  # queued, not sent yet
    with caplog.at_level(logging.WARNING, logger="kohakuboard"):
        _acked(out, 1, daemon="d2")  # a restarted daemon has only call 1
    assert "re-sending 2 unacknowledged log() call(s)" in caplog.text
    wire.sent.clear()
    out.pump(wire)
    assert wire.seqs() == [3, 4, 5]  # the re-sends, in order, then the new call
    assert out.replays == 1 and out.replayed_calls == 2
    _acked(out, 5, daemon="d2")
    assert out.unwritten_calls() == 0


def test_a_lost_connection_holds_new_data_until_a_daemon_answers():
    out = _outbox()
    wire = Wire()
    out.put_scalars(0, 0, {"x": 1.0})
    out.pump(wire)
    out.connection_lost()
    out.put_scalars(1, 0, {"x": 2.0})
    assert out.pump(wire) == BLOCKED and wire.seqs() == [1]
    request = out.ack_request(0.0)
    assert request is not None  # asked at once
    _acked(out, 0, daemon="d2")  # a new daemon, which has nothing
    assert out.pump(wire) == SENT and wire.seqs() == [1, 1, 2]


def test_a_full_socket_keeps_the_message_and_sends_it_next_time():
    out = _outbox()
    wire = Wire()
    wire.full = True
    out.put_scalars(0, 0, {"x": 1.0})
    assert out.pump(wire) == BLOCKED and out.sent_seq == 0 and out.unacked_calls == 1
    wire.full = False
    assert out.pump(wire) == SENT and wire.seqs() == [1] and out.unacked_calls == 1


def test_the_stop_marker_ends_the_pump_after_what_was_queued_before_it():
    out = _outbox()
    out.put_scalars(0, 0, {"x": 1.0})
    out.queue.append(STOP)
    wire = Wire()
    assert out.pump(wire) == STOPPING and wire.seqs() == [1]


def test_a_batch_that_cannot_be_encoded_is_reported_as_dropped_whole(monkeypatch):
    out = _outbox()
    for i in range(3):
        out.put_scalars(i, 0, {"x": float(i)})

    real = codec.encode

    def broken(msg):
        if isinstance(msg, m.LogBatch):
            raise RuntimeError("injected")
        return real(msg)

    monkeypatch.setattr(codec, "encode", broken)
    wire = Wire()
    out.pump(wire)
    monkeypatch.undo()
    [report] = wire.sent
    assert isinstance(report, m.DropReport) and (report.first_seq, report.env.seq, report.calls) == (1, 3, 3)
    assert out.unacked[0].calls == 0 and out.sent_seq == 3
    assert out.dropped_calls == 3 and out.encode_error[0] == 1 and not out.queue
    assert out.put_bytes == out.taken_bytes  # the three calls left the queue's count


def test_drop_policy_queues_the_count_in_place_of_the_dropped_calls(caplog):
    out = Outbox(
        resolve("ipc:///tmp/kobo-outbox-test/kobo", {}), Encoder(RUN, "c1", 0), 2, policy="drop", daemon_id="d1"
    )
    with caplog.at_level(logging.WARNING, logger="kohakuboard"):
        for i in range(4):
            out.put_scalars(i, 0, {"x": float(i)})  # calls 3 and 4 find the queue full
    assert "dropping the newest log() calls" in caplog.text
    assert out.dropped_calls == 2 and len(out.queue) == 2
    out.flush_drops()
    wire = Wire()
    out.pump(wire)
    report = wire.sent[-1]
    assert isinstance(report, m.DropReport) and (report.first_seq, report.env.seq, report.calls) == (3, 4, 2)


def test_warnings_go_to_the_kohakuboard_logger_and_never_into_captured_output(caplog):
    """The 80 % warning is emitted in log(), under the Board's lock: it must not reach the capture
    (which would re-enter the Board), only the logger."""
    captured = []
    capture = _capture.start_capture(lambda stream, text: captured.append(text))
    assert capture is not None
    logger = logging.getLogger("kohakuboard")
    to_stderr = logging.StreamHandler(sys.stderr)  # a user's handler writing to the captured stderr
    logger.addHandler(to_stderr)
    try:
        out = _outbox()
        with caplog.at_level(logging.WARNING, logger="kohakuboard"):
            for i in range(850):  # over 80 % of max_queue=1000
                out.put_scalars(i, 0, {"x": 1.0})
        print("the script's own line")
    finally:
        logger.removeHandler(to_stderr)
        capture.stop()
    assert [r.name for r in caplog.records] == ["kohakuboard"]
    assert caplog.records[0].levelno == logging.WARNING and "Queue size is 800" in caplog.records[0].getMessage()
    assert captured == ["the script's own line\n"]


def test_flush_returns_at_once_for_acknowledged_calls_and_asks_the_daemon_directly_otherwise():
    asked = []

    def request(cls, env, timeout, want, wait_ms, *peer):
        asked.append((cls, want))
        return m.Acked(env, want, "d1", 0, "")

    out = _outbox(request=request)
    out.put_scalars(0, 0, {"x": 1.0})
    out.flush(1, 5.0)
    assert asked == [(m.AckRequest, 1)] and out.acked_seq == 1
    out.flush(1, 5.0)
    assert len(asked) == 1


def test_a_closed_outbox_does_not_block_log_at_the_bound():
    out = Outbox(resolve("ipc:///tmp/kobo-outbox-test/kobo", {}), Encoder(RUN, "c1", 0), 1)
    out.close()
    out.put_scalars(0, 0, {"x": 1.0})
    out.put_scalars(1, 0, {"x": 2.0})  # the queue is full and nobody empties it: returns anyway
    assert out.seq == 2
