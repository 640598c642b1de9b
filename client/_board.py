"""``Board``: the object training scripts log through."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..protocol.errors import (
    BoardClosedError,
    DaemonUnavailable,
    KoboError,
    StorageError,
    TransportError,
)
from ._rich import RICH_KINDS, Histogram
from ._values import check_name, to_config, to_scalar

if TYPE_CHECKING:
    from ..protocol import messages as m

# Imported by the first Board, not by `import kohakuboard.client`: measured,
# dataclasses, secrets and socket alone cost ~15 ms of the 30 ms import budget.
_loaded = False


def _load() -> None:
    global _loaded, m
    if not _loaded:
        from ..protocol import messages

        m = messages  # noqa: F811
        _loaded = True


def new_run_id(now: float | None = None) -> str:
    """``YYYYmmdd_HHMMSS_xxxxxx``: UTC time and 6 random ``[a-z0-9]``."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(time.time() if now is None else now))
    return stamp + "_" + "".join(secrets.choice(alphabet) for _ in range(6))


def distributed_run_id(launch_id: str, project: str, name: str | None) -> str:
    """``ddp_`` + 12 hex digits of ``sha256(launch_id|project|name)``.

    The same on every rank of one launch (``launch_id`` is torchrun's
    ``TORCHELASTIC_RUN_ID``), different for another launch, project or board name.
    """
    import hashlib

    digest = hashlib.sha256(f"{launch_id}|{project}|{name or ''}".encode("utf-8", "surrogatepass")).hexdigest()
    return "ddp_" + digest[:12]


def _check_count(what: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return value


def _check_seconds(what: str, value: Any) -> float | None:
    """``value`` as a timeout in seconds: None, or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {value!r}")
    return value


def _check_path_part(what: str, value: str) -> str:
    """``value`` as given, or ``TypeError``/``ValueError`` saying why it cannot name a folder.

    Never rewritten: the folder is named exactly what was passed.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    why = None
    if not value:
        why = "it is empty"
    elif value in (".", ".."):
        why = f"{value!r} is not a folder name but {'this' if value == '.' else 'the parent'} directory"
    elif "/" in value:
        why = "it contains '/' (one folder name, not a path)"
    elif "\0" in value:
        why = "it contains a NUL character"
    elif any(ord(c) < 32 for c in value):
        why = "it contains control characters"
    elif len(value.encode("utf-8", "surrogatepass")) > 200:
        why = "it is longer than 200 bytes"
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            why = "it is not valid Unicode (lone surrogate)"
    if why is not None:
        raise ValueError(f"{what}={value!r} cannot name the run's folder: {why}")
    return value


def _encode_rich(rich: list[tuple[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Convert rich values to wire items, copying their data now.

    Raises the value's ``TypeError``/``ValueError``/``OSError`` with the key
    in front of the message.
    """
    from ..protocol.items import check_call_size, check_item

    items: list[Any] = []
    blobs: list[Any] = []
    for key, value in rich:
        start = len(blobs)
        try:
            meta = value._encode(blobs)
            item = [key, RICH_KINDS[type(value)], meta, list(range(start, len(blobs)))]
            check_item(item, blobs)  # the rule the daemon applies again
        except (TypeError, ValueError, OSError) as exc:
            raise type(exc)(f"cannot log {key!r}: {exc}") from exc
        items.append(item)
    try:
        check_call_size(items, blobs)  # the message limits the daemon's decoder enforces
    except ValueError as exc:
        keys = ", ".join(repr(k) for k, _ in rich[:3]) + (", ..." if len(rich) > 3 else "")
        raise type(exc)(f"cannot log {keys}: {exc}") from exc
    return items, blobs


_KIND_TEXT = {
    "scalar": "a scalar",
    "media": "media (an image, video or audio)",
    "table": "a Table",
    "histogram": "a Histogram",
    "tensor": "a TensorLog",
    "kde": "a KernelDensity",
}


def _check_auto_step(value: Any) -> bool:
    """``auto_step`` as a bool; anything but a boolean is refused (not silently taken as one)."""
    if type(value).__name__ == "bool_" and (type(value).__module__ or "").startswith("numpy"):
        return bool(value)
    raise TypeError(
        f"auto_step must be True or False, got {type(value).__name__} {value!r:.40}: auto_step is log()'s own "
        "argument, so a metric cannot be named 'auto_step' (rename it)"
    )


_UNUSED_DEFAULTS = {
    "remote_url": None,
    "remote_token": None,
    "remote_project": None,
    "sync_enabled": False,
    "sync_interval": 10,
    "memory_mode": False,
}


def _warn_unused_settings(**given: Any) -> None:
    """One warning for KohakuBoard settings this design does not use (set to anything but their default)."""
    used = [k for k, v in given.items() if v != _UNUSED_DEFAULTS[k] and not (k == "sync_interval" and v is None)]
    if not used:
        return
    import warnings

    shown = ", ".join(f"{k}=***" if k == "remote_token" else f"{k}={given[k]!r}" for k in used)
    warnings.warn(
        f"kohakuboard: Board({shown}) is ignored: log() only queues the call and the per-node kobo-daemon writes "
        "every run to disk, so there is no memory mode and nothing to sync. To gather runs of several machines "
        "in one place, run `kobo-daemon run --forward tcp://HEAD:PORT` on each node (README: Several nodes); "
        "to share runs, copy the run folder or serve it with `kobo-serve`.",
        UserWarning,
        stacklevel=3,
    )


def _warn_same_rank(path: str, rank: int, others: Any) -> None:
    """Warn that other live processes write this run with the same rank (their steps will interleave)."""
    try:
        who = [f"pid {int(pid)} on {host}" for pid, host in others or ()]
    except (TypeError, ValueError):
        return
    if not who:
        return
    import warnings

    warnings.warn(
        f"kohakuboard: run {path} is being written by another live process with rank {rank} "
        f"({', '.join(who)}); the steps of both will interleave under rank {rank}. Were two scripts given the "
        "same run_id? Give each its own run_id, or each process its own rank (rank=, or RANK).",
        UserWarning,
        stacklevel=3,
    )


def _existing_folder(project_dir: str, run_id: str) -> str | None:
    """The folder of an existing run ``run_id`` in ``project_dir``: ``run_id`` or one ``{run_id}_{annotation}``."""
    if os.path.isfile(os.path.join(project_dir, run_id, "metadata.json")):
        return run_id
    try:
        names = [n for n in os.listdir(project_dir) if n.startswith(run_id + "_")]
    except OSError:
        return None
    found = []
    for n in names:
        try:
            import json

            with open(os.path.join(project_dir, n, "metadata.json"), encoding="utf-8") as f:
                if json.load(f).get("run_id") == run_id:
                    found.append(n)
        except (OSError, ValueError, AttributeError):
            continue
    return found[0] if len(found) == 1 else None


class Board:
    """One run: logs go to ``{base_dir}/{project}/{run_id}/`` through the kobo-daemon.

    ``Board(name=None, config=None, *, project="default", run_id=None,
    base_dir="./kohakuboard", capture_output=True, ...)``.  ``board_id`` is an
    alias of ``run_id``; an existing ``run_id`` resumes that run: it keeps its
    name (``self.name`` becomes it), rank 0's ``config`` is merged into the
    stored one (keys given replace theirs, new keys are added, the others
    stay), and steps continue after its last.  Opening a run that another
    live process writes with the same rank warns, naming that process (pid
    and host): the steps of both would interleave.  ``config``
    must be JSON-serialisable (numpy scalars are converted); otherwise
    ``TypeError`` naming the key is raised before anything is created.

    Connecting starts a detached ``kobo-daemon`` when none answers (unless
    ``KOBO_DAEMON_AUTOSTART=0``); raises :class:`DaemonUnavailable` when none
    can be reached, :class:`StorageError` when the run folder cannot be written.

    ``max_queue``: how many ``log()`` calls may wait in this process for the
    sender thread.  At 80 % a warning goes once to the ``kohakuboard`` logger;
    at 100 % ``log()`` blocks until the daemon catches up (nothing is dropped).

    Distributed training: ``rank``, ``local_rank`` and ``world_size`` default
    to the ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` environment variables
    (0, ``RANK``, 1).  Every point records its rank; readers return rank 0's
    series unless asked for another rank.  Every rank of one launch lands in
    the same run with no coordination code: without ``run_id``, under torchrun
    (``TORCHELASTIC_RUN_ID`` set, the same on every rank of a launch) the run id
    is ``ddp_`` + the first 12 hex digits of
    ``sha256(f"{TORCHELASTIC_RUN_ID}|{project}|{name or ''}")``, so every rank
    (and an elastic restart of the launch) computes the same one.  A second
    Board with the same name and project in the same launch therefore resumes
    that run.  With ``WORLD_SIZE`` > 1 but no usable ``TORCHELASTIC_RUN_ID``
    (another launcher, or torchrun's static rendezvous without ``--rdzv-id``,
    where it is the placeholder ``none``) a ``ValueError`` asks for ``run_id=``,
    the same string on every rank.  Only rank 0 sets the run's name, config and
    ``world_size`` in ``metadata.json``.  With world size > 1, captured output
    lines are prefixed ``[rank N] `` in ``logs/output.log``.

    Forked processes (``os.fork``, ``multiprocessing`` with the fork start
    method, DataLoader workers) may keep using an inherited Board: on its
    first use in the child it attaches to the same run as a client of its own
    (new sockets, sender thread and client id; the parent's are left alone),
    its steps continuing from the parent's at fork time.  A multiprocessing
    child finishes its client when it exits; a child made with ``os.fork`` that
    leaves with ``os._exit`` must call ``finish()`` first, or the daemon counts
    it as crashed.  A child that never logs never attaches, and finishing the
    Board in a child never finishes the parent's client.
    """

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        project: str = "default",
        run_id: str | None = None,
        board_id: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        capture_output: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        max_queue: int | None = None,
        max_inflight_bytes: int | None = None,
        queue_policy: str | None = None,
        timeout: float | None = None,
        annotation: str | None = None,
        remote_url: str | None = None,
        remote_token: str | None = None,
        remote_project: str | None = None,
        sync_enabled: bool = False,
        sync_interval: float = 10,
        memory_mode: bool = False,
    ) -> None:
        self._closed = True  # until fully open: finish() and __del__ are no-ops
        _warn_unused_settings(
            remote_url=remote_url,
            remote_token=remote_token,
            remote_project=remote_project,
            sync_enabled=sync_enabled,
            sync_interval=sync_interval,
            memory_mode=memory_mode,
        )
        _load()
        from ._config import ClientConfig

        for what, value in (("run_id", run_id), ("board_id", board_id)):
            if value is not None:
                try:
                    _check_path_part(what, value)
                except ValueError as exc:
                    if value == "":
                        raise ValueError(f"{exc}; omit {what} (or pass None) to start a new run") from None
                    raise
        if not isinstance(capture_output, bool):
            raise TypeError(f"capture_output must be True or False, got {type(capture_output).__name__}")
        if base_dir is not None and not isinstance(base_dir, (str, os.PathLike)):
            raise TypeError(f"base_dir must be a path (str or os.PathLike), got {type(base_dir).__name__}")
        if base_dir is not None and not isinstance(os.fspath(base_dir), str):
            raise TypeError("base_dir must be a str path, not bytes")
        if max_queue is not None:
            max_queue = _check_count("max_queue", max_queue, 1)
        timeout = _check_seconds("timeout", timeout)
        if run_id is not None and board_id is not None and run_id != board_id:
            raise ValueError(f"run_id={run_id!r} and board_id={board_id!r} disagree; pass one of them")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        cfg = ClientConfig.from_env()
        if config is not None and not isinstance(config, dict):
            from collections.abc import Mapping

            if not isinstance(config, Mapping):
                raise TypeError(f"config must be a dict, got {type(config).__name__}")
            config = dict(config)
        self.config: dict[str, Any] = to_config(config or {}, "config", nonfinite_as_text=True)
        self.project = _check_path_part("project", project)
        self.rank = cfg.rank if rank is None else _check_count("rank", rank, 0)
        self.world_size = cfg.world_size if world_size is None else _check_count("world_size", world_size, 1)
        if local_rank is not None:
            self.local_rank = _check_count("local_rank", local_rank, 0)
        else:
            self.local_rank = cfg.local_rank if cfg.local_rank is not None else self.rank
        if self.world_size > 1 and self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        explicit = run_id if run_id is not None else board_id
        launch = cfg.elastic_run_id
        if explicit:
            rid = explicit
        elif launch and launch.lower() != "none":
            rid = distributed_run_id(launch, self.project, name)
        elif self.world_size > 1:
            why = (
                "TORCHELASTIC_RUN_ID is torchrun's placeholder 'none' (static rendezvous without --rdzv-id)"
                if launch
                else "TORCHELASTIC_RUN_ID is not set (not launched by torchrun)"
            )
            raise ValueError(
                f"world size is {self.world_size} but no run_id was given and {why}, so the ranks cannot "
                "agree on a run: pass run_id=... (the same string on every rank, e.g. your job id), "
                "or launch with torchrun --rdzv-id=<job id>"
            )
        else:
            rid = new_run_id()
        self.run_id = _check_path_part("run_id", rid)
        if name is None:
            from ._words import friendly_name

            name = friendly_name()
        self.name = name
        self.base_dir = os.path.abspath(os.fspath(base_dir if base_dir is not None else cfg.base_dir))
        if annotation is not None:
            if annotation == "":
                annotation = None
            else:
                _check_path_part("annotation", annotation)
        folder = self.run_id if annotation is None else f"{self.run_id}_{annotation}"
        if len(folder.encode("utf-8")) > 255:
            raise ValueError(f"run_id and annotation make a folder name of more than 255 bytes: {folder[:60]!r}...")
        if annotation is None and explicit:
            folder = _existing_folder(os.path.join(self.base_dir, self.project), self.run_id) or folder
        self.annotation = annotation
        self.path = os.path.join(self.base_dir, self.project, folder)
        from ..protocol.runpath import run_path_too_long

        too_long = run_path_too_long(self.path)
        if too_long is not None:
            raise ValueError(f"cannot create the run at {self.path[:80]!r}...: {too_long}")
        self.capture_output = capture_output
        self._cfg = cfg
        self._timeout = timeout
        self._client = os.urandom(8).hex()
        self._lock = threading.Lock()
        self._step = -1
        self._global_step = 0
        # name -> kind ("scalar", "media", "table", ...) of every name this run
        # holds or this client logged: one name, one kind.
        self._kinds: dict[str, str] = {}
        self._crashed = False
        self._end_status: str | None = None  # "crashed" or "interrupted", set by an exception
        self._pid = os.getpid()
        self._max_queue = max_queue if max_queue is not None else cfg.max_queue
        self._max_inflight = (
            _check_count("max_inflight_bytes", max_inflight_bytes, 1)
            if max_inflight_bytes is not None
            else cfg.max_inflight_bytes
        )
        from ._config import QUEUE_POLICIES

        self._policy = queue_policy if queue_policy is not None else cfg.queue_policy
        if self._policy not in QUEUE_POLICIES:
            raise ValueError(f"queue_policy must be one of {', '.join(QUEUE_POLICIES)}, got {self._policy!r}")
        self._reopening = False

        reply = self._connect()
        self._kinds.update((k, v) for k, v in (reply.kinds or {}).items() if isinstance(k, str) and v in _KIND_TEXT)
        if reply.name and self.rank == 0:
            self.name = reply.name  # a resumed run keeps its name
        self.resumed = not reply.created
        _warn_same_rank(self.path, self.rank, reply.same_rank)
        if self.resumed and reply.attached == 0:
            # Resuming a run nobody else is writing: continue its counters.
            self._step = reply.last_step
            self._global_step = reply.last_global_step
        self._closed = False
        _register(self)
        self._capture = None
        if capture_output:
            from ._capture import start_capture

            prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
            self._capture = start_capture(self._send_output, prefix)

    def _connect(self) -> Any:
        """Open the sockets, attach this client to the run, start the sender; return the reply."""
        import socket

        from ..protocol.control import ControlClient, ensure_daemon
        from ..protocol.peer import process_start_ticks
        from ._encoding import Encoder
        from ._outbox import Outbox
        from ._revival import Revival
        from ._sender import Sender

        cfg = self._cfg
        ensure_daemon(cfg.endpoint, autostart=cfg.autostart)
        conn = ControlClient(cfg.endpoint)
        ident = (os.getpid(), process_start_ticks(), socket.gethostname())
        try:
            reply = conn.request(
                m.OpenRun,
                self._env(),
                self._timeout if self._timeout is not None else cfg.open_timeout,
                self.name,
                self.project,
                self.run_id,
                self.config,
                *ident,
                self.world_size,
                self.annotation or "",
            )
        except BaseException:
            conn.close()
            raise
        outbox = Outbox(
            cfg.endpoint,
            Encoder(self.path, self._client, self.rank),
            self._max_queue,
            max_inflight_bytes=self._max_inflight,
            policy=self._policy,
            daemon_id=reply.daemon,
            peer=ident,
            request=conn.request,
        )
        sender = Sender(conn.ctx, cfg.endpoint, outbox, Revival(cfg.endpoint, outbox, autostart=cfg.autostart))
        sender.start()
        self._conn, self._outbox, self._sender = conn, outbox, sender
        return reply

    # ---------------------------------------------------------------- fork

    def _check_process(self) -> None:
        """Slow path of the fork check: re-attach if this is a forked child."""
        global _pid
        pid = _pid = os.getpid()
        if self._pid != pid:
            self._reopen_in_child(pid)

    def _reopen_in_child(self, pid: int) -> None:
        """This Board was inherited by a forked child: attach the child as a client of its own.

        The parent's sockets and sender thread belong to the parent (and zmq
        objects must not be used across fork): they are kept referenced and
        never touched, so nothing of the parent's is closed or sent from here.
        Whatever the parent had queued but not sent is the parent's to send.
        """
        with _fork_lock:
            if self._pid == pid or self._closed:
                return  # another thread of this child did it already
            _abandoned.append((self._conn, self._sender))
            self._reopening = True
            self._client = os.urandom(8).hex()
            try:
                self._connect()  # a new outbox numbering from 1; steps continue from the parent's at fork time
                self._pid = pid  # only now: other threads of this child wait on the lock until here
            except BaseException:
                # No way to log from this child: close the board here (only here).
                self._pid = pid
                self._closed = True
                _unregister(self)
                capture, self._capture = self._capture, None
                if capture is not None:
                    capture.stop()
                raise
            finally:
                self._reopening = False
            _finish_with_multiprocessing_child()

    # -------------------------------------------------------------- logging

    def _env(self) -> m.Envelope:
        return m.Envelope(self.path, self._client, 0, self.rank, max(self._step, 0), self._global_step, time.time())

    @property
    def board_id(self) -> str:
        """The run's folder name: ``run_id``, or ``{run_id}_{annotation}`` (as KohakuBoard's ``board_id``)."""
        return os.path.basename(self.path)

    @property
    def global_step(self) -> int:
        """The user's counter, changed only by :meth:`step`."""
        return self._global_step

    @property
    def current_step(self) -> int:
        """The step of the latest ``log()`` call (-1 before the first)."""
        return self._step

    def step(self, increment: int = 1) -> int:
        """Advance ``global_step`` by ``increment`` (once per optimizer update); return it."""
        if type(increment) is not int:
            if not (hasattr(increment, "__index__")):
                raise TypeError(f"increment must be an integer, got {type(increment).__name__}")
            increment = int(increment)
        with self._lock:
            after = self._global_step + increment
            if not -(2**63) <= after < 2**63:  # the daemon stores global steps as int64
                raise ValueError(f"step({increment}) would move global_step to {after}, beyond a 64-bit integer")
            self._global_step = after
            return self._global_step

    def log(self, auto_step: bool = True, **values: Any) -> None:
        """Log values; returns as soon as they are queued (non-blocking).

        Every value of one call shares one ``(step, global_step)``.
        ``auto_step=False`` reuses the previous call's step.  A value that
        cannot be logged raises ``TypeError``/``ValueError`` naming its key, and
        nothing of the call is sent; so does a name already used in this run
        for another kind of value (a scalar, then an image, under one name),
        and ``auto_step`` given anything but True or False (a metric cannot be
        named ``auto_step``).  Raises :class:`BoardClosedError` after
        :meth:`finish`.
        """
        if self._closed:
            raise BoardClosedError(f"board {self.run_id!r} is finished; create a new Board to log more")
        if auto_step is not True and auto_step is not False:
            auto_step = _check_auto_step(auto_step)
        if self._pid != _pid:
            self._check_process()
        scalars: dict[str, float] = {}
        rich: list[tuple[str, Any]] | None = None
        kinds = self._kinds
        new: list[tuple[str, str]] | None = None
        for key, value in values.items():
            t = type(value)
            if (t is float or t is int) and -1e308 < value < 1e308:
                scalars[key] = float(value)
                kind = "scalar"
            elif t in RICH_KINDS:
                if rich is None:
                    rich = []
                rich.append((key, value))
                kind = RICH_KINDS[t]
            else:
                scalars[key] = to_scalar(key, value)
                kind = "scalar"
            if kinds.get(key) != kind:
                new = self._new_name(key, kind, new)
        if rich is not None:
            items, blobs = _encode_rich(rich)
        elif not scalars:
            return
        if new is not None:
            kinds.update(new)
        with self._lock:
            if auto_step:
                self._step += 1
            elif self._step < 0:
                self._step = 0
            if rich is None:
                self._outbox.put_scalars(self._step, self._global_step, scalars)
            else:
                self._outbox.put_log(self._step, self._global_step, scalars, items, blobs)

    def _new_name(self, key: str, kind: str, new: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
        """A name not yet seen as ``kind``: check it; refuse a second kind for one name."""
        before = self._kinds.get(key)
        if before is not None:
            raise TypeError(
                f"cannot log {key!r} as {_KIND_TEXT[kind]}: this run already has {key!r} as {_KIND_TEXT[before]} "
                "(one name holds one kind of value; use another name)"
            )
        check_name(key)
        if new is None:
            new = []
        new.append((key, kind))
        return new

    # ---------------------------------------------- KohakuBoard's log_* calls
    #
    # Each is one log() call (a step of its own, the current global_step), kept
    # so that scripts written for KohakuBoard run unchanged.  Several values of
    # one step belong in one log() call instead: log(a=..., b=Histogram(...)).

    def log_histogram(
        self, name: str, values: Any, num_bins: int = 64, precision: str = "exact", **kwargs: Any
    ) -> None:
        """Log one histogram as its own ``log()`` call (a step of its own).

        Kept because the guide shows it; it is exactly the step inflation the
        guide warns about.  Prefer ``log(**{name: Histogram(values)})`` with
        every histogram of a step in one call.
        """
        self._log_rich(name, Histogram(values, num_bins, precision, **kwargs))

    def log_images(self, name: str, images: Any, caption: str | None = None, *, captions: Any = None) -> None:
        """Log one image or several under ``name`` at one step (one ``log()`` call).

        ``images``: one image (numpy, torch, PIL, path, bytes), a list or tuple
        of them, or a 4-D array/tensor (a batch, split on its first axis).
        ``caption`` applies to every image; ``captions`` gives one per image.
        The reader returns several rows of ``name`` at that step, in order.
        """
        from ._rich import Media

        if caption is not None and captions is not None:
            raise TypeError("pass caption= (one for all) or captions= (one per image), not both")
        if isinstance(images, (list, tuple)):
            seq = list(images)
        elif getattr(images, "ndim", 0) == 4 and not isinstance(images, (str, bytes)):
            seq = [images[i] for i in range(images.shape[0])]
        else:
            seq = [images]
        if not seq:
            raise ValueError(f"cannot log {name!r}: log_images() got no images")
        if captions is None:
            texts = [caption or ""] * len(seq)
        else:
            texts = list(captions)
            if len(texts) != len(seq):
                raise ValueError(f"cannot log {name!r}: {len(texts)} captions for {len(seq)} images")
        self._log_many(name, [Media(img, caption=c, media_type="image") for img, c in zip(seq, texts)], "media")

    def log_video(self, name: str, video: Any, caption: str | None = None) -> None:
        """Log a video (a file path or encoded bytes: mp4, webm, mkv, mov, avi, ogv) as one ``log()`` call."""
        from ._rich import Media

        self._log_rich(name, Media(video, caption=caption or "", media_type="video"))

    def log_audio(self, name: str, audio: Any, caption: str | None = None) -> None:
        """Log an audio clip (a file path or encoded bytes: wav, mp3, ogg, flac, m4a, aac) as one ``log()`` call."""
        from ._rich import Media

        self._log_rich(name, Media(audio, caption=caption or "", media_type="audio"))

    def log_table(self, name: str, table: Any) -> None:
        """Log a :class:`Table` (or a list of dicts, made into one) as one ``log()`` call."""
        from ._rich import Table

        self._log_rich(name, table if isinstance(table, Table) else Table(table))

    def log_tensor(
        self,
        name: str,
        values: Any = None,
        precision: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        namespace: str | None = None,
        tensor: Any = None,
    ) -> None:
        """Log a whole tensor (a :class:`TensorLog`) as one ``log()`` call.

        ``values`` (or ``tensor=``): the array; ``precision`` casts before
        storing; ``metadata`` and ``namespace`` are stored with it.
        """
        from ._rich import TensorLog

        if values is not None and tensor is not None:
            raise TypeError("pass the tensor once: values or tensor=, not both")
        data = values if values is not None else tensor
        self._log_rich(name, TensorLog(data, namespace=namespace, metadata=metadata, precision=precision))

    def log_kernel_density(
        self,
        name: str,
        grid: Any = None,
        density: Any = None,
        *,
        values: Any = None,
        num_points: int = 256,
        kernel: str = "gaussian",
        bandwidth: Any = None,
        **kwargs: Any,
    ) -> None:
        """Log a :class:`KernelDensity` as one ``log()`` call.

        Raw ``values`` (the daemon estimates the density on ``num_points``
        points, Gaussian kernel, ``bandwidth`` a number or None/"auto" for
        Scott's rule), or a precomputed ``grid`` and ``density``.
        """
        from ._rich import KernelDensity

        self._log_rich(
            name,
            KernelDensity(
                values=values,
                num_points=num_points,
                bandwidth=bandwidth,
                grid=grid,
                density=density,
                kernel=kernel,
                **kwargs,
            ),
        )

    def _log_rich(self, name: str, value: Any) -> None:
        """One rich value under ``name``, as ``log(**{name: value})`` logs it (a step of its own).

        Not through ``log()``: there a value named ``auto_step`` would be taken for log()'s own
        argument, and the log_* calls take any metric name.
        """
        kind = RICH_KINDS.get(type(value))
        if kind is None:  # a subclass (of Table): log() refuses it as it refuses any non-number
            raise TypeError(f"cannot log {name!r}: {type(value).__name__} is not a number")
        self._log_many(name, [value], kind)

    def _log_many(self, name: str, values: list[Any], kind: str) -> None:
        """Several rich values of one ``kind`` under one name at one step: one message each, queued together.

        Checked and copied first, all of them: if one cannot be logged, none is.
        """
        if self._closed:
            raise BoardClosedError(f"board {self.run_id!r} is finished; create a new Board to log more")
        if self._pid != _pid:
            self._check_process()
        new = self._new_name(name, kind, None) if self._kinds.get(name) != kind else None
        encoded = [_encode_rich([(name, value)]) for value in values]
        if new is not None:
            self._kinds.update(new)
        with self._lock:
            self._step += 1
            for items, blobs in encoded:
                self._outbox.put_log(self._step, self._global_step, {}, items, blobs)

    def _send_output(self, stream: str, text: str) -> None:
        if self._closed and self._capture is None:
            return
        if self._pid != _pid:
            if self._reopening:
                return  # printed while attaching a forked child: nowhere to send it yet
            self._check_process()
        with self._lock:
            self._outbox.put_output(max(self._step, 0), self._global_step, stream, text)

    # ----------------------------------------------------------- durability

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything logged before this call is durable in the run folder.

        Raises :class:`StorageError` if the daemon cannot write it (disk full,
        folder not writable), :class:`KoboTimeoutError` after ``timeout``
        seconds (default 60), :class:`DaemonUnavailable` if the daemon died.
        """
        if self._closed:
            raise BoardClosedError(f"board {self.run_id!r} is finished")
        if self._pid != os.getpid():
            return  # a forked child that has logged nothing yet: nothing of this process to wait for
        self._raise_sender_error()
        outbox = self._outbox
        with self._lock:
            last = outbox.seq
            outbox.flush_drops()
        timeout = _check_seconds("timeout", timeout)
        timeout = timeout if timeout is not None else self._cfg.flush_timeout
        outbox.flush(last, timeout)
        self._raise_sender_error()  # a call among these that could not be encoded (a bug): said once

    def _raise_sender_error(self) -> None:
        outbox = self._outbox
        err = outbox.sender_error
        if err is not None:
            raise TransportError(f"sending to kobo-daemon failed: {err!r}") from err
        failed, outbox.encode_error = outbox.encode_error, None
        if failed is not None:  # reported once: later calls are delivered as usual
            seq, exc = failed
            n = outbox.encode_errors
            raise TransportError(
                f"a log() call (message {seq} of this board) could not be encoded and was counted as dropped "
                f"({n} so far); the calls after it are delivered. Cause: {exc!r}. This is a KohakuBoard bug; "
                "please report it."
            ) from exc

    def finish(self, timeout: float | None = None, *, status: str | None = None) -> None:
        """Write everything, mark the run finished (or crashed), close the board.

        Idempotent; called by ``with``, at exit and after an uncaught exception.
        Returns within about ``timeout`` seconds (default 10) even when the
        daemon is dead; then it warns how many ``log()`` calls may not have
        been written.  Raises :class:`StorageError` if the daemon reports that
        it could not write the run (the data stays with the daemon, which
        writes it once it can).
        """
        _check_seconds("timeout", timeout)
        if self._closed:
            return
        if self._pid != os.getpid():
            self._close_unused_in_child()
            return
        if self._capture is not None:
            self._capture.stop()  # forwards the unfinished last line first
            self._capture = None
        with self._lock:
            if self._closed:
                return
            self._closed = True
            last = self._outbox.seq
        status = status or self._end_status or ("crashed" if self._crashed else "finished")
        timeout = self._cfg.finish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        _unregister(self)
        outbox, sender = self._outbox, self._sender
        problem: KoboError | None = None
        try:
            with self._lock:
                outbox.flush_drops()
            # One round trip in the usual case: the daemon's FinishRun waits until
            # everything up to ``last`` is durable (the sender keeps sending
            # meanwhile), then marks the client finished.  The end of a run must
            # survive a restart of the daemon (or, through a forwarder, of the
            # head): a request the dead daemon never answered is asked again
            # every few seconds, after the sender's acknowledged delivery has
            # re-sent the data, until the timeout.
            # A backlog that takes more than a second shows a progress line on stderr.
            from ._progress import FinishProgress

            with FinishProgress(outbox.unwritten_calls, f"finishing {self.path}"):
                problem = self._finish_until(last, status, deadline)
        finally:
            stopped = sender.stop(0.5)
            unwritten = outbox.unwritten_calls()
            if stopped:
                self._conn.close()
            else:
                self._conn.ctx.destroy(linger=0)
        if isinstance(problem, StorageError):
            raise problem
        if problem is not None:
            import warnings

            warnings.warn(
                f"kohakuboard: run {self.path} could not be finished ({problem}); "
                f"{unwritten} log() call(s) were not written",
                RuntimeWarning,
                stacklevel=2,
            )
        failed, outbox.encode_error = outbox.encode_error, None
        if failed is not None:  # not yet reported by a flush(): the run is finished, so a warning
            import warnings

            warnings.warn(
                f"kohakuboard: {outbox.encode_errors} log() call(s) of run {self.path} could not be encoded and "
                f"were counted as dropped (first cause: {failed[1]!r}); this is a KohakuBoard bug, please report it",
                RuntimeWarning,
                stacklevel=2,
            )

    def _finish_until(self, last: int, status: str, deadline: float) -> KoboError | None:
        """Ask the daemon to finish this client until it answers or ``deadline``; the last problem."""
        from ..protocol.endpoint import daemon_alive

        outbox = self._outbox
        problem: KoboError | None = None
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if problem is not None and not daemon_alive(self._conn.ep):
                    return DaemonUnavailable(f"kobo-daemon on {self._conn.ep} is not running")
                return problem
            if attempt and outbox.acked_seq < last and not outbox.daemon_down:
                # Data first: acknowledged delivery re-sends what a restarted daemon lost.
                try:
                    outbox.flush(last, remaining)
                except StorageError as exc:
                    problem = exc  # the daemon still defers the finish until the data is written
                except KoboError as exc:
                    return exc  # the whole time went by
                remaining = max(0.1, deadline - time.monotonic())
            attempt += 1
            try:
                # A first request may wait while the daemon writes; a repeated one
                # comes after the data is durable and is answered at once.
                reply = self._conn.request(
                    m.FinishRun, self._env(), min(remaining, 5.0 if attempt == 1 else 2.0), last, status
                )
            except StorageError as exc:
                return exc
            except DaemonUnavailable as exc:
                problem = exc
                if self._sender.revival.autostart:  # nothing else may start one: the sender has nothing to send
                    from ..protocol.control import ensure_daemon

                    try:
                        if ensure_daemon(self._conn.ep, autostart=True, timeout=max(0.1, deadline - time.monotonic())):
                            continue  # a new daemon: ask it at once
                    except KoboError as exc2:
                        problem = exc2
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))  # (a forwarder without its head, too)
                continue
            except KoboError as exc:
                if getattr(exc, "no_answer", False):  # a restarted daemon (or head) lost the request: ask again
                    problem = exc
                    continue
                return exc  # the daemon answered with an error (e.g. its own timeout): final
            outbox.note_durable(reply.durable_seq)
            return None

    def _close_unused_in_child(self) -> None:
        # Inherited from the parent and never used in this process: this process
        # has no client to finish, and the parent's client is the parent's.
        with _fork_lock:
            if self._closed:
                return
            self._closed = True
            _unregister(self)
            capture, self._capture = self._capture, None
        if capture is not None:
            capture.stop()

    close = finish

    def __enter__(self) -> Board:
        return self

    def __exit__(self, et: Any, exc: Any, tb: Any) -> None:
        if et is not None:
            self._ended_by(et, exc, tb)
            try:
                self.finish()
            except KoboError:
                pass  # never mask the user's exception
        else:
            self.finish()

    def _ended_by(self, et: Any, exc: Any, tb: Any) -> None:
        """An exception ends this board: ``interrupted`` for KeyboardInterrupt, else ``crashed``.

        Its traceback goes to ``logs/output.log`` (marked stderr): Python prints
        it only after the board has finished, when nothing captures any more.
        """
        if self._closed or self._end_status is not None:
            return
        self._end_status = "interrupted" if issubclass(et, KeyboardInterrupt) else "crashed"
        self._crashed = self._end_status == "crashed"
        if self._pid != os.getpid():
            return
        import traceback

        from ._capture import label_output

        text = "".join(traceback.format_exception(et, exc, tb))
        prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
        try:
            if self._capture is not None:
                self._capture.stdout.flush_partial()
                self._capture.stderr.flush_partial()
            self._send_output("stderr", label_output("stderr", text, prefix))
        except Exception:
            pass  # never mask the user's exception

    def __repr__(self) -> str:
        state = "finished" if self._closed else "open"
        return f"<Board {self.project}/{self.run_id} {state} step={self._step} global_step={self._global_step}>"

    def stats(self) -> dict[str, Any]:
        """Client-side counters: what was logged, sent, acknowledged, queued, dropped, re-sent."""
        s = self._outbox
        return {
            "logged": s.seq,
            "sent": s.sent_seq,
            "acknowledged": s.acked_seq,
            "queued": len(s.queue),
            "unacknowledged_calls": s.unacked_calls,
            "inflight_bytes": s.put_bytes - s.taken_bytes + s.unacked_bytes,
            "max_inflight_bytes": s.limit,
            "peak_queue": s.peak,
            "max_queue": s.max_queue,
            "dropped_calls": s.dropped_calls,
            "dropped_values": s.dropped_values,
            "dropped_lines": s.dropped_lines,
            "daemon_restarts_seen": s.replays,
            "replayed_calls": s.replayed_calls,
        }


# ------------------------------------------------------------ process hooks

_boards: Any = None  # weakref.WeakSet of live boards, created by the first one
_hooks_installed = False
_uncaught = False
# This process's pid, kept current by an at-fork hook so that log() can notice
# a forked child without a getpid() system call per call.
_pid = os.getpid()
_fork_lock = threading.RLock()
# The parent's (connection, sender) pairs of boards re-attached in a forked
# child: referenced so that they are never garbage-collected (closed) here.
_abandoned: list[Any] = []
_mp_finalizer_pid = 0


def _register(board: Board) -> None:
    global _hooks_installed, _boards, _pid
    if not _hooks_installed:
        import atexit
        import weakref

        _hooks_installed = True
        _boards = weakref.WeakSet()
        atexit.register(_finish_all)
        previous = sys.excepthook

        def excepthook(et: Any, exc: Any, tb: Any) -> None:
            global _uncaught
            _uncaught = True
            # Boards that do not capture this process's stderr get the traceback
            # themselves; a capturing one gets it through its tee, below.
            for board in list(_boards or ()):
                if board._capture is None and board._pid == os.getpid():
                    board._ended_by(et, exc, tb)
                elif board._pid == os.getpid():
                    board._end_status = board._end_status or (
                        "interrupted" if issubclass(et, KeyboardInterrupt) else "crashed"
                    )
            previous(et, exc, tb)

        sys.excepthook = excepthook
        _pid = os.getpid()
        os.register_at_fork(after_in_child=_after_fork_in_child)
    _boards.add(board)
    _finish_with_multiprocessing_child()


def _after_fork_in_child() -> None:
    """Runs in every forked child, before it returns from fork: only cheap, local work.

    Locks another thread of the parent may have held at fork time are replaced;
    the boards re-attach lazily on first use (see ``Board._reopen_in_child``).
    """
    global _pid, _fork_lock
    _pid = os.getpid()
    _fork_lock = threading.RLock()
    for board in list(_boards or ()):
        board._lock = threading.Lock()
    capture = sys.modules.get(__package__ + "._capture")
    if capture is not None:
        capture.reset_locks_after_fork()


def _finish_with_multiprocessing_child() -> None:
    """In a multiprocessing child, finish this process's boards when it exits.

    A ``multiprocessing`` child leaves through ``os._exit`` (no ``atexit``), but
    runs its finalizers first; without this its client would look crashed.
    """
    global _mp_finalizer_pid
    if _mp_finalizer_pid == os.getpid():
        return
    process = sys.modules.get("multiprocessing.process")
    util = sys.modules.get("multiprocessing.util")
    if process is None or util is None or process.parent_process() is None:
        return  # not a multiprocessing child: atexit finishes the boards
    _mp_finalizer_pid = os.getpid()
    util.Finalize(None, _finish_all, exitpriority=0)


def _unregister(board: Board) -> None:
    if _boards is not None:
        _boards.discard(board)


def _finish_all() -> None:
    for board in list(_boards):
        if os.getpid() != board._pid:
            continue  # a forked child must not finish its parent's run
        if _uncaught and board._end_status is None:
            board._crashed = True
        try:
            board.finish()
        except Exception as exc:  # at exit there is nobody left to raise to
            from ._notices import error

            error(f"kohakuboard: finishing {board.path} failed: {exc}")
