"""Client-side conversion: arrays, images and media kinds, as the training process sees them."""

from __future__ import annotations

import io
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kohakuboard.client._convert import (
    MAX_IMAGE_PIXELS,
    image_to_hwc_uint8,
    media_type_from_path,
    sniff_media,
    to_numpy,
)


def _torch():
    return pytest.importorskip("torch")


# ------------------------------------------------------------------ to_numpy


def test_to_numpy_returns_an_independent_copy():
    """Mutating the source array after to_numpy does not change the copy."""
    src = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = to_numpy(src)
    src[0, 0] = 99
    assert out[0, 0] == 0 and out.dtype == np.float32 and out.shape == (2, 3)
    assert not np.shares_memory(out, src)


def test_to_numpy_makes_views_c_contiguous():
    """A transposed, strided view comes back as a C-contiguous array with the same values."""
    src = np.arange(24).reshape(4, 6)[::2, ::3].T
    out = to_numpy(src)
    assert out.flags.c_contiguous and np.array_equal(out, src)


def test_to_numpy_lists_and_scalars():
    """Nested lists, Python numbers and numpy scalars become arrays of the natural shape and dtype."""
    assert to_numpy([[1.0, 2.0], [3.0, 4.0]]).shape == (2, 2)
    assert to_numpy((1, 2, 3)).dtype.kind == "i"
    assert to_numpy(3.5).shape == () and to_numpy(3.5) == 3.5
    assert to_numpy(np.float16(2)).dtype == np.float16
    assert to_numpy(["a", "b"]).dtype.kind == "U"  # callers decide whether strings are allowed


def test_ragged_list_raises_value_error_saying_ragged():
    """Lists of unequal lengths raise ValueError mentioning 'ragged'."""
    with pytest.raises(ValueError, match="ragged"):
        to_numpy([[1.0, 2.0], [3.0]])


def test_objects_that_are_not_arrays_raise_type_error():
    """None, dicts and lists holding None raise TypeError instead of giving an object array."""
    for bad in (None, {"a": 1}, [1, None], object()):
        with pytest.raises(TypeError):
            to_numpy(bad)


def test_torch_bf16_tensor_converts_to_float32():
    """A CUDA-less bfloat16 tensor that requires grad converts to float32 with its values."""
    torch = _torch()
    t = torch.tensor([[1.5, -2.25], [0.0, 3.0]], dtype=torch.bfloat16, requires_grad=True)
    out = to_numpy(t)
    assert out.dtype == np.float32 and out.tolist() == [[1.5, -2.25], [0.0, 3.0]]


def test_torch_float16_and_float8_widen_to_float32():
    """float16 and float8 tensors come back as float32; integer and bool dtypes are kept."""
    torch = _torch()
    assert to_numpy(torch.ones(2, dtype=torch.float16)).dtype == np.float32
    assert to_numpy(torch.ones(2, dtype=torch.float8_e4m3fn)).dtype == np.float32
    assert to_numpy(torch.ones(2, dtype=torch.int16)).dtype == np.int16
    assert to_numpy(torch.ones(2, dtype=torch.bool)).dtype == np.bool_


def test_mutating_a_torch_tensor_after_to_numpy_leaves_the_copy():
    """The array does not share memory with the CPU tensor it came from."""
    torch = _torch()
    t = torch.arange(4, dtype=torch.float32)
    out = to_numpy(t)
    t[0] = 99
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_torch_views_parameters_sparse_and_conjugates():
    """Transposed views, Parameters, sparse and conjugated tensors convert to their dense values."""
    torch = _torch()
    t = torch.arange(6.0).reshape(2, 3).t()
    out = to_numpy(t)
    assert out.flags.c_contiguous and out.tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    assert to_numpy(torch.nn.Parameter(torch.ones(2))).tolist() == [1.0, 1.0]
    assert to_numpy(torch.eye(2).to_sparse()).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert to_numpy(torch.tensor([1 + 2j]).conj()).tolist() == [1 - 2j]


def test_list_of_bf16_tensors_converts():
    """A list of scalar bfloat16 tensors (e.g. collected losses) becomes a float array."""
    torch = _torch()
    out = to_numpy([torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(2.5, dtype=torch.bfloat16)])
    assert out.tolist() == [1.0, 2.5]


def test_meta_tensor_raises_value_error():
    """A tensor on the meta device has no data and raises a clear ValueError."""
    torch = _torch()
    with pytest.raises(ValueError, match="meta"):
        to_numpy(torch.ones(2, device="meta"))


def test_converting_plain_data_imports_no_numpy_torch_or_pil_until_needed():
    """Importing _convert loads no numpy; converting lists and numpy images never imports torch or PIL."""
    code = (
        "import sys\n"
        "import kohakuboard.client._convert as c\n"
        "assert 'numpy' not in sys.modules\n"
        "import numpy as np\n"
        "c.to_numpy([[1, 2], [3, 4]])\n"
        "c.image_to_hwc_uint8(np.zeros((3, 8, 8), np.float32))\n"
        "print(','.join(m for m in ('torch', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------ images


def test_chw_float_image_becomes_hwc_uint8_pixels():
    """A CHW float image in [0, 1] comes back HWC uint8: clipped, times 255, rounded, NaN -> 0."""
    chw = np.zeros((3, 4, 5), np.float32)
    chw[0] = 1.0
    chw[1] = 0.5
    chw[2] = [[0.2, -3.0, 7.0, np.nan, 0.5], [np.inf, -np.inf, 1 / 255, 0.999, 0.0]] * 2
    out = image_to_hwc_uint8(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out[:, :, 0].tolist() == [[255] * 5] * 4
    assert out[:, :, 1].tolist() == [[128] * 5] * 4  # 127.5 rounds half to even
    assert out[:, :, 2].tolist() == [[51, 0, 255, 0, 128], [255, 0, 1, 255, 0]] * 2


def test_shapes_that_fit_neither_hwc_nor_chw_clearly_are_refused():
    """(4, 4, 2) and (4, 4, 5) were read as 4-channel CHW images 4x2 and 4x5: now a clear error."""
    for shape in ((4, 4, 2), (4, 4, 5), (3, 2, 5)):
        with pytest.raises(ValueError, match=r"ambiguous.*neither clearly HWC nor CHW"):
            image_to_hwc_uint8(np.zeros(shape, np.uint8))


def test_hwc_uint8_image_is_kept_exactly_as_a_copy():
    """An HWC uint8 image keeps its pixels and does not share memory with the input."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
    out = image_to_hwc_uint8(img)
    assert np.array_equal(out, img) and not np.shares_memory(out, img)
    img[0, 0, 0] ^= 1
    assert out[0, 0, 0] != img[0, 0, 0]


def test_grayscale_hw_and_hw1_give_one_channel():
    """HW and (H, W, 1) grayscale images both come back as (H, W, 1)."""
    g = np.arange(15, dtype=np.uint8).reshape(3, 5)
    assert np.array_equal(image_to_hwc_uint8(g)[:, :, 0], g)
    assert image_to_hwc_uint8(g[:, :, None]).shape == (3, 5, 1)
    assert np.array_equal(image_to_hwc_uint8(g[None])[:, :, 0], g)  # (1, H, W) is CHW


def test_last_dimension_wins_when_both_could_be_channels():
    """(3, 5, 4) is read as HWC RGBA (the last dim wins), (3, 8, 8) as CHW RGB."""
    assert image_to_hwc_uint8(np.zeros((3, 5, 4), np.uint8)).shape == (3, 5, 4)
    assert image_to_hwc_uint8(np.zeros((3, 8, 8), np.uint8)).shape == (8, 8, 3)


def test_bool_and_integer_images_are_mapped_to_0_255():
    """bool images become 0/255; other integer dtypes are clipped to [0, 255]."""
    assert image_to_hwc_uint8(np.array([[True, False]])).ravel().tolist() == [255, 0]
    assert image_to_hwc_uint8(np.array([[-5, 300, 17]], np.int16)).ravel().tolist() == [0, 255, 17]
    assert image_to_hwc_uint8(np.array([[-128, 127]], np.int8)).ravel().tolist() == [0, 127]
    assert image_to_hwc_uint8(np.array([[65535, 3]], np.uint16)).ravel().tolist() == [255, 3]


def test_torch_chw_bf16_image_converts():
    """A bfloat16 CHW tensor becomes the HWC uint8 image of its values."""
    torch = _torch()
    t = torch.zeros(3, 4, 6, dtype=torch.bfloat16)
    t[1] = 1.0
    out = image_to_hwc_uint8(t)
    assert out.shape == (4, 6, 3) and out[..., 1].min() == 255 and out[..., [0, 2]].max() == 0


def test_torch_uint8_hwc_image_is_copied():
    """A uint8 HWC tensor converts exactly and later writes to the tensor do not leak in."""
    torch = _torch()
    t = torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8)
    out = image_to_hwc_uint8(t)
    expected = t.numpy().copy()
    t.zero_()
    assert np.array_equal(out, expected)


def test_batch_of_images_raises_with_a_clear_message():
    """A 4-D array raises ValueError explaining it is a batch and how to log it."""
    with pytest.raises(ValueError, match=r"4-D array \(N, C, H, W\) is a batch of images; log one image per Media"):
        image_to_hwc_uint8(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"arr\[0\]"):
        image_to_hwc_uint8(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="5-D"):
        image_to_hwc_uint8(np.zeros((1, 1, 3, 8, 8)))


def test_arrays_that_are_not_one_image_raise_value_error():
    """0-D, 1-D, empty and wrong-channel arrays raise ValueError saying what is wrong."""
    cases = [
        (np.float32(1.0), "0-D"),
        (np.zeros(5), "1-D"),
        (np.zeros((0, 5)), "empty"),
        (np.zeros((4, 0, 3)), "empty"),
        (np.zeros((5, 5, 2)), "1, 3 or 4"),
        (np.zeros((5, 6, 7)), "1, 3 or 4"),
    ]
    for arr, text in cases:
        with pytest.raises(ValueError, match=text):
            image_to_hwc_uint8(arr)


def test_images_over_the_pixel_limit_are_refused_before_copying():
    """An image of more than 2**28 pixels raises ValueError (a zero-memory broadcast view is enough to tell)."""
    huge = np.broadcast_to(np.uint8(0), (1 << 15, (1 << 13) + 1))
    assert huge.shape[0] * huge.shape[1] > MAX_IMAGE_PIXELS == 1 << 28
    with pytest.raises(ValueError, match="pixel limit"):
        image_to_hwc_uint8(huge)


def test_unsupported_types_raise_type_error():
    """Strings, dicts, None and complex arrays raise TypeError."""
    for bad in ("image.png", {"a": 1}, None, np.zeros((2, 2), complex), b"\x89PNG"):
        with pytest.raises(TypeError):
            image_to_hwc_uint8(bad)


def test_pil_rgb_rgba_and_l_images_keep_their_pixels():
    """PIL RGB, RGBA and L images come back with exactly their pixels and channel count."""
    rng = np.random.default_rng(1)
    for channels in (3, 4):
        arr = rng.integers(0, 256, size=(6, 5, channels), dtype=np.uint8)
        assert np.array_equal(image_to_hwc_uint8(Image.fromarray(arr)), arr)
    gray = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    assert np.array_equal(image_to_hwc_uint8(Image.fromarray(gray)), gray[:, :, None])


def test_pil_palette_and_alpha_modes_become_rgb_or_rgba():
    """P becomes RGB (RGBA with transparency); LA, La and PA become RGBA; 1 becomes 0/255 gray; CMYK becomes RGB."""
    p = Image.new("P", (3, 2))
    p.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    out = image_to_hwc_uint8(p)
    assert out.shape == (2, 3, 3) and out[0, 0].tolist() == [10, 20, 30]
    p.info["transparency"] = 0
    assert image_to_hwc_uint8(p)[0, 0].tolist() == [10, 20, 30, 0]
    la = Image.new("LA", (2, 2), (200, 100))
    assert image_to_hwc_uint8(la)[0, 0].tolist() == [200, 200, 200, 100]
    assert image_to_hwc_uint8(Image.new("La", (2, 2))).shape == (2, 2, 4)
    assert image_to_hwc_uint8(Image.new("PA", (2, 2))).shape == (2, 2, 4)
    assert image_to_hwc_uint8(Image.new("1", (2, 2), 1)).ravel().tolist() == [255] * 4
    assert image_to_hwc_uint8(Image.new("CMYK", (2, 2))).shape == (2, 2, 3)


def test_pil_16_bit_and_float_images_map_to_8_bits():
    """A 16-bit PIL image is scaled (65535 -> 255); mode I and F are pixel values clipped to [0, 255]."""
    i16 = Image.fromarray(np.array([[0, 65535, 257 * 100]], np.uint16))
    assert image_to_hwc_uint8(i16).ravel().tolist() == [0, 255, 100]
    i32 = Image.fromarray(np.array([[-5, 100, 70000]], np.int32))
    assert image_to_hwc_uint8(i32).ravel().tolist() == [0, 100, 255]
    f = Image.fromarray(np.array([[-5.0, 100.4, 300.0, np.nan]], np.float32))
    assert image_to_hwc_uint8(f).ravel().tolist() == [0, 100, 255, 0]


# ------------------------------------------------------------------ media kinds


def _pil_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buf, fmt)
    return buf.getvalue()


def test_sniff_recognises_real_encoded_images():
    """PNG, JPEG, GIF, WebP and BMP files written by PIL are sniffed as images with the right extension."""
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp"), ("BMP", "bmp")):
        assert sniff_media(_pil_bytes(fmt)) == ("image", ext)


def test_sniff_recognises_a_real_wav_file(tmp_path: Path):
    """A WAV file written by the wave module is audio/wav, whatever the hint says."""
    path = tmp_path / "beep.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 100)
    assert sniff_media(path.read_bytes()) == ("audio", "wav")
    assert sniff_media(path.read_bytes(), hint_ext="mp4") == ("audio", "wav")


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40, ("video", "mp4")),
        (b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40, ("video", "mp4")),
        (b"\x00\x00\x00\x18ftypM4A " + b"\x00" * 40, ("audio", "m4a")),
        (b"\x00\x00\x00\x14ftypqt  " + b"\x00" * 40, ("video", "mov")),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40, ("image", "avif")),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm" + b"\x00" * 20, ("video", "webm")),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska" + b"\x00" * 20, ("video", "mkv")),
        (b"RIFF\x00\x00\x00\x00AVI LIST" + b"\x00" * 20, ("video", "avi")),
        (b"OggS\x00\x02" + b"\x00" * 22 + b"\x01\x1e\x01vorbis" + b"\x00" * 20, ("audio", "ogg")),
        (b"OggS\x00\x02" + b"\x00" * 22 + b"\x80theora" + b"\x00" * 20, ("video", "ogv")),
        (b"fLaC\x00\x00\x00\x22" + b"\x00" * 40, ("audio", "flac")),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 40, ("audio", "mp3")),
        (b"\xff\xfb\x90\x64" + b"\x00" * 40, ("audio", "mp3")),
        (b"\xff\xf1\x50\x80\x02\x1f\xfc" + b"\x00" * 40, ("audio", "aac")),
    ],
)
def test_sniff_recognises_container_magic(data, expected):
    """Video and audio containers are told apart by their magic bytes."""
    assert sniff_media(data) == expected


def test_sniff_uses_the_hint_for_ambiguous_and_unknown_bytes():
    """A generic ISO-BMFF brand follows an m4a/mov hint; unknown bytes fall back to a known hint."""
    isom = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40
    assert sniff_media(isom, hint_ext="m4a") == ("audio", "m4a")
    assert sniff_media(isom, hint_ext=".MOV") == ("video", "mov")
    assert sniff_media(b"not a known header", hint_ext="mp3") == ("audio", "mp3")
    assert sniff_media(b"not a known header", hint_ext=".JPEG") == ("image", "jpg")


def test_sniff_raises_when_neither_bytes_nor_hint_tell():
    """Unknown bytes without a usable hint, and empty bytes, raise ValueError."""
    with pytest.raises(ValueError, match="media type"):
        sniff_media(b"hello world, plain text")
    with pytest.raises(ValueError, match="media type"):
        sniff_media(b"hello world, plain text", hint_ext="txt")
    with pytest.raises(ValueError, match="empty"):
        sniff_media(b"", hint_ext="png")


def test_media_type_from_path_by_extension():
    """Extensions map case-insensitively to (media type, canonical extension); Path objects work."""
    assert media_type_from_path("a/b/Photo.JPEG") == ("image", "jpg")
    assert media_type_from_path(Path("clip.mp4")) == ("video", "mp4")
    assert media_type_from_path("x.WebM") == ("video", "webm")
    assert media_type_from_path("song.flac") == ("audio", "flac")
    assert media_type_from_path("voice.M4A") == ("audio", "m4a")
    assert media_type_from_path("dir.with.dots/sound.wav") == ("audio", "wav")


def test_media_type_from_path_rejects_unknown_extensions():
    """Unknown or missing extensions raise ValueError naming the file."""
    with pytest.raises(ValueError, match="notes.txt"):
        media_type_from_path("notes.txt")
    with pytest.raises(ValueError, match="README"):
        media_type_from_path("README")
