"""Fixtures for the merchant's tests: a personalised card in a SimReader, a settlement fake."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import AsyncIterator

import pytest

from tests.merchant.fakes import MASTER, FakeSettlement
from webpurse.card import CardApplet, MemoryStore, personalise
from webpurse.reader.sim import SimReader

SERIAL = bytes.fromhex("0000000000000000A001")


def make_card(balance: int = 0, serial: bytes = SERIAL) -> CardApplet:
    state = personalise(MASTER, serial, start=dt.date(2026, 1, 1))
    if balance:
        from dataclasses import replace

        state = replace(state, balance=balance)
    counter = itertools.count()
    return CardApplet(
        state, MemoryStore(state), lambda n: bytes((next(counter) + i) % 256 for i in range(n))
    )


@pytest.fixture
def settlement() -> FakeSettlement:
    return FakeSettlement()


@pytest.fixture
async def reader() -> AsyncIterator[SimReader]:
    async with SimReader(make_card(balance=10_000)) as sim:
        yield sim
