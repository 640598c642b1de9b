"""Encode/decode are pure, round-trip every message, and reject bad input with ProtocolError only."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuboard.protocol import codec
from kohakuboard.protocol import messages as m
from kohakuboard.protocol.errors import MalformedMessage, MessageTooLarge, ProtocolError, VersionMismatch

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Lone surrogates cannot be UTF-8 encoded; the client refuses them before encoding.
st_text = lambda **kw: st.text(st.characters(blacklist_categories=("Cs",)), **kw)  # noqa: E731
names = st_text(min_size=1, max_size=40)
names_st = names
floats = st.floats(allow_nan=False)  # NaN != NaN: checked separately below
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | floats | st_text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st_text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
envelopes = st.builds(m.Envelope, st_text(max_size=100), st_text(max_size=32), ints, ints, ints, ints, floats)

FIELD_STRATEGIES = {
    "int": ints,
    "float": floats,
    "bool": st.booleans(),
    "str": st_text(max_size=50),
}


@st.composite
def log_batches(draw):
    import struct

    names = draw(st.lists(names_st, max_size=8, unique=True))
    n = draw(st.integers(0, 20))
    ints_n = lambda: struct.pack(f"<{n}q", *draw(st.lists(ints, min_size=n, max_size=n)))  # noqa: E731
    floats_k = lambda k: struct.pack(f"<{k}d", *draw(st.lists(st.floats(allow_nan=False), min_size=k, max_size=k)))  # noqa: E731
    return m.LogBatch(draw(envelopes), names, n, ints_n(), ints_n(), ints_n(), floats_k(n), floats_k(n * len(names)))


@st.composite
def drop_reports(draw):
    env = draw(envelopes)
    env.seq = draw(st.integers(1, 2**63 - 1))
    first = draw(st.integers(1, env.seq))
    return m.DropReport(env, first, draw(st.integers(0, 2**62)), draw(st.integers(0, 2**62)))


def _strategy_for(cls):
    if cls is m.LogBatch:
        return log_batches()
    if cls is m.DropReport:
        return drop_reports()
    kwargs = {"env": envelopes}
    for f in dataclasses.fields(cls):
        if f.name == "env":
            continue
        if f.name == "scalars":
            kwargs[f.name] = st.dictionaries(names, floats, max_size=20)
        elif f.name == "items":
            kwargs[f.name] = st.just([])
        elif f.name == "blobs":
            kwargs[f.name] = st.just([])
        elif f.name == "stream":
            kwargs[f.name] = st.sampled_from(["stdout", "stderr"])
        elif f.name == "same_rank":
            kwargs[f.name] = st.lists(st.tuples(st.integers(0, 2**31), st_text(max_size=8)).map(list), max_size=3)
        elif str(f.type).startswith("dict"):
            kwargs[f.name] = st.dictionaries(st_text(max_size=8), json_values, max_size=5)
        else:
            kwargs[f.name] = FIELD_STRATEGIES[str(f.type)]
    return st.builds(cls, **kwargs)


@pytest.mark.parametrize("cls", m.ALL_MESSAGES, ids=lambda c: c.__name__)
def test_every_message_round_trips(cls):
    """Every message type decodes to an equal object after encoding."""

    @settings(max_examples=60, deadline=None)
    @given(_strategy_for(cls))
    def check(msg):
        assert codec.decode(codec.encode(msg)) == msg

    check()


def test_rich_items_travel_with_blobs_as_extra_frames():
    """Items and their binary blobs round-trip; blobs are separate frames, not msgpack."""
    blob = bytes(range(256)) * 1000
    msg = m.LogMessage(
        m.Envelope("/r", "c", 3),
        {"loss": 0.5},
        [["img", "media", {"shape": [10, 10, 3]}, [0]], ["h", "histogram", {}, [1]]],
        [blob, b"xy"],
    )
    frames = codec.encode(msg)
    assert len(frames) == 3 and frames[1] == blob and len(frames[0]) < 200
    assert codec.decode(frames) == msg
    bad = m.LogMessage(m.Envelope(), {}, [["img", "media", {}, [5]]], [b"x"])
    with pytest.raises(MalformedMessage, match="missing blob"):
        codec.decode(codec.encode(bad))
    bad = m.LogMessage(m.Envelope(), {}, [["img", "gif", {}, []]], [])
    with pytest.raises(MalformedMessage, match="unknown log item kind"):
        codec.decode(codec.encode(bad))


def test_drop_report_must_cover_a_valid_range():
    """A drop report naming seqs outside 1..seq or negative counts is malformed."""
    with pytest.raises(MalformedMessage, match="dropped"):
        codec.decode(codec.encode(m.DropReport(m.Envelope("/r", "c", 5), 6, 1, 1)))
    with pytest.raises(MalformedMessage, match="dropped"):
        codec.decode(codec.encode(m.DropReport(m.Envelope("/r", "c", 5), 1, -1, 0)))
    ok = m.DropReport(m.Envelope("/r", "c", 5), 3, 3, 12)
    assert codec.decode(codec.encode(ok)) == ok


def test_log_batch_frames_must_match_count():
    """A LogBatch whose array frames disagree with its count is malformed, not a crash."""
    import struct

    good = m.LogBatch(
        m.Envelope("/r", "c", 2),
        ["a", "b"],
        2,
        struct.pack("<2q", 1, 2),
        struct.pack("<2q", 0, 1),
        struct.pack("<2q", 0, 0),
        struct.pack("<2d", 0.0, 0.0),
        struct.pack("<4d", 1, 2, 3, 4),
    )
    frames = codec.encode(good)
    assert codec.decode(frames) == good
    with pytest.raises(MalformedMessage, match="values"):
        codec.decode([*frames[:-1], frames[-1][:-8]])
    with pytest.raises(MalformedMessage, match="extra frame"):
        codec.decode(frames[:3])
    dup = m.LogBatch(good.env, ["a", "a"], 2, good.seqs, good.steps, good.global_steps, good.walls, good.values)
    with pytest.raises(MalformedMessage, match="distinct"):
        codec.decode(codec.encode(dup))


@given(envelopes, st.dictionaries(names, floats, max_size=40))
@settings(max_examples=100, deadline=None)
def test_fast_log_path_matches_generic_encoder(env, scalars):
    """The client's hot-path encoder produces exactly the generic encoder's frames."""
    fast = codec.encode_log(env.run, env.client, env.seq, env.rank, env.step, env.global_step, env.wall, scalars)
    assert fast == codec.encode(m.LogMessage(env, scalars))


def test_nan_and_inf_survive():
    """Non-finite values cross the wire unchanged."""
    msg = m.LogMessage(m.Envelope("/r", "c", 1), {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")})
    out = codec.decode(codec.encode(msg)).scalars
    assert out["nan"] != out["nan"] and out["inf"] == float("inf") and out["ninf"] == float("-inf")


def test_unknown_major_version_is_refused():
    """A message from a future protocol major version raises VersionMismatch naming both versions."""
    header = msgpack.unpackb(codec.encode(m.StatusRequest(m.Envelope()))[0])
    header[0], header[1] = 2, 0
    with pytest.raises(VersionMismatch, match=r"2\.0 is not supported"):
        codec.decode([msgpack.packb(header)])


def test_newer_minor_version_is_accepted():
    """A newer minor version of the same major decodes (minor bumps only add)."""
    header = msgpack.unpackb(codec.encode(m.StatusRequest(m.Envelope()))[0])
    header[1] = 9
    assert isinstance(codec.decode([msgpack.packb(header)]), m.StatusRequest)


def test_open_run_from_another_minor_version_decodes():
    """A 1.0 client's OpenRun (no world_size) decodes with world_size 1, a 1.2 one's without annotation with
    annotation ""; a newer minor's extra fields are ignored."""
    msg = m.OpenRun(m.Envelope("/r", "c", 1), "n", "p", "id", {"lr": 0.1}, 12, 34, "h", 4, "note")
    header = msgpack.unpackb(codec.encode(msg)[0])
    assert header[10][-2:] == [4, "note"] and codec.decode(codec.encode(msg)) == msg
    old = header[:1] + [0] + header[2:10] + [header[10][:-2]]
    assert (codec.decode([msgpack.packb(old)]).world_size, codec.decode([msgpack.packb(old)]).annotation) == (1, "")
    v12 = header[:1] + [2] + header[2:10] + [header[10][:-1]]
    assert (codec.decode([msgpack.packb(v12)]).world_size, codec.decode([msgpack.packb(v12)]).annotation) == (4, "")
    newer = header[:1] + [m.PROTOCOL_MINOR + 1] + header[2:10] + [header[10] + ["future field"]]
    assert codec.decode([msgpack.packb(newer)]) == msg
    same_minor_short = header[:10] + [header[10][:-1]]
    with pytest.raises(MalformedMessage, match="9 fields"):
        codec.decode([msgpack.packb(same_minor_short)])
    older_too_short = header[:1] + [0] + header[2:10] + [header[10][:-3]]
    with pytest.raises(MalformedMessage):
        codec.decode([msgpack.packb(older_too_short)])


def test_run_opened_from_a_1_2_daemon_decodes_without_kinds_name_and_same_rank():
    """A 1.2 daemon's RunOpened (no kinds, name, same_rank) decodes with empty ones: the client then knows none."""
    msg = m.RunOpened(
        m.Envelope("/r", "c", 1), False, 5, 7, 0, "d1", {"loss": "scalar"}, "Brave Falcon", [[123, "node1"]]
    )
    header = msgpack.unpackb(codec.encode(msg)[0])
    assert codec.decode(codec.encode(msg)) == msg
    v12 = header[:1] + [2] + header[2:10] + [header[10][:-3]]
    got = codec.decode([msgpack.packb(v12)])
    assert (got.daemon, got.kinds, got.name, got.same_rank) == ("d1", {}, "", [])


def test_size_limits_are_enforced_before_decoding():
    """Oversized headers and too many frames are refused as MessageTooLarge."""
    with pytest.raises(MessageTooLarge):
        codec.decode([b"\x00" * (codec.MAX_HEADER_BYTES + 1)])
    with pytest.raises(MessageTooLarge):
        codec.decode([b"x"] * (codec.MAX_FRAMES + 1))
    big = m.OutputMessage(m.Envelope(), "stdout", "x" * (codec.MAX_HEADER_BYTES + 10))
    with pytest.raises(MessageTooLarge):
        codec.encode(big)


@pytest.mark.parametrize(
    "header",
    [
        [1, 0, "log", "r", "c", 1, 0, 0, 0, 0.0, [{"x": "nan"}]],
        [1, 0, "log", "r", "c", 1, 0, 0, 0, 0.0, [{"": 1.0}]],
        [1, 0, "log", "r", "c", 1.5, 0, 0, 0, 0.0, [{}]],
        [1, 0, "nope", "r", "c", 1, 0, 0, 0, 0.0, []],
        [1, 0, "flush", "r", "c", 1, 0, 0, 0, 0.0, ["x"]],
        [1, 0, "flush", "r", "c", 1, 0, 0, 0, 0.0, [1, 2]],
        [1, 0, "output", "r", "c", 1, 0, 0, 0, 0.0, ["stdin", "x"]],
        [1, 0, "open", "r", "c", 1, 0, 0, 0, 0.0, ["n", "p", "id", {}, True, 0, "h"]],
        [1, 0, "log", "r", "c", 1, 0, 0, 0, 0.0],
        "just a string",
    ],
)
def test_malformed_headers_are_rejected(header):
    """Wrong shapes and types raise MalformedMessage, never a bare exception."""
    with pytest.raises(MalformedMessage):
        codec.decode([msgpack.packb(header)])


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
@settings(max_examples=500, deadline=None)
def test_random_frames_only_raise_protocol_errors(frames):
    """Random bytes never crash the decoder with anything but a ProtocolError."""
    try:
        codec.decode(frames)
    except ProtocolError:
        pass


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_valid_messages_only_raise_protocol_errors(data):
    """Valid messages with flipped, cut or inserted bytes decode or raise ProtocolError."""
    frame = codec.encode_log("/run", "client", 5, 0, 3, 2, 1.5, {"loss": 0.5, "acc": 0.9})[0]
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 5))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[pos:]
        else:
            buf.insert(pos, data.draw(st.integers(0, 255)))
    try:
        codec.decode([bytes(buf)])
    except ProtocolError:
        pass
