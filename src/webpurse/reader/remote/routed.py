"""A :class:`~webpurse.reader.base.Reader` whose agent is connected to another shop process.

Each batch goes to the node holding the agent's WebSocket through the shop's Redis (see
:mod:`webpurse.reader.remote.routing`) and is sent to the agent once, exactly as a local
:class:`~webpurse.reader.remote.reader.RemoteReader` would. Failures keep their meaning:
a request that could not be queued sent nothing (:class:`ReaderDisconnected`); one queued
whose answer never came may have run (:class:`OutcomeUnknown`: recover, never re-send).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Sequence

from redis.exceptions import RedisError

from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import (
    CardInfo,
    OutcomeUnknown,
    ReaderDisconnected,
    Step,
)
from webpurse.reader.messages import MAX_BATCH_APDUS, CardStatus, Outcome
from webpurse.reader.remote.routing import (
    REPLY_TTL,
    SessionDirectory,
    SessionState,
    decode_error,
    encode_steps,
)
from webpurse.reader.remote.shared import SharedStateUnavailable

log = logging.getLogger(__name__)

_SLICE = 2.0
"""Seconds of one BLPOP on an answer before the node's heartbeat is checked again."""


class RoutedReader:
    """The session ``state`` (held by ``state.node``), driven from this process."""

    def __init__(
        self, directory: SessionDirectory, state: SessionState, *, batch_timeout: float = 60.0
    ) -> None:
        self._directory = directory
        self._state = state
        self.batch_timeout = batch_timeout
        self.binding = state.binding
        self.session = state.session

    @property
    def name(self) -> str:
        return f"remote:{self._state.reader}"

    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def card(self) -> CardStatus:
        return CardStatus(self._state.present, self._state.atr)

    async def _wait_until(self, condition: Callable[[SessionState], bool], timeout: float) -> None:
        def ready(state: SessionState | None) -> bool:
            if state is None or state.session != self.session:
                raise ReaderDisconnected("the remote reader's session has ended")
            if not state.alive:
                raise ReaderDisconnected("the shop process holding the agent's link is gone")
            return condition(state)

        state = await self._directory.wait(self.binding, ready, timeout)
        assert state is not None
        self._state = state

    async def wait_for_card(self, timeout: float) -> CardInfo:
        await self._wait_until(lambda s: s.connected and s.present, timeout)
        return CardInfo(self.name, self._state.atr or b"")

    async def wait_for_removal(self, timeout: float) -> None:
        await self._wait_until(lambda s: s.connected and not s.present, timeout)

    async def wait_connected(self, timeout: float) -> None:
        await self._wait_until(lambda s: s.connected, timeout)

    async def _call(self, request: dict[str, object], wait: float) -> dict[str, object]:
        shared = self._directory.shared
        reply = shared.key("reply", secrets.token_hex(12))
        request = {**request, "binding": self.binding, "session": self.session, "reply": reply}
        node = self._state.node
        queue = shared.key("rpc", node)
        try:
            if not await self._directory.alive(node):
                raise ReaderDisconnected("the shop process holding the agent's link is gone")
            await shared.redis.rpush(queue, json.dumps(request))  # type: ignore[misc]
        except SharedStateUnavailable as exc:
            raise ReaderDisconnected(f"shared state unavailable, nothing sent: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise ReaderDisconnected(f"shared state unavailable, nothing sent: {exc}") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        answer = None
        try:
            while answer is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise OutcomeUnknown(f"no answer from the reader's node within {wait:g} s")
                # In slices, so a node that died mid-batch is noticed within seconds.
                answer = await shared.redis.blpop(  # type: ignore[misc]
                    [reply], timeout=max(1, int(min(_SLICE, remaining)))
                )
                if answer is None and not await self._directory.alive(node):
                    raise OutcomeUnknown("the shop process holding the agent's link died")
        except (RedisError, OSError, SharedStateUnavailable) as exc:
            log.warning("session %s: lost the shared state mid-batch: %s", self.session, exc)
            raise OutcomeUnknown(f"shared state lost while the batch was out: {exc}") from exc
        result: dict[str, object] = json.loads(answer[1])
        return result

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        if not 1 <= len(batch) <= MAX_BATCH_APDUS:
            raise ValueError(f"a remote batch holds 1 to {MAX_BATCH_APDUS} steps")
        # The node's own deadline is batch_timeout (+5 s for the wire); answer after it.
        wait = min(REPLY_TTL, self.batch_timeout + 10.0)
        answer = await self._call({"op": "transmit", "steps": encode_steps(batch)}, wait)
        if "error" in answer or "responses" not in answer:
            raise decode_error(answer)
        raw = answer["responses"]
        assert isinstance(raw, list)
        return [ResponseApdu.from_bytes(bytes.fromhex(str(r))) for r in raw]

    async def hand_over(self) -> dict[str, object] | None:
        """Ask the node holding this session to give it up (its agent resumed here): what
        the session needs to go on here, or None if it cannot move now."""
        try:
            answer = await self._call({"op": "handover"}, 3.0)
        except (ReaderDisconnected, OutcomeUnknown) as exc:
            log.info("session %s: not handed over: %s", self.session, exc)
            return None
        moved = answer.get("handover")
        if not isinstance(moved, dict):
            log.info("session %s: not handed over: %s", self.session, answer.get("message"))
            return None
        return moved

    async def end(self, outcome: Outcome, message: str = "", amount: int | None = None) -> None:
        """Tell the agent the outcome, through its node, and close the session."""
        request: dict[str, object] = {
            "op": "end",
            "outcome": outcome.value,
            "message": message,
            "amount": amount,
        }
        try:
            await self._call(request, 3.0)
        except (ReaderDisconnected, OutcomeUnknown) as exc:
            log.info("session %s: could not end it from here: %s", self.session, exc)
