"""PyTorch Lightning: ``KohakuBoardLogger``, a Lightning ``Logger``.

::

    from kohakuboard.integrations.lightning import KohakuBoardLogger

    trainer = Trainer(logger=KohakuBoardLogger(name="resnet", project="vision"))

Works with ``lightning`` (``lightning.pytorch``) and, when only that is
installed (or it is the one already imported), ``pytorch_lightning``;
:func:`make_logger_class` builds the class for either explicitly.

Rank zero only, as Lightning expects of a logger: ``log_metrics`` values go to
the run at Lightning's ``step`` as ``global_step`` (values logged at the same
step share one KohakuBoard step), ``log_hyperparams`` goes to the run's config,
``experiment`` is the :class:`kohakuboard.client.Board` (``experiment.log(...)``
takes anything a Board takes), and :meth:`log_image` / :meth:`log_histogram`
log images and histograms at a step.  ``finalize("success")`` finishes the run,
``finalize("failed")`` marks it ``crashed`` (an exception in ``fit``) or
``interrupted`` (Ctrl-C);
logging after that (``trainer.test`` after ``fit``) reopens the same run.
``name`` is the run's project, ``version`` its run id, ``log_dir`` the run
folder; ``save_dir`` is None, so checkpoints stay under the Trainer's
``default_root_dir`` and out of the run folder.
"""

from __future__ import annotations

import os
import sys
from argparse import Namespace
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..client import Board, Histogram, Media
from ._common import StepMapper, jsonable, merge_config, scalar_or_none

__all__ = ["KohakuBoardLogger", "make_logger_class"]


def _framework() -> ModuleType:
    """``lightning.pytorch``, or ``pytorch_lightning`` when only that is installed or already in use."""
    if "pytorch_lightning" in sys.modules and "lightning.pytorch" not in sys.modules:
        return sys.modules["pytorch_lightning"]
    try:
        import lightning.pytorch
    except ImportError:
        try:
            import pytorch_lightning
        except ImportError:
            raise ImportError(
                "kohakuboard.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)"
            ) from None
        return pytorch_lightning
    return lightning.pytorch


def _params(params: Any) -> dict[str, Any]:
    if isinstance(params, Namespace):
        params = vars(params)
    if not isinstance(params, Mapping):
        raise TypeError(f"hyperparameters must be a dict or argparse.Namespace, not {type(params).__name__}")
    return jsonable(dict(params))


def make_logger_class(framework: ModuleType) -> type:
    """Build the logger class for ``framework`` (``lightning.pytorch`` or ``pytorch_lightning``)."""
    import importlib

    logger_mod = importlib.import_module(framework.__name__ + ".loggers.logger")
    utilities = importlib.import_module(framework.__name__ + ".utilities")
    Logger: Any = logger_mod.Logger  # a class of the framework given, so typed as Any
    rank_zero_experiment = logger_mod.rank_zero_experiment
    rank_zero_only = utilities.rank_zero_only

    class KohakuBoardLogger(Logger):
        """Log a Lightning run to KohakuBoard.

        ``KohakuBoardLogger(name=None, project="default", *, run_id=None,
        base_dir=None, config=None, **board_kwargs)``; ``board_kwargs`` go to
        :class:`kohakuboard.client.Board`.  The run opens on first use.
        """

        def __init__(
            self,
            name: str | None = None,
            project: str = "default",
            *,
            run_id: str | None = None,
            base_dir: str | None = None,
            config: dict[str, Any] | None = None,
            **board_kwargs: Any,
        ) -> None:
            super().__init__()
            self._run_name = name
            self._project = project
            self._run_id = run_id
            self._base_dir = base_dir
            self._config = jsonable(dict(config or {}))
            self._board_kwargs = board_kwargs
            self._board: Board | None = None
            self._open = False
            self._steps: StepMapper | None = None

        # ---------------------------------------------------------- the run

        def _ensure(self) -> Board:
            if self._board is not None and self._open:
                return self._board
            kwargs = dict(self._board_kwargs)
            # Rank zero only: one writer, whatever the launch's WORLD_SIZE.
            kwargs.setdefault("rank", 0)
            kwargs.setdefault("world_size", 1)
            if self._board is None:
                board = Board(
                    name=self._run_name,
                    config=self._config,
                    project=self._project,
                    run_id=self._run_id,
                    base_dir=self._base_dir,
                    **kwargs,
                )
            else:  # finalized, then logged to again: resume the same run
                board = Board(
                    name=self._run_name,
                    project=self._project,
                    run_id=self._board.run_id,
                    base_dir=self._board.base_dir,
                    **kwargs,
                )
            self._board, self._open = board, True
            self._run_id = board.run_id
            self._steps = StepMapper(board)
            return board

        def _step_mapper(self) -> StepMapper:
            """The open run's step mapper (opening the run if need be)."""
            self._ensure()
            assert self._steps is not None  # made by _ensure with the board
            return self._steps

        @property
        @rank_zero_experiment
        def experiment(self) -> Board:
            """The run's :class:`kohakuboard.client.Board` (a no-op stand-in on other ranks)."""
            return self._ensure()

        @property
        def name(self) -> str:
            return self._project

        @property
        def version(self) -> str | None:
            if self._run_id is None and rank_zero_only.rank == 0:
                self._ensure()
            return self._run_id

        @property
        def save_dir(self) -> str | None:
            return None

        @property
        def root_dir(self) -> str | None:
            return os.path.join(self._board.base_dir, self._project) if self._board is not None else None

        @property
        def log_dir(self) -> str | None:
            """The run folder (rank zero, once the run is open)."""
            return self._board.path if self._board is not None else None

        # ---------------------------------------------------------- logging

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            config = _params(params)
            if not config:
                return
            if self._board is None:  # not open yet: the run is created with it
                self._config.update(config)
                return
            self._ensure()
            merge_config(self._board, config)

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
            values = {}
            for key, value in metrics.items():
                number = scalar_or_none(value)
                if number is not None:
                    values[key] = number
            if values:
                self._step_mapper().log(values, step)

        @rank_zero_only
        def log_image(self, key: str, images: Any, step: int | None = None, caption: Any = None) -> None:
            """Log an image (anything :class:`Media` takes), or a list of them as ``key/0``, ``key/1``, ..."""
            if isinstance(images, (list, tuple)):
                captions = list(caption) if isinstance(caption, (list, tuple)) else [caption or ""] * len(images)
                values = {
                    f"{key}/{i}": Media(img, caption=str(c or "")) for i, (img, c) in enumerate(zip(images, captions))
                }
            else:
                values = {key: Media(images, caption=str(caption or ""))}
            self._step_mapper().log(values, step)

        @rank_zero_only
        def log_histogram(self, key: str, values: Any, step: int | None = None, num_bins: int = 64) -> None:
            """Log a histogram of ``values`` (binned by the daemon)."""
            self._step_mapper().log({key: Histogram(values, num_bins=num_bins)}, step)

        # ---------------------------------------------------------- the end

        @rank_zero_only
        def save(self) -> None:
            if self._board is not None and self._open:
                self._board.flush()

        @rank_zero_only
        def finalize(self, status: str) -> None:
            if self._board is not None and self._open:
                self._open = False
                if status == "failed":
                    # Lightning calls this inside its except block, for Ctrl-C and errors alike
                    exc = sys.exc_info()[1]
                    ours = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
                else:
                    ours = "finished"
                self._board.finish(status=ours)

    KohakuBoardLogger.__module__ = __name__
    KohakuBoardLogger.__qualname__ = "KohakuBoardLogger"
    return KohakuBoardLogger


KohakuBoardLogger = make_logger_class(_framework())
