"""Hugging Face Transformers: ``KohakuBoardCallback``, a ``transformers.TrainerCallback``.

::

    from kohakuboard.integrations.transformers import KohakuBoardCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[KohakuBoardCallback()])
    # or: trainer.add_callback(KohakuBoardCallback(name="bert-tiny", project="nlp"))

What it records:

* config: ``training_args`` (``TrainingArguments.to_sanitized_dict()``) and
  ``model_config`` (``model.config.to_dict()``), plus the ``config=`` you pass;
* every ``Trainer.log`` call (``on_log``), names rewritten as the other
  trackers do (``eval_loss`` -> ``eval/loss``, ``test_*`` -> ``test/*``,
  everything else ``train/*``; non-numbers skipped), with ``global_step`` =
  the Trainer's ``state.global_step``; calls at the same global step (the
  training loss and the evaluation of that step) share one KohakuBoard step;
* status: ``finished`` when training ends (``on_train_end``); when training
  began and never ended, ``interrupted`` if Ctrl-C (``KeyboardInterrupt``)
  ended the script, else ``crashed`` (an uncaught exception, or one the script
  caught before it exited).  Logs after training (``trainer.evaluate()``)
  reopen the same run and finish it again at exit.

Only the main process (``state.is_world_process_zero``) logs by default;
``all_ranks=True`` opens the run on every rank (each point records its rank;
under ``torchrun`` all ranks share the launch-derived run id).
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from typing import Any

from transformers import TrainerCallback

from ..client import Board
from ._common import StepMapper, jsonable, scalar_or_none

__all__ = ["KohakuBoardCallback", "rewrite_logs"]

_live: weakref.WeakSet[KohakuBoardCallback] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_installed = False


def rewrite_logs(logs: dict[str, Any]) -> dict[str, float]:
    """Trainer log keys to KohakuBoard names; only numbers are kept."""
    out: dict[str, float] = {}
    for key, value in logs.items():
        number = scalar_or_none(value)
        if number is None:
            continue
        if key.startswith("eval_"):
            name = "eval/" + key[5:]
        elif key.startswith("test_"):
            name = "test/" + key[5:]
        else:
            name = "train/" + key
        out[name] = number
    return out


def _finish_unended() -> None:
    """At exit (before the client's own at-exit hook): training that never ended crashed,
    or was interrupted when the exception that ends the script is a ``KeyboardInterrupt``."""
    last = getattr(sys, "last_type", None)  # set for the exception that ended the script, if any
    status = "interrupted" if isinstance(last, type) and issubclass(last, KeyboardInterrupt) else "crashed"
    for cb in list(_live):
        if cb._training:
            try:
                cb.finish(status=status)
            except Exception:  # at exit there is nobody left to raise to
                pass


def _install_exit_hook() -> None:
    # Registered after the first Board exists, so it runs before the client's
    # at-exit hook (atexit runs last-registered first).
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            atexit.register(_finish_unended)
            _hook_installed = True


class KohakuBoardCallback(TrainerCallback):
    """Log a ``transformers.Trainer`` run to KohakuBoard.

    ``KohakuBoardCallback(name=None, project="default", *, run_id=None,
    base_dir=None, config=None, all_ranks=False, log_model_config=True,
    **board_kwargs)``.  ``name`` defaults to ``TrainingArguments.run_name``;
    ``board_kwargs`` go to :class:`kohakuboard.client.Board`.  The run opens at
    ``on_train_begin`` (or the first ``on_log``); :attr:`board` is the open
    :class:`Board`, for logging anything else into the same run.
    """

    def __init__(
        self,
        name: str | None = None,
        project: str = "default",
        *,
        run_id: str | None = None,
        base_dir: str | None = None,
        config: dict[str, Any] | None = None,
        all_ranks: bool = False,
        log_model_config: bool = True,
        **board_kwargs: Any,
    ) -> None:
        self.name = name
        self.project = project
        self.run_id = run_id
        self.base_dir = base_dir
        self.config = dict(config or {})
        self.all_ranks = all_ranks
        self.log_model_config = log_model_config
        self.board_kwargs = board_kwargs
        self._board: Board | None = None
        self._board_open = False
        self._steps: StepMapper | None = None
        self._training = False
        _live.add(self)

    @property
    def board(self) -> Board | None:
        """The open Board of this callback (None before the run opened, or on a rank that does not log)."""
        return self._board

    # -------------------------------------------------------------- helpers

    def _logs_here(self, state: Any) -> bool:
        return self.all_ranks or bool(getattr(state, "is_world_process_zero", True))

    def _run_config(self, args: Any, model: Any) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if args is not None:
            to_dict = getattr(args, "to_sanitized_dict", None) or getattr(args, "to_dict", None)
            if to_dict is not None:
                config["training_args"] = jsonable(to_dict())
        model_config = getattr(model, "config", None)
        if self.log_model_config and model_config is not None and hasattr(model_config, "to_dict"):
            config["model_config"] = jsonable(model_config.to_dict())
        config.update(jsonable(self.config))
        return config

    def _open(self, args: Any, state: Any, model: Any) -> Board | None:
        if not self._logs_here(state):
            return None
        board = self._board
        if board is not None and self._board_open:
            return board
        kwargs = dict(self.board_kwargs)
        if not self.all_ranks:
            # Only the main process logs: one writer, whatever the launch's WORLD_SIZE.
            kwargs.setdefault("rank", 0)
            kwargs.setdefault("world_size", 1)
        name = self.name or getattr(args, "run_name", None) or None
        if board is not None:  # finished at on_train_end; later logs reopen (resume) the same run
            self._board = Board(name=name, project=self.project, run_id=board.run_id, base_dir=board.base_dir, **kwargs)
        else:
            self._board = Board(
                name=name,
                config=self._run_config(args, model),
                project=self.project,
                run_id=self.run_id,
                base_dir=self.base_dir,
                **kwargs,
            )
        self._board_open = True
        self._steps = StepMapper(self._board)
        _install_exit_hook()
        return self._board

    # -------------------------------------------------------------- events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._open(args, state, model) is not None:
            self._training = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, model: Any = None, **kwargs: Any
    ) -> None:
        if not logs:
            return
        board = self._open(args, state, model)
        if board is None:
            return
        values = rewrite_logs(logs)
        if not values:
            return
        assert self._steps is not None  # made by _open with the board
        self._steps.log(values, int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.finish()

    def finish(self, status: str | None = None) -> None:
        """Finish the run now (``status`` "finished", "crashed" or "interrupted"); later logs reopen it."""
        board = self._board
        self._training = False
        if board is not None and self._board_open:
            self._board_open = False
            board.finish(status=status)
