"""Text forms of a scalar series shared by ``kobo export`` and the viewer's CSV download.

CSV columns: ``metric,rank,step,global_step,wall,value``; NaN and infinities
are written ``nan``, ``inf``, ``-inf``; floats with ``repr`` (round-trip exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

CSV_COLUMNS = ("metric", "rank", "step", "global_step", "wall", "value")


def csv_header() -> str:
    return ",".join(CSV_COLUMNS) + "\n"


def csv_field(name: str) -> str:
    """``name`` quoted as CSV needs (commas, quotes, line breaks)."""
    if any(c in name for c in ',"\n\r'):
        return '"' + name.replace('"', '""') + '"'
    return name


def csv_value(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def csv_lines(metric: str, rank: int, series: Any) -> Iterator[str]:
    """One CSV line per point of ``series`` (a reader's structured array), in logging order."""
    quoted = csv_field(metric)
    steps, gsteps, walls, values = (series[f].tolist() for f in ("step", "global_step", "wall", "value"))
    for st, gs, w, v in zip(steps, gsteps, walls, values):
        yield f"{quoted},{rank},{st},{gs},{csv_value(w)},{csv_value(v)}\n"
