"""How the merchant gets a reader for an order.

The payment page pairs the shopper's agent with the order; the agent's WebSocket then
becomes a :class:`~webpurse.reader.base.Reader` bound to that order. The cashier only
sees :class:`ReaderBroker`: ``pair`` issues the one-time token and short code,
``reader_for`` waits for the agent, ``finish`` tells the agent how it ended. A
:class:`LocalBroker` hands out one local reader (the sim reader in tests, a PC/SC reader
for a till), so the same flows run without a WebSocket.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Protocol

from webpurse.reader.base import Reader, ReaderDisconnected, ReaderTimeout
from webpurse.reader.messages import Outcome
from webpurse.reader.remote import ReaderHub


@dataclass(frozen=True, slots=True)
class Pairing:
    """The single-use token the page hands the agent, and the code a shopper can type."""

    token: str
    short_code: str


class ReaderBroker(Protocol):
    async def pair(self, order_id: str, *, amount: int, description: str) -> Pairing: ...

    async def reader_for(self, order_id: str, timeout: float) -> Reader: ...

    async def finish(
        self,
        order_id: str,
        outcome: str,
        message: str,
        amount: int | None,
        session: str | None = None,
    ) -> None: ...


class LocalBroker:
    """Every order gets the same local reader (a shop's own till, or tests)."""

    def __init__(self, reader: Reader | None = None) -> None:
        self._reader = reader
        self._ready = asyncio.Event()
        if reader is not None:
            self._ready.set()
        self.finished: list[tuple[str, str]] = []

    def attach(self, reader: Reader) -> None:
        self._reader = reader
        self._ready.set()

    async def pair(self, order_id: str, *, amount: int, description: str) -> Pairing:
        return Pairing(secrets.token_urlsafe(32), f"{secrets.randbelow(10**8):08d}")

    async def reader_for(self, order_id: str, timeout: float) -> Reader:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise ReaderTimeout("no reader attached") from None
        assert self._reader is not None
        return self._reader

    async def finish(
        self,
        order_id: str,
        outcome: str,
        message: str,
        amount: int | None,
        session: str | None = None,
    ) -> None:
        self.finished.append((order_id, outcome))


_OUTCOMES = {o.value: o for o in Outcome}


class RemoteBroker:
    """Readers of shoppers' agents over the remote-reader WebSocket (``ReaderHub``).

    The pairing is bound to the order id, so a retry or a recovery after an interruption
    stays with the same order whatever its current settlement object is. With the hub's
    shared state (Redis), the agent may be connected to another shop process: its reader
    is then driven through that process (``RoutedReader``).
    """

    def __init__(self, hub: ReaderHub) -> None:
        self.hub = hub

    async def pair(self, order_id: str, *, amount: int, description: str) -> Pairing:
        issued = await self.hub.open_pairing(order_id, display=description[:64])
        return Pairing(issued.token, issued.code)

    async def reader_for(self, order_id: str, timeout: float) -> Reader:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reader = await self.hub.wait_for_reader(order_id, max(0.0, deadline - loop.time()))
            try:
                await reader.wait_connected(max(0.0, deadline - loop.time()))
            except ReaderDisconnected:
                # Its session ended while we waited for its link: the agent paired again
                # for this order (a new session); take that one.
                if loop.time() >= deadline:
                    raise
                continue
            return reader

    async def finish(
        self,
        order_id: str,
        outcome: str,
        message: str,
        amount: int | None,
        session: str | None = None,
    ) -> None:
        """End the order's agent session (only ``session`` when given: a newer one the
        shopper paired since is left alone)."""
        await self.hub.finish(
            order_id, _OUTCOMES.get(outcome, Outcome.FAILED), message, amount, session=session
        )
