"""Every message that crosses the client/daemon boundary.

Two socket pairs carry them:

* **data**: client ``PUSH`` -> daemon ``PULL``.  Fire and forget: :class:`LogMessage`
  and :class:`OutputMessage`.  Nothing is answered on this pair.
* **control**: client ``DEALER`` <-> daemon ``ROUTER``.  Requests (:class:`OpenRun`,
  :class:`FlushRequest`, :class:`FinishRun`, :class:`StatusRequest`,
  :class:`ShutdownRequest`) each get exactly one reply (:class:`RunOpened`,
  :class:`Flushed`, :class:`Finished`, :class:`StatusReply`, :class:`Ack` or
  :class:`ErrorReply`).

Every message starts with the same :class:`Envelope`; on the wire the first frame
is one msgpack array::

    [major, minor, kind, run, client, seq, rank, step, global_step, wall, payload]

``payload`` is a msgpack array holding the message's own fields in declaration
order.  Large binary values (arrays, media) travel as extra frames after the
header and are referenced from the payload by index, never packed into msgpack.

``seq`` is the client's sequence number for data messages (1, 2, 3, ... per
client id) and a request id on the control pair, echoed back in the reply.
A flush barrier names the last *data* ``seq`` the client sent, so it holds
whatever order the two socket pairs deliver in.

This module is plain dataclasses: importing it costs nothing (no msgpack).
They are not ``frozen``: a frozen dataclass's ``__init__`` goes through
``object.__setattr__`` per field, which measured at several microseconds per
decoded message on the daemon's hot path.  Treat them as immutable all the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 4
# Minor versions only append payload fields (each with a default).  A message
# names the minor version that added each field in its ``SINCE`` map; fields not
# listed are in 1.0.  The decoder fills fields an older sender did not have with
# their defaults and ignores trailing fields a newer sender added.


@dataclass(slots=True)
class Envelope:
    """Fields every message carries.

    ``run`` is the absolute path of the run folder, so a daemon that has never
    seen the client (after a restart) still knows where its data belongs.
    """

    run: str = ""
    client: str = ""
    seq: int = 0
    rank: int = 0
    step: int = 0
    global_step: int = 0
    wall: float = 0.0


# --------------------------------------------------------------------- data


@dataclass(slots=True)
class LogMessage:
    """One ``board.log(...)`` call.

    Wire payload: ``[{name: float, ...}, items, blobs]``.  All values share the
    envelope's ``(step, global_step, wall, rank)``.

    ``items`` holds the rich values (media, tables, histograms, tensors, KDEs),
    each ``[name, kind, meta, refs]``: ``kind`` is one of :data:`ITEM_KINDS`,
    ``meta`` a map of the item's small fields, ``refs`` indices into ``blobs``.
    ``blobs`` travel as extra frames (raw array buffers or file bytes, never
    inside msgpack); on the wire the payload holds ``[first_frame, count]``.
    """

    KIND: ClassVar[str] = "log"
    env: Envelope
    scalars: dict[str, float] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)


ITEM_KINDS = frozenset({"media", "table", "histogram", "tensor", "kde"})


@dataclass(slots=True)
class LogBatch:
    """Consecutive ``board.log(...)`` calls of one client with the same names.

    Wire payload: ``[names, count, 0, 1, 2, 3, 4]``: the integers are the
    indices of the extra frames that follow the header:

    * frame 1 ``seqs``: ``count`` little-endian int64, the calls' sequence numbers
    * frame 2 ``steps``: ``count`` int64
    * frame 3 ``global_steps``: ``count`` int64
    * frame 4 ``walls``: ``count`` float64, seconds since the epoch
    * frame 5 ``values``: ``count * len(names)`` float64, row-major (one row per call)

    A call is never split across messages: each row is one whole ``log()`` call
    with its own ``(seq, step, global_step, wall)``.  The sender uses this form
    when calls queue up faster than it can send them one by one; it moves the
    per-value work out of Python on both sides (measured: about 3x the
    throughput of one message per call at 32 scalars per call).  The envelope
    carries the last call's fields.
    """

    KIND: ClassVar[str] = "log_batch"
    env: Envelope
    names: list[str] = field(default_factory=list)
    count: int = 0
    seqs: bytes = b""
    steps: bytes = b""
    global_steps: bytes = b""
    walls: bytes = b""
    values: bytes = b""


@dataclass(slots=True)
class OutputMessage:
    """Captured stdout/stderr text for the run's ``logs/output.log``.

    Wire payload: ``[stream, text]`` with stream ``"stdout"`` or ``"stderr"``.
    """

    KIND: ClassVar[str] = "output"
    env: Envelope
    stream: str = "stdout"
    text: str = ""


@dataclass(slots=True)
class DropReport:
    """Calls ``first_seq..env.seq`` that the client's drop policy discarded (since 1.2).

    Sent in sequence order in place of the dropped calls, so the sequence stays
    contiguous; the daemon adds the counts to the run's stored drop counters.
    ``calls`` counts ``log()`` calls (with ``values`` values), ``lines`` (since
    1.4) captured output lines; the daemon marks the place in ``output.log``.
    Wire payload: ``[first_seq, calls, values, lines]``.
    """

    KIND: ClassVar[str] = "dropped"
    SINCE: ClassVar[dict[str, int]] = {"lines": 4}
    env: Envelope
    first_seq: int = 0
    calls: int = 0
    values: int = 0
    lines: int = 0


# ------------------------------------------------------------------ control


@dataclass(slots=True)
class OpenRun:
    """Attach a client to a run, creating the run folder if needed.

    Wire payload: ``[name, project, run_id, config, pid, pid_start, host, world_size, annotation]``.
    ``pid``/``pid_start`` (the process start time in clock ticks) let the daemon
    tell when the client process died without finishing.  ``world_size`` (since
    1.1) is the number of ranks of the client's launch; rank 0's is recorded in
    ``metadata.json``.  ``annotation`` (since 1.3): the note the run folder's
    name carries after the run id (``{run_id}_{annotation}``), kept in
    ``metadata.json``; empty for none.
    """

    KIND: ClassVar[str] = "open"
    SINCE: ClassVar[dict[str, int]] = {"world_size": 1, "annotation": 3}
    env: Envelope
    name: str = ""
    project: str = "default"
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    pid_start: int = 0
    host: str = ""
    world_size: int = 1
    annotation: str = ""


@dataclass(slots=True)
class FlushRequest:
    """Barrier: answer once every data message up to ``last_seq`` is durable.

    Wire payload: ``[last_seq]``.
    """

    KIND: ClassVar[str] = "flush"
    env: Envelope
    last_seq: int = 0


@dataclass(slots=True)
class FinishRun:
    """Flush like :class:`FlushRequest`, then detach the client from the run.

    Wire payload: ``[last_seq, status]``; status is ``"finished"`` or ``"crashed"``.
    """

    KIND: ClassVar[str] = "finish"
    env: Envelope
    last_seq: int = 0
    status: str = "finished"


@dataclass(slots=True)
class AckRequest:
    """Which of my data messages are durable?  (since 1.2)

    Asked by the client's sender every ~100 ms while it holds unacknowledged
    messages.  If ``want_seq`` is not durable yet, the daemon writes the run's
    pending batch now and waits up to ``wait_ms`` for it before answering.
    ``pid``/``pid_start``/``host`` let a restarted daemon re-attach a client it
    has never seen.  Wire payload: ``[want_seq, wait_ms, pid, pid_start, host]``.
    """

    KIND: ClassVar[str] = "ack_req"
    env: Envelope
    want_seq: int = 0
    wait_ms: int = 0
    pid: int = 0
    pid_start: int = 0
    host: str = ""


@dataclass(slots=True)
class StatusRequest:
    """Ask for the daemon's counters.  Wire payload: ``[]``."""

    KIND: ClassVar[str] = "status"
    env: Envelope


@dataclass(slots=True)
class ShutdownRequest:
    """Ask the daemon to drain and exit, as SIGTERM does.  Wire payload: ``[]``."""

    KIND: ClassVar[str] = "shutdown"
    env: Envelope


# ------------------------------------------------------------------ replies


@dataclass(slots=True)
class RunOpened:
    """Reply to :class:`OpenRun`.

    Wire payload: ``[created, last_step, last_global_step, attached, daemon, kinds]``.
    ``last_step`` is -1 for a run without points; ``attached`` counts the other
    clients currently attached; ``daemon`` (since 1.2) identifies this daemon
    instance (a new id after every restart); ``kinds`` (since 1.3) maps every
    name a resumed run holds to its kind ("scalar", "media", "table",
    "histogram", "tensor", "kde"), so a client refuses a second kind under one
    name; ``name`` (since 1.3) is the run's name after this open (a resumed
    run keeps its own); ``same_rank`` (since 1.3) lists ``[pid, host]`` of the
    other live processes attached with this client's rank (their steps will
    interleave: two scripts given one run id).
    """

    KIND: ClassVar[str] = "opened"
    SINCE: ClassVar[dict[str, int]] = {"daemon": 2, "kinds": 3, "name": 3, "same_rank": 3}
    env: Envelope
    created: bool = True
    last_step: int = -1
    last_global_step: int = 0
    attached: int = 0
    daemon: str = ""
    kinds: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    same_rank: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class Flushed:
    """Reply to :class:`FlushRequest`.  Wire payload: ``[durable_seq]``."""

    KIND: ClassVar[str] = "flushed"
    env: Envelope
    durable_seq: int = 0


@dataclass(slots=True)
class Finished:
    """Reply to :class:`FinishRun`.  Wire payload: ``[durable_seq, status]``."""

    KIND: ClassVar[str] = "finished"
    env: Envelope
    durable_seq: int = 0
    status: str = "finished"


@dataclass(slots=True)
class Acked:
    """Reply to :class:`AckRequest` (since 1.2).

    Wire payload: ``[durable_seq, daemon, error_code, error]``: every data
    message of the client with a sequence number up to ``durable_seq`` is
    durable; ``daemon`` is the instance id; ``error_code``/``error`` are the
    run's current storage error (0 and "" when writing works).
    """

    KIND: ClassVar[str] = "acked"
    env: Envelope
    durable_seq: int = 0
    daemon: str = ""
    error_code: int = 0
    error: str = ""


@dataclass(slots=True)
class StatusReply:
    """Reply to :class:`StatusRequest`.  Wire payload: ``[info]`` (a map)."""

    KIND: ClassVar[str] = "status_reply"
    env: Envelope
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Ack:
    """Plain acknowledgement (shutdown).  Wire payload: ``[]``."""

    KIND: ClassVar[str] = "ack"
    env: Envelope


@dataclass(slots=True)
class ErrorReply:
    """A request failed.  Wire payload: ``[code, message]``; codes in ``errors``."""

    KIND: ClassVar[str] = "error"
    env: Envelope
    code: int = 1
    message: str = ""


DataMessage = LogMessage | LogBatch | OutputMessage | DropReport
ControlRequest = OpenRun | FlushRequest | FinishRun | AckRequest | StatusRequest | ShutdownRequest
DaemonReply = RunOpened | Flushed | Finished | Acked | StatusReply | Ack | ErrorReply
ClientMessage = DataMessage | ControlRequest
Message = ClientMessage | DaemonReply

ALL_MESSAGES: tuple[type[Message], ...] = (
    LogMessage,
    LogBatch,
    OutputMessage,
    DropReport,
    OpenRun,
    FlushRequest,
    FinishRun,
    AckRequest,
    StatusRequest,
    ShutdownRequest,
    RunOpened,
    Flushed,
    Finished,
    Acked,
    StatusReply,
    Ack,
    ErrorReply,
)
DATA_KINDS = frozenset(m.KIND for m in (LogMessage, LogBatch, OutputMessage, DropReport))
REQUEST_KINDS = frozenset(
    m.KIND for m in (OpenRun, FlushRequest, FinishRun, AckRequest, StatusRequest, ShutdownRequest)
)
