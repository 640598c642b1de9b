"""Turning what users pass to ``log()`` and ``config=`` into plain data.

No numpy or torch import here: values are recognised by their type's module
name, the way tensorboardX's x2num does, and converted with their own methods.
"""

from __future__ import annotations

from typing import Any

MAX_NAME_CHARS = 1024


def check_name(name: str) -> None:
    """Raise ``ValueError`` for a metric name that cannot be stored."""
    if not name:
        raise ValueError("metric name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"metric name {name[:40]!r}... is longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 for c in name):
        raise ValueError(f"metric name {name!r} contains control characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"metric name {name!r} is not valid Unicode (lone surrogate)") from None


def to_scalar(key: str, value: Any) -> float:
    """Convert one logged value to a float, or raise naming ``key``.

    Accepts Python numbers and bools, numpy scalars, 0-d or 1-element numpy
    arrays and torch tensors (any device, any float dtype).  NaN and +-inf are
    kept.  Everything else raises ``TypeError``; a number too large for a
    float64 raises ``ValueError``.
    """
    t = type(value)
    try:
        if t is float or t is int or t is bool:
            return float(value)
        module = t.__module__ or ""
        if module == "numpy" or module.startswith("numpy."):
            size = getattr(value, "size", 1)
            if size != 1:
                raise TypeError(
                    f"cannot log {key!r}: a numpy array of shape {getattr(value, 'shape', '?')} is not a scalar "
                    "(log one element, or use Histogram/TensorLog for arrays)"
                )
            kind = getattr(getattr(value, "dtype", None), "kind", "f")
            if kind not in "biuf":
                raise TypeError(f"cannot log {key!r}: numpy dtype {value.dtype} is not a number")
            return float(value.reshape(-1)[0] if hasattr(value, "reshape") and getattr(value, "ndim", 0) else value)
        if module.startswith("torch"):
            numel = value.numel() if hasattr(value, "numel") else 1
            if numel != 1:
                raise TypeError(
                    f"cannot log {key!r}: a tensor of shape {tuple(value.shape)} is not a scalar "
                    "(log .mean() or one element, or use Histogram/TensorLog)"
                )
            if getattr(value, "is_complex", lambda: False)():
                raise TypeError(f"cannot log {key!r}: complex tensors are not numbers")
            return float(value.detach().reshape(-1)[0].float().item())
    except OverflowError:
        raise ValueError(f"cannot log {key!r}: {value!r:.40} is too large for a float64") from None
    if isinstance(value, (int, float)) and not isinstance(value, complex):  # subclasses, Decimal-free
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"cannot log {key!r}: {value!r:.40} is too large for a float64") from None
    raise TypeError(f"cannot log {key!r}: {t.__name__} is not a number")


def to_config(obj: Any, path: str = "config") -> Any:
    """Return a JSON-ready copy of ``config``; numpy scalars become Python numbers.

    Raises ``TypeError`` naming the key of the first value that is not
    JSON-serialisable (dict keys must be strings).
    """
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(f"{path} is not valid Unicode (lone surrogate)") from None
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: key {k!r} is not a string")
            to_config(k, f"{path} key")
            out[k] = to_config(v, f"{path}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_config(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    module = type(obj).__module__ or ""
    if module == "numpy" or module.startswith("numpy."):
        if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:
            return to_config(obj.tolist(), path)
        if hasattr(obj, "item"):
            return to_config(obj.item(), path)
    if module.startswith("torch") and hasattr(obj, "tolist"):
        return to_config(obj.detach().cpu().tolist(), path)
    raise TypeError(f"{path} is not JSON-serialisable: {type(obj).__name__} {obj!r:.80}")


