"""Turning user data into plain numpy arrays and media kinds, in the training process.

Everything here is a pure function and runs in the caller's training loop, so
it only copies and reshapes: no PNG encoding, no binning, no density estimates
(the daemon does those, see :mod:`kohakuboard.storage.values`).

numpy is imported inside the functions, and torch and PIL are never imported
here: a torch tensor or PIL image is recognised by its type's module name, and
by then its library is already in ``sys.modules``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MAX_IMAGE_PIXELS = 1 << 28
"""Largest image accepted, in pixels (H * W): 256 Mpx, 1 GiB as RGBA."""

_CHANNELS = (1, 3, 4)

# ----------------------------------------------------------------- arrays


def _is_torch_tensor(obj: Any) -> bool:
    """True for a torch tensor (or Parameter/subclass) without importing torch."""
    if not (type(obj).__module__ or "").startswith("torch"):
        return False
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _torch_to_numpy(t: Any) -> tuple[Any, bool]:
    """Return ``(array, fresh)``; ``fresh`` is True when the array owns new memory.

    Detaches, resolves sparse/quantized/conjugate/negative views, moves to the
    CPU and widens dtypes numpy lacks (bfloat16, float16 and float8 become
    float32; complex32 becomes complex64).
    """
    import torch

    if t.device.type == "meta":
        raise ValueError("a tensor on the 'meta' device has no data to log")
    if getattr(t, "is_nested", False):
        raise ValueError("a nested (ragged) tensor cannot be converted to one array")
    t = t.detach()
    fresh = False
    if t.layout != torch.strided:
        t, fresh = t.to_dense(), True
    if t.is_quantized:
        t, fresh = t.dequantize(), True
    if t.device.type != "cpu":
        t, fresh = t.cpu(), True
    if t.dtype.is_floating_point and t.dtype not in (torch.float32, torch.float64):
        t, fresh = t.float(), True  # bfloat16, float16, float8_*: numpy has no (or no exact) match
    elif t.dtype == getattr(torch, "complex32", None):
        t, fresh = t.to(torch.complex64), True
    if t.is_conj():
        t, fresh = t.resolve_conj(), True
    if t.is_neg():
        t, fresh = t.resolve_neg(), True
    try:
        arr = t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"cannot convert a torch tensor of dtype {t.dtype} to a numpy array: {exc}") from None
    return arr, fresh


def _map_tensors(obj: Any) -> Any:
    """Replace torch tensors nested in lists/tuples by numpy arrays (slow path only)."""
    if isinstance(obj, (list, tuple)):
        return [_map_tensors(x) for x in obj]
    if _is_torch_tensor(obj):
        return _torch_to_numpy(obj)[0]
    return obj


def _from_sequence(obj: Any) -> Any:
    import numpy as np

    try:
        return np.array(obj)
    except (TypeError, RuntimeError, ValueError) as exc:
        first = exc
    if "torch" in sys.modules:  # e.g. a list of CUDA or bfloat16 tensors
        try:
            return np.array(_map_tensors(obj))
        except (TypeError, RuntimeError, ValueError) as exc:
            first = exc
    if isinstance(first, ValueError) and ("inhomogeneous" in str(first) or "sequence" in str(first)):
        raise ValueError(
            f"ragged list: the nested lists differ in length, so they do not form an array ({first})"
        ) from None
    raise TypeError(f"cannot convert this {type(obj).__name__} to an array: {first}") from None


def _as_array(obj: Any) -> tuple[Any, bool]:
    """``(array, fresh)`` for ``obj``; a non-fresh array may share memory with ``obj``."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj, False
    if _is_torch_tensor(obj):
        return _torch_to_numpy(obj)
    if isinstance(obj, (list, tuple)):
        return _from_sequence(obj), True
    if isinstance(obj, (np.generic, int, float, complex, bool, str, bytes)):
        return np.array(obj), True
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__") or hasattr(obj, "__array_struct__"):
        return np.asarray(obj), False  # PIL images, jax/cupy-like arrays, memoryview-backed objects
    if isinstance(obj, (memoryview, bytearray)):
        return np.array(obj), True
    raise TypeError(f"cannot convert a {type(obj).__module__}.{type(obj).__qualname__} to an array")


def to_numpy(obj: Any) -> Any:
    """Return ``obj`` as a NEW C-contiguous ``numpy.ndarray`` (never a view of ``obj``).

    Accepts numpy arrays and scalars, Python numbers and (nested) lists/tuples,
    torch tensors on any device (detached and moved to the CPU; bfloat16,
    float16 and float8 become float32) and objects with ``__array__``.  The
    result is always a copy, so the caller may mutate ``obj`` right after.
    Ragged lists raise ``ValueError`` ("ragged"); values that give an object
    array (``None``, dicts, ints beyond 64 bits) raise ``TypeError``.
    """
    import numpy as np

    arr, fresh = _as_array(obj)
    if arr.dtype.kind == "O":
        raise TypeError(f"cannot convert a {type(obj).__name__} to a numeric array (it holds Python objects)")
    if fresh and arr.flags.c_contiguous and type(arr) is np.ndarray:
        return arr
    return np.array(arr, copy=True, order="C", subok=False)


# ----------------------------------------------------------------- images


def _check_pixels(h: int, w: int) -> None:
    if h <= 0 or w <= 0:
        raise ValueError(f"image is empty ({h}x{w} pixels)")
    if h * w > MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {h}x{w} = {h * w} pixels is over the {MAX_IMAGE_PIXELS} pixel limit")


def _pil_to_array(im: Any) -> Any:
    """HWC uint8 array from a PIL image, following PIL's own pixel conventions.

    1/L stay grayscale; RGB/RGBA as is; LA/La/PA and P with transparency become
    RGBA, other modes (P, CMYK, YCbCr, LAB, HSV, RGBX, RGBa) RGB or RGBA.  16-bit
    modes (I;16*) are scaled to 8 bits (65535 -> 255); 32-bit I and F are
    pixel values clipped to [0, 255] (PIL's convention; F NaN -> 0).
    """
    import numpy as np

    w, h = im.size
    _check_pixels(h, w)
    mode = im.mode
    try:
        if mode in ("L", "RGB", "RGBA"):
            arr = np.asarray(im)
        elif mode == "1":
            arr = np.asarray(im.convert("L"))
        elif mode.startswith("I;16"):
            raw = np.asarray(im).astype(np.float32)
            arr = np.rint(raw / 257.0).astype(np.uint8)
        elif mode in ("I", "F") or mode.startswith(("I;", "F;")):
            raw = np.asarray(im if mode in ("I", "F") else im.convert("F"))
            if raw.dtype.kind == "f":
                raw = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
                arr = np.rint(np.clip(raw, 0, 255)).astype(np.uint8)
            else:
                arr = np.clip(raw, 0, 255).astype(np.uint8)
        elif mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
            arr = np.asarray((im.convert("LA") if mode == "La" else im).convert("RGBA"))
        else:
            arr = np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to L, RGB or RGBA: {exc}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.array(arr, dtype=np.uint8, copy=True, order="C")


def _image_layout(shape: tuple[int, ...]) -> str:
    """ "hw", "hwc" or "chw" for an image shape; ValueError for anything else or too many pixels."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"a {ndim}-D array of shape {shape} is not an image (need HW, HWC or CHW)")
    if ndim >= 4:
        if ndim == 4:
            hint = "a 4-D array (N, C, H, W) is a batch of images; log one image per Media, or a Table of Media"
        else:
            hint = f"a {ndim}-D array is not one image; log one image per Media, or a Table of Media"
        if shape[0] == 1:
            hint += " (for a batch of one, pass arr[0])"
        raise ValueError(f"{hint}; got shape {shape}")
    if ndim == 2:
        layout, (h, w) = "hw", shape
    elif shape[-1] in _CHANNELS:
        layout, (h, w) = "hwc", shape[:2]
    elif shape[0] in _CHANNELS and min(shape[1], shape[2]) > shape[0]:
        layout, (h, w) = "chw", shape[1:]
    elif shape[0] in _CHANNELS:
        raise ValueError(
            f"image of shape {shape} is ambiguous: its last dimension ({shape[-1]}) is no channel count "
            f"(1, 3, 4) and its first ({shape[0]}) is not smaller than the other two, so it is neither "
            "clearly HWC nor CHW; pass (H, W, C) with C = 1, 3 or 4 (arr.transpose(1, 2, 0) turns CHW into HWC)"
        )
    else:
        raise ValueError(
            f"image of shape {shape} has no channel dimension of size 1, 3 or 4 "
            "(expected HW, HWC or CHW with 1 = gray, 3 = RGB, 4 = RGBA)"
        )
    _check_pixels(int(h), int(w))
    return layout


def _is_pil_image(obj: Any) -> bool:
    if not (type(obj).__module__ or "").startswith("PIL"):
        return False
    image_mod = sys.modules.get("PIL.Image")
    return image_mod is not None and isinstance(obj, image_mod.Image)


def image_to_hwc_uint8(obj: Any) -> Any:
    """Return one image as a new C-contiguous ``(H, W, C)`` uint8 array, ``C`` in 1, 3, 4.

    Accepts numpy arrays, torch tensors (any device/dtype) and array-likes in
    HWC, CHW (first dim 1/3/4 and smaller than the other two, last dim not
    1/3/4; a shape like (4, 4, 2) or (4, 4, 5) that fits neither clearly is
    refused), HW or (H, W, 1) layout, and
    PIL images.  Pixel values: uint8 as is; bool -> 0/255; float -> clipped to
    [0, 1], times 255, rounded (NaN -> 0); other integers -> clipped to
    [0, 255].  Raises ``ValueError`` for arrays that are not one image (0-D,
    1-D, 4-D+ batches), empty images, wrong channel counts and images over
    ``MAX_IMAGE_PIXELS``; ``TypeError`` for unsupported types or dtypes.
    """
    import numpy as np

    if _is_pil_image(obj):
        return _pil_to_array(obj)
    if isinstance(obj, (str, bytes, bytearray, memoryview, os.PathLike)) or obj is None:
        raise TypeError(
            f"cannot make an image from {type(obj).__name__}; file paths and encoded bytes go through Media"
        )
    if not (
        isinstance(obj, (np.ndarray, list, tuple))
        or _is_torch_tensor(obj)
        or hasattr(obj, "__array__")
        or hasattr(obj, "__array_interface__")
    ):
        raise TypeError(
            f"cannot make an image from a {type(obj).__module__}.{type(obj).__qualname__} "
            "(use a numpy array, torch tensor, PIL image, file path or encoded bytes)"
        )
    shape = getattr(obj, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        _image_layout(shape)  # refuse a batch or a huge image before copying it off a GPU
    src, fresh = _as_array(obj)
    if src.dtype.kind == "O":
        raise TypeError("cannot make an image from an array of Python objects")
    layout = _image_layout(tuple(src.shape))
    if layout == "hw":
        arr = src[:, :, None]
    elif layout == "chw":
        arr = src.transpose(1, 2, 0)
    else:
        arr = src
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        out = np.ascontiguousarray(arr)
    elif kind == "b":
        out = arr.astype(np.uint8, order="C")
        out *= np.uint8(255)
    elif kind == "f":
        f = arr.astype(np.float32, order="C")  # a new array: safe to work in place
        np.nan_to_num(f, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(f, 0.0, 1.0, out=f)
        f *= 255.0
        np.rint(f, out=f)
        out = f.astype(np.uint8)
    elif kind in "iu":
        info = np.iinfo(arr.dtype)
        out = np.clip(arr, max(0, int(info.min)), min(255, int(info.max))).astype(np.uint8, order="C")
    else:
        raise TypeError(f"cannot make an image from an array of dtype {arr.dtype} (need uint8, bool, int or float)")
    if not fresh and (out is src or np.shares_memory(out, src)):
        out = out.copy(order="C")
    elif not out.flags.c_contiguous:
        out = np.ascontiguousarray(out)
    return out


# ----------------------------------------------------------------- media kinds

_EXTENSIONS: dict[str, tuple[str, str]] = {
    # image
    "png": ("image", "png"),
    "jpg": ("image", "jpg"),
    "jpeg": ("image", "jpg"),
    "jpe": ("image", "jpg"),
    "jfif": ("image", "jpg"),
    "gif": ("image", "gif"),
    "webp": ("image", "webp"),
    "bmp": ("image", "bmp"),
    "avif": ("image", "avif"),
    # video
    "mp4": ("video", "mp4"),
    "m4v": ("video", "mp4"),
    "webm": ("video", "webm"),
    "mkv": ("video", "mkv"),
    "mov": ("video", "mov"),
    "avi": ("video", "avi"),
    "ogv": ("video", "ogv"),
    # audio
    "wav": ("audio", "wav"),
    "mp3": ("audio", "mp3"),
    "ogg": ("audio", "ogg"),
    "oga": ("audio", "ogg"),
    "opus": ("audio", "opus"),
    "flac": ("audio", "flac"),
    "m4a": ("audio", "m4a"),
    "aac": ("audio", "aac"),
    "mka": ("audio", "mka"),
}


def _norm_ext(ext: str | None) -> str:
    return (ext or "").strip().lower().lstrip(".")


def media_type_from_path(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(media_type, ext)`` for a file name by its (case-insensitive) extension.

    ``media_type`` is "image", "video" or "audio"; ``ext`` is canonical
    ("jpeg" -> "jpg", "m4v" -> "mp4").  Raises ``ValueError`` for unknown
    extensions.  The file is not read.
    """
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    ext = _norm_ext(os.path.splitext(name)[1])
    try:
        return _EXTENSIONS[ext]
    except KeyError:
        known = ", ".join(sorted(_EXTENSIONS))
        raise ValueError(
            f"cannot tell the media type of {os.path.basename(name)!r} from its extension "
            f"{('.' + ext) if ext else '(none)'}; known: {known}"
        ) from None


_ISO_AUDIO_BRANDS = (b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B ")
_ISO_IMAGE_BRANDS = {b"avif": "avif", b"avis": "avif"}
_QT_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def _sniff_iso_bmff(data: bytes, hint: str) -> tuple[str, str]:
    brand = data[8:12]
    if brand in _ISO_IMAGE_BRANDS:
        return "image", _ISO_IMAGE_BRANDS[brand]
    if brand in _ISO_AUDIO_BRANDS:
        return "audio", "m4a"
    if brand == b"qt  ":
        return "video", "mov"
    if hint in ("m4a", "mov"):  # generic brands (isom, mp42, ...) are used by both
        return _EXTENSIONS[hint]
    return "video", "mp4"


def _is_mp3_frame(data: bytes) -> bool:
    if len(data) < 4 or data[0] != 0xFF or (data[1] & 0xE0) != 0xE0:
        return False
    version = (data[1] >> 3) & 3
    layer = (data[1] >> 1) & 3
    bitrate = data[2] >> 4
    rate = (data[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 3


def _is_adts(data: bytes) -> bool:
    return len(data) >= 7 and data[0] == 0xFF and (data[1] & 0xF6) == 0xF0 and ((data[2] >> 2) & 0xF) < 13


def _is_bmp(data: bytes) -> bool:
    if len(data) < 18 or data[:2] != b"BM":
        return False
    dib = int.from_bytes(data[14:18], "little")
    return dib in (12, 16, 40, 52, 56, 64, 108, 124)


def sniff_media(data: bytes, hint_ext: str | None = None) -> tuple[str, str]:
    """``(media_type, ext)`` of encoded media from its magic bytes.

    Knows PNG, JPEG, GIF, WebP, BMP, AVIF images; MP4, MOV, WebM, MKV, AVI,
    Ogg Theora videos; WAV, MP3, Ogg (Vorbis/Opus), FLAC, M4A, AAC audio.
    ``hint_ext`` (e.g. a file's extension) names the variant where the bytes
    are ambiguous (ISO-BMFF "isom" as m4a or mov; Matroska as mka; Ogg as opus)
    and is the fallback when the bytes are not recognised.  Raises
    ``ValueError`` when neither tells.
    """
    if not isinstance(data, bytes):
        data = bytes(memoryview(data)[:4096])
    if not data:
        raise ValueError("cannot tell the media type of empty bytes")
    hint = _norm_ext(hint_ext)
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image", "gif"
    if head[:4] == b"RIFF" and len(head) >= 12:
        fourcc = head[8:12]
        if fourcc == b"WEBP":
            return "image", "webp"
        if fourcc == b"WAVE":
            return "audio", "wav"
        if fourcc == b"AVI ":
            return "video", "avi"
    if head[:4] in (b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "audio", "wav"
    if _is_bmp(head):
        return "image", "bmp"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        return _sniff_iso_bmff(head, hint)
    if head[4:8] in _QT_ATOMS and hint in ("", "mov"):
        return "video", "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska / WebM
        doc = data[:4096]
        if b"webm" in doc:
            return ("audio", "webm") if hint == "weba" else ("video", "webm")
        if hint == "mka":
            return "audio", "mka"
        return "video", "mkv"
    if head.startswith(b"OggS"):
        page = data[:4096]
        if b"\x80theora" in page:
            return "video", "ogv"
        if b"OpusHead" in page:
            return "audio", "opus" if hint == "opus" else "ogg"
        return "audio", "ogg"
    if head.startswith(b"fLaC"):
        return "audio", "flac"
    if head.startswith(b"ID3") or _is_mp3_frame(head):
        return "audio", "mp3"
    if _is_adts(head):
        return "audio", "aac"
    if hint in _EXTENSIONS:
        return _EXTENSIONS[hint]
    raise ValueError(
        f"cannot tell the media type of {len(data)} bytes starting {head[:12]!r} "
        "(not a known image, video or audio format; pass a file path with a known extension)"
    )
