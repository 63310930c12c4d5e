"""Reading the card number through the shopper's agent (the online top-up's card choice).

The top-up page may take the card number from the card itself instead of the shopper's
typing: it pairs the agent exactly as the payment page does (a single-use token bound to a
*read* id instead of an order), and the shop sends one batch, ``SELECT`` EP and
``READ BINARY`` EF 0x15 — nothing that needs the holder's consent or changes the card — and
takes the card number from the issuer data. A read belongs to the browser session that
started it; it is forgotten after :data:`READ_TTL` seconds. With the shop's shared state
(Redis) its status is also kept there, so the page may poll any shop process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from webpurse.merchant.readers import Pairing, ReaderBroker
from webpurse.protocol.apdu import ResponseApdu
from webpurse.protocol.commands import EP_AID, SFI_ISSUER, ReadBinary, Select
from webpurse.protocol.errors import ProtocolError
from webpurse.protocol.records import IssuerData
from webpurse.reader.base import ReaderError, Step
from webpurse.reader.remote.shared import SharedState

log = logging.getLogger(__name__)

READ_TTL = 600.0
MAX_READS = 10_000
MAX_WAITING = 200
"""Reads waiting for an agent at once, across all sessions (each holds a pairing and a task)."""


class TooManyReads(Exception):
    """More reads wait for an agent than :data:`MAX_WAITING`: try again shortly."""


def read_steps() -> list[Step]:
    """SELECT the e-purse by AID, READ BINARY the issuer file (EF 0x15)."""
    return [
        Step(Select(name=EP_AID).to_apdu().to_bytes()),
        Step(ReadBinary(SFI_ISSUER, 0, 0).to_apdu().to_bytes()),
    ]


def card_number_of(responses: Sequence[ResponseApdu]) -> str | None:
    """The card number from the batch's answers; None when the card is no e-purse of ours."""
    if len(responses) < 2 or not all(r.ok for r in responses[:2]):
        return None
    try:
        return IssuerData.from_bytes(responses[1].data).card_number
    except ProtocolError:
        return None


@dataclass
class CardRead:
    id: str
    session_id: str
    started: float
    status: str = "waiting"  # waiting → read | failed
    card_number: str | None = None
    error: str | None = None


class CardReads:
    def __init__(
        self,
        broker: ReaderBroker,
        *,
        reader_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedState | None = None,
    ) -> None:
        self.broker = broker
        self._shared = shared
        self.reader_timeout = reader_timeout
        self._clock = clock
        self._reads: dict[str, CardRead] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _forget_old(self) -> None:
        now = self._clock()
        for read_id in [k for k, r in self._reads.items() if now - r.started > READ_TTL]:
            del self._reads[read_id]
        while len(self._reads) > MAX_READS:
            del self._reads[next(iter(self._reads))]

    async def start(self, session_id: str) -> tuple[CardRead, Pairing]:
        """A new read for this browser session; its earlier read, if still waiting, ends."""
        self._forget_old()
        for task in list(self._tasks):
            if task.get_name() == f"read {session_id}":
                task.cancel()
                self._tasks.discard(task)  # it no longer counts as waiting
        if len(self._tasks) >= MAX_WAITING:
            raise TooManyReads(f"{len(self._tasks)} card reads are waiting")
        read = CardRead("rd_" + secrets.token_hex(12), session_id, self._clock())
        pairing = await self.broker.pair(read.id, amount=0, description="read the card number")
        if len(self._tasks) >= MAX_WAITING:  # others started while the pairing was stored
            raise TooManyReads(f"{len(self._tasks)} card reads are waiting")
        self._reads[read.id] = read
        await self._save(read)
        task = asyncio.create_task(self._run(read), name=f"read {session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return read, pairing

    def get(self, read_id: str, session_id: str) -> CardRead | None:
        read = self._reads.get(read_id)
        if read is None or not secrets.compare_digest(read.session_id, session_id):
            return None
        return read

    @staticmethod
    def _owner(session_id: str) -> str:
        """Redis keeps a hash of the browser's session id, not the id itself."""
        return hashlib.sha256(session_id.encode()).hexdigest()

    async def _save(self, read: CardRead) -> None:
        """Share the read's status (errors are logged: this process still answers)."""
        if self._shared is None:
            return
        data = {
            "owner": self._owner(read.session_id),
            "status": read.status,
            "card_number": read.card_number,
            "error": read.error,
        }
        try:
            with self._shared.guard("sharing a card read"):
                await self._shared.redis.set(
                    self._shared.key("cardread", read.id), json.dumps(data), ex=int(READ_TTL)
                )
        except Exception:
            log.warning("card read %s: status not shared", read.id)

    async def lookup(self, read_id: str, session_id: str) -> CardRead | None:
        """:meth:`get`, and with shared state a read started by another shop process."""
        read = self.get(read_id, session_id)
        if read is not None or self._shared is None:
            return read
        with self._shared.guard("reading a card read"):
            raw = await self._shared.redis.get(self._shared.key("cardread", read_id))
        if raw is None:
            return None
        data = json.loads(raw)
        if not secrets.compare_digest(str(data.get("owner", "")), self._owner(session_id)):
            return None
        return CardRead(
            read_id,
            session_id,
            self._clock(),
            status=str(data["status"]),
            card_number=data.get("card_number"),
            error=data.get("error"),
        )

    async def _run(self, read: CardRead) -> None:
        outcome, message = "failed", "no card read"
        try:
            reader = await self.broker.reader_for(read.id, self.reader_timeout)
            await reader.wait_for_card(self.reader_timeout)
            number = card_number_of(await reader.transmit(read_steps()))
            if number is None:
                read.status, read.error = "failed", "not_an_epurse"
            else:
                read.status, read.card_number = "read", number
                outcome, message = "succeeded", "card number read"
        except ReaderError as exc:
            log.info("card read %s: %s", read.id, exc)
            read.status, read.error = "failed", "no_reader"
        except Exception:
            log.exception("card read %s failed", read.id)
            read.status, read.error = "failed", "internal_error"
        await self._save(read)
        try:
            await self.broker.finish(read.id, outcome, message, None)
        except Exception:
            log.warning("card read %s: could not end the agent's session", read.id, exc_info=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
