"""kohakuboard.integrations.tensorboard.SummaryWriter: one training script written for
torch.utils.tensorboard runs twice, once as written and once with only its import line changed;
everything it logged is read back from both and compared."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the script trains a torch model")
pytest.importorskip("tensorboard", reason="torch.utils.tensorboard needs tensorboard (pip install tensorboard)")
pytest.importorskip("matplotlib", reason="the script logs a matplotlib figure")

from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from kohakuboard.storage.reader import RunReader, list_runs  # noqa: E402
from kohakuboard.storage.verify import verify_run  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    {import_line}

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter("runs/linear")
    for step in range(6):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("train/lr", opt.param_groups[0]["lr"], global_step=step)
        writer.add_scalars("norms", {{"weight": model.weight.norm(), "bias": model.bias.norm()}}, step)
        if step % 2 == 0:
            writer.add_histogram("weights", model.weight, step)
            writer.add_image("input", torch.rand(3, 8, 6), step)
            writer.add_image("input_hwc", (torch.rand(5, 7, 3) * 255).to(torch.uint8), step, dataformats="HWC")
            writer.add_images("batch", torch.rand(3, 1, 4, 4), step)
            writer.add_text("note", f"step {{step}} loss {{loss.item():.4f}}", step)
    fig = plt.figure(figsize=(2, 1.5), dpi=50)
    plt.plot([0, 1, 2], [2, 0, 1])
    writer.add_figure("curve", fig, 5)
    writer.add_hparams({{"lr": 0.1, "optimizer": "sgd"}}, {{"hparam/final_loss": loss.item()}})
    writer.flush()
    writer.close()
    print("done")
    """
)


def _run(*scripts: tuple[str, Path]) -> None:
    """Run the script with each ``(import line, cwd)`` at once (each spends seconds importing torch)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = []
    try:
        for import_line, cwd in scripts:
            cwd.mkdir(parents=True, exist_ok=True)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", SCRIPT.format(import_line=import_line)],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "done" in out, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


def _accumulators(logdir: Path) -> dict[str, EventAccumulator]:
    out = {}
    for root, _, files in os.walk(logdir):
        if any("tfevents" in f for f in files):
            acc = EventAccumulator(root, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
            acc.Reload()
            out[os.path.relpath(root, logdir)] = acc
    return out


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_script_written_for_torch_tensorboard_runs_unchanged(daemon, base_dir: Path, tmp_path: Path):
    _run(
        ("from torch.utils.tensorboard import SummaryWriter", tmp_path / "tb"),
        ("from kohakuboard.integrations.tensorboard import SummaryWriter", tmp_path / "kobo"),
    )
    tb = _accumulators(tmp_path / "tb" / "runs")
    main = tb["linear"]
    (info,) = list_runs(base_dir)
    with RunReader(info.path) as run:
        assert run.name == "runs/linear"
        assert run.status == "finished"
        assert run.config == {"lr": 0.1, "optimizer": "sgd"}

        # scalars: every TensorBoard value at its step, with the same value
        pairs = {
            "train/loss": (main, "train/loss"),
            "train/lr": (main, "train/lr"),
            "norms/weight": (tb["linear/norms_weight"], "norms"),
            "norms/bias": (tb["linear/norms_bias"], "norms"),
        }
        for name, (acc, tag) in pairs.items():
            events = acc.Scalars(tag)
            s = run.series(name)
            assert s["global_step"].tolist() == [e.step for e in events] == list(range(6)), name
            # TensorBoard stores float32; we keep float64
            assert s["value"].tolist() == pytest.approx([e.value for e in events], rel=1e-6), name
        (hp_dir,) = [k for k in tb if k.startswith("linear/") and "norms" not in k]  # add_hparams' sub-run
        final = tb[hp_dir].Scalars("hparam/final_loss")[0].value
        assert float(run.series("hparam/final_loss")["value"][0]) == pytest.approx(final)

        # no step inflation: everything logged at one global_step shares one step
        # (add_hparams came without a global_step: a step of its own, after the others)
        assert run.series("hparam/final_loss")["step"].tolist() == [6]
        step_of: dict[int, int] = {}
        for name in set(run.list_metrics()) - {"hparam/final_loss"}:
            s = run.series(name)
            for st, g in zip(s["step"].tolist(), s["global_step"].tolist()):
                assert step_of.setdefault(g, st) == st, (name, g)
        for kind in ("media", "table"):
            for item in run.list_items()[kind]:
                rows = run.media(item) if kind == "media" else run.tables(item)
                for row in rows:
                    assert step_of.setdefault(row["global_step"], row["step"]) == row["step"], item
        assert sorted(step_of) == [0, 1, 2, 3, 4, 5]
        assert len(set(step_of.values())) == 6

        # images: the same pixels as TensorBoard's PNGs, at the same steps
        for tag, gray in (("input", False), ("input_hwc", False), ("batch", True), ("curve", False)):
            ours = run.media(tag)
            theirs = main.Images(tag)
            assert [r["global_step"] for r in ours] == [e.step for e in theirs], tag
            for r, e in zip(ours, theirs):
                a, b = _pixels(Path(r["path"]).read_bytes()), _pixels(e.encoded_image_string)
                if gray:  # TensorBoard stores one-channel images as RGB
                    assert a.ndim == 2 and np.array_equal(a, b[..., 0]), tag
                else:
                    assert np.array_equal(a[..., :3], b[..., :3]), tag

        # histograms: every value counted, over the same range
        ours = run.histograms("weights")
        theirs = main.Histograms("weights")
        assert [h["global_step"] for h in ours] == [e.step for e in theirs] == [0, 2, 4]
        for h, e in zip(ours, theirs):
            hv = e.histogram_value
            assert int(np.sum(h["counts"])) == int(hv.num) == 8
            assert h["edges"][0] == pytest.approx(hv.min) and h["edges"][-1] == pytest.approx(hv.max)

        # text
        texts = [t["rows"][0][0] for t in run.tables("note")]
        tb_texts = [e.tensor_proto.string_val[0].decode() for e in main.Tensors("note/text_summary")]
        assert texts == tb_texts and len(texts) == 3
    assert verify_run(info.path).exit_code == 0


def test_context_manager_exception_marks_crashed_and_unsupported_methods_warn(daemon, base_dir: Path):
    from kohakuboard.integrations.tensorboard import SummaryWriter

    with pytest.raises(RuntimeError):
        with SummaryWriter("boom", base_dir=str(base_dir)) as w:
            w.add_scalar("x", 1.0, 0)
            with pytest.warns(UserWarning, match="add_graph is not supported"):
                w.add_graph(object())
            w.add_graph(object())  # warns once
            raise RuntimeError("boom")
    (info,) = list_runs(base_dir)
    with RunReader(info.path) as run:
        assert run.status == "crashed"
        assert run.series("x")["value"].tolist() == [1.0]


def test_context_manager_ctrl_c_marks_interrupted(daemon, base_dir: Path):
    from kohakuboard.integrations.tensorboard import SummaryWriter

    with pytest.raises(KeyboardInterrupt):
        with SummaryWriter("ctrl-c", base_dir=str(base_dir)) as w:
            w.add_scalar("x", 1.0, 0)
            raise KeyboardInterrupt
    (info,) = list_runs(base_dir)
    with RunReader(info.path) as run:
        assert run.status == "interrupted"


def test_values_without_global_step_take_new_steps(daemon, base_dir: Path):
    from kohakuboard.integrations.tensorboard import SummaryWriter

    w = SummaryWriter("nostep", base_dir=str(base_dir))
    for v in (1.0, 2.0, 3.0):
        w.add_scalar("x", v)
    w.add_scalar("y", 5.0, np.int64(7))
    w.add_scalar("z", 6.0, 7)
    w.close()
    (info,) = list_runs(base_dir)
    with RunReader(info.path) as run:
        x = run.series("x")
        assert x["value"].tolist() == [1.0, 2.0, 3.0] and x["step"].tolist() == [0, 1, 2]
        assert run.series("y")["step"].tolist() == run.series("z")["step"].tolist() == [3]
        assert run.series("z")["global_step"].tolist() == [7]
