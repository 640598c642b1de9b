"""Check a run folder for damage (``kobo verify``; format: :mod:`.format`).

:func:`verify_run` reads everything read-only and reports, per file, what is
wrong, without ever raising on a truncated, half-copied or corrupted file:

* ``metadata.json`` parses, is an object with the keys the writer writes and a
  format version this KohakuBoard reads;
* every SQLite file (``data/metadata.db``, the ColumnVault files, the tensors
  KVault) passes SQLite's own check; ``metadata.db`` has the format's tables;
* each ColumnVault column against its committed length: more rows is an
  uncommitted tail (a note: the next writer removes it and the client re-sends
  it), fewer is damage; every committed scalar record is a possible point and
  every histogram record parses;
* media rows point to files that exist, with the size and sha256 of their name;
* table rows parse and their media cells exist;
* tensor and KDE rows have their payload in the tensors KVault, of the right
  byte size;
* ``logs/output.log`` against its committed length.

Notes (uncommitted tails, checks that could not be made because another file
is broken) are not damage: a run with only notes is clean.

Every database is opened like :class:`~.reader.RunReader` opens it
(:class:`~.reader.ReadOnlyFile`): no file is created in the run folder and no
write access to it is needed, so a run the checker may not write (another
user's, a read-only mount, a copy) is checked like any other and is not
reported damaged for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from . import format as fmt
from .reader import ReadOnlyFile

_REC = fmt.scalar_record_dtype()
_R = TypeVar("_R")
_HEADER = struct.Struct(fmt.HISTOGRAM_HEADER)
_SCALAR_CHUNK = 1 << 20  # rows per read while checking (32 MiB)
_HIST_CHUNK = 1024
_MEDIA_NAME = re.compile(r"[0-9a-f]{64}")
# Tables every metadata.db has; ``committed`` and ``client_seqs`` only once it has commit points.
_TABLES = ("meta", "steps", "clients", "media", "tables", "tensors", "kde", "events")
_COMMIT_TABLES = ("committed", "client_seqs")
_METADATA_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "project": str,
    "run_id": str,
    "config": dict,
    "created_at": (int, float),
    "status": str,
    "format_version": int,
}


@dataclass
class Finding:
    """One thing found: ``file`` (relative to the run folder) and what is wrong with it.

    ``damage`` False is a note: worth knowing, not a fault of the run.
    """

    file: str
    message: str
    damage: bool = True
    # Damage of the kind a copy taken while the run was written also shows: the
    # newest committed rows, bytes or media files are not there.
    newest_missing: bool = field(default=False, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "message": self.message}

    def __str__(self) -> str:
        return f"{self.file}: {'' if self.damage else 'note: '}{self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_run` found in the run folder at ``path``."""

    path: str
    is_run: bool = True
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    status: str | None = None  # the run's status in metadata.json, if readable

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if not f.damage]

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    @property
    def exit_code(self) -> int:
        """``kobo verify``'s exit code: 0 clean, 1 damaged, 2 not a run."""
        if not self.is_run:
            return 2
        return 1 if self.damaged else 0

    def summary(self) -> str:
        if not self.is_run:
            return f"not a KohakuBoard run: {self.path} (no metadata.json or data/metadata.db)"
        c = self.counts
        parts = [_plural(c.get("metrics", 0), "metric column") + f" ({_plural(c.get('points', 0), 'point')})"]
        for key, word in (
            ("histograms", "histogram record"),
            ("media_files", "media file"),
            ("tables", "table"),
            ("tensors", "tensor"),
            ("kde", "KDE"),
        ):
            if c.get(key):
                parts.append(_plural(c[key], word))
        parts.append(f"output.log {_plural(c.get('output_bytes', 0), 'byte')}")
        notes = f"; {_plural(len(self.notes), 'note')}" if self.notes else ""
        if self.damaged:
            hint = ""
            if self.status == fmt.STATUS_RUNNING and all(p.newest_missing for p in self.problems):
                hint = (
                    " (the run was being written: if this folder is a copy taken meanwhile, it missed "
                    "the newest data; copy data/metadata.db first, or after the run finished)"
                )
            return f"DAMAGED: {_plural(len(self.problems), 'problem')} in {self.path}{notes}{hint}"
        return f"ok: {self.path} is intact: {', '.join(parts)}{notes}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "run": self.is_run,
            "ok": self.is_run and not self.damaged,
            "exit_code": self.exit_code,
            "problems": [f.as_dict() for f in self.problems],
            "notes": [f.as_dict() for f in self.notes],
            "counts": dict(self.counts),
            "summary": self.summary(),
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def looks_like_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a run folder, possibly a damaged one."""
    p = os.fspath(path)
    return os.path.isdir(p) and any(
        os.path.lexists(os.path.join(p, rel)) for rel in (fmt.METADATA_JSON, fmt.METADATA_DB, fmt.SCALARS_DB)
    )


def verify_run(path: str | os.PathLike[str]) -> VerifyReport:
    """Check the run folder at ``path``; never raises for what is in the folder."""
    v = _Verifier(os.path.abspath(os.fspath(path)))
    if not looks_like_run(v.path):
        v.report.is_run = False
        return v.report
    v.run()
    return v.report


@dataclass
class _Snapshot:
    """What ``metadata.db`` says, read in one transaction."""

    committed: dict[tuple[str, str], int] | None = None  # None: no commit points (older run)
    media: list[dict[str, Any]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    kde: list[dict[str, Any]] = field(default_factory=list)


class _Verifier:
    def __init__(self, path: str) -> None:
        self.path = path
        self.report = VerifyReport(path)
        self.status = fmt.STATUS_RUNNING

    # ------------------------------------------------------------ plumbing

    def problem(self, rel: str, message: str, newest_missing: bool = False) -> None:
        self.report.findings.append(Finding(rel, message, True, newest_missing))

    def note(self, rel: str, message: str) -> None:
        self.report.findings.append(Finding(rel, message, False))

    def count(self, key: str, n: int = 1) -> None:
        self.report.counts[key] = self.report.counts.get(key, 0) + n

    @contextlib.contextmanager
    def guard(self, rel: str, what: str) -> Iterator[None]:
        """Turn any error while checking ``rel`` into a problem with it (kohakuvault panics too)."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a corrupt file may raise anything
            self.problem(rel, f"cannot {what}: {_describe(exc)}")

    def full(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    @contextlib.contextmanager
    def opened(self, rel: str, kind: str) -> Iterator[ReadOnlyFile]:
        """``rel`` opened without writing to the run folder (see :class:`ReadOnlyFile`), closed after."""
        f = ReadOnlyFile(self.full(rel), kind)
        try:
            yield f
        finally:
            f.close()

    def checked(self, f: ReadOnlyFile, check: Callable[[Any], _R]) -> _R:
        """``check(handle)`` through ``f.read``: if a writer changed the file while it was
        checked, it is checked again, and only the last attempt's findings and counts stay."""
        findings, counts = self.report.findings, self.report.counts

        def attempt(handle: Any) -> tuple[_R, list[Finding], dict[str, int]]:
            self.report.findings, self.report.counts = list(findings), dict(counts)
            return check(handle), self.report.findings, self.report.counts

        try:
            out, self.report.findings, self.report.counts = f.read(attempt)
        except BaseException:
            self.report.findings, self.report.counts = findings, counts
            raise
        return out

    def tail_note(self, rel: str, text: str) -> None:
        """Note data past the commit point (``text`` ends in "will be removed")."""
        live = ""
        if self.status == fmt.STATUS_RUNNING:
            live = " (or committed in a moment, if the run is being written now)"
        self.note(rel, f"{text} when the run is next written{live}")

    def run(self) -> None:
        with self.guard(fmt.METADATA_JSON, "check it"):
            self.check_metadata_json()
        snap: _Snapshot | None = None
        with self.guard(fmt.METADATA_DB, "check it"):
            snap = self.check_metadata_db()
        committed = snap.committed if snap is not None else None
        for rel, kind in [(fmt.SCALARS_DB, "scalar")] + [(r, "histogram") for r in fmt.HISTOGRAM_FILES.values()]:
            with self.guard(rel, "check it"):
                self.check_vault(rel, kind, committed)
        if snap is None:
            if os.path.exists(self.full(fmt.METADATA_DB)):
                self.note(
                    fmt.METADATA_DB,
                    "media, tables, tensors, KDEs and commit points not checked: this database cannot be read",
                )
        else:
            with self.guard(fmt.MEDIA_DIR, "check media files"):
                self.check_media(snap.media)
            with self.guard(fmt.METADATA_DB, "check tables"):
                self.check_tables(snap.tables, {r["id"] for r in snap.media})
            with self.guard(fmt.TENSORS_DB, "check it"):
                self.check_tensors(snap.tensors, snap.kde)
        with self.guard(fmt.OUTPUT_LOG, "check it"):
            self.check_output(committed)

    # ----------------------------------------------------- metadata.json

    def check_metadata_json(self) -> None:
        rel = fmt.METADATA_JSON
        full = self.full(rel)
        if not os.path.lexists(full):
            self.problem(rel, "missing (the run's name, config and status are gone)")
            return
        with open(full, "rb") as f:
            raw = f.read()
        if not raw.strip():
            self.problem(rel, f"empty ({_plural(len(raw), 'byte')}): truncated")
            return
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self.problem(rel, f"not valid JSON, truncated or corrupted ({_plural(len(raw), 'byte')}): {exc}")
            return
        if not isinstance(meta, dict):
            self.problem(rel, f"holds a JSON {type(meta).__name__}, not an object")
            return
        missing = [k for k in _METADATA_KEYS if k not in meta]
        if missing:
            self.problem(rel, f"missing key(s): {', '.join(missing)}")
        for key, types in _METADATA_KEYS.items():
            value = meta.get(key)
            if key in meta and (isinstance(value, bool) or not isinstance(value, types)):
                self.problem(rel, f"{key} is {_short(value)}, not a {_type_names(types)}")
        status = meta.get("status")
        if isinstance(status, str):
            if status not in fmt.STATUSES:
                self.problem(rel, f"status is {status!r}, not one of {', '.join(fmt.STATUSES)}")
            else:
                self.status = self.report.status = status
        created = meta.get("created_at")
        if isinstance(created, (int, float)) and not isinstance(created, bool) and not math.isfinite(created):
            self.problem(rel, f"created_at is {created!r}")
        version = meta.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool):
            if version > fmt.FORMAT_VERSION:
                self.problem(
                    rel,
                    f"format version {version} is newer than this KohakuBoard's "
                    f"({fmt.FORMAT_VERSION}): upgrade kohakuboard to verify this run",
                )
            elif version < 1:
                self.problem(rel, f"format version {version} does not exist")

    # ------------------------------------------------------- metadata.db

    def sqlite_check(self, rel: str, full_check: bool, committed: bool = True) -> bool:
        """Check ``rel`` as a SQLite file (its size, then SQLite's own check, read-only); report
        what is wrong in one line.  Returns whether SQLite can read it.

        ``committed`` False: nothing in the file was ever committed, so whatever is wrong
        with it loses nothing (a writer creating it, or one that died doing so): a note.
        """
        path = self.full(rel)
        size = os.path.getsize(path)
        report = (
            self.problem
            if committed
            else (
                lambda rel, text: self.note(
                    rel, f"{text} (nothing in it was committed: the writer was creating it, or died doing so)"
                )
            )
        )
        if size == 0:
            report(rel, "empty file (0 bytes): truncated")
            return False
        wrong = [_sqlite_size_problem(path, size)]
        ok = not wrong[0].startswith("not a SQLite")
        if ok:
            pragma = "integrity_check" if full_check else "quick_check"
            try:
                with self.opened(rel, "sql") as f:
                    rows = f.read(lambda db: [r[0] for r in db.execute(f"PRAGMA {pragma}(20)").fetchall()])
            except sqlite3.Error as exc:
                ok = False
                wrong.append(f"SQLite cannot read it: {exc}")
            else:
                if rows != ["ok"]:
                    ok = False
                    lines = [ln for r in rows for ln in str(r).splitlines() if ln and not ln.startswith("***")]
                    shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
                    wrong.append(f"SQLite {pragma} failed: {shown}")
        wrong = [w for w in wrong if w]
        if wrong:
            report(rel, f"damaged ({_plural(size, 'byte')}): {'; '.join(wrong)}")
        return ok

    def check_metadata_db(self) -> _Snapshot | None:
        rel = fmt.METADATA_DB
        if not os.path.lexists(self.full(rel)):
            self.problem(rel, "missing (the run's steps, media, tables, tensors and commit points are gone)")
            return None
        if not self.sqlite_check(rel, full_check=True):
            return None
        with self.opened(rel, "sql") as f:
            return self.checked(f, self.read_metadata_db)

    def read_metadata_db(self, db: sqlite3.Connection) -> _Snapshot | None:
        rel = fmt.METADATA_DB
        try:
            db.execute("BEGIN")  # one snapshot of everything below, even while the daemon writes
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = [t for t in _TABLES if t not in names]
            flag = None
            if "meta" in names:
                row = db.execute("SELECT value FROM meta WHERE key='commit_lengths'").fetchone()
                flag = row[0] if row else None
                row = db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
                if row is None:
                    self.problem(rel, "the meta table has no format_version")
                elif not str(row[0]).isdigit() or int(row[0]) > fmt.FORMAT_VERSION:
                    self.problem(
                        rel, f"format version {row[0]!r} is not one this KohakuBoard reads (up to {fmt.FORMAT_VERSION})"
                    )
            if flag == "1":
                missing += [t for t in _COMMIT_TABLES if t not in names]
            if missing:
                self.problem(rel, f"missing table(s): {', '.join(missing)}")
                return None
            snap = _Snapshot()
            if flag == "1":
                rows = db.execute("SELECT file, name, length FROM committed")
                snap.committed = {(f, n): int(ln) for f, n, ln in rows}
            snap.media = _dicts(db, "SELECT * FROM media ORDER BY id")
            snap.tables = _dicts(db, "SELECT * FROM tables ORDER BY id")
            snap.tensors = _dicts(db, "SELECT * FROM tensors ORDER BY id")
            snap.kde = _dicts(db, "SELECT * FROM kde ORDER BY id")
            bad = db.execute("SELECT COUNT(*) FROM steps WHERE last_step < first_step OR first_step < 0").fetchone()[0]
            if bad:
                self.problem(rel, f"{_plural(bad, 'row')} of the steps table describe impossible step ranges")
            return snap
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")

    # ------------------------------------------------------ ColumnVaults

    def check_vault(self, rel: str, kind: str, committed: dict[tuple[str, str], int] | None) -> None:
        expected = None if committed is None else {n: ln for (f, n), ln in committed.items() if f == rel}
        if not os.path.lexists(self.full(rel)):
            lost = {n: ln for n, ln in (expected or {}).items() if ln > 0}
            if lost:
                self.problem(
                    rel,
                    f"missing, but {_plural(len(lost), 'column')} with "
                    f"{_plural(sum(lost.values()), 'committed row')} should be in it ({_names(lost)})",
                )
            return
        if not self.sqlite_check(rel, full_check=False, committed=expected is None or bool(expected)):
            return

        def check(vault: Any) -> None:
            want = dict(expected) if expected is not None else None  # check_column pops from it
            for name, dtype, length in vault.list_columns():
                with self.guard(rel, f"read column {name!r}"):
                    self.check_column(rel, kind, vault, name, dtype, int(length), want)
            for name, n in (want or {}).items():
                if n > 0:
                    self.problem(rel, f"column {name!r} is missing: {_plural(n, 'row')} {_were(n)} committed")

        with self.opened(rel, "columns") as f:
            self.checked(f, check)

    def check_column(
        self, rel: str, kind: str, vault: Any, name: str, dtype: str, length: int, expected: dict[str, int] | None
    ) -> None:
        col_label = f"column {name!r}: "
        committed = None if expected is None else expected.pop(name, None)
        try:
            fmt.split_column_name(name)
        except ValueError:
            self.problem(rel, f"{col_label}not a rank/name column of KohakuBoard")
            return
        if kind == "scalar" and dtype != fmt.SCALAR_COLUMN_DTYPE:
            self.problem(rel, f"{col_label}has dtype {dtype!r}, expected {fmt.SCALAR_COLUMN_DTYPE!r}")
            return
        if kind != "scalar" and not (dtype == "bytes" or re.fullmatch(r"vec:u8:[0-9]+", dtype)):
            self.problem(rel, f"{col_label}has dtype {dtype!r}, expected 'vec:u8:<record size>' (or 'bytes')")
            return
        n = length
        if expected is not None:
            if committed is None:  # created by a batch that was never committed
                if length:
                    self.tail_note(
                        rel,
                        f"{col_label}{_plural(length, 'uncommitted row')} (the column was "
                        "never committed), will be removed",
                    )
                return
            if length > committed:
                self.tail_note(
                    rel, f"{col_label}uncommitted tail of {_plural(length - committed, 'row')}, will be removed"
                )
                n = committed
            elif length < committed:
                lost = committed - length
                self.problem(
                    rel,
                    f"{col_label}has {_plural(length, 'row')} but {committed} {_were(committed)} "
                    f"committed: the last {_plural(lost, 'committed row')} {_are(lost)} lost",
                    newest_missing=True,
                )
        col = vault[name]
        if kind == "scalar":
            self.count("metrics")
            self.count("points", n)
            self.check_scalars(rel, col_label, col, n)
        else:
            self.count("histogram_columns")
            self.count("histograms", n)
            self.check_histograms(rel, col_label, col, n, rel == fmt.HISTOGRAM_FILES["exact"])

    def check_scalars(self, rel: str, label: str, col: Any, n: int) -> None:
        bad, first = 0, -1
        for start in range(0, n, _SCALAR_CHUNK):
            rec = col.read_array(start, min(_SCALAR_CHUNK, n - start)).view(_REC).reshape(-1)
            wall = rec["wall"]
            wrong = (rec["step"] < 0) | ~np.isfinite(wall) | (wall <= 0)
            k = int(np.count_nonzero(wrong))
            if k:
                if first < 0:
                    first = start + int(np.flatnonzero(wrong)[0])
                bad += k
        if bad:
            self.problem(
                rel,
                f"{label}{_plural(bad, 'record')} of {n} cannot be a logged point "
                f"(negative step or impossible time), the first at row {first}: corrupted",
            )

    def check_histograms(self, rel: str, label: str, col: Any, n: int, exact: bool) -> None:
        itemsize = 4 if exact else 1
        bad, first, why = 0, -1, ""
        for start in range(0, n, _HIST_CHUNK):
            for i, rec in enumerate(col.read(start, min(_HIST_CHUNK, n - start))):
                reason = _histogram_problem(rec, itemsize, exact)
                if reason:
                    if first < 0:
                        first, why = start + i, reason
                    bad += 1
        if bad:
            verb = "does" if bad == 1 else "do"
            self.problem(
                rel,
                f"{label}{_plural(bad, 'histogram record')} of {n} {verb} not parse, the first at row {first}: {why}",
            )

    # ------------------------------------------------------- rich values

    def check_media(self, rows: list[dict[str, Any]]) -> None:
        by_file: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            h, ext = str(r.get("hash")), str(r.get("ext"))
            if not _MEDIA_NAME.fullmatch(h) or not ext.isalnum():
                self.problem(
                    fmt.METADATA_DB, f"media row {r.get('id')} ({_who([r])}) names no valid file: {h!r}.{ext!r}"
                )
                continue
            by_file.setdefault((h, ext), []).append(r)
        for (h, ext), refs in by_file.items():
            rel = f"{fmt.MEDIA_DIR}/{h}.{ext}"
            with self.guard(rel, "check it"):
                full = self.full(rel)
                if not os.path.isfile(full):
                    self.problem(rel, f"missing (logged as {_who(refs)})", newest_missing=True)
                    continue
                self.count("media_files")
                digest, size = _sha256(full)
                wrong = []
                if size != refs[0]["size"]:
                    wrong.append(f"is {_plural(size, 'byte')}, {refs[0]['size']} were logged")
                if digest != h:
                    wrong.append(f"its sha256 is {digest[:16]}..., not the {h[:16]}... of its name")
                if wrong:
                    self.problem(rel, f"modified or corrupted: {' and '.join(wrong)} (logged as {_who(refs)})")

    def check_tables(self, rows: list[dict[str, Any]], media_ids: set[int]) -> None:
        for r in rows:
            where = f"table {r['name']!r} step {r['step']}"
            try:
                columns = json.loads(r["columns"])
                cells = json.loads(r["rows"])
            except (TypeError, ValueError) as exc:
                self.problem(fmt.METADATA_DB, f"{where}: its JSON does not parse: {exc}")
                continue
            if (
                not isinstance(columns, list)
                or not isinstance(cells, list)
                or any(not isinstance(row, list) or len(row) != len(columns) for row in cells)
            ):
                width = len(columns) if isinstance(columns, list) else "?"
                self.problem(fmt.METADATA_DB, f"{where}: rows do not match its {width} columns")
                continue
            self.count("tables")
            refs = [c["$media"] for row in cells for c in row if isinstance(c, dict) and "$media" in c]
            lost = [ref for ref in refs if ref not in media_ids]
            if lost:
                self.problem(
                    fmt.METADATA_DB,
                    f"{where}: {_plural(len(lost), 'media cell')} "
                    f"refer{'s' if len(lost) == 1 else ''} to media rows "
                    f"that do not exist ({', '.join(map(str, lost[:5]))})",
                )

    def check_tensors(self, tensors: list[dict[str, Any]], kdes: list[dict[str, Any]]) -> None:
        rel = fmt.TENSORS_DB
        if not tensors and not kdes:
            return
        if not os.path.lexists(self.full(rel)):
            self.problem(
                rel,
                f"missing, but {_plural(len(tensors), 'tensor')} and {_plural(len(kdes), 'KDE')} were logged into it",
            )
            return
        if not self.sqlite_check(rel, full_check=False):
            return
        with self.opened(rel, "kv") as f:
            self.checked(f, lambda kv: self.check_payloads(rel, kv, tensors, kdes))

    def check_payloads(self, rel: str, kv: Any, tensors: list[dict[str, Any]], kdes: list[dict[str, Any]]) -> None:
        for r in tensors:
            where = f"tensor {r['name']!r} step {r['step']}"
            with self.guard(rel, f"read {where}"):
                try:
                    shape = [int(x) for x in json.loads(r["shape"])]
                    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(r["dtype"]).itemsize
                except (TypeError, ValueError) as exc:
                    self.problem(
                        fmt.METADATA_DB, f"{where}: dtype {r['dtype']!r} / shape {r['shape']!r} do not parse: {exc}"
                    )
                    continue
                self.check_payload(rel, where, kv, r["key"], size)
                self.count("tensors")
        for r in kdes:
            where = f"KDE {r['name']!r} step {r['step']}"
            with self.guard(rel, f"read {where}"):
                self.check_payload(rel, where, kv, r["key"], 16 * int(r["grid_size"]))
                self.count("kde")

    def check_payload(self, rel: str, where: str, kv: Any, key: str, size: int) -> None:
        data = kv.get(key)
        if data is None:
            self.problem(rel, f"{where}: its data (key {key!r}) is missing")
        elif len(data) != size:
            self.problem(rel, f"{where}: its data is {_plural(len(data), 'byte')}, expected {size}")

    # ------------------------------------------------------------ output

    def check_output(self, committed: dict[tuple[str, str], int] | None) -> None:
        rel = fmt.OUTPUT_LOG
        full = self.full(rel)
        size = os.path.getsize(full) if os.path.exists(full) else None
        want = None if committed is None else committed.get((rel, ""))
        self.report.counts["output_bytes"] = size or 0
        if want is None:
            return
        if size is None:
            if want > 0:
                self.problem(rel, f"missing, but {_plural(want, 'byte')} of captured output {_were(want)} committed")
        elif size < want:
            self.problem(
                rel,
                f"is {_plural(size, 'byte')} but {want} {_were(want)} committed: the last "
                f"{_plural(want - size, 'byte')} of captured output {_are(want - size)} lost (truncated)",
                newest_missing=True,
            )
        elif size > want:
            self.tail_note(rel, f"uncommitted tail of {_plural(size - want, 'byte')}, will be removed")


# ----------------------------------------------------------------- helpers


def _sqlite_size_problem(path: str, size: int) -> str:
    """Why the file's size cannot be that of the SQLite database its header describes, or ''.

    SQLite reads missing pages at the end of a file as zeros, so a cut that only
    removes free or unused pages passes its own check; the size gives it away.
    """
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return f"not a SQLite database: its {min(size, 100)}-byte header is wrong (overwritten or truncated)"
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return f"the header's page size {page} is impossible (overwritten)"
    if size % page:
        return f"truncated: {_plural(size, 'byte')} is not a whole number of {page}-byte pages"
    pages = int.from_bytes(header[28:32], "big")
    header_valid = pages > 0 and header[24:28] == header[92:96]
    wal = path + "-wal"
    wal_frames = os.path.exists(wal) and os.path.getsize(wal) > 32  # the WAL may define the size
    if header_valid and not wal_frames and size < pages * page:
        return f"truncated: {_plural(size // page, 'page')} of the {pages} its header counts"
    return ""


def _dicts(db: sqlite3.Connection, sql: str) -> list[dict[str, Any]]:
    cur = db.execute(sql)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def _histogram_problem(rec: bytes, itemsize: int, exact: bool) -> str:
    """Why ``rec`` is not a histogram record (format: "Rich values"), or ''."""
    if len(rec) < _HEADER.size:
        return f"{len(rec)} bytes, shorter than the {_HEADER.size}-byte header"
    step, _, wall, n, nan, posinf, neginf, total, scale = _HEADER.unpack_from(rec)
    if n < 0 or n > (len(rec) - _HEADER.size) // max(itemsize, 1):
        return f"header says {n} bins in a {len(rec)}-byte record"
    body = len(rec) - _HEADER.size
    if n:
        want = 8 * (n + 1) + itemsize * n
        if body != want:
            return f"{n} bins need {want} bytes of edges and counts, the record has {body}"
    elif body % 8:
        return f"{body} bytes after the header of an empty histogram"
    if step < 0 or not math.isfinite(wall) or wall <= 0:
        return f"impossible step {step} or time {wall!r}"
    if min(nan, posinf, neginf, total) < 0 or not (math.isfinite(scale) and scale >= 0):
        return "negative counts or scale in the header"
    if n:
        edges = np.frombuffer(rec, dtype="<f8", count=n + 1, offset=_HEADER.size)
        if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) < 0):
            return "bin edges are not finite and increasing"
        if exact and np.any(np.frombuffer(rec, dtype="<i4", count=n, offset=_HEADER.size + 8 * (n + 1)) < 0):
            return "negative bin counts"
    return ""


def _sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _who(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
    name = str(first.get("name"))
    table, sep, cell = name.rpartition("#")
    what = f"a cell of table {table!r}" if sep and cell.isdigit() else repr(name)
    return f"{what} rank {first.get('rank')} step {first.get('step')}{more}"


def _names(columns: dict[str, int]) -> str:
    names = sorted(columns)
    return ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _type_names(types: Any) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {"str": "string", "dict": "JSON object", "int": "integer", "float": "number"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in types)


def _were(n: int) -> str:
    return "was" if n == 1 else "were"


def _are(n: int) -> str:
    return "is" if n == 1 else "are"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
