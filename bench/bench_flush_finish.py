"""3. ``flush()`` round trip on an idle daemon, 4. ``finish()`` of an idle board.

flush: one Board, a few logs and a flush so the run is open and written, then
``N_FLUSH`` times one ``log()`` of one scalar followed by a timed ``flush()``:
the round trip that makes one call durable (the sender sends it, asks for its
acknowledgement, the daemon writes the batch at once and answers); median (and
p99) per repeat.  A ``flush()`` with nothing new since the last acknowledgement
returns without asking the daemon; its time is reported alongside.  Baseline: a raw pyzmq DEALER -> ROUTER echo over IPC with a server in
another process (the daemon is another process too), same message count, and
the ratio of the two per repeat; and one 64-byte append + fsync in the runs'
directory (a durable flush() pays two: the vault's WAL and metadata.db).

finish: ``N_BOARDS`` boards per repeat, each opened (capture_output=True),
one ``log()`` and a ``flush()`` so nothing is pending, then ``finish()`` timed.
``Board()`` open time on the running daemon is reported too (no target).

finish after log: ``N_BOARDS`` boards per repeat opened with
capture_output=False, one ``log()`` and at once a timed ``finish()`` (the
daemon must write the call, then mark the run finished), alternating with as
many fresh boards where one ``log()`` is followed by a timed ``flush()`` (the
baseline; then an untimed ``finish()``).  Target: within 2x of that flush.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import _common as c


def echo_server(addr: str, ready) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    ready.set()
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"stop":
            sock.send_multipart(frames)
            break
        sock.send_multipart(frames)
    sock.close()
    ctx.term()


def fsync_ms(dirpath: str, n: int) -> float:
    """Median time (ms) of appending 64 bytes to a file and fsyncing it, in ``dirpath``
    (the runs' file system): a durable flush() pays two of these (format "Durability")."""
    path = os.path.join(dirpath, "fsync-probe")
    ts = []
    with open(path, "ab") as f:
        for _ in range(n):
            t0 = time.perf_counter()
            f.write(b"\0" * 64)
            f.flush()
            os.fsync(f.fileno())
            ts.append(time.perf_counter() - t0)
    os.unlink(path)
    return c.median(ts) * 1000


def zmq_pingpong(dirpath: str, n: int, repeats: int) -> list[float]:
    """Median round trip (ms) of a DEALER->ROUTER echo over IPC, per repeat."""
    import zmq

    ctx_mp = mp.get_context("spawn")
    addr = f"ipc://{dirpath}/echo"
    ready = ctx_mp.Event()
    server = ctx_mp.Process(target=echo_server, args=(addr, ready))
    server.start()
    ready.wait(30)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    payload = b"\x00" * 120  # about the size of an encoded FlushRequest
    for _ in range(50):  # warm-up (connection set-up)
        sock.send_multipart([payload])
        sock.recv_multipart()
    meds = []
    for _ in range(repeats):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send_multipart([payload])
            sock.recv_multipart()
            ts.append(time.perf_counter() - t0)
        meds.append(c.median(ts) * 1000)
    sock.send_multipart([b"stop"])
    sock.recv_multipart()
    sock.close()
    ctx.term()
    server.join(10)
    return meds


def main() -> None:
    args = c.parse_args(__doc__.splitlines()[0])
    n_flush = 200
    n_boards = 10 if args.quick else 20
    from kohakuboard.client import Board

    flush_meds, flush_p99, finish_meds, open_meds = [], [], [], []
    fal_meds, fresh_flush_meds = [], []
    nothing_new_us: list[float] = []
    with c.IsolatedDaemon(keep=args.keep) as env:
        t0 = time.perf_counter()
        first = Board("first", {}, project="ff", run_id="autostart", base_dir=env.base_dir, capture_output=True)
        autostart_s = time.perf_counter() - t0  # includes starting the daemon
        first.finish()
        for r in range(args.repeats):
            board = Board("flush", {}, project="ff", run_id=f"flush{r}", base_dir=env.base_dir, capture_output=True)
            for i in range(10):
                board.log(x=float(i))
            board.flush()
            for _ in range(20):
                board.flush()  # warm-up
            ts = []
            for i in range(n_flush):
                board.log(x=float(i))
                t0 = time.perf_counter()
                board.flush()
                ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(n_flush):
                board.flush()
            nothing_new_us.append((time.perf_counter() - t0) / n_flush * 1e6)
            board.finish()
            ts.sort()
            flush_meds.append(c.median(ts) * 1000)
            flush_p99.append(c.percentile(ts, 99) * 1000)

            fin, opn = [], []
            for b in range(n_boards):
                t0 = time.perf_counter()
                board = Board(
                    "finish", {"b": b}, project="ff", run_id=f"fin{r}-{b}", base_dir=env.base_dir, capture_output=True
                )
                opn.append(time.perf_counter() - t0)
                board.log(x=1.0)
                board.flush()
                t0 = time.perf_counter()
                board.finish()
                fin.append(time.perf_counter() - t0)
            finish_meds.append(c.median(fin) * 1000)
            open_meds.append(c.median(opn) * 1000)

            fal, ffl = [], []
            for b in range(n_boards):
                for timed in ("finish", "flush"):
                    board = Board(
                        "fal",
                        {"b": b},
                        project="ff",
                        run_id=f"fal{r}-{b}-{timed}",
                        base_dir=env.base_dir,
                        capture_output=False,
                    )
                    board.log(x=1.0)
                    t0 = time.perf_counter()
                    if timed == "finish":
                        board.finish()
                        fal.append(time.perf_counter() - t0)
                    else:
                        board.flush()
                        ffl.append(time.perf_counter() - t0)
                        board.finish()
            for b in range(n_boards):  # every call is in the run
                for timed in ("finish", "flush"):
                    pts = c.read_series(os.path.join(env.base_dir, "ff", f"fal{r}-{b}-{timed}"), "x")
                    assert len(pts) == 1, (timed, len(pts))
            fal_meds.append(c.median(fal) * 1000)
            fresh_flush_meds.append(c.median(ffl) * 1000)
            c.log(
                f"flush/finish repeat {r + 1}/{args.repeats}: flush median {flush_meds[-1]:.3f} ms "
                f"(p99 {flush_p99[-1]:.3f}), finish median {finish_meds[-1]:.2f} ms, open {open_meds[-1]:.1f} ms, "
                f"finish after log {fal_meds[-1]:.2f} ms vs flush after log {fresh_flush_meds[-1]:.2f} ms"
            )
        zmq_meds = zmq_pingpong(env.dir, n_flush, args.repeats)
        os.makedirs(env.base_dir, exist_ok=True)
        sync_ms = fsync_ms(env.base_dir, n_flush)
    zmq_med = c.median(zmq_meds)
    ratios = [f / z for f, z in zip(flush_meds, zmq_meds)]
    records = [
        c.metric(
            "flush_idle_ms",
            "flush() round trip after one log(), idle daemon (median)",
            unit="ms",
            target=2.0,
            op="<=",
            values=flush_meds,
            baseline=f"raw pyzmq DEALER/ROUTER ping-pong over IPC {zmq_med:.3f} ms "
            f"(flush / ping-pong {c.median(ratios):.1f}x); one 64-byte append + fsync {sync_ms:.3f} ms; "
            f"flush() with nothing new {c.median(nothing_new_us):.1f} us",
            baseline_values={
                "zmq_pingpong_ms": zmq_med,
                "zmq_per_repeat": zmq_meds,
                "fsync_ms": sync_ms,
                "flush_nothing_new_us": nothing_new_us,
            },
            extra={
                "flushes_per_repeat": n_flush,
                "p99_ms_per_repeat": flush_p99,
                "flush_over_pingpong_per_repeat": ratios,
            },
        ),
        c.metric(
            "finish_idle_ms",
            "finish() of an idle board (median)",
            unit="ms",
            target=50.0,
            op="<=",
            values=finish_meds,
            baseline=f"idle flush() {c.median(flush_meds):.3f} ms",
            baseline_values={"flush_idle_ms": c.median(flush_meds)},
            extra={
                "boards_per_repeat": n_boards,
                "board_open_ms_per_repeat": open_meds,
                "first_board_with_daemon_autostart_s": autostart_s,
            },
        ),
        c.metric(
            "finish_after_log_ms",
            "finish() right after one log(), capture_output=False (median)",
            unit="ms",
            target=2 * c.median(fresh_flush_meds),
            op="<=",
            values=fal_meds,
            baseline=f"flush() right after one log() on a fresh board {c.median(fresh_flush_meds):.3f} ms "
            "(target: 2x that)",
            baseline_values={
                "fresh_flush_after_log_ms": c.median(fresh_flush_meds),
                "fresh_flush_per_repeat": fresh_flush_meds,
            },
            extra={
                "boards_per_repeat": n_boards,
                "ratio_per_repeat": [a / b for a, b in zip(fal_meds, fresh_flush_meds)],
            },
        ),
        c.metric(
            "board_open_ms",
            "Board() open on a running daemon (median, no target)",
            unit="ms",
            target=None,
            op="<=",
            values=open_meds,
            baseline=f"first Board incl. daemon autostart {autostart_s * 1000:.0f} ms",
            baseline_values={"autostart_ms": autostart_s * 1000},
        ),
    ]
    c.emit(args, records)


if __name__ == "__main__":
    main()
