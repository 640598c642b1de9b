"""kobo-daemon: receives log messages over ZeroMQ and writes run folders."""
