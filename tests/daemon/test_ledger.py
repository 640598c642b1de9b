"""The daemon's ledger (daemon/ledger.py): per client, which calls are new, duplicates, durable.

Pure logic; the protocol it is part of is tested end to end in test_replay.py and test_multinode.py.
"""

from __future__ import annotations

import numpy as np

from kohakuboard.daemon.ledger import Ledger


def test_new_calls_are_claimed_once_and_durable_after_their_commit():
    led = Ledger()
    assert led.claim_each("a", np.array([1, 2, 3], np.int64)) is None  # all new
    assert led.claim("a", 4, 4)
    assert led.durable("a") == 0  # staged, not committed
    assert led.marks() == {"a": ([(1, 4)], 4)}
    assert led.committed() == {"a": 4}
    assert led.durable("a") == 4 and led.marks() == {}  # nothing claimed since


def test_a_resend_is_refused_call_by_call():
    led = Ledger([("a", 1, 4)])
    keep = led.claim_each("a", np.array([3, 4, 5, 6], np.int64))
    assert keep.tolist() == [False, False, True, True]
    assert not led.claim("a", 2, 2) and not led.claim("a", 1, 6)  # already held (staged too)
    assert led.duplicates == 4
    assert led.claim_each("a", np.array([5, 6], np.int64)).tolist() == [False, False]
    assert led.highest_seen("a") == 6 and led.highest_seen("b") == 0


def test_a_hole_holds_back_the_durable_number_until_it_is_filled():
    led = Ledger()
    led.claim("a", 1, 2)
    led.claim_each("a", np.array([5, 7], np.int64))  # not consecutive: kept number by number
    assert led.marks() == {"a": ([(1, 2), (5, 5), (7, 7)], 2)}
    led.committed()
    assert led.durable("a") == 2
    led.claim("a", 3, 4)
    assert led.committed() == {"a": 5}


def test_a_failed_commit_keeps_the_claims_for_the_next_one():
    led = Ledger()
    led.claim("a", 1, 3)
    first = led.marks()  # the commit that would have written these failed: committed() not called
    led.claim("b", 1, 1)
    assert led.marks() == {**first, "b": ([(1, 1)], 1)}  # the retry records both
    assert not led.claim("a", 1, 3)  # still held (staged): a re-send meanwhile is a duplicate
    assert led.durable("a") == 0
    led.committed()
    assert (led.durable("a"), led.durable("b")) == (3, 1)


def test_loading_what_a_previous_daemon_committed():
    led = Ledger()
    led.received("a", 9)
    led.load([("a", 1, 5), ("a", 8, 9), ("b", 2, 3)])
    assert led.durable("a") == 5 and led.durable("b") == 0  # b's call 1 never arrived
    assert led.highest_received("a") == 9
    assert not led.claim("a", 8, 9) and led.claim("a", 6, 7)
    assert led.committed() == {"a": 9}
