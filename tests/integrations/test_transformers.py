"""KohakuBoardCallback: a tiny BERT (built from a config, no download) trained by transformers'
Trainer against a real daemon; values, config and status read back from the run folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="transformers' Trainer needs torch")
pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers accelerate)")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install accelerate)")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from kohakuboard.integrations.transformers import KohakuBoardCallback, rewrite_logs  # noqa: E402
from kohakuboard.storage.reader import RunReader, list_runs  # noqa: E402
from kohakuboard.storage.verify import verify_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # transformers/accelerate talking about their own future, not about this code
    "ignore::FutureWarning:transformers.*",
    "ignore::FutureWarning:accelerate.*",
    "ignore::DeprecationWarning:transformers.*",
)

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=16,
    num_labels=2,
)


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1, 64, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(n)
    ]


def _args(tmp_path: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        run_name="tiny-bert",
        learning_rate=1e-3,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_rewrite_logs_names_and_skips_non_numbers():
    """eval_/test_ prefixes become namespaces, everything else train/; strings are skipped."""
    out = rewrite_logs({"loss": 1.5, "eval_loss": 2, "test_acc": torch.tensor(0.5), "epoch": 0.25, "note": "x"})
    assert out == {"train/loss": 1.5, "eval/loss": 2.0, "test/acc": 0.5, "train/epoch": 0.25}


def test_trainer_logs_values_config_and_finishes(daemon, base_dir: Path, tmp_path: Path):
    """3 steps with evaluation: every on_log value at the Trainer's global step, the config, status finished."""
    model = BertForSequenceClassification(BertConfig(**TINY))
    seen: list[tuple[int, dict]] = []

    class Spy(KohakuBoardCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append((state.global_step, dict(logs or {})))
            super().on_log(args, state, control, logs=logs, **kw)

    cb = Spy(project="hf", base_dir=str(base_dir), config={"note": "tiny"})
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(), eval_dataset=_dataset(4), callbacks=[cb]
    )
    trainer.train()
    run_id = cb.board.run_id
    path = base_dir / "hf" / run_id
    with RunReader(path) as run:
        assert run.status == "finished"
        assert run.name == "tiny-bert"
        assert run.config["note"] == "tiny"
        assert run.config["training_args"]["max_steps"] == 3
        assert run.config["training_args"]["learning_rate"] == 1e-3
        assert run.config["model_config"]["hidden_size"] == 32
        assert run.config["model_config"]["num_hidden_layers"] == 1
        metrics = set(run.list_metrics())
        expected: dict[str, list[tuple[int, float]]] = {}
        for gstep, logs in seen:
            for key, value in rewrite_logs(logs).items():
                expected.setdefault(key, []).append((gstep, value))
        assert {"train/loss", "eval/loss", "train/learning_rate", "train/train_runtime"} <= set(expected)
        assert metrics == set(expected)
        for key, points in expected.items():
            s = run.series(key)
            assert [(int(g), float(v)) for g, v in zip(s["global_step"], s["value"])] == pytest.approx(points), key
        assert list(run.series("train/loss")["global_step"]) == [1, 2, 3]
        assert list(run.series("eval/loss")["global_step"]) == [2, 3]  # eval_steps=2 and the last step
        # values of one global step share one step: no step inflation
        pairs = {
            (int(st), int(g)) for k in expected for st, g in zip(run.series(k)["step"], run.series(k)["global_step"])
        }
        assert sorted(pairs) == [(0, 1), (1, 2), (2, 3)]
    assert verify_run(str(path)).exit_code == 0


def test_add_callback_then_evaluate_after_training_reopens_the_run(daemon, base_dir: Path, tmp_path: Path):
    """trainer.add_callback(...); evaluate() after train() logs into the same run, which ends finished."""
    model = BertForSequenceClassification(BertConfig(**TINY))
    trainer = Trainer(
        model=model, args=_args(tmp_path, eval_strategy="no"), train_dataset=_dataset(), eval_dataset=_dataset(4)
    )
    cb = KohakuBoardCallback(name="added", project="hf", base_dir=str(base_dir))
    trainer.add_callback(cb)
    trainer.train()
    metrics = trainer.evaluate()
    cb.finish()
    runs = list_runs(base_dir)
    assert len(runs) == 1
    with RunReader(runs[0].path) as run:
        assert run.status == "finished"
        s = run.series("eval/loss")
        assert list(s["global_step"]) == [3]
        assert float(s["value"][0]) == pytest.approx(metrics["eval_loss"])
        assert list(run.series("train/loss")["global_step"]) == [1, 2, 3]


CRASH = textwrap.dedent(
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, TrainerCallback
    from kohakuboard.integrations.transformers import KohakuBoardCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise {exc}("boom at step 2")

    model = BertForSequenceClassification(BertConfig(**{tiny!r}))
    data = [{{"input_ids": torch.randint(1, 64, (8,)), "labels": torch.tensor(i % 2)}} for i in range(8)]
    args = TrainingArguments(output_dir={out!r}, max_steps=5, per_device_train_batch_size=2, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[KohakuBoardCallback(name="crash", base_dir={base!r}), Boom()])
    {body}
    """
)


# (exception raised at step 2, how the script runs the training, its exit code, the run's status)
NEVER_ENDS = {
    "uncaught": ("RuntimeError", "trainer.train()", 1, "crashed"),
    "keyboard-interrupt": (
        "KeyboardInterrupt",
        "trainer.train()",
        -2,
        "interrupted",
    ),  # Ctrl-C: Python ends itself with SIGINT
    "caught-then-exit": (
        "RuntimeError",
        "try:\n    trainer.train()\nexcept RuntimeError:\n    print('caught')",
        0,
        "crashed",
    ),
}


@pytest.fixture(scope="module")
def never_ending(shared_daemons, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """The scripts of :func:`test_training_that_never_ends`, run at once (each spends seconds importing
    torch and transformers) against the shared daemon: case -> (exit code, stderr, base dir)."""
    from kohakuboard.testing import scrubbed_environ

    ep = shared_daemons.get().endpoint
    started = {}
    for case, (exc, body, _, _) in NEVER_ENDS.items():
        tmp = tmp_path_factory.mktemp(case)
        base = tmp / "kohakuboard"
        script = CRASH.format(exc=exc, tiny=TINY, out=str(tmp / "out"), base=str(base), body=body)
        env = dict(scrubbed_environ(), KOBO_DAEMON_ENDPOINT=str(ep), KOBO_BASE_DIR=str(base), PYTHONWARNINGS="ignore")
        err = open(tmp / "stderr", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=err, text=True, env=env
        )
        started[case] = (proc, err, base)
    results = {}
    try:
        for case, (proc, err, base) in started.items():
            code = proc.wait(180)
            err.seek(0)
            results[case] = (code, err.read(), base)
    finally:
        for proc, err, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            err.close()
    return results


@pytest.mark.parametrize("case", list(NEVER_ENDS))
def test_training_that_never_ends(daemon, never_ending, case):
    """Training that raised (uncaught, or caught by the script) leaves the run crashed; Ctrl-C interrupted."""
    code, status = NEVER_ENDS[case][2:]
    returncode, stderr, base_dir = never_ending[case]
    assert returncode == code, stderr[-3000:]
    runs = list_runs(base_dir)
    assert len(runs) == 1, stderr[-3000:]
    with RunReader(runs[0].path) as run:
        assert run.status == status
        assert list(run.series("train/loss")["global_step"]) == [1, 2][: len(run.series("train/loss"))]
        assert len(run.series("train/loss")) >= 1
    meta = json.loads((Path(runs[0].path) / "metadata.json").read_text())
    assert meta["finished_at"] is not None
