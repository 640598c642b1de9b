"""Encode messages to ZeroMQ frames and decode them back: pure functions.

``encode(msg) -> list[bytes]`` and ``decode(frames) -> Message`` are the only
entry points used by client and daemon.  :func:`encode_log` is the client's hot
path for :class:`~.messages.LogMessage`; it produces exactly the frames
``encode`` would.

Decoding never trusts its input: every limit is checked before anything large
is allocated (msgpack's own ``max_*_len`` limits), every field's type is
checked, and every failure is a :class:`~.errors.ProtocolError` subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import msgpack

from . import messages as m
from .errors import MalformedMessage, MessageTooLarge, ProtocolError, VersionMismatch

# Limits.  The header is small by design: large values travel as extra frames.
MAX_HEADER_BYTES = 16 << 20
MAX_FRAMES = 4096
MAX_FRAME_BYTES = 512 << 20
MAX_MESSAGE_BYTES = 1 << 30
MAX_NAME_CHARS = 1024
MAX_VALUES_PER_LOG = 1 << 20

_HEADER_LEN = 11
_BY_KIND: dict[str, type[m.Message]] = {cls.KIND: cls for cls in m.ALL_MESSAGES}

# Field checkers: what a payload field must be after msgpack decoding.
_INT = (int,)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Frame:
    """Marker type: a ``bytes`` field travels as an extra frame, indexed from the payload."""


class _Frames:
    """Marker type: a ``list[bytes]`` field travels as extra frames ``[first, count]``."""


_NUM = (int, float)


def _payload_types(cls: type[m.Message]) -> list[tuple[str, tuple[type, ...]]]:
    out = []
    for f in fields(cls):
        if f.name == "env":
            continue
        ann = str(f.type)
        if ann.startswith("dict"):
            types: tuple[type, ...] = (dict,)
        elif ann == "list[bytes]":
            types = (_Frames,)
        elif ann.startswith("list"):
            types = (list,)
        elif ann == "bytes":
            types = (_Frame,)
        elif ann == "bool":
            types = (bool,)
        elif ann == "int":
            types = _INT
        elif ann == "float":
            types = _NUM
        elif ann == "str":
            types = (str,)
        else:  # pragma: no cover - guarded by test_every_message_round_trips
            raise TypeError(f"unsupported field type {ann} in {cls.__name__}")
        out.append((f.name, types))
    return out


_SCHEMA = {kind: _payload_types(cls) for kind, cls in _BY_KIND.items()}


def _packer_default(obj: Any) -> Any:
    raise TypeError(f"cannot encode {type(obj).__name__} in a KohakuBoard message")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_packer_default)


def encode(msg: Any) -> list[bytes]:
    """Encode a message into frames.

    Raises ``TypeError`` if a payload field holds something msgpack cannot
    carry, and :class:`MessageTooLarge` if the header is over its limit.
    """
    env: m.Envelope = msg.env
    payload: list[Any] = []
    extra: list[bytes] = []
    for name, types in _SCHEMA[msg.KIND]:
        value = getattr(msg, name)
        if types[0] is _Frame:
            payload.append(len(extra))
            extra.append(value)
        elif types[0] is _Frames:
            payload.append([len(extra), len(value)])
            extra.extend(value)
        else:
            payload.append(value)
    header = _pack(
        [
            m.PROTOCOL_MAJOR,
            m.PROTOCOL_MINOR,
            msg.KIND,
            env.run,
            env.client,
            env.seq,
            env.rank,
            env.step,
            env.global_step,
            env.wall,
            payload,
        ]
    )
    if len(header) > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"message header is {len(header)} bytes (limit {MAX_HEADER_BYTES})")
    return [header, *extra]


def encode_log(
    run: str,
    client: str,
    seq: int,
    rank: int,
    step: int,
    global_step: int,
    wall: float,
    scalars: dict[str, float],
) -> list[bytes]:
    """Fast path for the client: the frames of a :class:`LogMessage`."""
    return [
        msgpack.packb(
            [
                m.PROTOCOL_MAJOR,
                m.PROTOCOL_MINOR,
                "log",
                run,
                client,
                seq,
                rank,
                step,
                global_step,
                wall,
                [scalars, [], [0, 0]],
            ],
            use_bin_type=True,
        )
    ]


def _unpack_header(frame: bytes | memoryview) -> list[Any]:
    n = len(frame)
    if n > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"header frame is {n} bytes (limit {MAX_HEADER_BYTES})")
    try:
        # msgpack allocates an array or map of the declared length before reading
        # its elements: no declared length may exceed what the frame can hold
        # (an element takes at least 1 byte, a map entry 2).
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=min(n, MAX_VALUES_PER_LOG),
            max_map_len=min(n // 2, MAX_VALUES_PER_LOG),
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise MalformedMessage(f"header is not valid msgpack: {exc}") from exc
    except RecursionError as exc:
        raise MalformedMessage("header nests too deeply") from exc
    if not isinstance(obj, list) or len(obj) != _HEADER_LEN:
        raise MalformedMessage("header is not an array of 11 fields")
    return obj


def _check_envelope(h: list[Any]) -> m.Envelope:
    major, minor, kind, run, client, seq, rank, step, gstep, wall, _ = h
    if not isinstance(major, int) or not isinstance(minor, int):
        raise MalformedMessage("protocol version is not a pair of integers")
    if major != m.PROTOCOL_MAJOR:
        raise VersionMismatch(
            f"protocol version {major}.{minor} is not supported (this side speaks {m.PROTOCOL_MAJOR}.x)"
        )
    if not isinstance(kind, str) or kind not in _BY_KIND:
        raise MalformedMessage(f"unknown message kind {kind!r}")
    if not isinstance(run, str) or not isinstance(client, str):
        raise MalformedMessage("run and client must be strings")
    if len(run) > 4096 or len(client) > 128:
        raise MalformedMessage("run path or client id too long")
    for name, value in (("seq", seq), ("rank", rank), ("step", step), ("global_step", gstep)):
        if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
            raise MalformedMessage(f"envelope field {name} must be a 64-bit integer")
    if type(wall) not in _NUM or wall != wall:
        raise MalformedMessage("envelope field wall must be a number, not NaN")
    return m.Envelope(run, client, seq, rank, step, gstep, float(wall))


def _check_scalars(scalars: dict[Any, Any]) -> dict[str, float]:
    # Checked with C-level map()/set() first: this runs for every value the
    # daemon receives.  The per-value loop only runs when something is off.
    if not scalars:
        return scalars
    if set(map(type, scalars)) != {str} or "" in scalars or max(map(len, scalars)) > MAX_NAME_CHARS:
        raise MalformedMessage("metric names must be non-empty strings")
    if set(map(type, scalars.values())) != {float}:
        for name, value in scalars.items():
            if type(value) is int:
                scalars[name] = float(value)
            elif type(value) is not float:
                raise MalformedMessage(f"value of {name!r} is not a number")
    return scalars


def _check_items(items: list[Any], n_blobs: int) -> None:
    names = set()
    for item in items:
        if type(item) is not list or len(item) != 4:
            raise MalformedMessage("a log item must be [name, kind, meta, refs]")
        name, kind, meta, refs = item
        if type(name) is not str or not name or len(name) > MAX_NAME_CHARS or name in names:
            raise MalformedMessage("log item names must be distinct non-empty strings")
        names.add(name)
        if type(kind) is not str or kind not in m.ITEM_KINDS:
            raise MalformedMessage(f"unknown log item kind {kind!r}")
        if type(meta) is not dict or type(refs) is not list:
            raise MalformedMessage("log item meta must be a map and refs a list")
        for ref in refs:
            if type(ref) is not int or not 0 <= ref < n_blobs:
                raise MalformedMessage(f"log item {name!r} refers to a missing blob")


def _check_batch(payload: list[Any]) -> None:
    names, count, seqs, steps, gsteps, walls, values = payload
    if (
        set(map(type, names)) - {str}
        or "" in names
        or (names and max(map(len, names)) > MAX_NAME_CHARS)
        or len(set(names)) != len(names)
    ):
        raise MalformedMessage("log_batch names must be distinct non-empty strings")
    if count < 0 or count > MAX_VALUES_PER_LOG:
        raise MalformedMessage("log_batch count out of range")
    for name, frame, size in (
        ("seqs", seqs, 8 * count),
        ("steps", steps, 8 * count),
        ("global_steps", gsteps, 8 * count),
        ("walls", walls, 8 * count),
        ("values", values, 8 * count * len(names)),
    ):
        if len(frame) != size:
            raise MalformedMessage(f"log_batch frame {name} has {len(frame)} bytes, expected {size}")
    if count:
        # A NaN wall is stored as NULL and fails the run's every later commit.  The
        # sum is NaN when any wall is (one C-level pass); little-endian host assumed.
        w = memoryview(walls).cast("d")
        total = sum(w)
        if total != total and any(x != x for x in w):
            raise MalformedMessage("log_batch walls must not be NaN")


def _since(kind: str) -> list[int]:
    cls = _BY_KIND[kind]
    since = getattr(cls, "SINCE", {})
    return [since.get(name, 0) for name, _ in _SCHEMA[kind]]


_SINCE = {kind: _since(kind) for kind in _BY_KIND}


def _adapt_minor(kind: str, minor: int, payload: list[Any], n: int) -> list[Any]:
    """The payload of another minor version, in this version's shape.

    A newer sender's extra trailing fields are dropped; an older sender's
    missing trailing fields (added after its minor version) take their defaults.
    Anything else is malformed.
    """
    if minor > m.PROTOCOL_MINOR and len(payload) > n:
        return payload[:n]
    if minor < m.PROTOCOL_MINOR and len(payload) < n:
        known = sum(1 for since in _SINCE[kind] if since <= minor)
        if len(payload) == known:
            cls = _BY_KIND[kind]
            defaults = cls(m.Envelope())
            return payload + [getattr(defaults, name) for name, _ in _SCHEMA[kind][known:]]
    raise MalformedMessage(f"{kind} payload must be an array of {n} fields")


def peek_envelope(frames: Sequence[bytes | memoryview | Any]) -> tuple[str, m.Envelope] | None:
    """The kind and envelope of a message whose header is valid, whatever its payload
    (None when the header itself is not).  For a message :func:`decode` refused: who sent it
    and which sequence number it carried."""
    if not frames:
        return None
    first = frames[0]
    try:
        header = _unpack_header(first if isinstance(first, (bytes, memoryview)) else first.bytes)
        return str(header[2]), _check_envelope(header)
    except ProtocolError:
        return None


def decode(frames: Sequence[bytes | memoryview | Any]) -> Any:
    """Decode frames into a message object.

    Raises :class:`MalformedMessage`, :class:`MessageTooLarge` or
    :class:`VersionMismatch`; never anything else for bad input.
    """
    if not frames:
        raise MalformedMessage("empty message")
    if len(frames) > MAX_FRAMES:
        raise MessageTooLarge(f"{len(frames)} frames (limit {MAX_FRAMES})")
    first = frames[0]
    header = _unpack_header(first if isinstance(first, (bytes, memoryview)) else first.bytes)
    env = _check_envelope(header)
    kind = header[2]
    payload = header[10]
    schema = _SCHEMA[kind]
    if not isinstance(payload, list):
        raise MalformedMessage(f"{kind} payload must be an array of {len(schema)} fields")
    if len(payload) != len(schema):
        payload = _adapt_minor(kind, header[1], payload, len(schema))
    extra = frames[1:]
    for k, ((name, types), value) in enumerate(zip(schema, payload)):
        if types[0] is _Frame:
            if type(value) is not int or not 0 <= value < len(extra):
                raise MalformedMessage(f"{kind} field {name} does not name an extra frame")
            frame = extra[value]
            payload[k] = frame if isinstance(frame, (bytes, memoryview)) else frame.buffer
        elif types[0] is _Frames:
            if (
                type(value) is not list
                or len(value) != 2
                or type(value[0]) is not int
                or type(value[1]) is not int
                or value[0] < 0
                or value[1] < 0
                or value[0] + value[1] > len(extra)
            ):
                raise MalformedMessage(f"{kind} field {name} does not name a range of extra frames")
            payload[k] = [
                f if isinstance(f, (bytes, memoryview)) else f.buffer for f in extra[value[0] : value[0] + value[1]]
            ]
        elif type(value) not in types:
            raise MalformedMessage(f"{kind} field {name} has the wrong type")
        elif types is _INT and not _INT64_MIN <= value <= _INT64_MAX:
            raise MalformedMessage(f"{kind} field {name} is not a 64-bit integer")
    if kind == "log":
        _check_scalars(payload[0])
        _check_items(payload[1], len(payload[2]))
    elif kind == "log_batch":
        _check_batch(payload)
    elif kind == "output" and payload[0] not in ("stdout", "stderr"):
        raise MalformedMessage("output stream must be stdout or stderr")
    elif kind == "dropped" and not (
        1 <= payload[0] <= env.seq and payload[1] >= 0 and payload[2] >= 0 and payload[3] >= 0
    ):
        raise MalformedMessage("dropped report needs 1 <= first_seq <= seq and non-negative counts")
    try:
        return _BY_KIND[kind](env, *payload)
    except TypeError as exc:  # pragma: no cover - schema and class agree
        raise MalformedMessage(str(exc)) from exc
