"""Writing systemd unit files: what ``kobo-daemon install-systemd`` and ``kobo-serve install-systemd`` share.

Each program renders its own units (``daemon/units.py``, ``viewer/units.py``);
quoting ``ExecStart=`` words, finding the unit directory and writing a unit
file (atomically, refusing to overwrite a different one without ``--force``)
are the same for both, so they live here in the bottom layer that both the
daemon and the viewer may import (``tests/test_layers.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .atomic import write_atomic

_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def quote_arg(arg: str) -> str:
    """One ExecStart= word: ``%`` and ``$`` escaped, quoted if it holds spaces or quotes."""
    word = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_dir(user: bool, environ: Mapping[str, str] | None = None) -> str:
    """Where systemd looks for units: the user's unit dir (``user``), or /etc/systemd/system."""
    env = os.environ if environ is None else environ
    if not user:
        return "/etc/systemd/system"
    config = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "systemd", "user")


class UnitInstallError(Exception):
    """A unit file could not be written; the message says why and what to do."""


def install_unit(directory: str, name: str, text: str, *, force: bool, program: str, systemd_dir: str) -> list[str]:
    """Write unit ``name`` into ``directory`` for ``program``'s ``install-systemd``; return what to tell the user.

    Raises :class:`UnitInstallError` (a different unit is there without
    ``force``, no permission, any other write error).
    """
    path = os.path.join(directory, name)
    try:
        changed = write_unit(path, text, force=force)
    except FileExistsError:
        raise UnitInstallError(
            f"{path} already exists and differs from the unit this installation would write; "
            "rerun with --force to overwrite it (--print shows the new unit)"
        ) from None
    except PermissionError as exc:
        hint = f'run it as root (sudo "$(command -v {program})" install-systemd ...), or use --user for a per-user unit'
        raise UnitInstallError(f"cannot write {path}: {exc.strerror}; {hint}") from exc
    except OSError as exc:
        raise UnitInstallError(f"cannot write {path}: {exc}") from exc
    lines = [f"{'wrote' if changed else 'unchanged (already up to date):'} {path}"]
    if os.path.abspath(directory) != os.path.abspath(systemd_dir):
        lines.append(f"(not where systemd looks: copy it to {systemd_dir}/ before enabling)")
    return lines


def write_unit(path: str, text: str, *, force: bool) -> bool:
    """Write ``text`` to ``path`` atomically; return False if it already held exactly that.

    Raises ``FileExistsError`` if ``path`` holds something else and not ``force``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            old: str | None = f.read()
    except FileNotFoundError:
        old = None
    if old == text:
        return False
    if old is not None and not force:
        raise FileExistsError(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, text, mode=0o644, fsync=False)
    return True
