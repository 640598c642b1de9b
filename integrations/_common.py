"""Helpers shared by the integrations; only the public client API is used."""

from __future__ import annotations

import enum
import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """A JSON-ready copy of ``obj``: what JSON cannot hold becomes its ``str()``.

    Framework configs hold enums, dtypes, paths and objects; a config must
    never stop training, so they are kept as text.  Non-finite floats become
    strings too (``"nan"``, ``"inf"``).
    """
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    module = type(obj).__module__ or ""
    if module.startswith(("numpy", "torch")) and callable(getattr(obj, "tolist", None)):
        try:
            return jsonable(obj.tolist())  # numpy scalars and arrays, tensors
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def scalar_or_none(value: Any) -> float | None:
    """``float(value)`` for numbers (Python, numpy, one-element tensors); None otherwise."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        n = numel() if callable(numel) else numel
        if n is not None and int(n) != 1:
            return None
        if hasattr(value, "detach"):
            value = value.detach().reshape(-1)[0].float().item()
        elif hasattr(value, "reshape"):
            value = value.reshape(-1)[0]
        return float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def merge_config(board: Any, config: dict[str, Any]) -> None:
    """Add ``config`` to the config of ``board``'s run, which is already open.

    The public API sets a run's config when a Board opens it, and a Board that
    opens an existing ``run_id`` merges its config into the run's (rank 0
    only).  So a short-lived second Board on the same run does it: it logs
    nothing, captures no output, and finishing it leaves the run running while
    ``board`` is attached.
    """
    from ..client import Board

    if not config:
        return
    extra = Board(
        name=board.name,
        config=config,
        project=board.project,
        run_id=board.run_id,
        base_dir=board.base_dir,
        capture_output=False,
        rank=0,
        world_size=board.world_size,
        local_rank=0,
    )
    extra.finish()


class StepMapper:
    """Log values at a framework's ``global_step`` without step inflation.

    Every ``log()`` call gets its own step in KohakuBoard; frameworks instead
    log many values separately at one global step.  So the first call at a new
    global step moves ``board.global_step`` there and takes a new step, and
    every later call at the same global step reuses that step
    (``log(auto_step=False)``): values with the same global step share one
    step, and each keeps its own wall time.  ``global_step=None`` takes a new
    step at the current global step.
    """

    __slots__ = ("board", "last")

    def __init__(self, board: Any) -> None:
        self.board = board
        self.last: int | None = None

    def log(self, values: dict[str, Any], global_step: Any = None) -> None:
        if not values:
            return
        board = self.board
        if global_step is None:
            board.log(**values)
            self.last = None
            return
        gs = int(global_step)
        if gs == self.last:
            board.log(auto_step=False, **values)
            return
        delta = gs - board.global_step
        if delta:
            board.step(delta)
        board.log(**values)
        self.last = gs
