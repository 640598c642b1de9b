"""The wire protocol between KohakuBoard clients and ``kobo-daemon``.

``messages`` defines every message, ``codec`` turns them into ZeroMQ frames and
back, ``endpoint`` says where the sockets live, ``control`` is the public
control client (status, shutdown, starting a daemon) and ``errors`` holds the
one exception tree used by client, daemon and readers alike.  ``items`` is the
rule every rich value follows and ``binning`` the histogram binning both ends
apply.

This is the bottom layer (``tests/test_layers.py``): it imports nothing else of
the package, and what more than one layer above shares lives here too:
``atomic`` (replacing a file atomically), ``runpath`` (the longest run path),
``systemd`` (writing unit files), ``peer`` (is a process alive).  Only
``control`` imports zmq; only ``codec`` imports msgpack.
"""
