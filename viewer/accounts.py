"""Who may look at a ``kobo-serve`` server: users with passwords, API tokens, project visibility.

Everything lives in one JSON file, ``<config_dir>/accounts.json``:

* the directory is created 0700 and the file 0600 whatever the umask; a file
  others may read is tightened (when we own it) or refused, and so is a
  directory others may write (they could swap the file);
* passwords are stored as salted ``hashlib.scrypt`` hashes together with their
  parameters (n, r, p, dklen), so the cost can be raised later without
  breaking old hashes; a plain-text password never reaches the file or a log;
* an API token (``kobo_<id>_<secret>``) is shown once; only the SHA-256 of its
  secret is stored (the secret has 256 bits of entropy: no KDF needed); a
  token carries its user's project visibility and dies with its user;
* every change is a read-modify-write under an ``flock`` on
  ``accounts.lock``, written to a temporary file, fsynced and renamed over
  the old one, so a reader sees either the old or the new file; root editing
  a directory another account owns leaves the file to that account (the one
  the server runs as);
* a running server sees changes the CLI made without a restart: each
  ``verify_*``/``get_user``/``has_users`` call ``stat``s the file and re-reads
  it when its inode, size, mtime or ctime changed.  If the changed file cannot
  be used (corrupt, too open), the server fails closed: nobody is let in until
  it is fixed (and the reason is logged).

The server only ever reads this file (its systemd unit has no write access to
it); only :meth:`Accounts.add_user` and the other changing methods, called
by the ``kobo-serve user|token`` commands, write it.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ..protocol.atomic import write_atomic
from ..storage import format as fmt

log = logging.getLogger("kohakuboard.viewer.accounts")

FILE_NAME = "accounts.json"
LOCK_NAME = "accounts.lock"
FORMAT_VERSION = 1

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# project names as the viewer accepts them in URLs (viewer/index.py)
PROJECT_RE = re.compile(r"^[A-Za-z0-9_.@+=-]{1,255}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # characters; beyond this it is not a password but a payload

# scrypt cost of new hashes (about 16 MiB and a few tens of ms per hash)
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SALT_BYTES = 16
_MAX_SCRYPT_MEM = 1 << 30  # refuse stored parameters that would need more than 1 GiB

TOKEN_PREFIX = "kobo_"
TOKEN_ID_RE = re.compile(r"^[0-9a-f]{12}$")
MAX_LABEL = 200


class AccountsError(Exception):
    """The accounts file or its directory cannot be used safely (permissions, corrupt content)."""


class UserExists(ValueError):
    """``add_user`` with a name that is taken."""


class NoSuchUser(LookupError):
    """A user name that is not in the accounts file."""


class NoSuchToken(LookupError):
    """A token id that is not in the accounts file."""


def default_config_dir() -> str:
    """``$KOBO_SERVE_CONFIG``, else ``~/.config/kohakuboard/serve`` (not XDG-dependent: the unit names it)."""
    env = os.environ.get("KOBO_SERVE_CONFIG")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".config", "kohakuboard", "serve")


@dataclass(frozen=True)
class User:
    """A user as the server sees it: ``projects`` None means every project."""

    name: str
    projects: tuple[str, ...] | None
    created: float
    # changes with the password (and when a user is removed and added again): sessions
    # remember it at login and end when it no longer matches (`kobo-serve user passwd`)
    credential: str = field(default="", compare=False, repr=False)

    def may_see(self, project: str) -> bool:
        return self.projects is None or project in self.projects


@dataclass(frozen=True)
class Token:
    """An API token's public facts (never its secret)."""

    id: str
    user: str
    label: str
    created: float


# ---------------------------------------------------------------- validation


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"invalid user name {name!r}: 1 to 64 characters, letters, digits and _ . @ -")
    return name


def check_password(password: Any) -> str:
    if not isinstance(password, str):
        raise ValueError("the password must be text")
    n = len(password)
    if n < MIN_PASSWORD:
        raise ValueError(f"the password is too short: use at least {MIN_PASSWORD} characters (got {n})")
    if n > MAX_PASSWORD:
        raise ValueError(f"the password is too long: at most {MAX_PASSWORD} characters (got {n})")
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise ValueError("the password holds a control character (a stray newline or tab?)")
    return password


def check_projects(projects: Iterable[str] | None) -> tuple[str, ...] | None:
    if projects is None:
        return None
    if isinstance(projects, str):
        raise ValueError("give projects as a list of names, not one string")
    out: list[str] = []
    for p in projects:
        if not isinstance(p, str) or p in (".", "..") or not PROJECT_RE.match(p):
            raise ValueError(f"invalid project name {p!r}: letters, digits and _ . @ + = -")
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError("a user limited to no project could see nothing: leave projects out for all projects")
    return tuple(out)


def check_label(label: Any) -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL or any(unicodedata.category(c) == "Cc" for c in label):
        raise ValueError(f"a token label is text of at most {MAX_LABEL} characters, without control characters")
    return label


# ---------------------------------------------------------------- hashing


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _pw_bytes(password: str) -> bytes:
    # NFKC as NIST SP 800-63B suggests: the same password typed on another system still matches
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def hash_password(password: str) -> dict[str, Any]:
    """A new salted scrypt record ``{"alg", "n", "r", "p", "dklen", "salt", "hash"}`` for ``password``."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(_pw_bytes(password), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN)
    return {
        "alg": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "dklen": SCRYPT_DKLEN,
        "salt": _b64(salt),
        "hash": _b64(digest),
    }


def _positive_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_hash_record(rec: Any) -> None:
    if not isinstance(rec, dict) or rec.get("alg") != "scrypt":
        raise ValueError("not a scrypt password record")
    n, r, p, dklen = rec.get("n"), rec.get("r"), rec.get("p"), rec.get("dklen")
    if not (_positive_int(n) and _positive_int(r) and _positive_int(p) and _positive_int(dklen)):
        raise ValueError("bad scrypt parameters")
    if n < 2 or n & (n - 1) or 128 * r * (n + p + 2) > _MAX_SCRYPT_MEM or p > 16 or not 16 <= dklen <= 64:
        raise ValueError("scrypt parameters out of range")
    if len(_unb64(rec["salt"])) < 8 or len(_unb64(rec["hash"])) != dklen:
        raise ValueError("bad scrypt salt or hash")


def check_password_hash(rec: dict[str, Any], password: str) -> bool:
    """Whether ``password`` matches the scrypt record ``rec`` (constant-time compare)."""
    digest = _scrypt(_pw_bytes(password), _unb64(rec["salt"]), rec["n"], rec["r"], rec["p"], rec["dklen"])
    return hmac.compare_digest(digest, _unb64(rec["hash"]))


# a record no password matches, hashed against when the user does not exist so that
# an unknown name costs the same scrypt as a known one
_DUMMY = {
    "alg": "scrypt",
    "n": SCRYPT_N,
    "r": SCRYPT_R,
    "p": SCRYPT_P,
    "dklen": SCRYPT_DKLEN,
    "salt": _b64(secrets.token_bytes(SALT_BYTES)),
    "hash": _b64(secrets.token_bytes(SCRYPT_DKLEN)),
}
_DUMMY_SHA = hashlib.sha256(secrets.token_bytes(32)).hexdigest()


def _token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """``kobo_<id>_<secret>`` -> (id, secret), or None if it does not look like a token."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    parts = token[len(TOKEN_PREFIX) :].split("_", 1)
    if len(parts) != 2 or not TOKEN_ID_RE.match(parts[0]) or len(parts[1]) < 20:
        return None
    return parts[0], parts[1]


# ---------------------------------------------------------------- file safety


def _mkdir_private(path: str) -> None:
    """Create ``path`` 0700 (parents 0755, never group/world-writable) whatever the umask."""
    path = os.path.abspath(path)
    try:
        created = fmt.makedirs(path, 0o755, leaf_mode=0o700)
    except FileExistsError:  # a file where the directory should be: _check_dir says so
        return
    for d in created:
        os.chmod(d, 0o700 if d == path else 0o755)


def _check_dir(path: str, *, fix: bool) -> None:
    """The config dir must not be writable by others (they could replace the accounts file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise AccountsError(f"{path} is not a directory")
    loose = st.st_mode & 0o077
    if not loose:
        return
    if fix and st.st_uid == os.geteuid():
        try:
            os.chmod(path, 0o700)
            return
        except OSError as exc:
            if st.st_mode & 0o022:
                raise AccountsError(
                    f"{path} is writable by other users (mode {oct(st.st_mode & 0o777)}) and "
                    f"cannot be tightened ({exc.strerror}): run `chmod 700 {path}`"
                ) from exc
            return
    if st.st_mode & 0o022:
        raise AccountsError(
            f"{path} is writable by other users (mode {oct(st.st_mode & 0o777)}), who could "
            f"replace the accounts file: run `chmod 700 {path}`"
        )


def _check_file(path: str, st: os.stat_result) -> None:
    """The accounts file must be a regular file that only its owner can access (tightened when it is ours)."""
    if not stat.S_ISREG(st.st_mode):
        raise AccountsError(f"{path} is not a regular file")
    if not st.st_mode & 0o077:
        return
    mode = oct(st.st_mode & 0o777)
    if st.st_uid == os.geteuid():
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            raise AccountsError(
                f"{path} is readable by other users (mode {mode}) and cannot be tightened "
                f"({exc.strerror}): run `chmod 600 {path}`"
            ) from exc
        log.warning("%s was mode %s; tightened to 0600", path, mode)
        return
    raise AccountsError(
        f"{path} is accessible to other users (mode {mode}) and not ours to fix: run `chmod 600 {path}` as its owner"
    )


def _give_to_dir_owner(fd: int, directory: str) -> None:
    """Root editing another account's accounts (``sudo kobo-serve --config-dir ~alice/... user add``)
    leaves the file to that account, which the server runs as: a root-owned 0600 file would lock it out."""
    if os.geteuid() != 0:
        return
    st = os.stat(directory)
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def _parse(data: Any, path: str) -> dict[str, Any]:
    """Validate the file's content; raise AccountsError naming what is wrong."""
    try:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version-{FORMAT_VERSION} accounts file")
        users, tokens = data.get("users"), data.get("tokens")
        if not isinstance(users, dict) or not isinstance(tokens, dict):
            raise ValueError("no users/tokens tables")
        for name, u in users.items():
            check_name(name)
            if not isinstance(u, dict):
                raise ValueError(f"user {name!r} is not a table")
            _check_hash_record(u.get("password"))
            if u.get("projects") is not None:
                check_projects(u["projects"])
            if not isinstance(u.get("created"), (int, float)):
                raise ValueError(f"user {name!r} has no creation time")
        for tid, t in tokens.items():
            if not TOKEN_ID_RE.match(tid) or not isinstance(t, dict):
                raise ValueError(f"bad token {tid!r}")
            if t.get("user") not in users:
                raise ValueError(f"token {tid} belongs to no user")
            if not isinstance(t.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", t["sha256"]):
                raise ValueError(f"token {tid} has no sha256")
    except (ValueError, KeyError, TypeError) as exc:
        raise AccountsError(f"{path} is damaged: {exc}") from exc
    return data


def _empty() -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "users": {}, "tokens": {}}


# ---------------------------------------------------------------- the accounts


@dataclass(frozen=True)
class _State:
    key: tuple[int, ...] | None  # stat key of the file this came from (None: no file)
    users: dict[str, User]
    hashes: dict[str, dict[str, Any]]
    tokens: dict[str, tuple[Token, str]]  # id -> (token, sha256 hex)
    error: str | None = None


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _credential(name: str, u: dict[str, Any]) -> str:
    """A digest of the user's password record and creation time (no secret: the record is a salted hash)."""
    rec = u["password"]
    return hashlib.sha256(f"{name}\0{rec['salt']}\0{rec['hash']}\0{float(u['created'])!r}".encode()).hexdigest()


def _state_from(data: dict[str, Any], key: tuple[int, ...] | None) -> _State:
    users = {
        n: User(
            n, tuple(u["projects"]) if u.get("projects") is not None else None, float(u["created"]), _credential(n, u)
        )
        for n, u in data["users"].items()
    }
    hashes = {n: u["password"] for n, u in data["users"].items()}
    tokens = {
        tid: (Token(tid, t["user"], str(t.get("label", "")), float(t.get("created", 0.0))), t["sha256"])
        for tid, t in data["tokens"].items()
    }
    return _State(key, users, hashes, tokens)


class Accounts:
    """The users and API tokens of one server, kept in ``<config_dir>/accounts.json``.

    Reading (``verify_password``, ``verify_token``, ``get_user``, ``users``,
    ``tokens``, ``has_users``) re-reads the file when it changed and never
    writes.  Changing methods lock, re-read, change and rewrite the file
    atomically.  Thread-safe.
    """

    def __init__(self, config_dir: str | os.PathLike[str] | None = None) -> None:
        self.config_dir = os.path.abspath(os.fspath(config_dir) if config_dir is not None else default_config_dir())
        self.path = os.path.join(self.config_dir, FILE_NAME)
        self._lock = threading.Lock()
        self._state = _State(None, {}, {}, {})
        _check_dir(self.config_dir, fix=True)
        self._state = self._load()  # raises AccountsError on an unusable file

    def __repr__(self) -> str:
        return f"Accounts({self.config_dir!r})"

    # ---------------------------------------------------------- reading

    def _load(self) -> _State:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return _State(None, {}, {}, {})
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AccountsError(f"{self.path} is a symbolic link; refusing to follow it") from exc
            raise AccountsError(f"cannot read {self.path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_file(self.path, st)
            raw = f.read()
            st = os.fstat(f.fileno())  # after a chmod the ctime moved
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise AccountsError(f"{self.path} is damaged (not JSON: {exc})") from exc
        return _state_from(_parse(data, self.path), _stat_key(st))

    def _current(self) -> _State:
        """The state of the file as it is now: one ``stat``, a re-read only when it changed."""
        try:
            key: tuple[int, ...] | None = _stat_key(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            key = None
        except OSError as exc:
            key = (-1, exc.errno or 0)
        state = self._state
        if key == state.key and state.error is None:
            return state
        with self._lock:
            state = self._state
            if key == state.key and state.error is None:
                return state
            try:
                new = self._load()
                if state.error is not None:
                    log.warning("%s is usable again", self.path)
                log.info("accounts reloaded from %s: %d users, %d tokens", self.path, len(new.users), len(new.tokens))
            except (AccountsError, OSError) as exc:
                # fail closed: nobody gets in with an unusable file
                if state.error != str(exc):
                    log.error("%s; refusing every login and token until it is fixed", exc)
                new = _State(key, {}, {}, {}, error=str(exc))
            self._state = new
            return new

    def error(self) -> str | None:
        """Why the accounts file is unusable right now (everyone is refused), or None."""
        return self._current().error

    def has_users(self) -> bool:
        return bool(self._current().users)

    def users(self) -> list[User]:
        """Every user, by name."""
        return sorted(self._current().users.values(), key=lambda u: u.name)

    def get_user(self, name: str) -> User | None:
        """The user called ``name`` as the file holds it now (None if removed)."""
        return self._current().users.get(name) if isinstance(name, str) else None

    def tokens(self, user: str | None = None) -> list[Token]:
        """The tokens (of ``user``, or everyone's), oldest first."""
        found = [t for t, _ in self._current().tokens.values() if user is None or t.user == user]
        return sorted(found, key=lambda t: (t.created, t.id))

    def verify_password(self, name: str, password: str) -> User | None:
        """The user if ``password`` is hers, else None; as slow for an unknown name as for a known one."""
        state = self._current()
        rec = state.hashes.get(name) if isinstance(name, str) else None
        user = state.users.get(name) if rec is not None else None
        ok_type = isinstance(password, str) and len(password) <= MAX_PASSWORD
        try:
            ok = check_password_hash(rec if rec is not None else _DUMMY, password if ok_type else "")
        except (ValueError, MemoryError) as exc:  # a stored record scrypt refuses
            log.error("cannot check the password of %r: %s", name, exc)
            return None
        return user if ok and ok_type and user is not None else None

    def verify_token(self, token: str) -> User | None:
        """The user an API token string belongs to, or None (unknown, revoked or malformed)."""
        state = self._current()
        parts = split_token(token)
        tid, secret = parts if parts is not None else ("", "")
        entry = state.tokens.get(tid)
        expected = entry[1] if entry is not None else _DUMMY_SHA
        ok = hmac.compare_digest(_token_digest(secret).encode(), expected.encode())
        if not ok or entry is None or parts is None:
            return None
        return state.users.get(entry[0].user)

    # ---------------------------------------------------------- changing

    def _change(self, fn: Any) -> Any:
        """Run ``fn(data)`` on the file's current content under the lock and write the result."""
        _mkdir_private(self.config_dir)
        _check_dir(self.config_dir, fix=True)
        lock_path = os.path.join(self.config_dir, LOCK_NAME)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(lock_fd, 0o600)
            _give_to_dir_owner(lock_fd, self.config_dir)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            current = self._load()
            data = self._raw(current)
            result = fn(data)
            _parse(data, self.path)
            self._write(data)
            with self._lock:
                self._state = self._load()
            return result
        finally:
            os.close(lock_fd)  # releases the flock

    def _raw(self, state: _State) -> dict[str, Any]:
        """The JSON content of a state (what the file holds)."""
        data = _empty()
        for name, u in state.users.items():
            data["users"][name] = {
                "password": state.hashes[name],
                "projects": list(u.projects) if u.projects is not None else None,
                "created": u.created,
            }
        for tid, (t, digest) in state.tokens.items():
            data["tokens"][tid] = {"user": t.user, "label": t.label, "created": t.created, "sha256": digest}
        return data

    def _write(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        write_atomic(
            self.path,
            text,
            mode=0o600,  # whatever the umask
            fsync=True,
            sync_dir=True,
            prepare=lambda fd: _give_to_dir_owner(fd, self.config_dir),
        )

    def add_user(self, name: str, password: str, projects: Iterable[str] | None = None) -> User:
        """Add a user (``projects`` None: she sees every project).  ValueError if the name is taken or invalid."""
        check_name(name)
        check_password(password)
        plist = check_projects(projects)
        record = hash_password(password)

        def fn(data: dict[str, Any]) -> None:
            if name in data["users"]:
                raise UserExists(
                    f"user {name!r} already exists (use `kobo-serve user passwd {name}` to change her password)"
                )
            data["users"][name] = {
                "password": record,
                "projects": list(plist) if plist is not None else None,
                "created": time.time(),
            }

        self._change(fn)
        user = self._state.users[name]
        log.info("added user %r", name)
        return user

    def set_password(self, name: str, password: str) -> None:
        """Give ``name`` a new password; a running server ends her sessions (her API tokens stay valid)."""
        check_password(password)
        record = hash_password(password)

        def fn(data: dict[str, Any]) -> None:
            if name not in data["users"]:
                raise NoSuchUser(f"no user named {name!r}")
            data["users"][name]["password"] = record

        self._change(fn)
        log.info("changed the password of %r", name)

    def set_projects(self, name: str, projects: Iterable[str] | None) -> User:
        """Limit ``name`` to ``projects`` (None: every project)."""
        plist = check_projects(projects)

        def fn(data: dict[str, Any]) -> None:
            if name not in data["users"]:
                raise NoSuchUser(f"no user named {name!r}")
            data["users"][name]["projects"] = list(plist) if plist is not None else None

        self._change(fn)
        return self._state.users[name]

    def remove_user(self, name: str) -> int:
        """Remove ``name`` and revoke her tokens; return how many tokens were revoked."""

        def fn(data: dict[str, Any]) -> int:
            if name not in data["users"]:
                raise NoSuchUser(f"no user named {name!r}")
            del data["users"][name]
            mine = [tid for tid, t in data["tokens"].items() if t["user"] == name]
            for tid in mine:
                del data["tokens"][tid]
            return len(mine)

        n = self._change(fn)
        log.info("removed user %r and %d tokens", name, n)
        return n

    def create_token(self, user: str, label: str = "") -> tuple[str, str]:
        """A new API token for ``user``: (token id, the token string, shown once and never stored)."""
        check_label(label)
        secret = secrets.token_urlsafe(32)
        digest = _token_digest(secret)

        def fn(data: dict[str, Any]) -> str:
            if user not in data["users"]:
                raise NoSuchUser(f"no user named {user!r}")
            while True:
                tid = secrets.token_hex(6)
                if tid not in data["tokens"]:
                    break
            data["tokens"][tid] = {"user": user, "label": label, "created": time.time(), "sha256": digest}
            return tid

        tid = self._change(fn)
        log.info("created token %s for %r", tid, user)
        return tid, f"{TOKEN_PREFIX}{tid}_{secret}"

    def revoke_token(self, token_id: str) -> Token:
        """Revoke a token by its id; return what it was."""
        if isinstance(token_id, str) and token_id.startswith(TOKEN_PREFIX):
            parts = split_token(token_id)  # the whole token string pasted: take its id
            token_id = parts[0] if parts else token_id

        def fn(data: dict[str, Any]) -> Token:
            t = data["tokens"].pop(token_id, None) if isinstance(token_id, str) else None
            if t is None:
                raise NoSuchToken(f"no token with id {token_id!r} (`kobo-serve token list` shows them)")
            return Token(token_id, t["user"], t.get("label", ""), t.get("created", 0.0))

        tok = self._change(fn)
        log.info("revoked token %s of %r", token_id, tok.user)
        return tok
