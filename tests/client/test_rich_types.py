"""Media, Table, Histogram, TensorLog and KernelDensity through a real daemon, read back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kohakuboard.client import Board, Histogram, KernelDensity, Media, Table, TensorLog
from kohakuboard.storage.reader import RunReader


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_every_type_at_several_steps_in_one_call(daemon):
    """Each type logged at 3 steps in one mixed call reads back exactly (pixels, counts, bits, KDE)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    chw = rng.random((3, 16, 16)).astype(np.float32)
    values = rng.normal(size=10_000).astype(np.float32)
    values[:7] = np.nan
    values[7:9] = np.inf
    tensor = rng.normal(size=(4, 5, 6)).astype(np.float16)
    with Board(run_id="rich", capture_output=False) as b:
        for step in range(3):
            b.log(
                loss=1.0 / (step + 1),
                same_img=Media(img, caption=f"step {step}"),
                chw_img=Media(chw),
                hist=Histogram(values, num_bins=32),
                compact=Histogram(values, precision="compact"),
                pre=Histogram(values[9:]).compute_bins(),
                weights=TensorLog(tensor * (step + 1), namespace="layer3", metadata={"head": 2}),
                dens=KernelDensity(values=values[9:], grid_size=128),
                tbl=Table([{"name": "Alice", "score": np.int64(95), "img": Media(img)}, {"name": "Bob", "pass": True}]),
            )
        b.flush()
        with RunReader(b.path) as r:
            assert r.series("loss")["value"].tolist() == [1.0, 0.5, 1.0 / 3]
            items = r.list_items()
            assert items["media"] == ["chw_img", "same_img"]
            assert items["histogram"] == ["compact", "hist", "pre"]
            assert items["tensor"] == ["weights"] and items["kde"] == ["dens"] and items["table"] == ["tbl"]

            media = r.media("same_img")
            assert [m["step"] for m in media] == [0, 1, 2]
            assert [m["caption"] for m in media] == ["step 0", "step 1", "step 2"]
            assert len({m["hash"] for m in media}) == 1  # 3 rows, 1 blob
            assert (media[0]["width"], media[0]["height"]) == (48, 32)
            np.testing.assert_array_equal(_png_pixels(r.media_bytes(media[0])), img)
            chw_px = _png_pixels(r.media_bytes(r.media("chw_img", start=1, end=1)[0]))
            np.testing.assert_array_equal(chw_px, np.rint(chw.transpose(1, 2, 0) * 255).astype(np.uint8))

            hists = r.histograms("hist")
            assert [h["step"] for h in hists] == [0, 1, 2]
            h = hists[0]
            finite = values[np.isfinite(values)]
            assert h["counts"].sum() == finite.size == h["total"]
            assert (h["nan"], h["posinf"], h["neginf"]) == (7, 2, 0)
            assert h["edges"][0] == finite.min() and h["edges"][-1] == pytest.approx(finite.max())
            assert len(h["edges"]) == 33
            c = r.histograms("compact")[0]
            assert c["precision"] == "compact"
            assert abs(c["counts"].sum() - finite.size) / finite.size < 0.05
            assert r.histograms("pre")[0]["counts"].sum() == finite.size

            t = r.tensors("weights")
            assert len(t) == 3 and t[2]["array"].dtype == np.float16 and t[2]["array"].shape == (4, 5, 6)
            assert t[2]["array"].tobytes() == (tensor * 3).tobytes()
            assert t[0]["namespace"] == "layer3" and t[0]["metadata"] == {"head": 2}

            k = r.kde("dens")[0]
            assert len(k["grid"]) == 128 and np.trapezoid(k["density"], k["grid"]) == pytest.approx(1.0, abs=0.02)
            assert abs(k["grid"][np.argmax(k["density"])]) < 0.5

            tables = r.tables("tbl")
            assert len(tables) == 3
            tb = tables[0]
            assert tb["columns"] == ["name", "score", "img", "pass"]
            assert tb["rows"][0][:2] == ["Alice", 95] and tb["rows"][1] == ["Bob", None, None, True]
            np.testing.assert_array_equal(_png_pixels(r.media_bytes(tb["rows"][0][2])), img)
    # identical pixels are one file: same_img x3 and the table cells x3 share one, chw_img x3 another
    assert len(list(Path(b.path, "media").glob("*.png"))) == 2


def test_array_mutated_after_log_is_stored_as_it_was(daemon):
    """Mutating an image or tensor right after log() does not change what is stored."""
    img = np.zeros((8, 8), dtype=np.uint8)
    arr = np.arange(10, dtype=np.float64)
    with Board(run_id="mutate", capture_output=False) as b:
        b.log(img=Media(img), t=TensorLog(arr), h=Histogram(arr))
        img[:] = 255
        arr[:] = -1
        b.flush()
        with RunReader(b.path) as r:
            assert _png_pixels(r.media_bytes(r.media("img")[0])).max() == 0
            assert r.tensors("t")[0]["array"].tolist() == list(range(10))
            assert r.histograms("h")[0]["edges"][0] == 0.0


def test_video_audio_from_paths_and_bytes(daemon, tmp_path):
    """Video and audio are stored from a path or bytes with their type and extension."""
    import wave

    wav = tmp_path / "beep.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 800)
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    with Board(run_id="av", capture_output=False) as b:
        b.log(training_video=Media(str(mp4), media_type="video"), sound=Media(wav.read_bytes(), media_type="audio"))
        b.flush()
        with RunReader(b.path) as r:
            v = r.media("training_video")[0]
            assert v["media_type"] == "video" and v["ext"] == "mp4" and r.media_bytes(v) == mp4.read_bytes()
            a = r.media("sound")[0]
            assert a["media_type"] == "audio" and a["ext"] == "wav" and r.media_bytes(a) == wav.read_bytes()


@pytest.mark.parametrize(
    "make, exc, text",
    [
        (lambda tmp: Media(np.zeros((2, 3, 8, 8))), ValueError, "4-D"),
        (lambda tmp: Media(str(tmp / "missing.mp4"), media_type="video"), FileNotFoundError, "missing.mp4"),
        (lambda tmp: Table([{"a": object()}]), TypeError, "column 'a'"),
        (lambda tmp: Histogram([[1.0, 2.0], [3.0]]), ValueError, "ragged"),
        (lambda tmp: Histogram(bins=[0.0, 1.0], counts=[1, 2]), ValueError, "edges"),
        (lambda tmp: KernelDensity(grid=[0.0, 1.0], density=[1.0]), ValueError, "grid"),
        (lambda tmp: TensorLog(np.array(["a", "b"])), TypeError, "numeric"),
    ],
)
def test_bad_rich_values_raise_naming_the_key_and_keep_the_call_unsent(daemon, tmp_path, make, exc, text):
    """A bad rich value raises in the caller naming its key; the rest of that call is not sent, later calls work."""
    with Board(run_id="badrich", capture_output=False) as b:
        with pytest.raises(exc, match=text) as info:
            b.log(ok=1.0, broken=make(tmp_path))
        assert "'broken'" in str(info.value)
        b.log(ok=2.0, fine=Histogram([1.0, 2.0]))
        b.flush()
        with RunReader(b.path) as r:
            assert r.series("ok")["value"].tolist() == [2.0]
            assert len(r.histograms("fine")) == 1


def test_constructor_parameters_are_checked_early():
    """Wrong parameters (media_type, precision, num_bins, grid_size) fail at construction with their name."""
    with pytest.raises(ValueError, match="media_type"):
        Media(b"x", media_type="gif")
    with pytest.raises(ValueError, match="precision"):
        Histogram([1.0], precision="half")
    with pytest.raises(ValueError, match="num_bins"):
        Histogram([1.0], num_bins=0)
    with pytest.raises(ValueError, match="grid_size"):
        KernelDensity(values=[1.0], grid_size=1)
    assert KernelDensity(raw_values=[1.0, 2.0], num_points=64).grid_size == 64


def test_empty_and_all_nan_histograms_are_stored_empty(daemon):
    """An empty or all-NaN histogram is an empty histogram, not an error."""
    with Board(run_id="emptyh", capture_output=False) as b:
        b.log(empty=Histogram([]), nans=Histogram(np.full(5, np.nan)))
        b.flush()
        with RunReader(b.path) as r:
            e = r.histograms("empty")[0]
            assert e["counts"].size == 0 and e["total"] == 0
            n = r.histograms("nans")[0]
            assert n["counts"].size == 0 and n["nan"] == 5


def test_log_histogram_is_one_step_per_call_as_the_guide_warns(daemon):
    """The guide's BAD example runs: log_histogram() takes a step per call, unified log() shares one."""
    grads = [np.arange(10.0), np.arange(20.0)]
    with Board(run_id="inflation", capture_output=False) as b:
        b.log_histogram("grad1", grads[0])  # step 0
        b.log_histogram("grad2", grads[1])  # step 1
        b.log(grad1=Histogram(grads[0]), grad2=Histogram(grads[1]))  # both at step 2
        b.flush()
        with RunReader(b.path) as r:
            assert [h["step"] for h in r.histograms("grad1")] == [0, 2]
            assert [h["step"] for h in r.histograms("grad2")] == [1, 2]


def test_log_helpers_take_the_metric_name_auto_step(daemon, tmp_path):
    """The log_* calls take the metric name as an argument, so "auto_step" is a name like any other there.

    They once passed it on as ``log(**{name: value})``, where it became log()'s own ``auto_step``
    argument and was refused (log_images() alone took it).
    """
    import wave

    wav = tmp_path / "beep.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 800)
    mp4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100
    rng = np.random.default_rng(0)
    calls = {
        "histogram": lambda b: b.log_histogram("auto_step", rng.normal(size=100)),
        "media": lambda b: b.log_video("auto_step", mp4),
        "audio": lambda b: b.log_audio("auto_step", str(wav)),
        "table": lambda b: b.log_table("auto_step", [{"a": 1}]),
        "tensor": lambda b: b.log_tensor("auto_step", np.ones((2, 3))),
        "kde": lambda b: b.log_kernel_density("auto_step", values=rng.normal(size=100)),
    }
    for kind, call in calls.items():
        with Board(run_id=f"auto-step-{kind}", capture_output=False) as b:
            b.log(loss=1.0)  # step 0
            call(b)  # step 1
            b.flush()
            with RunReader(b.path) as r:
                if kind == "histogram":
                    rows = r.histograms("auto_step")
                elif kind in ("media", "audio"):
                    rows = r.media("auto_step")
                elif kind == "table":
                    rows = r.tables("auto_step")
                elif kind == "tensor":
                    rows = r.tensors("auto_step")
                else:
                    rows = r.kde("auto_step")
                assert [row["step"] for row in rows] == [1], kind
    with Board(run_id="auto-step-log", capture_output=False) as b:  # log() keeps the name for its argument
        with pytest.raises(TypeError, match="auto_step"):
            b.log(auto_step=Histogram([1.0, 2.0]))
