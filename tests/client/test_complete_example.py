"""The guide's "Complete Example", run as written with a small CPU model, every item read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

COMPLETE_EXAMPLE = """
import torch
from torch import nn, optim

# stand-ins for what the guide leaves to the user: a tiny CIFAR-like model and data
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
optimizer = optim.AdamW(model.parameters(), lr=0.001)
criterion = nn.CrossEntropyLoss()
train_loader = [(torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
val_loader = [(torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
class _DS(list):
    pass
val_loader_dataset = _DS(range(32))
class _VL(list):
    dataset = val_loader_dataset
val_loader = _VL(val_loader)
class_names = [f"class{i}" for i in range(10)]

from kohakuboard.client import Board, Histogram, Table, Media

# Initialize board
board = Board(
    name="cifar10-resnet18",
    config={
        "lr": 0.001,
        "batch_size": 128,
        "epochs": 100,
        "optimizer": "AdamW"
    }
)

# Training loop
for epoch in range(EPOCHS):
    # Training phase
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()

        board.step()  # Increment ONCE per optimizer step

        # Log training metrics
        board.log(**{
            "train/loss": loss.item(),
            "train/lr": optimizer.param_groups[0]['lr']
        })

    # Log gradients every epoch (not every batch!)
    if epoch % 1 == 0:
        grad_data = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                grad_data[f"gradients/{name}"] = Histogram(param.grad).compute_bins()
        board.log(**grad_data)

    # Validation phase
    model.eval()
    val_loss = 0
    correct = 0
    predictions_table = []

    with torch.no_grad():
        for batch_idx, (data, target) in enumerate(val_loader):
            output = model(data)
            val_loss += criterion(output, target).item()
            pred = output.argmax(dim=1)
            correct += (pred == target).sum().item()

            # Collect sample predictions (first batch only)
            if batch_idx == 0:
                for i in range(min(8, len(data))):
                    predictions_table.append({
                        "image": Media(data[i].cpu().numpy()),
                        "true": class_names[target[i]],
                        "pred": class_names[pred[i]],
                        "correct": "✓" if pred[i] == target[i] else "✗"
                    })

    # Log validation results (scalars + table together!)
    board.log(**{
        "val/loss": val_loss / len(val_loader),
        "val/accuracy": correct / len(val_loader.dataset),
        "val/predictions": Table(predictions_table)
    })

# Auto-cleanup on exit (atexit hook)
print(board.path)
"""


def test_complete_example_with_a_small_cpu_model(endpoint, tmp_path, script):
    """Every scalar, gradient histogram and prediction table of the Complete Example is in the run."""
    epochs = 3
    res = script(COMPLETE_EXAMPLE.replace("EPOCHS", str(epochs)), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    run = Path(res.stdout.strip().splitlines()[-1])
    assert json.loads((run / "metadata.json").read_text())["status"] == "finished"

    from kohakuboard.storage.reader import RunReader

    with RunReader(run) as r:
        assert r.config["optimizer"] == "AdamW"
        loss = r.series("train/loss")
        assert len(loss) == epochs * 4
        assert loss["global_step"].tolist() == list(range(1, epochs * 4 + 1))
        assert len(r.series("val/loss")) == epochs and len(r.series("val/accuracy")) == epochs
        items = r.list_items()
        grads = [n for n in items["histogram"] if n.startswith("gradients/")]
        assert sorted(grads) == ["gradients/0.bias", "gradients/0.weight", "gradients/3.bias", "gradients/3.weight"]
        for g in grads:
            hists = r.histograms(g)
            assert len(hists) == epochs
            assert all(h["counts"].sum() > 0 for h in hists)
        assert r.histograms("gradients/0.weight")[0]["total"] == 4 * 3 * 3 * 3
        tables = r.tables("val/predictions")
        assert len(tables) == epochs
        t = tables[-1]
        assert t["columns"] == ["image", "true", "pred", "correct"]
        assert len(t["rows"]) == 8
        first = t["rows"][0]
        assert first[0]["media_type"] == "image" and (first[0]["width"], first[0]["height"]) == (8, 8)
        assert first[1].startswith("class") and first[3] in ("✓", "✗")
        # the table and the validation scalars were logged in one call: same step
        assert t["step"] == int(r.series("val/loss")["step"][-1])
