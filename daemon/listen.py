"""The head daemon's TCP listener (``kobo-daemon run --listen tcp://HOST:PORT``).

Each ``--listen tcp://HOST:PORT`` binds two TCP sockets: data (``PULL``) on
PORT and requests (``ROUTER``) on PORT+1; forwarders are pointed at
``tcp://HEAD:PORT`` and use both.  The IPC sockets stay as they are.

Security: the TCP sockets are CURVE servers with the daemon's
``server.key_secret``, and a ZAP handler (pyzmq's ``ThreadAuthenticator``)
lets in only the client public keys listed under the ``authorized`` path (see
:mod:`.keys`); a connection with any other key, or without CURVE, is refused
during the handshake, before any message of it is read.  ``--insecure-plaintext``
is the only way to listen without CURVE, and the daemon then logs a warning.

How messages reach the daemon: the TCP sockets live in a ZeroMQ context of
their own (the daemon's context has its own ZAP handler for the IPC sockets,
which judges peers by Unix uid), and a :class:`~.forward.Relay` thread passes
every message on to the daemon's own IPC sockets, unchanged.  Remote data is
thus decoded, checked and written by exactly the code local data goes through.
A ``shutdown`` request is not accepted over TCP.

Run paths: a message names its run by the absolute path the *client* chose,
and the head writes it at that path on the head's file system, as the
daemon's user.  Use a base directory that exists on the head (the same
``KOBO_BASE_DIR`` on every node, typically a path on the head's disk or a
shared file system).  An authorized node can write wherever the head's
daemon user can: authorize only nodes you trust with that.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.errors import KoboError, code_for
from . import keys
from .config import DaemonConfig
from .forward import Head, Relay, RelaySetupError, tcp_pair

log = logging.getLogger("kohakuboard.daemon")

ZAP_DOMAIN = "kohakuboard-tcp"


class _HeadRelay(Relay):
    name = "tcp-listener"

    def intercept(self, ident: bytes, body: list[bytes], head: Head | None) -> bool:
        if head is not None and head.kind == m.ShutdownRequest.KIND:
            self.reply_error(
                ident, head, "shutdown is not accepted over TCP: stop the head on its own machine",
                code=code_for(KoboError()),
            )
            return True
        return False


class TcpListener:
    """The TCP sockets, their authenticator and the relay into the daemon's IPC sockets."""

    def __init__(self, config: DaemonConfig) -> None:
        self.addresses = list(config.listen)
        self.secure = not config.insecure_plaintext
        pairs = [tcp_pair(a, bind=True) for a in self.addresses]
        self.authorized: keys.AuthorizedKeys | None = None
        server_keys: tuple[bytes, bytes] | None = None
        if self.secure:
            directory = keys.key_dir(config.key_dir)
            try:
                server_keys = keys.load_pair(directory, keys.SERVER)
            except keys.KeyProblem as exc:
                raise RelaySetupError(
                    f"--listen {' '.join(self.addresses)} refused: {exc}. Listening on TCP needs CURVE keys: run "
                    "`kobo-daemon keys generate`, then authorize each forwarding node's client key with "
                    "`kobo-daemon keys authorize KEY`; or pass --insecure-plaintext to accept unencrypted, "
                    "unauthenticated connections from anyone who can reach the port"
                ) from None
            path = keys.authorized_path(config.authorized, directory)
            self.authorized = keys.AuthorizedKeys(path)
            if not self.authorized.keys():
                log.warning("no authorized client keys in %s yet: every node is refused until one is added "
                            "(kobo-daemon keys authorize KEY; no restart needed)", path)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.auth: Any = None
        self.pull = self.ctx.socket(zmq.PULL)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.relay: _HeadRelay | None = None
        try:
            if server_keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                # Bound before any CURVE socket binds; ZAP_ENFORCE_DOMAIN makes
                # libzmq refuse connections should the handler ever be missing.
                self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("kohakuboard.daemon.zap"))
                self.auth.start()
                self.auth.configure_curve_callback(ZAP_DOMAIN, self.authorized)
            for sock in (self.pull, self.router):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)  # libzmq checks it per frame
                sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
                sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
                if any("[" in a for a in self.addresses):
                    sock.setsockopt(zmq.IPV6, 1)
                if server_keys is not None:
                    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                    sock.curve_secretkey = server_keys[1]
                    sock.curve_publickey = server_keys[0]
                    sock.curve_server = True
            self.pull.setsockopt(zmq.RCVHWM, 16)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            for data_addr, control_addr in pairs:
                for sock, addr in ((self.pull, data_addr), (self.router, control_addr)):
                    try:
                        sock.bind(addr)
                    except zmq.ZMQError as exc:
                        raise RelaySetupError(f"cannot listen on {addr}: {exc}") from None
            self.relay = _HeadRelay(
                self.pull, self.router, config.endpoint.data_addr, config.endpoint.control_addr,
                f"the kobo-daemon on {config.endpoint}",
            )
        except BaseException:
            self.close()
            raise
        if self.secure:
            log.info("listening on %s (data) and %s (requests) with CURVE; server key %s; authorized keys: %s",
                     ", ".join(p[0] for p in pairs), ", ".join(p[1] for p in pairs),
                     server_keys[0].decode() if server_keys else "?", self.authorized.path if self.authorized else "?")
        else:
            for _ in range(2):
                log.warning(
                    "!!! listening on %s WITHOUT encryption or authentication (--insecure-plaintext): anyone who "
                    "can reach these ports can read the traffic and write run folders anywhere this user can !!!",
                    ", ".join(f"{d} and {c}" for d, c in pairs),
                )
        self.relay.start()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"addresses": self.addresses, "secure": self.secure}
        if self.authorized is not None:
            out.update(authorized=self.authorized.path, accepted=self.authorized.accepted, refused=self.authorized.refused)
        if self.relay is not None:
            out.update(self.relay.info())
        return out

    def close(self) -> None:
        """Stop the relay, the authenticator and the sockets; idempotent."""
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.ctx.closed:
            return
        for sock in (self.pull, self.router):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


def start_tcp_listener(config: DaemonConfig) -> TcpListener | None:
    """Listen on ``config.listen`` (None when it is empty); raise :class:`KoboError` if impossible."""
    if not getattr(config, "listen", None):
        return None
    return TcpListener(config)
