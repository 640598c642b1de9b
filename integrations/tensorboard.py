"""TensorBoard's writer API on KohakuBoard: change the import line, keep the script.

::

    # from torch.utils.tensorboard import SummaryWriter
    from kohakuboard.integrations.tensorboard import SummaryWriter

    writer = SummaryWriter("runs/exp1")          # the run's name; project/base_dir/config= as keywords
    writer.add_scalar("loss", loss, global_step)
    writer.close()

Supported with ``torch.utils.tensorboard``'s signatures: ``add_scalar``,
``add_scalars``, ``add_image``, ``add_images``, ``add_histogram``,
``add_text``, ``add_hparams``, ``add_figure`` (needs matplotlib), ``flush``,
``close``, ``get_logdir`` and ``with SummaryWriter() as w:``.  Needs neither
torch nor tensorboard (tensors are read through their own methods).

Steps: ``global_step`` becomes the run's ``global_step``.  Every value logged
with the same ``global_step`` as the call before shares that call's step
(``log(auto_step=False)``), so a loop that calls ``add_scalar`` ten times per
step stores ten metrics at one step, not ten steps.  A call without
``global_step`` takes a new step at the current global step.

Differences: ``walltime=`` is ignored (each value gets the time it was
logged); ``purge_step``, ``max_queue``, ``flush_secs`` and
``filename_suffix`` are accepted and have no effect.  ``add_text`` stores a
one-cell :class:`~kohakuboard.client.Table` (column ``text``); ``add_scalars``
stores ``main_tag/tag`` metrics in this run (TensorBoard makes sub-runs);
``add_hparams`` merges the hyperparameters into the run's config and logs the
metrics as scalars.  The other ``add_*`` methods (graph, embedding, audio,
video, PR curves, mesh, custom scalars) warn once and store nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from typing import Any

from ..client import Board, Histogram, Media, Table
from ._common import StepMapper, jsonable, merge_config

__all__ = ["SummaryWriter"]

_UNSUPPORTED = (
    "add_graph",
    "add_onnx_graph",
    "add_embedding",
    "add_audio",
    "add_video",
    "add_pr_curve",
    "add_pr_curve_raw",
    "add_mesh",
    "add_custom_scalars",
    "add_custom_scalars_multilinechart",
    "add_custom_scalars_marginchart",
    "add_histogram_raw",
    "add_tensor",
    "add_image_with_boxes",
)


def _numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _to_hwc(arr: Any, dataformats: str) -> Any:
    """``arr`` in ``dataformats`` (CHW, HWC, HW, NCHW, NHWC, ...) as HWC; N images tiled like TensorBoard."""
    fmt = dataformats.upper()
    if len(set(fmt)) != len(fmt) or arr.ndim != len(fmt):
        raise ValueError(f"image of shape {arr.shape} does not match dataformats={dataformats!r}")
    if len(fmt) == 4:
        return _grid([arr.transpose([fmt.index(c) for c in "NHWC"])[i] for i in range(arr.shape[fmt.index("N")])])
    if len(fmt) == 3:
        return arr.transpose([fmt.index(c) for c in "HWC"])
    if len(fmt) == 2:
        return arr.transpose([fmt.index(c) for c in "HW"])[:, :, None]
    raise ValueError(f"unsupported dataformats={dataformats!r}")


def _grid(images: list[Any], ncols: int = 8) -> Any:
    """Tile HWC images of one size into rows of ``ncols``, as TensorBoard's ``make_grid``."""
    import numpy as np

    if not images:
        raise ValueError("no images to log")
    channels = max(im.shape[2] for im in images)
    images = [np.repeat(im, channels, 2) if im.shape[2] == 1 and channels > 1 else im for im in images]
    h, w = images[0].shape[:2]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError("images logged together must have one size")
    ncols = min(len(images), ncols)
    nrows = -(-len(images) // ncols)
    canvas = np.zeros((h * nrows, w * ncols, channels), dtype=images[0].dtype)
    for i, im in enumerate(images):
        y, x = divmod(i, ncols)
        canvas[y * h : (y + 1) * h, x * w : (x + 1) * w] = im
    return canvas


def _uint8(hwc: Any) -> Any:
    """Pixels as TensorBoard scales them: uint8 kept, anything else taken as [0, 1] floats."""
    import numpy as np

    if hwc.dtype == np.uint8:
        return np.ascontiguousarray(hwc)
    return np.ascontiguousarray((hwc.astype(np.float32) * 255).clip(0, 255).astype(np.uint8))


def _figure_pixels(figure: Any, close: bool) -> Any:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.array(canvas.buffer_rgba(), dtype=np.uint8)
    if close:
        import matplotlib.pyplot as plt

        plt.close(figure)
    return pixels


class SummaryWriter:
    """``torch.utils.tensorboard.SummaryWriter`` writing a KohakuBoard run.

    ``SummaryWriter(log_dir=None, comment="", purge_step=None, max_queue=10,
    flush_secs=120, filename_suffix="", *, project="default", run_id=None,
    base_dir=None, config=None, **board_kwargs)``: ``log_dir`` names the run
    (default ``runs/<time>_<host><comment>`` as TensorBoard's); the run folder
    is ``{base_dir}/{project}/{run_id}`` (:meth:`get_logdir`); the other
    keywords go to :class:`kohakuboard.client.Board`.  :attr:`board` is the run's
    Board, for anything TensorBoard has no method for.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        comment: str = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: int = 120,
        filename_suffix: str = "",
        *,
        project: str = "default",
        run_id: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        config: dict[str, Any] | None = None,
        **board_kwargs: Any,
    ) -> None:
        if log_dir is None:
            stamp = time.strftime("%b%d_%H-%M-%S")
            log_dir = os.path.join("runs", f"{stamp}_{socket.gethostname()}{comment}")
        self.board = Board(
            name=os.fspath(log_dir),
            config=jsonable(config or {}),
            project=project,
            run_id=run_id,
            base_dir=base_dir,
            **board_kwargs,
        )
        self._steps = StepMapper(self.board)
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # ------------------------------------------------------------ helpers

    @property
    def log_dir(self) -> str:
        """The run folder."""
        return self.board.path

    def get_logdir(self) -> str:
        """The run folder (TensorBoard: the directory of the event files)."""
        return self.board.path

    def _log(self, values: dict[str, Any], global_step: Any) -> None:
        if global_step is not None and type(global_step) is not int:
            global_step = int(global_step)  # numpy integers, one-element tensors
        with self._lock:
            self._steps.log(values, global_step)

    # ------------------------------------------------------------- scalars

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: Any = None,
        walltime: float | None = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        """Log one scalar (a number, numpy scalar or one-element tensor)."""
        self._log({tag: scalar_value}, global_step)

    def add_scalars(
        self, main_tag: str, tag_scalar_dict: dict[str, Any], global_step: Any = None, walltime: float | None = None
    ) -> None:
        """Log several scalars as ``main_tag/tag`` in one call."""
        self._log({f"{main_tag}/{tag}": value for tag, value in tag_scalar_dict.items()}, global_step)

    # -------------------------------------------------------------- images

    def add_image(
        self,
        tag: str,
        img_tensor: Any,
        global_step: Any = None,
        walltime: float | None = None,
        dataformats: str = "CHW",
    ) -> None:
        """Log an image: uint8 in [0, 255] or float in [0, 1], laid out as ``dataformats``."""
        self._log({tag: Media(_uint8(_to_hwc(_numpy(img_tensor), dataformats)))}, global_step)

    def add_images(
        self,
        tag: str,
        img_tensor: Any,
        global_step: Any = None,
        walltime: float | None = None,
        dataformats: str = "NCHW",
    ) -> None:
        """Log a batch of images as one image tiled 8 per row (as TensorBoard shows them)."""
        self._log({tag: Media(_uint8(_to_hwc(_numpy(img_tensor), dataformats)))}, global_step)

    def add_figure(
        self, tag: str, figure: Any, global_step: Any = None, close: bool = True, walltime: float | None = None
    ) -> None:
        """Log a matplotlib figure (or a list of them, tiled) as an image; needs matplotlib."""
        if isinstance(figure, (list, tuple)):
            image = _grid([_figure_pixels(f, close) for f in figure])
        else:
            image = _figure_pixels(figure, close)
        self._log({tag: Media(image)}, global_step)

    # ---------------------------------------------------------- histograms

    def add_histogram(
        self,
        tag: str,
        values: Any,
        global_step: Any = None,
        bins: Any = "tensorflow",
        walltime: float | None = None,
        max_bins: int | None = None,
    ) -> None:
        """Log a histogram of ``values``.

        ``bins="tensorflow"`` (the default) lets the daemon bin over the full
        range (64 bins); an integer is the number of bins; numpy's bin
        strings ("auto", "fd", ...) or explicit edges are binned here.
        """
        import numpy as np

        if isinstance(bins, str) and bins == "tensorflow":
            hist = Histogram(values)
        elif isinstance(bins, int) and not isinstance(bins, bool):
            hist = Histogram(values, num_bins=bins)
        else:
            arr = _numpy(values).reshape(-1).astype(np.float64)
            arr = arr[np.isfinite(arr)]
            counts, edges = np.histogram(arr, bins=bins)
            hist = Histogram(bins=edges, counts=counts)
        self._log({tag: hist}, global_step)

    # ---------------------------------------------------------------- text

    def add_text(self, tag: str, text_string: str, global_step: Any = None, walltime: float | None = None) -> None:
        """Log text, stored as a one-cell table (column ``text``)."""
        self._log({tag: Table(columns=["text"], rows=[[str(text_string)]])}, global_step)

    # ------------------------------------------------------------- hparams

    def add_hparams(
        self,
        hparam_dict: dict[str, Any],
        metric_dict: dict[str, Any],
        hparam_domain_discrete: dict[str, list[Any]] | None = None,
        run_name: str | None = None,
        global_step: Any = None,
    ) -> None:
        """Merge ``hparam_dict`` into the run's config and log ``metric_dict`` as scalars."""
        if not isinstance(hparam_dict, dict) or not isinstance(metric_dict, dict):
            raise TypeError("hparam_dict and metric_dict should be dictionary.")
        merge_config(self.board, jsonable(hparam_dict))
        self._log(dict(metric_dict), global_step)

    # ----------------------------------------------------------- lifecycle

    def flush(self) -> None:
        """Block until everything logged so far is durable in the run folder."""
        self.board.flush()

    def close(self) -> None:
        """Finish the run (status finished)."""
        self.board.finish()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, et: Any, exc: Any, tb: Any) -> None:
        if et is not None:
            try:
                self.board.finish(status="interrupted" if issubclass(et, KeyboardInterrupt) else "crashed")
            except Exception:
                pass  # never mask the exception that left the block
        else:
            self.close()

    def __getattr__(self, name: str) -> Any:
        if name in _UNSUPPORTED:

            def unsupported(*args: Any, **kwargs: Any) -> None:
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(
                        f"kohakuboard SummaryWriter.{name} is not supported: nothing was stored",
                        UserWarning,
                        stacklevel=2,
                    )

            return unsupported
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
