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
            if size == 0:
                raise TypeError(
                    f"cannot log {key!r}: the numpy array is empty (shape {value.shape}), it holds no value"
                )
            if size != 1:
                raise TypeError(
                    f"cannot log {key!r}: a numpy array of shape {getattr(value, 'shape', '?')} is not a scalar "
                    "(log one element, or use Histogram/TensorLog for arrays)"
                )
            kind = getattr(getattr(value, "dtype", None), "kind", "f")
            if kind not in "biuf":
                raise TypeError(f"cannot log {key!r}: numpy dtype {value.dtype} is not a number")
            out = float(
                value.reshape(-1)[0] if hasattr(value, "reshape") and bool(getattr(value, "ndim", 0)) else value
            )
            if out - out != 0.0 and out == out and not bool(abs(value) == out * out):
                # a finite longdouble beyond float64 turns into inf without an
                # OverflowError; refuse it as the int 10**400 is refused
                raise OverflowError
            return out
        if module.startswith("torch"):
            numel = value.numel() if hasattr(value, "numel") else 1
            if numel == 0:
                raise TypeError(
                    f"cannot log {key!r}: the tensor is empty (shape {tuple(value.shape)}), it holds no value"
                )
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


_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


MAX_CONFIG_DEPTH = 100


def to_config(obj: Any, path: str = "config", *, nonfinite_as_text: bool = False, _depth: int = 0) -> Any:
    """Return a JSON- and msgpack-ready copy of ``config``, or raise naming the key path.

    numpy and torch scalars become Python numbers, their arrays lists,
    tuples lists and ``os.PathLike`` values (``pathlib.Path``) strings.  With
    ``nonfinite_as_text`` (the run's ``config``: ``metadata.json`` is strict
    JSON) NaN and +-inf are kept as the strings ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"``; otherwise they stay floats.  Anything else (bytes, sets,
    objects, integers beyond 64 bits, non-string dict keys) raises
    ``TypeError`` naming its place, e.g. ``config['optim']['betas']``; so does
    nesting deeper than ``MAX_CONFIG_DEPTH`` (100) levels.
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
        if not -(2**63) <= obj < 2**64:
            raise TypeError(f"{path} is an integer too large to store ({obj!r:.40}): beyond 64 bits")
        return int(obj)
    if isinstance(obj, float):
        if nonfinite_as_text and obj - obj != 0.0:
            return _NONFINITE[repr(float(obj))]
        return float(obj)
    if _depth >= MAX_CONFIG_DEPTH and isinstance(obj, (dict, list, tuple)):
        where = path if len(path) <= 120 else f"{path[:60]}...{path[-40:]}"
        raise TypeError(f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels of dicts and lists, too deep to store")
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: key {k!r} is not a string")
            to_config(k, f"{path} key")
            out[k] = to_config(v, f"{path}[{k!r}]", nonfinite_as_text=nonfinite_as_text, _depth=_depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [
            to_config(v, f"{path}[{i}]", nonfinite_as_text=nonfinite_as_text, _depth=_depth + 1)
            for i, v in enumerate(obj)
        ]
    module = type(obj).__module__ or ""
    if module == "numpy" or module.startswith("numpy."):
        if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:
            return to_config(obj.tolist(), path, nonfinite_as_text=nonfinite_as_text, _depth=_depth)
        if hasattr(obj, "item"):
            item = obj.item()
            if type(item) is not type(obj):
                return to_config(item, path, nonfinite_as_text=nonfinite_as_text)
    if module.startswith("torch") and hasattr(obj, "tolist"):
        return to_config(obj.detach().cpu().tolist(), path, nonfinite_as_text=nonfinite_as_text, _depth=_depth)
    if hasattr(obj, "__fspath__"):
        import os

        value = os.fspath(obj)
        if isinstance(value, str):
            return to_config(value, path)
    raise TypeError(f"{path} cannot be stored in the run's config: {type(obj).__name__} {obj!r:.80}")
