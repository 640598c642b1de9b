"""What the type-check gate and the typed package rest on, read from pyproject.toml.

mypy itself runs in CI (``.ci/mypy``, called by ``.ci/run``); these tests keep its ground from
shifting: it checks against the oldest Python the package claims (so a 3.11-only API such as
``asyncio.TaskGroup`` is caught), its version is pinned, and every shipped package carries
``py.typed`` so that users' type checkers read the annotations.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_mypy_checks_against_the_oldest_python_the_package_claims(pyproject):
    oldest = re.fullmatch(r">=\s*(\d+\.\d+)", pyproject["project"]["requires-python"].strip())
    assert oldest, "requires-python is not of the form '>=X.Y'"
    assert pyproject["tool"]["mypy"]["python_version"] == oldest.group(1)


def test_the_test_extra_pins_mypy(pyproject):
    pins = [r for r in pyproject["project"]["optional-dependencies"]["test"] if re.match(r"mypy\b", r)]
    assert len(pins) == 1 and re.fullmatch(r"mypy==[\w.]+", pins[0]), pins


def test_every_shipped_package_has_py_typed_and_ships_it(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["*"]
    for package in setuptools["packages"]:
        folder = ROOT / setuptools["package-dir"][package]
        assert (folder / "py.typed").is_file(), f"{folder.name}/py.typed is missing"


def test_ci_mypy_checks_every_shipped_package(pyproject):
    script = (ROOT / ".ci" / "mypy").read_text()
    checked = set(re.findall(r"-p (kohakuboard\.\w+)", script))
    assert checked == set(pyproject["tool"]["setuptools"]["packages"])
    assert re.search(r"^\.ci/mypy$", (ROOT / ".ci" / "run").read_text(), re.M), ".ci/run does not run .ci/mypy"
