"""``kohakuboard.viewer.accounts``: who may look at a ``kobo-serve`` server.

Real files in ``tmp_path``; the "other process" is the real ``kobo-serve`` CLI
in a subprocess, editing the file a live :class:`Accounts` instance reads.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kohakuboard.viewer import accounts as A
from kohakuboard.viewer.accounts import Accounts, AccountsError, NoSuchToken, NoSuchUser

PW = "correct horse battery"


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kohakuboard.viewer.serve_cli", *args, "--config-dir", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the file


def test_file_is_0600_and_dirs_private_even_with_umask_0(tmp_path):
    """umask 0 would make everything world-writable; the accounts dir is 0700, its file 0600, parents 0755."""
    config = tmp_path / "a" / "b" / "serve"
    old = os.umask(0)
    try:
        acc = Accounts(config)
        assert not config.exists()  # reading creates nothing
        acc.add_user("alice", PW)
        acc.create_token("alice")
    finally:
        os.umask(old)
    assert mode(config) == 0o700
    assert mode(config / "accounts.json") == 0o600
    assert mode(config / "accounts.lock") == 0o600
    assert mode(tmp_path / "a") == 0o755 and mode(tmp_path / "a" / "b") == 0o755
    assert sorted(p.name for p in config.iterdir()) == ["accounts.json", "accounts.lock"]  # no temp file left

    # and through the CLI in another process started with umask 0
    config2 = tmp_path / "c" / "serve"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kohakuboard.viewer.serve_cli",
            "user",
            "add",
            "bob",
            "--password-stdin",
            "--config-dir",
            str(config2),
        ],
        input=PW + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0),
    )
    assert res.returncode == 0, res.stderr
    assert mode(config2) == 0o700 and mode(config2 / "accounts.json") == 0o600 and mode(tmp_path / "c") == 0o755


def test_no_plain_text_password_or_token_in_the_file(tmp_path):
    acc = Accounts(tmp_path)
    acc.add_user("alice", PW)
    tid, tok = acc.create_token("alice", label="ci")
    secret = tok.split("_", 2)[2]
    raw = (tmp_path / "accounts.json").read_text()
    assert PW not in raw and tok not in raw and secret not in raw
    data = json.loads(raw)
    rec = data["users"]["alice"]["password"]
    # a salted scrypt hash, stored with its parameters
    assert (rec["alg"], rec["n"], rec["r"], rec["p"], rec["dklen"]) == ("scrypt", 2**14, 8, 1, 32)
    assert len(A._unb64(rec["salt"])) == 16 and len(A._unb64(rec["hash"])) == 32
    import hashlib

    assert data["tokens"][tid]["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    # the same password twice gives two different hashes (random salt)
    acc.add_user("bob", PW)
    assert json.loads((tmp_path / "accounts.json").read_text())["users"]["bob"]["password"]["hash"] != rec["hash"]


def test_a_looser_file_is_tightened_and_a_foreign_one_refused(tmp_path):
    acc = Accounts(tmp_path)
    acc.add_user("alice", PW)
    path = tmp_path / "accounts.json"
    os.chmod(path, 0o644)
    again = Accounts(tmp_path)  # ours: tightened
    assert mode(path) == 0o600 and again.has_users()

    os.chmod(tmp_path, 0o777)
    Accounts(tmp_path)  # our directory: tightened too
    assert mode(tmp_path) == 0o700

    if os.geteuid() != 0:
        pytest.skip("a file owned by someone else needs root to set up")
    os.chmod(path, 0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(AccountsError, match=r"accessible to other users \(mode 0o644\).*chmod 600"):
        Accounts(tmp_path)
    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir(mode=0o777)
    os.chmod(foreign_dir, 0o777)
    os.chown(foreign_dir, 65534, 65534)
    with pytest.raises(AccountsError, match="writable by other users"):
        Accounts(foreign_dir)


def test_root_editing_another_accounts_directory_leaves_the_file_to_that_account(tmp_path):
    """`sudo kobo-serve --config-dir ~alice/... user add` must not leave a root-owned file alice cannot read."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    config = tmp_path / "alice-config"
    config.mkdir(mode=0o700)
    os.chown(config, 65534, 65534)
    res = cli(config, "user", "add", "bob", "--password-stdin", stdin=PW + "\n")
    assert res.returncode == 0, res.stderr
    for name in ("accounts.json", "accounts.lock"):
        st = (config / name).stat()
        assert (st.st_uid, st.st_gid, mode(config / name)) == (65534, 65534, 0o600)
    assert Accounts(config).verify_password("bob", PW) is not None


def test_a_damaged_file_is_refused_and_a_live_reader_fails_closed(tmp_path):
    acc = Accounts(tmp_path)
    acc.add_user("alice", PW)
    path = tmp_path / "accounts.json"
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    with pytest.raises(AccountsError, match="damaged"):
        Accounts(tmp_path)
    # the running server's instance lets nobody in (and says why) until the file is fixed
    assert acc.verify_password("alice", PW) is None and not acc.has_users()
    assert "damaged" in (acc.error() or "")
    with pytest.raises(AccountsError):
        acc.add_user("bob", PW)  # and nothing overwrites what might be recovered
    path.write_text(good)
    assert acc.verify_password("alice", PW) is not None and acc.error() is None


# ---------------------------------------------------------------- passwords


def test_verify_right_and_wrong_password_and_unknown_user(tmp_path):
    acc = Accounts(tmp_path)
    alice = acc.add_user("alice", PW)
    assert alice.name == "alice" and alice.projects is None and abs(alice.created - time.time()) < 60
    assert acc.verify_password("alice", PW) == alice
    assert acc.verify_password("alice", PW + " ") is None
    assert acc.verify_password("alice", "") is None
    assert acc.verify_password("Alice", PW) is None  # names are case-sensitive
    assert acc.verify_password("mallory", PW) is None
    assert acc.verify_password("not a name!", PW) is None
    assert acc.verify_password("alice", "x" * 100_000) is None  # no error, no megabyte scrypt
    acc.set_password("alice", "another password")
    assert acc.verify_password("alice", PW) is None
    assert acc.verify_password("alice", "another password") == alice
    with pytest.raises(NoSuchUser, match="no user named 'bob'"):
        acc.set_password("bob", PW)


def test_an_unknown_name_costs_a_scrypt_like_a_known_one(tmp_path):
    """Timing must not tell which names exist: an unknown name is hashed against a dummy record."""
    acc = Accounts(tmp_path)
    acc.add_user("alice", PW)

    def fastest(name: str) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            acc.verify_password(name, "wrong password")
            times.append(time.perf_counter() - t0)
        return min(times)

    known, unknown = fastest("alice"), fastest("mallory")
    assert known > 0.005  # a real scrypt (2**14, 8, 1), not a string compare
    assert unknown > 0.5 * known


def test_password_unicode_is_normalized(tmp_path):
    """NFKC: the same password typed as precomposed or decomposed (or full-width) characters matches."""
    acc = Accounts(tmp_path)
    acc.add_user("jose", "jos\u00e9-secret")
    assert acc.verify_password("jose", "jose\u0301-secret") is not None


def test_name_and_password_validation_messages(tmp_path):
    acc = Accounts(tmp_path)
    for bad in ("", "a b", "x" * 65, "al/ice", "../x", "al\nice", "é"):
        with pytest.raises(ValueError, match="invalid user name .*letters, digits and _ . @ -"):
            acc.add_user(bad, PW)
    for ok in ("a", "alice.smith@lab-1", "A_b", "x" * 64):
        acc.add_user(ok, PW)
    with pytest.raises(ValueError, match=r"too short: use at least 8 characters \(got 7\)"):
        acc.add_user("bob", "1234567")
    with pytest.raises(ValueError, match="too short"):
        acc.set_password("alice.smith@lab-1", "short")
    with pytest.raises(ValueError, match="control character"):
        acc.add_user("bob", "password\n")
    with pytest.raises(ValueError, match="too long"):
        acc.add_user("bob", "x" * 2000)
    with pytest.raises(ValueError, match="already exists"):
        acc.add_user("a", PW)
    with pytest.raises(ValueError, match="invalid project name"):
        acc.add_user("bob", PW, projects=["ok", "../etc"])
    with pytest.raises(ValueError, match="no project"):
        acc.add_user("bob", PW, projects=[])
    assert acc.get_user("bob") is None
    assert [u.name for u in acc.users()] == ["A_b", "a", "alice.smith@lab-1", "x" * 64]
    # nothing failed half-way: the file holds exactly those users
    assert sorted(json.loads((tmp_path / "accounts.json").read_text())["users"]) == [u.name for u in acc.users()]


# ---------------------------------------------------------------- tokens


def test_a_token_verifies_until_revoked(tmp_path):
    acc = Accounts(tmp_path)
    alice = acc.add_user("alice", PW)
    tid, tok = acc.create_token("alice", label="nightly eval")
    assert tok.startswith(f"kobo_{tid}_") and len(tok) > 50
    assert acc.verify_token(tok) == alice
    [t] = acc.tokens("alice")
    assert (t.id, t.user, t.label) == (tid, "alice", "nightly eval") and acc.tokens("bob") == []
    # a wrong secret with the right id, a truncated token, garbage: all None
    assert acc.verify_token(tok[:-1] + ("A" if tok[-1] != "A" else "B")) is None
    assert acc.verify_token(tok[:-5]) is None
    for junk in ("", "kobo_", f"kobo_{tid}_", "Bearer " + tok, tok + " ", "x" * 10_000):
        assert acc.verify_token(junk) is None
    tid2, tok2 = acc.create_token("alice")
    assert tid2 != tid and tok2 != tok
    assert acc.revoke_token(tid).id == tid
    assert acc.verify_token(tok) is None and acc.verify_token(tok2) == alice
    with pytest.raises(NoSuchToken, match="no token with id"):
        acc.revoke_token(tid)
    acc.revoke_token(tok2)  # pasting the whole token works too
    assert acc.verify_token(tok2) is None and acc.tokens() == []
    with pytest.raises(NoSuchUser):
        acc.create_token("bob")


def test_removing_a_user_revokes_her_tokens(tmp_path):
    acc = Accounts(tmp_path)
    acc.add_user("alice", PW)
    bob = acc.add_user("bob", PW)
    toks = [acc.create_token("alice")[1] for _ in range(3)]
    _, bobs = acc.create_token("bob")
    assert acc.remove_user("alice") == 3
    assert all(acc.verify_token(t) is None for t in toks)
    assert acc.verify_password("alice", PW) is None and acc.get_user("alice") is None
    assert acc.verify_token(bobs) == bob and [t.user for t in acc.tokens()] == ["bob"]
    with pytest.raises(NoSuchUser):
        acc.remove_user("alice")
    # a new alice does not inherit the old one's tokens
    acc.add_user("alice", PW)
    assert all(acc.verify_token(t) is None for t in toks)


# ---------------------------------------------------------------- projects


def test_project_visibility(tmp_path):
    acc = Accounts(tmp_path)
    everyone = acc.add_user("lead", PW)
    limited = acc.add_user("intern", PW, projects=["vision", "vision", "nlp"])
    assert everyone.projects is None and everyone.may_see("vision") and everyone.may_see("anything")
    assert limited.projects == ("vision", "nlp")
    assert limited.may_see("vision") and limited.may_see("nlp")
    assert not limited.may_see("audio") and not limited.may_see("Vision") and not limited.may_see("")
    # a token sees what its user sees, now, not what she saw when it was made
    _, tok = acc.create_token("intern")
    assert acc.verify_token(tok).projects == ("vision", "nlp")
    acc.set_projects("intern", ["audio"])
    user = acc.verify_token(tok)
    assert user.may_see("audio") and not user.may_see("vision")
    assert acc.set_projects("intern", None).may_see("vision")


# ---------------------------------------------------------------- another process


def test_a_live_instance_sees_changes_the_cli_makes_without_restart(tmp_path):
    """The server's Accounts re-reads the file the CLI (another process) rewrote: users, passwords, tokens."""
    server = Accounts(tmp_path)
    assert not server.has_users()

    res = cli(tmp_path, "user", "add", "alice", "--password-stdin", "--projects", "vision", stdin=PW + "\n")
    assert res.returncode == 0, res.stderr
    assert server.has_users()
    alice = server.verify_password("alice", PW)
    assert alice is not None and alice.projects == ("vision",)

    res = cli(tmp_path, "token", "create", "alice", "--label", "ci")
    assert res.returncode == 0, res.stderr
    tok = res.stdout.strip()
    assert server.verify_token(tok) == alice

    res = cli(tmp_path, "user", "passwd", "alice", "--password-stdin", stdin="a brand new one\n")
    assert res.returncode == 0, res.stderr
    assert server.verify_password("alice", PW) is None
    assert server.verify_password("alice", "a brand new one") is not None

    tid = tok.split("_")[1]
    res = cli(tmp_path, "token", "revoke", tid)
    assert res.returncode == 0, res.stderr
    assert server.verify_token(tok) is None

    res = cli(tmp_path, "user", "remove", "alice")
    assert res.returncode == 0, res.stderr
    assert server.get_user("alice") is None and server.verify_password("alice", "a brand new one") is None
    assert not server.has_users()


def test_an_unchanged_file_is_not_reread(tmp_path, monkeypatch):
    """Each verify costs one stat; the file is parsed again only when it changed."""
    acc = Accounts(tmp_path)
    acc.add_user("alice", PW)
    _, tok = acc.create_token("alice")
    loads = []
    real = acc._load
    monkeypatch.setattr(acc, "_load", lambda: loads.append(1) or real())
    for _ in range(50):
        assert acc.verify_token(tok) is not None
    assert loads == []
    Accounts(tmp_path).create_token("alice")  # another instance writes
    assert acc.verify_token(tok) is not None and len(loads) == 1


def test_default_config_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KOBO_SERVE_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert A.default_config_dir() == str(tmp_path / ".config" / "kohakuboard" / "serve")
    monkeypatch.setenv("KOBO_SERVE_CONFIG", str(tmp_path / "elsewhere"))
    assert A.default_config_dir() == str(tmp_path / "elsewhere")
    assert Accounts().path == str(tmp_path / "elsewhere" / "accounts.json")
