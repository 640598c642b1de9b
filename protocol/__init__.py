"""The wire protocol between KohakuBoard clients and ``kobo-daemon``.

``messages`` defines every message, ``codec`` turns them into ZeroMQ frames and
back, ``endpoint`` says where the sockets live and ``errors`` holds the one
exception tree used by client, daemon and readers alike.  Nothing here imports
zmq; only ``codec`` imports msgpack.
"""
