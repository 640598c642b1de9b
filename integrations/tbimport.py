"""``kobo import tensorboard LOGDIR``: TensorBoard event files to KohakuBoard run folders.

One run per directory holding event files (``*tfevents*``), named by its path
under LOGDIR.  Scalars (``simple_value`` and the scalars plugin's tensors),
images (``Summary.Image`` and the images plugin), histograms
(``HistogramProto`` and the histograms plugin's ``[k, 3]`` tensors), text (the
text plugin; stored as a one-column table ``text``), audio clips and the
hparams plugin's hyperparameters (into the run's config) are converted with
their step (as ``global_step``) and wall time; graphs, PR curves, meshes and
other plugins' data are counted as not converted.  Values of consecutive events
at one TensorBoard step share one KohakuBoard step; each keeps its own wall
time.  ``created_at``/``finished_at`` are the first and last converted event's times, the
host the one in the event file's name.

Writing: the run is written in this process by the daemon's own writer
(:class:`kohakuboard.storage.writer.RunWriter`) from the same protocol
messages a ``Board`` sends, with the events' wall times in their envelopes: a
``Board`` stamps every call with the current time and has no way to log a past
one.  No daemon is needed; the writer's lock refuses a second writer of the
same folder.

Importing twice: the run id is ``tb_`` + 12 hex digits of the SHA-256 of the
directory's oldest event file name (names hold the writer's start time, host
and pid), so the same directory, wherever it was copied, maps to the same run.
An existing run whose recorded files (names and sizes, ``imported_from`` in
``metadata.json``) are the same is skipped; one whose files changed since is
skipped with a note unless ``replace=True``; an import that was cut off (no
``imported_from`` yet, no writer holding it) is redone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _tfevents

CLIENT = "tensorboard-import"
_BATCH_CALLS = 4096
_BATCH_BYTES = 32 << 20


@dataclass
class RunResult:
    """What happened to one event directory."""

    event_dir: str
    name: str
    run_id: str
    path: str
    action: str  # "imported", "replaced", "skipped", "failed"
    reason: str = ""
    counts: Counter = field(default_factory=Counter)  # converted values by kind
    not_converted: Counter = field(default_factory=Counter)  # values/records left out, by what they are
    problems: list[str] = field(default_factory=list)  # unreadable records, with file and offset


def find_event_dirs(logdir: str) -> list[tuple[str, list[str]]]:
    """``(directory, [event file names])`` for every directory under ``logdir`` with event files."""
    out = []
    for root, dirs, files in os.walk(logdir):
        dirs.sort()
        events = sorted(f for f in files if "tfevents" in f and os.path.isfile(os.path.join(root, f)))
        if events:
            out.append((root, events))
    return out


def run_id_for(files: list[str]) -> str:
    return "tb_" + hashlib.sha256(sorted(files)[0].encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _host_from(name: str) -> str:
    # events.out.tfevents.<timestamp>.<host>.<pid>.<n><suffix>
    parts = name.split(".")
    try:
        i = parts.index("tfevents")
        return ".".join(parts[i + 2 : -2]) or ""
    except ValueError:
        return ""


class _Clock:
    """The writer's clock: the events' time, not the import's."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class _Converter:
    """Turns the events of one directory into log messages."""

    def __init__(self, path: str, hparams_pb2: Any, result: RunResult) -> None:
        from ..protocol import messages as m

        self.m = m
        self.path = path
        self.hparams_pb2 = hparams_pb2
        self.result = result
        self.plugin: dict[str, str] = {}  # tag -> plugin name (only the first value of a tag carries it)
        self.hparams: dict[str, Any] = {}
        self.seq = 0
        self.step = -1
        self.last_tb_step: int | None = None
        self.first_wall: float | None = None
        self.last_wall: float | None = None

    def messages(self, event: Any) -> list[Any]:
        wall = float(event.wall_time)
        what = event.WhichOneof("what")
        if what in ("file_version", "session_log", None):
            return []
        if what != "summary":
            self.result.not_converted[what.replace("_", " ")] += 1
            return []
        calls: list[tuple[dict[str, float], list[tuple[str, Any]]]] = [({}, [])]
        for value in event.summary.value:
            try:
                converted = self._value(value)
            except Exception as exc:  # one bad value must not stop the run's import
                self.result.problems.append(f"tag {value.tag!r} at step {event.step}: {exc}")
                self.result.not_converted["unreadable value"] += 1
                continue
            for key, kind, v in converted:
                if kind != "scalar":
                    from ..client._board import _encode_rich

                    try:  # the value rule of log() (protocol/items.py): e.g. fractional bucket counts
                        _encode_rich([(key, v)])
                    except (TypeError, ValueError) as exc:
                        self.result.problems.append(f"tag {value.tag!r} at step {event.step}: {exc}")
                        self.result.not_converted[f"invalid {kind}"] += 1
                        continue
                scalars, rich = calls[-1]
                if key in scalars or any(k == key for k, _ in rich):  # a tag twice in one event
                    calls.append(({}, []))
                    scalars, rich = calls[-1]
                if kind == "scalar":
                    scalars[key] = v
                else:
                    rich.append((key, v))
                self.result.counts[kind] += 1
        out = []
        for scalars, rich in calls:
            if scalars or rich:
                out.append(self._message(int(event.step), wall, scalars, rich))
        if out:  # the run's created_at/finished_at: its first and last data
            if self.first_wall is None or wall < self.first_wall:
                self.first_wall = wall
            if self.last_wall is None or wall > self.last_wall:
                self.last_wall = wall
        return out

    def _message(self, tb_step: int, wall: float, scalars: dict[str, float], rich: list[tuple[str, Any]]) -> Any:
        from ..client._board import _encode_rich

        m = self.m
        if tb_step != self.last_tb_step or self.step < 0:
            self.step += 1
            self.last_tb_step = tb_step
        self.seq += 1
        items, blobs = _encode_rich(rich) if rich else ([], [])
        env = m.Envelope(self.path, CLIENT, self.seq, 0, self.step, tb_step, wall)
        return m.LogMessage(env, scalars, items, [bytes(b) for b in blobs])

    # ------------------------------------------------------------ values

    def _value(self, value: Any) -> list[tuple[str, str, Any]]:
        from ..client import Histogram, Media, Table

        tag = value.tag
        plugin = value.metadata.plugin_data.plugin_name if value.HasField("metadata") else ""
        if plugin:
            self.plugin[tag] = plugin
        else:
            plugin = self.plugin.get(tag, "")
        if plugin == "hparams":  # no value: the data is in the plugin's content
            self._hparams(value.metadata.plugin_data.content)
            return []
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            return [(tag, "scalar", float(value.simple_value))]
        if kind == "image":
            return [(tag, "image", Media(bytes(value.image.encoded_image_string), media_type="image"))]
        if kind == "histo":
            return self._hist(tag, _histogram_proto(value.histo, Histogram))
        if kind == "audio":
            return [(tag, "audio", Media(bytes(value.audio.encoded_audio_string), media_type="audio"))]
        if kind == "tensor":
            arr = _tfevents.tensor_value(value.tensor)
            if plugin in ("scalars", ""):
                if arr.size == 1 and arr.dtype.kind in "biuf":
                    return [(tag, "scalar", float(arr.reshape(-1)[0]))]
            elif plugin == "text":
                cells = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in arr.reshape(-1)]
                if tag.endswith("/text_summary"):  # torch and tensorboardX add this to add_text's tag
                    tag = tag[: -len("/text_summary")]
                return [(tag, "text", Table(columns=["text"], rows=[[c] for c in cells]))]
            elif plugin == "histograms" and arr.ndim == 2 and arr.shape[1] == 3:
                return self._hist(tag, _histogram_tensor(arr, Histogram))
            elif plugin == "images" and arr.dtype == object and arr.size >= 3:
                images = [bytes(b) for b in arr.reshape(-1)[2:]]
                if len(images) == 1:
                    return [(tag, "image", Media(images[0], media_type="image"))]
                return [(f"{tag}/{i}", "image", Media(b, media_type="image")) for i, b in enumerate(images)]
            elif plugin == "audio" and arr.dtype == object and arr.size >= 1:
                clips = (
                    [bytes(b) for b in arr.reshape(-1, arr.shape[-1])[:, 0]]
                    if arr.ndim == 2
                    else [bytes(arr.reshape(-1)[0])]
                )
                return [
                    (tag if len(clips) == 1 else f"{tag}/{i}", "audio", Media(c, media_type="audio"))
                    for i, c in enumerate(clips)
                ]
            self.result.not_converted[f"{plugin or 'tensor'} summary"] += 1
            return []
        self.result.not_converted[f"{kind or 'empty'} summary"] += 1
        return []

    def _hist(self, tag: str, hist: Any) -> list[tuple[str, str, Any]]:
        if hist is None:
            self.result.not_converted["empty histogram"] += 1
            return []
        return [(tag, "histogram", hist)]

    def _hparams(self, content: bytes) -> None:
        if self.hparams_pb2 is None:
            self.result.not_converted["hparams"] += 1
            return
        data = self.hparams_pb2.HParamsPluginData.FromString(content)
        if data.WhichOneof("data") != "session_start_info":
            return  # the experiment's domain description and the session's end carry no values
        for key, v in data.session_start_info.hparams.items():
            which = v.WhichOneof("kind")
            if which == "number_value":
                x = v.number_value
                self.hparams[key] = int(x) if x.is_integer() and abs(x) < 2**53 else x
            elif which == "string_value":
                self.hparams[key] = v.string_value
            elif which == "bool_value":
                self.hparams[key] = v.bool_value
        self.result.counts["hparams"] += 1


def _histogram_proto(h: Any, Histogram: Any) -> Any:  # None for an empty one
    """A ``HistogramProto`` (right bucket limits) as edges and counts."""
    import numpy as np

    limits = np.array(h.bucket_limit, dtype=np.float64)
    counts = np.array(h.bucket, dtype=np.float64)
    if counts.size == 0 or counts.size != limits.size:
        return None
    lo, hi = float(h.min), float(h.max)
    # Bucket i holds (limit[i-1], limit[i]]; the first one is unbounded below.
    # torch and tensorboardX write an empty first bucket whose limit is the left edge.
    if counts[0] == 0:
        edges, counts = limits, counts[1:]
    else:
        edges = np.concatenate([[min(lo, limits[0])], limits])
    big = np.abs(edges) > 1e300  # TensorFlow's default buckets end at +-DBL_MAX
    if big.any():
        edges = edges.copy()
        edges[big & (edges > 0)] = max(hi, np.max(edges[~big], initial=hi))
        edges[big & (edges < 0)] = min(lo, np.min(edges[~big], initial=lo))
    if counts.size == 0:
        return None
    return Histogram(bins=np.maximum.accumulate(edges), counts=counts)


def _histogram_tensor(arr: Any, Histogram: Any) -> Any:
    """The histograms plugin's ``[k, 3]`` tensor (left, right, count) as edges and counts."""
    import numpy as np

    arr = arr.astype(np.float64)
    if arr.shape[0] == 0:
        return None
    edges = np.concatenate([arr[:1, 0], arr[:, 1]])
    return Histogram(bins=np.maximum.accumulate(edges), counts=arr[:, 2])


# ------------------------------------------------------------------ runs


def _fingerprint(event_dir: str, files: list[str]) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(event_dir, f)) for f in files}


def _writer_busy(path: str) -> bool:
    import fcntl

    from ..storage import format as fmt

    lock = os.path.join(path, fmt.WRITER_LOCK)
    if not os.path.exists(lock):
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def import_dir(
    event_dir: str,
    files: list[str],
    *,
    name: str,
    project: str,
    base_dir: str,
    replace: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Convert one directory of event files into ``{base_dir}/{project}/tb_...``."""
    from ..daemon.ingest import RunIngest
    from ..storage import format as fmt
    from ..storage.writer import RunWriter

    event_pb2, hparams_pb2 = _tfevents.protos()
    run_id = run_id_for(files)
    path = os.path.join(os.path.abspath(base_dir), project, run_id)
    result = RunResult(event_dir, name, run_id, path, "imported")
    fingerprint = _fingerprint(event_dir, files)
    meta_path = os.path.join(path, fmt.METADATA_JSON)
    if os.path.exists(path):
        try:
            meta = fmt.read_json(meta_path)
        except (OSError, ValueError):
            meta = {}
        source = meta.get("imported_from")
        if source:
            if source.get("files") == fingerprint:
                result.action, result.reason = "skipped", "already imported"
                return result
            if not replace:
                result.action = "skipped"
                result.reason = "already imported, and its event files changed since (--replace imports it again)"
                return result
            result.action = "replaced"
        else:  # an import that was cut off, or something else at this path
            if _writer_busy(path):
                result.action, result.reason = "skipped", "being written by another process"
                return result
            if meta and meta.get("run_id") != run_id:
                result.action, result.reason = "failed", f"{path} exists and is not an import of this directory"
                return result
        shutil.rmtree(path)

    clock = _Clock()
    conv = _Converter(path, hparams_pb2, result)
    writer = None
    ingest = None
    try:
        batch: list[Any] = []
        batch_bytes = 0
        for fname in files:
            fpath = os.path.join(event_dir, fname)
            done = 0
            for offset, size, data, problem in _tfevents.read_records(fpath):
                done += size
                if progress is not None and done >= 1 << 18:
                    progress(done)
                    done = 0
                if data is None:
                    result.problems.append(f"{fpath}: {problem}")
                    result.not_converted["unreadable record"] += 1
                    continue
                try:
                    event = event_pb2.Event.FromString(data)
                except Exception as exc:
                    result.problems.append(f"{fpath}: record at byte {offset} is not an Event ({exc})")
                    result.not_converted["unreadable record"] += 1
                    continue
                msgs = conv.messages(event)
                if not msgs:
                    continue
                if writer is None or ingest is None:  # (made together)
                    assert conv.first_wall is not None  # set by messages() when it returns any
                    clock.t = conv.first_wall
                    writer = RunWriter(path, now=clock)
                    ingest = RunIngest(writer, now=clock)
                    writer.attach(
                        client=CLIENT,
                        rank=0,
                        pid=os.getpid(),
                        host=_host_from(files[0]) or socket.gethostname(),
                        name=name,
                        project=project,
                        run_id=run_id,
                        config={},
                        world_size=1,
                    )
                batch.extend(msgs)
                batch_bytes += sum(len(b) for msg in msgs for b in msg.blobs)
                if len(batch) >= _BATCH_CALLS or batch_bytes >= _BATCH_BYTES:
                    ingest.stage(batch)
                    ingest.commit()
                    batch, batch_bytes = [], 0
            if progress is not None and done:
                progress(done)
        if writer is None or ingest is None:  # (made together)
            result.action, result.reason = "skipped", "no values to convert"
            return result
        if batch:
            ingest.stage(batch)
            ingest.commit()
        clock.t = conv.last_wall if conv.last_wall is not None else clock.t
        writer.detach(CLIENT, fmt.STATUS_FINISHED)
        if conv.hparams:
            writer.metadata["config"] = {**writer.metadata.get("config", {}), **conv.hparams}
        writer.metadata["imported_from"] = {
            "kind": "tensorboard",
            "dir": os.path.abspath(event_dir),
            "files": fingerprint,
            "imported_at": time.time(),
        }
        writer.set_status(fmt.STATUS_FINISHED)  # writes metadata.json: the import is complete
    except BaseException:
        if writer is not None:
            writer.close()
            writer = None
        shutil.rmtree(path, ignore_errors=True)  # never leave half a run behind
        raise
    finally:
        if writer is not None:
            writer.close()
    return result


def import_logdir(
    logdir: str,
    *,
    project: str = "default",
    base_dir: str = "./kohakuboard",
    replace: bool = False,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Import every event directory under ``logdir``; return one result per directory."""
    _tfevents.protos()  # fail early, with the install hint, when no protobufs are available
    logdir = os.path.abspath(logdir)
    results = []
    for event_dir, files in find_event_dirs(logdir):
        rel = os.path.relpath(event_dir, logdir)
        name = os.path.basename(logdir) if rel == "." else rel
        try:
            res = import_dir(
                event_dir, files, name=name, project=project, base_dir=base_dir, replace=replace, progress=progress
            )
        except Exception as exc:
            res = RunResult(event_dir, name, run_id_for(files), "", "failed", f"{type(exc).__name__}: {exc}")
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results


def total_bytes(logdir: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, files in find_event_dirs(logdir) for f in files)


def iter_summary(results: list[RunResult]) -> Iterator[str]:
    """Human-readable lines: one per directory, then what could not be converted."""
    for r in results:
        where = f"{os.path.basename(os.path.dirname(r.path))}/{r.run_id}" if r.path else r.run_id
        if r.action in ("imported", "replaced"):
            kinds = ", ".join(f"{n} {k}{'' if n == 1 else 's'}" for k, n in sorted(r.counts.items()))
            yield f"{r.action}: {r.name} -> {where} ({kinds or 'nothing'})"
        else:
            yield f"{r.action}: {r.name} ({where}): {r.reason}"
    left_out: Counter[str] = Counter()
    for r in results:
        left_out.update(r.not_converted)
    problems = [p for r in results for p in r.problems]
    if left_out or problems:
        yield "not converted:"
        for what, n in sorted(left_out.items()):
            yield f"  {n} {what}"
        for p in problems[:20]:
            yield f"  {p}"
        if len(problems) > 20:
            yield f"  ... and {len(problems) - 20} more problem(s)"
