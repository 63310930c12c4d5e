"""Reader sessions across shop processes: where each lives, and batches sent to it.

The process that holds an agent's WebSocket (its *node*) writes the session's state to
Redis (``session:<binding>``: node, session id, link up, card present, ATR) and announces
every change on ``session-events:<binding>``. A cashier on another process finds the
session there and drives it through a :class:`~webpurse.reader.remote.routed.RoutedReader`:
each batch is one request pushed on the node's list (``rpc:<node>``); the node's
:class:`RpcServer` hands it to the local :class:`RemoteReader` and pushes the answer to the
request's reply key, which the cashier waits on with ``BLPOP``. The agent still sees one
``transmit`` per batch: a purchase takes two round trips of the agent wherever the
cashier runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import (
    BatchRefused,
    CardRemoved,
    NoCard,
    OutcomeUnknown,
    ReaderDisconnected,
    ReaderError,
    ReaderTimeout,
    Step,
)
from webpurse.reader.messages import Outcome
from webpurse.reader.remote.reader import RemoteReader
from webpurse.reader.remote.shared import SharedState

log = logging.getLogger(__name__)

SESSION_TTL = 3600
"""Seconds a session's state outlives its last change (a node that died leaves none)."""
REPLY_TTL = 120
"""Seconds an answer waits for the cashier that asked."""
NODE_TTL = 10
"""Seconds a node counts as alive after its last heartbeat (every NODE_TTL / 3 s)."""

_FORGET = """
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class SessionState:
    """A session as the shop's Redis knows it."""

    binding: str
    node: str
    session: str
    reader: str
    connected: bool
    present: bool
    atr: bytes | None
    alive: bool = True
    """Its node's heartbeat is fresh (a SIGKILLed node's sessions are not)."""

    @classmethod
    def parse(cls, binding: str, raw: dict[Any, Any], alive: bool = True) -> SessionState | None:
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        if not fields.get("session"):
            return None
        return cls(
            binding=binding,
            node=fields["node"],
            session=fields["session"],
            reader=fields.get("reader", ""),
            connected=fields.get("connected") == "1",
            present=fields.get("present") == "1",
            atr=bytes.fromhex(fields["atr"]) if fields.get("atr") else None,
            alive=alive,
        )


class SessionDirectory:
    """Where every reader session lives, in the shop's Redis."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared

    def _key(self, binding: str) -> str:
        return self.shared.key("session", binding)

    def node_key(self, node: str) -> str:
        return self.shared.key("node", node)

    async def alive(self, node: str) -> bool:
        with self.shared.guard("checking a node's heartbeat"):
            return bool(await self.shared.redis.exists(self.node_key(node)))

    def channel(self, binding: str) -> str:
        return self.shared.key("session-events", binding)

    async def publish(self, reader: RemoteReader) -> None:
        """The owning node: write ``reader``'s state and announce it (errors are logged:
        the session still works from this process)."""
        card = reader.card
        mapping: dict[FieldT, EncodableT] = {
            "node": self.shared.node,
            "session": reader.session,
            "reader": reader.name.removeprefix("remote:"),
            "connected": "1" if reader.connected else "0",
            "present": "1" if card.present else "0",
            "atr": (card.atr or b"").hex(),
        }
        key = self._key(reader.binding)
        try:
            async with self.shared.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.node_key(self.shared.node), b"1", ex=NODE_TTL)
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, SESSION_TTL)
                pipe.publish(self.channel(reader.binding), reader.session)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("session %s: could not publish its state: %s", reader.session, exc)

    async def forget(self, reader: RemoteReader) -> None:
        """The owning node: the session ended (only if it is still the binding's one)."""
        try:
            await self.shared.redis.eval(_FORGET, 1, self._key(reader.binding), reader.session)  # type: ignore[misc]
            await self.shared.redis.publish(self.channel(reader.binding), reader.session)
        except (RedisError, OSError) as exc:
            log.warning("session %s: could not remove its state: %s", reader.session, exc)

    async def lookup(self, binding: str) -> SessionState | None:
        with self.shared.guard("looking up a reader session"):
            raw = await self.shared.redis.hgetall(self._key(binding))  # type: ignore[misc]
        state = SessionState.parse(binding, raw)
        if state is None:
            return None
        return SessionState.parse(binding, raw, await self.alive(state.node))

    async def wait(
        self,
        binding: str,
        condition: Callable[[SessionState | None], bool],
        timeout: float,
    ) -> SessionState | None:
        """The binding's state once ``condition`` holds; :class:`ReaderTimeout` after
        ``timeout``; :class:`ReaderDisconnected` when Redis cannot be reached."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with self.shared.redis.pubsub() as pubsub:
                await pubsub.subscribe(self.channel(binding))
                while True:
                    state = await self.lookup(binding)
                    if condition(state):
                        return state
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise ReaderTimeout(f"reader session for {binding}: waited {timeout:g} s")
                    # Any message (or the timeout) means: look again.
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
        except (RedisError, OSError) as exc:
            raise ReaderDisconnected(f"shared state unavailable: {exc}") from exc


# --- the wire format of a routed request ---------------------------------------------


def encode_steps(batch: Sequence[Step]) -> list[list[Any]]:
    return [[step.apdu.hex(), sorted(step.ok)] for step in batch]


def decode_steps(raw: list[list[Any]]) -> list[Step]:
    return [Step(bytes.fromhex(apdu), frozenset(int(sw) for sw in ok)) for apdu, ok in raw]


def encode_error(exc: BaseException) -> dict[str, Any]:
    responses = [r.to_bytes().hex() for r in getattr(exc, "responses", ())]
    kind = "error"
    for name, cls in _ERRORS:
        if isinstance(exc, cls):
            kind = name
            break
    return {
        "error": kind,
        "message": str(exc),
        "code": getattr(exc, "code", ""),
        "responses": responses,
    }


def decode_error(answer: dict[str, Any]) -> ReaderError:
    responses = [ResponseApdu.from_bytes(bytes.fromhex(r)) for r in answer.get("responses", [])]
    message = str(answer.get("message", ""))
    match answer.get("error"):
        case "outcome_unknown":
            return OutcomeUnknown(message, responses)
        case "card_removed":
            return CardRemoved(message, responses)
        case "disconnected":
            return ReaderDisconnected(message)
        case "no_card":
            return NoCard(message)
        case "timeout":
            return ReaderTimeout(message)
        case "refused":
            return BatchRefused(str(answer.get("code", "")), message, responses)
    return ReaderError(message)


# Most specific first: OutcomeUnknown is a CardRemoved, ReaderDisconnected a NoCard.
_ERRORS: list[tuple[str, type[BaseException]]] = [
    ("outcome_unknown", OutcomeUnknown),
    ("card_removed", CardRemoved),
    ("disconnected", ReaderDisconnected),
    ("no_card", NoCard),
    ("timeout", ReaderTimeout),
    ("refused", BatchRefused),
]

_OUTCOMES = {o.value: o for o in Outcome}


class RpcServer:
    """The owning node's side: takes requests for its sessions off ``rpc:<node>``."""

    def __init__(
        self,
        shared: SharedState,
        readers: Callable[[str], RemoteReader | None],
        handover: Callable[[RemoteReader], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.shared = shared
        self._readers = readers
        self._handover = handover
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def queue(self) -> str:
        return self.shared.key("rpc", self.shared.node)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._serve(), name=f"reader rpc {self.shared.node}")
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="reader rpc heartbeat")

    async def _beat(self) -> None:
        """Tell the other processes this node (and so its sessions) is alive."""
        key = self.shared.key("node", self.shared.node)
        while True:
            try:
                await self.shared.redis.set(key, b"1", ex=NODE_TTL)
            except (RedisError, OSError) as exc:
                log.warning("reader rpc: heartbeat not written: %s", exc)
            await asyncio.sleep(NODE_TTL / 3)

    async def close(self) -> None:
        tasks = [t for t in (self._task, self._heartbeat, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _serve(self) -> None:
        backoff = 0.1
        while True:
            try:
                item = await self.shared.redis.blpop([self.queue], timeout=2)  # type: ignore[misc]
                backoff = 0.1
            except (RedisError, OSError) as exc:
                log.warning("reader rpc: Redis unavailable (%s); retrying in %g s", exc, backoff)
                await asyncio.sleep(backoff)  # reconnection back-off, not synchronisation
                backoff = min(backoff * 2, 5.0)
                continue
            if item is None:
                continue
            try:
                request = json.loads(item[1])
            except ValueError:
                log.warning("reader rpc: dropped a malformed request")
                continue
            try:
                first = await self.shared.redis.set(
                    self.shared.key("rpc-taken", str(request.get("reply", ""))),
                    b"1",
                    nx=True,
                    ex=REPLY_TTL,
                )
            except (RedisError, OSError) as exc:
                # Unsure whether it ran before: never run a batch twice; the cashier
                # gets no answer (outcome unknown) and recovers from the card.
                log.warning("reader rpc: dropped a request (Redis unavailable: %s)", exc)
                continue
            if not first:
                log.warning("reader rpc: dropped a request delivered twice")
                continue
            task = asyncio.create_task(self._handle(request), name="reader rpc request")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _handle(self, request: dict[str, Any]) -> None:
        reader = self._readers(str(request.get("binding", "")))
        answer: dict[str, Any]
        if reader is None or reader.session != request.get("session"):
            answer = encode_error(ReaderDisconnected("the session is not held here any more"))
        else:
            try:
                if request.get("op") == "end":
                    outcome = _OUTCOMES.get(str(request.get("outcome")), Outcome.FAILED)
                    await reader.end(
                        outcome, str(request.get("message", "")), request.get("amount")
                    )
                    answer = {"ok": True}
                elif request.get("op") == "handover" and self._handover is not None:
                    answer = {"handover": await self._handover(reader)}
                else:
                    responses = await reader.transmit(decode_steps(request["steps"]))
                    answer = {"responses": [r.to_bytes().hex() for r in responses]}
            except ReaderError as exc:
                answer = encode_error(exc)
            except Exception as exc:
                log.exception("reader rpc: request for %s failed", reader.binding)
                answer = encode_error(OutcomeUnknown(f"the reader's node failed: {exc}"))
        reply = str(request.get("reply", ""))
        try:
            async with self.shared.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(reply, json.dumps(answer))
                pipe.expire(reply, REPLY_TTL)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("reader rpc: could not answer %s: %s", reply, exc)
