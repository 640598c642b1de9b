"""Importing the client stays cheap: no numpy, zmq, msgpack, PIL or torch."""

from __future__ import annotations

import subprocess
import sys

import kohakuboard.client


def test_import_pulls_no_heavy_modules():
    """A fresh interpreter importing kohakuboard.client loads none of the heavy dependencies (nor the viewer)."""
    code = (
        "import sys, kohakuboard.client\n"
        "heavy = [m for m in ('numpy', 'zmq', 'msgpack', 'PIL', 'torch', 'kohakuvault', 'click', 'starlette', 'uvicorn', 'kohakuboard.viewer', 'transformers', 'lightning', 'pytorch_lightning', 'tensorboard', 'tensorboardX', 'matplotlib', 'kohakuboard.integrations') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_integrations_package_imports_no_framework():
    """``import kohakuboard.integrations`` alone loads none of the frameworks it adapts."""
    code = (
        "import sys, kohakuboard.integrations\n"
        "heavy = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'tensorboard', 'tensorboardX', 'torch', 'matplotlib', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_are_exactly_all():
    """The client's public surface is its sorted __all__."""
    public = sorted(n for n in dir(kohakuboard.client) if not n.startswith("_"))
    assert kohakuboard.client.__all__ == sorted(kohakuboard.client.__all__)
    assert set(kohakuboard.client.__all__) <= set(public)
    assert "Board" in kohakuboard.client.__all__
