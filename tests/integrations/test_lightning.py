"""KohakuBoardLogger: a 3-step Lightning fit of a tiny model against a real daemon; values,
hyperparameters, images, histograms and status read back from the run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="Lightning needs torch")
pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from kohakuboard.storage.reader import RunReader, list_runs  # noqa: E402
from kohakuboard.storage.verify import verify_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # Lightning's advice about this toy setup (few dataloader workers, tiny batches, no GPU)
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*GPU available but not used.*",
    "ignore:.*Trying to infer the `batch_size`.*",
    # Lightning 2.6 on torch 2.13: torch deprecates a pytree class Lightning still uses
    "ignore:.*LeafSpec.*is deprecated:FutureWarning",
    "ignore::DeprecationWarning:lightning.*",
    "ignore::DeprecationWarning:pytorch_lightning.*",
)


def _loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


def _module_class(pl):
    class Tiny(pl.LightningModule):
        def __init__(self, lr: float = 0.05, hidden: int = 4, fail_at: int | None = None):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(4, 1)
            self.logged: list[tuple[int, str, float]] = []

        def training_step(self, batch, batch_idx):
            if self.hparams.fail_at is not None and self.global_step == self.hparams.fail_at:
                raise RuntimeError("boom")
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, batch_size=len(x))
            self.logged.append((self.global_step, "train_loss", float(loss.detach())))
            if self.global_step == 1:
                self.logger.log_image(
                    "sample",
                    [np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4), np.uint8)],
                    step=self.global_step,
                    caption=["white-ish", "black"],
                )
                self.logger.log_histogram("weights", self.net.weight.detach(), step=self.global_step)
                self.logger.experiment.log(auto_step=False, direct=1.0)  # the Board itself
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), batch_size=len(x))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return Tiny


def _fit(pl, logger, tmp_path: Path, module) -> object:
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
        val_check_interval=2,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, _loader(), _loader(4))
    return trainer


def _check_run(path: str, module) -> None:
    with RunReader(path) as run:
        assert run.status == "finished"
        assert run.config["lr"] == 0.05 and run.config["hidden"] == 4
        assert run.config["note"] == "given"
        loss = run.series("train_loss")
        assert [int(g) for g in loss["global_step"]] == [0, 1, 2]
        assert [float(v) for v in loss["value"]] == pytest.approx([v for _, _, v in module.logged])
        val = run.series("val_loss")
        assert len(val) == 1 and int(val["global_step"][0]) == 1  # after the 2nd optimizer step
        assert "epoch" in run.list_metrics()
        # values of one Lightning step share one KohakuBoard step
        gs_by_step = {}
        for name in ("train_loss", "val_loss", "epoch"):
            s = run.series(name)
            for st, g in zip(s["step"], s["global_step"]):
                assert gs_by_step.setdefault(int(st), int(g)) == int(g)
        assert sorted(set(gs_by_step.values())) == [0, 1, 2] and len(gs_by_step) == 3
        media = {name: run.media(name) for name in run.list_items()["media"]}
        assert set(media) == {"sample/0", "sample/1"}
        assert media["sample/0"][0]["caption"] == "white-ish" and media["sample/0"][0]["global_step"] == 1
        assert (media["sample/1"][0]["width"], media["sample/1"][0]["height"]) == (4, 4)
        hist = run.histograms("weights")
        assert len(hist) == 1 and int(np.sum(hist[0]["counts"])) == 4
        assert run.series("direct")["global_step"].tolist() == [1]
    assert verify_run(path).exit_code == 0


def test_lightning_fit_logs_metrics_hparams_media_and_finishes(daemon, base_dir: Path, tmp_path: Path):
    import lightning.pytorch as pl

    from kohakuboard.integrations.lightning import KohakuBoardLogger

    assert issubclass(KohakuBoardLogger, pl.loggers.Logger)
    logger = KohakuBoardLogger(name="tiny", project="pl", base_dir=str(base_dir), config={"note": "given"})
    module = _module_class(pl)()
    _fit(pl, logger, tmp_path, module)
    (info,) = list_runs(base_dir)
    assert logger.name == "pl" and logger.version == info.run_id
    assert logger.log_dir == str(base_dir / "pl" / logger.version) == info.path
    _check_run(logger.log_dir, module)


def test_lightning_exception_in_fit_marks_the_run_crashed(daemon, base_dir: Path, tmp_path: Path):
    import lightning.pytorch as pl

    from kohakuboard.integrations.lightning import KohakuBoardLogger

    logger = KohakuBoardLogger(name="fails", project="pl", base_dir=str(base_dir))
    with pytest.raises(RuntimeError, match="boom"):
        _fit(pl, logger, tmp_path, _module_class(pl)(fail_at=2))
    (info,) = list_runs(base_dir)
    with RunReader(info.path) as run:
        assert run.status == "crashed"
        assert [int(g) for g in run.series("train_loss")["global_step"]] == [0, 1]


def test_lightning_ctrl_c_in_fit_marks_the_run_interrupted(daemon, base_dir: Path, tmp_path: Path):
    """Lightning turns Ctrl-C into finalize("failed") and sys.exit(1): the run ends interrupted."""
    import signal

    import lightning.pytorch as pl

    from kohakuboard.integrations.lightning import KohakuBoardLogger

    class CtrlC(_module_class(pl)):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    logger = KohakuBoardLogger(name="ctrl-c", project="pl", base_dir=str(base_dir))
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT while it shuts down
    try:
        with pytest.raises(SystemExit):
            _fit(pl, logger, tmp_path, CtrlC())
    finally:
        signal.signal(signal.SIGINT, handler)
    (info,) = list_runs(base_dir)
    with RunReader(info.path) as run:
        assert run.status == "interrupted"
        assert [int(g) for g in run.series("train_loss")["global_step"]] == [0]


def test_pytorch_lightning_fallback(daemon, base_dir: Path, tmp_path: Path):
    """The same logger built for the older ``pytorch_lightning`` package works with its Trainer."""
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")

    from kohakuboard.integrations.lightning import make_logger_class

    Logger = make_logger_class(pl)
    assert issubclass(Logger, pl.loggers.Logger)
    logger = Logger(name="tiny", project="pl", base_dir=str(base_dir), config={"note": "given"})
    module = _module_class(pl)()
    _fit(pl, logger, tmp_path, module)
    _check_run(logger.log_dir, module)


def test_framework_choice(monkeypatch):
    """lightning.pytorch unless only pytorch_lightning is in use; a clear error without either."""
    import sys

    from kohakuboard.integrations import lightning as kl

    assert kl._framework() is sys.modules["lightning.pytorch"]
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    monkeypatch.delitem(sys.modules, "lightning.pytorch")
    assert kl._framework() is pl
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # makes `import lightning.pytorch` fail
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match="pip install lightning"):
        kl._framework()
