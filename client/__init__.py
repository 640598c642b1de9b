"""The training-side API: ``from kohakuboard.client import Board``.

Importing this package is cheap: it loads no numpy, torch, PIL, zmq or msgpack.
Those are imported when a Board first connects or converts a value.
"""

from ._board import Board

__all__ = ["Board"]
