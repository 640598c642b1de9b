"""``kobo``: list, show, export and verify runs.  A thin layer over :mod:`kohakuboard.storage.reader`
and :mod:`kohakuboard.storage.verify`."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import click

from ..protocol.errors import KoboError

_DIR_OPTION = click.option(
    "--dir",
    "base_dir",
    default="./kohakuboard",
    show_default=True,
    envvar="KOBO_BASE_DIR",
    help="Base directory holding {project}/{run_id} folders. Env: KOBO_BASE_DIR.",
)


def _fail(exc: BaseException) -> click.ClickException:
    return click.ClickException(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))


def _when(ts: Any) -> str:
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return "-"


def _open(run: str, base_dir: str) -> Any:
    from ..storage.reader import RunReader, find_run

    return RunReader(find_run(run, base_dir))


# No automatic environment prefix: only the documented variables (KOBO_BASE_DIR) are read, never
# KOBO_<COMMAND>_<OPTION> by accident.
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kohakuboard", prog_name="kobo", message="%(prog)s %(version)s")
def main() -> None:
    """Look at KohakuBoard runs: list them, show one, export its data, check it for damage."""


@main.command("list")
@click.argument("directory", default="./kohakuboard", required=False, envvar="KOBO_BASE_DIR")
def list_cmd(directory: str) -> None:
    """List every run under DIRECTORY (default $KOBO_BASE_DIR or ./kohakuboard), oldest first.

    One line per {project}/{run_id} folder: name, status, creation time and how
    many metrics it has (any rank; "?" if its data cannot be read).  Folders
    without a readable metadata.json are skipped.
    """
    import os

    from ..storage.reader import RunReader, list_runs

    if not os.path.isdir(directory):
        raise click.ClickException(f"{directory} is not a directory (no KohakuBoard runs there)")
    runs = list_runs(directory)
    if not runs:
        click.echo(f"no runs under {directory}")
        return
    rows: list[tuple[str, ...]] = []
    for info in runs:
        try:
            with RunReader(info.path) as r:
                n_metrics = str(len(r.list_metrics(rank=None)))
        except (KoboError, OSError):
            n_metrics = "?"
        rows.append(
            (
                f"{info.project}/{info.run_id}",
                info.name,
                info.status,
                _when(info.created_at),
                n_metrics,
                info.annotation or "-",
            )
        )
    header: tuple[str, ...] = ("RUN", "NAME", "STATUS", "CREATED", "METRICS", "ANNOTATION")
    if not any(info.annotation for info in runs):  # the column only when some run has one
        header, rows = header[:-1], [row[:-1] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command()
@click.argument("run")
@_DIR_OPTION
@click.option(
    "--json", "as_json", is_flag=True, help='Print the summary as JSON (NaN as null, infinities as "inf"/"-inf").'
)
@click.option(
    "--output",
    "show_output",
    is_flag=True,
    help="Print the run's captured output (logs/output.log; stderr lines start with [stderr]) instead.",
)
@click.option("--strip-ansi", is_flag=True, help="With --output: remove ANSI colour and cursor codes.")
def show(run: str, base_dir: str, as_json: bool, show_output: bool, strip_ansi: bool) -> None:
    """Show RUN (a path, project/run_id or run id): metadata, config and every metric.

    Each metric is listed with its point count, step range and last value (of
    its lowest rank), plus, when several ranks logged it, those ranks and each
    one's point count ("ranks 0,1,2,3 (points 10,10,10,10)").  The "ranks:"
    line counts the ranks that logged scalars, and gives the world size a
    distributed launch recorded.  Status "running?" means metadata.json says
    running but no daemon holds the run open: its clients and daemon are gone.
    """
    if strip_ansi and not show_output:
        raise click.UsageError("--strip-ansi goes with --output")
    if show_output:
        try:
            with _open(run, base_dir) as r:
                text = r.read_output(strip_ansi=strip_ansi)
        except (KoboError, OSError) as exc:
            raise _fail(exc) from exc
        click.echo(text, nl=False, color=True)  # as logged (click would strip codes into a pipe)
        return
    try:
        with _open(run, base_dir) as r:
            summary = r.summary()
            readers = {
                "media": r.media,
                "table": r.tables,
                "histogram": r.histograms,
                "tensor": r.tensors,
                "kde": r.kde,
            }
            item_counts = {
                kind: {name: len(readers[kind](name)) for name in names} for kind, names in summary["items"].items()
            }
    except (KoboError, OSError, KeyError) as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo(json.dumps(_json_safe(summary), indent=2, default=str, allow_nan=False))
        return
    click.echo(f"run:      {summary['project']}/{summary['run_id']}")
    click.echo(f"name:     {summary['name']}")
    note = summary["metadata"].get("annotation")
    if isinstance(note, str) and note:
        click.echo(f"annotation: {note}")
    stale = " (no daemon holds this run open: its clients and daemon are gone without marking it)"
    click.echo(f"status:   {summary['status']}{stale if summary['status'] == 'running?' else ''}")
    click.echo(f"created:  {_when(summary['created_at'])}")
    click.echo(f"finished: {_when(summary['finished_at'])}")
    click.echo(f"path:     {summary['path']}")
    world = summary["metadata"].get("world_size")
    world_text = f", world size {world}" if isinstance(world, int) and not isinstance(world, bool) and world > 1 else ""
    click.echo(f"ranks:    {len(summary['ranks'])} ({', '.join(map(str, summary['ranks'])) or '-'}){world_text}")
    dropped = summary.get("dropped") or {}
    if dropped.get("calls") or dropped.get("lines"):
        lines = f" and {dropped['lines']} output line(s)" if dropped.get("lines") else ""
        click.echo(
            f"dropped:  {dropped.get('calls', 0)} log() call(s) ({dropped.get('values', 0)} value(s)){lines} discarded "
            "by the drop policy while the daemon could not keep up"
        )
    click.echo("config:")
    for key, value in summary["config"].items():
        click.echo(f"  {key}: {json.dumps(value)}")
    items = summary.get("items") or {}
    for kind, label in (
        ("media", "media"),
        ("table", "tables"),
        ("histogram", "histograms"),
        ("tensor", "tensors"),
        ("kde", "kernel densities"),
    ):
        if items.get(kind):
            click.echo(f"{label}: {', '.join(f'{n} ({c})' for n, c in item_counts[kind].items())}")
    click.echo(f"metrics ({len(summary['metrics'])}):")
    if summary["metrics"]:
        width = max(len(n) for n in summary["metrics"])
        for name, m in summary["metrics"].items():
            if not m["points"]:
                click.echo(f"  {name.ljust(width)}  0 points")
                continue
            extra = ""
            if len(m["ranks"]) > 1:
                counts = ",".join(str(m["points_by_rank"][rk]) for rk in m["ranks"])
                extra = f"  ranks {','.join(map(str, m['ranks']))} (points {counts})"
            click.echo(
                f"  {name.ljust(width)}  {m['points']} point{'' if m['points'] == 1 else 's'}  steps {m['first_step']}..{m['last_step']}"
                f"  last {m['last_value']:.6g}{extra}"
            )


@main.command()
@click.argument("run")
@_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_context
def verify(ctx: click.Context, run: str, base_dir: str, as_json: bool) -> None:
    """Check RUN (a path, project/run_id or run id) for damage.

    Checks metadata.json, every database file (SQLite's own check), each
    column against its committed length, every scalar and histogram record,
    media files (exist, size and sha256 of their name), tensor and KDE data
    and logs/output.log.  Prints one line per problem (the file, then what is
    wrong) and a summary line.  An uncommitted tail (rows of a batch whose
    writer died before committing it) is a note, not damage: the next writer
    removes it and the client re-sends that batch.

    Exit code: 0 intact, 1 damaged, 2 not a run.
    """
    import os

    from ..protocol.errors import RunNotFound
    from ..storage.reader import find_run
    from ..storage.verify import looks_like_run, verify_run

    try:
        path = find_run(run, base_dir)
    except RunNotFound as exc:
        # A run whose metadata.json is gone is still a (damaged) run.
        candidates = [run, os.path.join(base_dir, run)] if not os.path.isabs(run) else [run]
        found = next((p for p in candidates if looks_like_run(p)), None)
        if found is None:
            if as_json:
                click.echo(json.dumps({"path": run, "run": False, "ok": False, "exit_code": 2, "error": str(exc)}))
            else:
                click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)
        path = found
    report = verify_run(path)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for finding in report.findings:
            click.echo(str(finding))
        click.echo(report.summary())
    ctx.exit(report.exit_code)


def _json_number(x: float) -> Any:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float made valid JSON (see :func:`_json_number`)."""
    if isinstance(obj, float):
        return _json_number(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _selection(reader: Any, metrics: tuple[str, ...], rank: str) -> list[tuple[str, int]]:
    """The (metric, rank) pairs to export; raises KeyError for a metric that is not there.

    Resolved before anything is written, so a typo never leaves half a file.
    """
    if rank != "all" and not metrics:
        have = reader.ranks()
        if int(rank) not in have and (have or int(rank) != 0):
            raise KeyError(
                f"run {reader.path} has no scalars from rank {rank} "
                f"(ranks with scalars: {', '.join(map(str, have)) or 'none'}); use --rank N or --rank all"
            )
    names = list(dict.fromkeys(metrics)) or reader.list_metrics(rank=None if rank == "all" else int(rank))
    out = []
    for name in names:
        if rank == "all":
            ranks = reader.ranks(name)
            if not ranks:
                reader.series_by_rank(name)  # raises KeyError naming the metric and close names
        else:
            ranks = [int(rank)]
            if int(rank) not in reader.ranks(name):
                reader.series(name, int(rank))  # raises KeyError naming the metric, ranks, close names
        out += [(name, r) for r in ranks]
    return out


def _rows(reader: Any, selection: list[tuple[str, int]]) -> Iterator[tuple[str, int, Any]]:
    for name, r in selection:
        yield name, r, reader.series(name, r)


@main.command()
@click.argument("run")
@_DIR_OPTION
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="csv: header metric,rank,step,global_step,wall,value; NaN and infinities are written "
    "nan, inf, -inf. jsonl: one JSON object per point with the same keys; NaN is null and "
    'infinities are the strings "inf" and "-inf" (so every line is valid JSON).',
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Only this metric (repeatable). Default: every metric of the chosen rank(s).",
)
@click.option("--rank", default="0", show_default=True, help="Rank to export (an integer), or 'all'.")
@click.option(
    "-o", "--output", type=click.File("w", encoding="utf-8"), default="-", help="File to write (default stdout)."
)
@click.option(
    "--media-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write every logged media item (and table cell) to this directory, as {name}_{step:08d}_{hash8}.{ext}.",
)
def export(
    run: str, base_dir: str, fmt: str, metrics: tuple[str, ...], rank: str, output: TextIO, media_dir: str | None
) -> None:
    """Export the scalar series of RUN as CSV or JSON lines (and media files with --media-dir).

    RUN is a run folder path, project/run_id or a run id.  Every point is
    written, in logging order, metric by metric and rank by rank.
    """
    from ..storage.export import csv_header, csv_lines

    if rank != "all" and not rank.lstrip("-").isdigit():
        raise click.BadParameter("must be an integer or 'all'", param_hint="--rank")
    try:
        with _open(run, base_dir) as r:
            if media_dir is not None:
                n = _export_media(r, media_dir)
                click.echo(f"wrote {n} media file(s) to {media_dir}", err=True)
            selection = _selection(r, metrics, rank)
            if fmt == "csv":
                output.write(csv_header())
            for name, rk, s in _rows(r, selection):
                if fmt == "csv":
                    output.writelines(csv_lines(name, rk, s))
                else:
                    steps, gsteps, walls, values = (s[f].tolist() for f in ("step", "global_step", "wall", "value"))
                    for st, gs, w, v in zip(steps, gsteps, walls, values):
                        output.write(
                            json.dumps(
                                {
                                    "metric": name,
                                    "rank": rk,
                                    "step": st,
                                    "global_step": gs,
                                    "wall": _json_number(w),
                                    "value": _json_number(v),
                                }
                            )
                            + "\n"
                        )
    except BrokenPipeError:
        raise  # `kobo export ... | head`: click exits quietly on EPIPE
    except (KoboError, OSError, KeyError) as exc:
        raise _fail(exc) from exc


def _export_media(reader: Any, media_dir: str) -> int:
    import os
    import re
    import shutil

    os.makedirs(media_dir, exist_ok=True)
    n = 0
    rows = [row for name in reader.list_items()["media"] for row in reader.media(name, rank=None)]
    for table in reader.list_items()["table"]:
        for t in reader.tables(table, rank=None):
            rows += [c for row in t["rows"] for c in row if isinstance(c, dict) and "hash" in c]
    for row in rows:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", row["name"]).strip("_") or "media"
        target = os.path.join(media_dir, f"{safe}_{row['step']:08d}_{row['hash'][:8]}.{row['ext']}")
        shutil.copyfile(row["path"], target)
        n += 1
    return n


@main.command("open")
@click.argument("directory", default="./kohakuboard", required=False, envvar="KOBO_BASE_DIR")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Loopback by default; other users of this machine still need the token.",
)
@click.option(
    "--port",
    default=48889,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port; if it is taken, a free one is used (and said).",
)
@click.option("--browser", is_flag=True, help="Open the page in a web browser.")
@click.option(
    "--no-token",
    is_flag=True,
    help="Do not ask for the token (loopback addresses only: anyone on this machine can then read the runs).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Another name the page may be reached by (Host header check against DNS rebinding); repeatable.",
)
def open_cmd(
    directory: str, host: str, port: int, browser: bool, no_token: bool, allowed_hosts: tuple[str, ...]
) -> None:
    """Open a live web viewer over DIRECTORY (default $KOBO_BASE_DIR or ./kohakuboard).

    Prints the URL to open; it carries a random token that the page exchanges
    for a cookie.  The viewer only reads: it never writes into a run.  Runs
    copied into DIRECTORY appear without a restart; running runs update live.
    """
    import os

    from ..viewer.serve import ServeError, serve

    if not os.path.isdir(directory):
        raise click.ClickException(f"{directory} is not a directory (no KohakuBoard runs there)")
    try:
        serve(
            os.path.abspath(directory),
            host=host,
            port=port,
            token=None if no_token else "",
            allowed_hosts=allowed_hosts,
            open_browser=browser,
            echo=click.echo,
        )
    except ServeError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command(
    "serve", add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve_cmd(args: tuple[str, ...]) -> None:
    """The team viewer with accounts: the same as kobo-serve ARGS (`kobo serve --help`)."""
    from ..viewer.serve_cli import main as serve_main

    serve_main.main(args=list(args), prog_name="kobo serve")


@main.group("import")
def import_group() -> None:
    """Bring runs written by other tools into KohakuBoard run folders."""


@import_group.command("tensorboard")
@click.argument("logdir", type=click.Path(exists=True, file_okay=False))
@click.option("--project", default="default", show_default=True, help="Project to put the runs in.")
@_DIR_OPTION
@click.option(
    "--replace",
    is_flag=True,
    help="Import again a directory whose event files changed since it was imported (its run is rewritten).",
)
def import_tensorboard(logdir: str, project: str, base_dir: str, replace: bool) -> None:
    """Convert the TensorBoard event files under LOGDIR: one run per directory of event files.

    Scalars, images, histograms, text, audio and hparams keep their step (as
    global_step) and wall time.  Runs already imported are skipped, so running
    it twice creates no duplicates.  Needs tensorboardX or tensorboard
    (pip install 'kohakuboard[tensorboard]').  Exit code 1 if a directory failed.
    """
    from ..integrations import _tfevents, tbimport

    try:
        _tfevents.protos()
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    if not tbimport.find_event_dirs(logdir):
        raise click.ClickException(f"no TensorBoard event files (*tfevents*) under {logdir}")
    total = tbimport.total_bytes(logdir)
    with click.progressbar(length=total, label="importing", file=sys.stderr, show_eta=True, show_pos=False) as bar:
        results = tbimport.import_logdir(
            logdir, project=project, base_dir=base_dir, replace=replace, progress=bar.update
        )
        bar.update(max(0, total - bar.pos))
    for line in tbimport.iter_summary(results):
        click.echo(line)
    n = {a: sum(r.action == a for r in results) for a in ("imported", "replaced", "skipped", "failed")}
    click.echo(f"{n['imported']} imported, {n['replaced']} replaced, {n['skipped']} skipped, {n['failed']} failed")
    if n["failed"]:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
