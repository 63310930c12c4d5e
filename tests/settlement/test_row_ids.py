"""Row ids: 24 hex digits of the OS's CSPRNG after the prefix, drawn in blocks (db._RandomIds)."""

from __future__ import annotations

import copy
import os
import pickle
import re

from webpurse.settlement import db
from webpurse.settlement.service import new_id
from webpurse.settlement.webhooks.tables import new_id as webhook_id


def test_ids_have_the_prefix_and_96_random_bits_and_never_repeat() -> None:
    ids = [new_id("pay") for _ in range(3 * db._IDS_DRAWN + 7)] + [webhook_id("evt")]
    assert all(re.fullmatch(r"(pay|evt)_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_draws_its_own_ids() -> None:
    new_id("pay")  # the pool holds ids drawn ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, " ".join(new_id("pay") for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    parent = {new_id("pay") for _ in range(50)}
    assert len(child) == 50 and not child & parent


def test_a_copy_of_the_pool_holds_none_of_its_ids() -> None:
    pool = db._RandomIds()
    drawn = pool()
    for other in (copy.copy(pool), pickle.loads(pickle.dumps(pool))):
        assert len({other() for _ in range(db._IDS_DRAWN)} & {pool() for _ in range(10)}) == 0
    assert len(drawn) == 24
