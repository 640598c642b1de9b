"""Reading TensorBoard event files: TFRecord framing, CRC32C, and the Event protobufs.

An event file is a sequence of records ``uint64 length, uint32 masked_crc32c(length),
bytes data[length], uint32 masked_crc32c(data)`` (little-endian); each ``data``
is one serialized ``tensorboard.Event`` protobuf.

The protobuf classes come from a maintained package: TensorBoard's own
(``tensorboard.compat.proto``, there whenever ``torch.utils.tensorboard`` was
used) or the definitions tensorboardX ships (``tensorboardX.proto``, the
``kohakuboard[tensorboard]`` extra: 0.5 MB plus protobuf, against ~57 MB for
tensorboard with grpcio and its data server).  The framing is read here rather
than through TensorBoard's ``EventFileLoader``: measured on this project's
2-core machine on a 4.5 MB file of 100,061 events written by
``torch.utils.tensorboard`` (100,000 scalars, 20 images, histograms and texts),
``EventFileLoader`` took 2.5-3.9 s (import 0.2-0.4 s), this reader 0.15 s plus
0.5 s for the pure-Python CRC check (the optional ``crc32c`` package makes that
~1 ms).  Importing ``tensorboardX.proto`` runs tensorboardX's ``__init__``, which
imports torch when it is installed (1.1-1.5 s, 235 MB RSS), so TensorBoard's
protobufs (14 ms) are preferred when both packages are there.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any

try:  # optional hardware CRC32C (what tensorboardX uses too, when installed)
    from crc32c import crc32c as _crc32c_native
except ImportError:  # pragma: no cover - depends on the environment
    _crc32c_native = None


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    if _crc32c_native is not None:
        return _crc32c_native(data)
    table = _TABLE
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def protos() -> tuple[ModuleType, ModuleType | None]:
    """``(event_pb2, hparams plugin_data_pb2 or None)`` from tensorboard, else tensorboardX.

    Raises ``ImportError`` naming the extra to install when neither is there.
    """
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        try:
            from tensorboardX.proto import event_pb2
        except ImportError:
            raise ImportError(
                "reading TensorBoard event files needs tensorboardX or tensorboard: "
                "pip install 'kohakuboard[tensorboard]'"
            ) from None
        try:
            from tensorboardX.proto import plugin_hparams_pb2 as hparams_pb2
        except ImportError:  # pragma: no cover
            hparams_pb2 = None
        return event_pb2, hparams_pb2
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_pb2
    except ImportError:  # pragma: no cover
        hparams_pb2 = None
    return event_pb2, hparams_pb2


def read_records(path: str, chunk: int = 1 << 20) -> Iterator[tuple[int, int, bytes | None, str | None]]:
    """Yield ``(offset, size, data, problem)`` for each record of the file at ``path``.

    ``data`` is None when the record cannot be used; ``problem`` then says why.
    A record whose data fails its CRC is skipped and reading goes on; a header
    that fails its CRC, or a record cut off at the end (a writer still running,
    or a truncated copy), ends the file.
    """
    with open(path, "rb") as f:
        while True:
            offset = f.tell()
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                yield offset, len(header), None, f"truncated record header at byte {offset} ({len(header)} of 12 bytes)"
                return
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                yield (
                    offset,
                    len(header),
                    None,
                    f"corrupt record header at byte {offset} (CRC mismatch); the rest of the file is unreadable",
                )
                return
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                yield (
                    offset,
                    12 + len(data) + len(footer),
                    None,
                    (f"truncated record at byte {offset} ({len(data)} of {length} bytes)"),
                )
                return
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                yield offset, 16 + length, None, f"corrupt record at byte {offset} (data CRC mismatch), skipped"
                continue
            yield offset, 16 + length, data, None


# ------------------------------------------------------------------ tensors

_DTYPES = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}
_STRING = 7


def tensor_value(t: Any) -> Any:
    """A ``TensorProto`` as a numpy array (strings as an object array of ``bytes``)."""
    import numpy as np

    shape = [int(d.size) for d in t.tensor_shape.dim]
    n = int(np.prod(shape)) if shape else 1
    if t.dtype == _STRING:
        values = list(t.string_val)
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
    else:
        dtype = _DTYPES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor dtype {t.dtype} is not supported")
        if t.tensor_content:
            arr = np.frombuffer(t.tensor_content, dtype=dtype)
        elif t.dtype == 1:
            arr = np.array(t.float_val, dtype=dtype)
        elif t.dtype == 2:
            arr = np.array(t.double_val, dtype=dtype)
        elif t.dtype == 9:
            arr = np.array(t.int64_val, dtype=dtype)
        elif t.dtype == 10:
            arr = np.array(t.bool_val, dtype=dtype)
        elif t.dtype == 19:
            arr = np.array(t.half_val, dtype="<u2").view("<f2")
        elif t.dtype in (22, 23):
            arr = np.array(t.uint32_val if t.dtype == 22 else t.uint64_val, dtype=dtype)
        else:
            arr = np.array(t.int_val, dtype=dtype)
    if arr.size == 1 and n > 1:  # TensorFlow stores a tensor of one repeated value once
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise ValueError(f"tensor holds {arr.size} values for shape {shape}")
    return arr.reshape(shape)
