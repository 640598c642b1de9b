"""pytest fixtures for testing training code against a real ``kobo-daemon``.

Enable them in your ``conftest.py``::

    pytest_plugins = ["kohakuboard.testing.plugin"]

and ask for ``kobo_daemon``::

    def test_my_training_loop(kobo_daemon):
        train()                                   # Board(run_id="t1") inside
        with kobo_daemon.read("t1") as run:
            assert run.status == "finished"

``kobo_daemon`` is a :class:`~kohakuboard.testing.KoboDaemon` from
:func:`~kohakuboard.testing.isolated_daemon`: a daemon of the test's own on an
endpoint of its own, runs written under ``tmp_path / "kohakuboard"`` (kept by pytest
for a look after a failure), this process's environment pointing Boards at both for
the test, and the daemon stopped (exit status 0 checked) afterwards.  To share one
daemon among the tests of a module, build a module-scoped fixture on
``isolated_daemon()`` the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import KoboDaemon, isolated_daemon


@pytest.fixture
def kobo_daemon(tmp_path: Path) -> Iterator[KoboDaemon]:
    """A real kobo-daemon for this test, runs under ``tmp_path / "kohakuboard"``."""
    with isolated_daemon(tmp_path / "kohakuboard") as daemon:
        yield daemon
