"""The training-side API: ``from kohakuboard.client import Board``.

Importing this package is cheap: it loads no numpy, torch, PIL, zmq or msgpack.
Those are imported when a Board first connects or converts a value.
"""

from ._board import Board
from ._rich import Histogram, KernelDensity, Media, Table, TensorLog

__all__ = ["Board", "Histogram", "KernelDensity", "Media", "Table", "TensorLog"]
