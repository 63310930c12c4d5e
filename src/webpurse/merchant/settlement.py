"""The merchant's client of the settlement server's `/v1` API (docs/team/contracts.md).

Payments and loads share one shape (create, authorise, capture/complete, uncertain,
resolve, cancel, get), so one :class:`SettlementClient` serves both, parameterised by
:class:`Kind`. Answers become :class:`SettlementObject`; a 402 decline becomes
:class:`Declined` (with the recovery hint when the card must first recover an earlier
transaction), any other error :class:`SettlementError`. The API key never appears in
logs, reprs or exceptions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import httpx
import orjson
import structlog

from webpurse.protocol.records import TransactionType

log = structlog.get_logger("webpurse.merchant.settlement")

RETRY_PAUSES = (0.05, 0.2, 0.5, 1.0)
"""Pauses between attempts of one settlement call whose connection broke (seconds)."""


def _plain(value: Any) -> bool:
    """Whether orjson writes ``value`` byte for byte as httpx's ``json=`` does (``json.dumps``
    with ``ensure_ascii=False``, compact, ``allow_nan=False``): dicts with text keys, lists,
    text, booleans, None and 64-bit integers. Floats, subclasses and anything else go the
    way they always went (tests/merchant/test_settlement_encoding.py). Loops, not ``all()``
    over a generator: a batch of 256 calls is walked whole (issue 20)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-(1 << 63) <= value < (1 << 64))
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            if type(item) is not str and not _plain(item):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110 - a loop, not all() over a generator: faster
            if type(item) is not str and not _plain(item):
                return False
        return True
    return False


def _encoded(json: dict[str, Any] | None) -> bytes | None:
    """The request body ``json=`` would send, by orjson (a batch of 256 payment calls: ~0.5 ms
    of the merchant's CPU by ``json.dumps``); None where it must go by ``json=`` itself."""
    if json is None or not _plain(json):
        return None
    try:
        return orjson.dumps(json)
    except TypeError:  # orjson.JSONEncodeError (a lone surrogate): json= raises its own error
        return None


_MARKS = bytes(
    ord("0") if byte in b"0123456789-" else ord("x") if byte in b":[," else ord(".")
    for byte in range(256)
)
_LONG_NUMBER = b"x" + b"0" * 19


def _loads(content: bytes) -> Any:
    """``json.loads(content)``, exactly, by orjson where that is the same (a batch's answer
    of 256 items: ~5 µs an item by json, ~2 by orjson; issue 20).

    orjson reads only RFC 8259 JSON and raises on anything else (NaN, a BOM, UTF-16, lone
    surrogates, nesting deeper than 1024): json decides those, as before. On valid JSON the
    one difference is an integer beyond 64 bits, which orjson reads as a float. Every number
    in valid JSON starts the text or follows ``:``, ``[`` or ``,`` (and JSON's whitespace,
    deleted here), so an integer orjson cannot hold (19 digits or more, with its sign) shows
    as ``x`` and 19 ``0`` in the marks; so does a long digit run in a string after one of
    those (it goes by json: only slower). Floats orjson reads as ``float()`` does (700,000
    random and edge-case decimals compared)."""
    marks = content.translate(_MARKS, b" \t\r\n")
    if _LONG_NUMBER in marks or marks[:1] == b"0":
        return json.loads(content)
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


_KEYS_DRAWN = 256
"""Idempotency keys drawn from the OS at once (16 random bytes each)."""

_forks = 0  # processes forked from this one so far, counted in the child


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class _IdempotencyKeys:
    """``mer-`` and 32 hex digits of the OS's CSPRNG, as ``secrets.token_hex(16)`` gives,
    drawn 256 keys at a time (one ``getrandom`` per 256 calls, not one per call: issue 20,
    the bench's client spent 5 % of its time there). Drawn again in a forked child, so two
    processes never hand out the same keys."""

    __slots__ = ("_drawn_in", "_keys")

    def __init__(self) -> None:
        self._keys: deque[str] = deque()
        self._drawn_in = _forks

    def __reduce__(self) -> tuple[type[_IdempotencyKeys], tuple[()]]:
        """A copy or a pickle is an empty pool that draws its own keys: never the keys drawn
        ahead here (two pools handing out the same keys, or a pickle holding future keys)."""
        return (_IdempotencyKeys, ())

    def __call__(self) -> str:
        if self._drawn_in != _forks:  # a forked child: the parent's keys are the parent's
            self._keys, self._drawn_in = deque(), _forks
        try:
            # One atomic step (deque's pops are thread-safe): two threads never take one key.
            return self._keys.popleft()
        except IndexError:
            drawn = os.urandom(16 * _KEYS_DRAWN).hex()
            self._keys.extend("mer-" + drawn[at : at + 32] for at in range(32, len(drawn), 32))
            return "mer-" + drawn[:32]


def _code(response: httpx.Response) -> str | None:
    try:
        body = _loads(response.content)
    except ValueError:
        return None
    return str(body.get("code")) if isinstance(body, dict) and body.get("code") else None


class Kind(StrEnum):
    """Which settlement object a flow drives."""

    PAYMENT = "payments"
    LOAD = "loads"


class SettlementError(Exception):
    """Settlement answered with an error that is not a card decline, or did not answer."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class RecoveryHint:
    """What settlement's ``recovery_required`` decline says must be recovered first.

    ``counter`` is the counter the lost transaction used (its INITIALIZE returned it);
    GET TRANSACTION PROVE names ``counter + 1`` (spec §3; settlement's ``recover.counter``).
    """

    kind: Kind
    object_id: str
    transaction_type: int
    counter: int
    # The card is one transaction ahead of settlement (``recover.heal``): no object of ours
    # to resolve; the card's PROVE answer goes to ``POST /v1/heal`` (Settlement.heal).
    heal: bool = False


@dataclass(frozen=True, slots=True)
class CardCheck:
    """A card check a decline offered (docs/settlement-api.md, "Evidence"): relay ``apdu``
    (INITIALIZE FOR LOAD, amount 0: it changes nothing on the card) in this contact and
    post the card's answer; settlement judges whether the card is a clone."""

    id: str
    apdu: bytes


class Declined(SettlementError):
    """Settlement refused (402): ``decline_code`` says why, ``recover`` what to recover,
    ``card_check`` the check to run on the card before it leaves (or None)."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        decline_code: str | None,
        recover: RecoveryHint | None = None,
        card_check: CardCheck | None = None,
    ) -> None:
        super().__init__(message, status=402, code=code)
        self.decline_code = decline_code
        self.recover = recover
        self.card_check = card_check


@dataclass(frozen=True, slots=True)
class Authorisation:
    """Settlement's authorisation: the APDU to send the card next (DEBIT or CREDIT)."""

    apdu: bytes
    date: str
    time: str


@dataclass(frozen=True, slots=True)
class SettlementObject:
    """A payment or a load as settlement reports it (only the fields the merchant uses)."""

    kind: Kind
    id: str
    status: str
    amount: int
    terminal_id: bytes
    key_index: int
    card_number: str | None = None
    decline_code: str | None = None
    tac: str | None = None
    authorisation: Authorisation | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, kind: Kind, body: dict[str, Any]) -> SettlementObject:
        try:
            auth_raw = body.get("authorisation")
            authorisation = None
            if auth_raw:
                apdu_hex = auth_raw.get("debit_apdu") or auth_raw.get("credit_apdu")
                authorisation = Authorisation(
                    apdu=bytes.fromhex(apdu_hex),
                    date=str(auth_raw.get("date", "")),
                    time=str(auth_raw.get("time", "")),
                )
            object_id = str(body["id"])
            status = str(body["status"])
            amount = int(body["amount"])
            terminal_id = bytes.fromhex(body.get("terminal_id") or "000000000000")
            key_index = int(body.get("key_index") or 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise SettlementError(f"settlement sent a malformed {kind.value[:-1]}: {exc}") from exc
        return cls(
            kind=kind,
            id=object_id,
            status=status,
            amount=amount,
            terminal_id=terminal_id,
            key_index=key_index,
            card_number=body.get("card_number"),
            decline_code=body.get("decline_code"),
            tac=body.get("tac"),
            authorisation=authorisation,
            raw=body,
        )


MERCHANT_FLOAT = "merchant_float"
BANK_TRANSFER = "bank_transfer"
FUNDING_METHODS = frozenset({MERCHANT_FLOAT, BANK_TRANSFER})


class TxStatus(StrEnum):
    """A payment's or a load's status, as settlement's API documents it (docs/settlement-api.md).

    The shop's own copy of settlement's words: it talks to settlement over HTTP only and
    imports nothing of it; ``tests/merchant/test_statuses.py`` keeps the two the same.
    """

    REQUIRES_FUNDING = "requires_funding"
    REQUIRES_CARD = "requires_card"
    AUTHORISED = "authorised"
    UNCERTAIN = "uncertain"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    CANCELED = "canceled"
    EXPIRED = "expired"


REQUIRES_FUNDING = TxStatus.REQUIRES_FUNDING
"""A bank-transfer load's status until settlement has matched the money to it."""
"""How the shop's top-ups are funded (docs/settlement-api.md "Funding"): cash taken at the
till draws on the merchant's prepaid float; an online top-up waits for the cardholder's own
bank transfer. A load is never created without one of them."""


@dataclass(frozen=True, slots=True)
class FloatBalance:
    """The merchant's prepaid top-up float at settlement (``GET /v1/float``)."""

    balance: int
    low_threshold: int
    currency: str = "CNY"

    @property
    def is_low(self) -> bool:
        return self.balance <= self.low_threshold


def funding_reference(obj: SettlementObject) -> str | None:
    """The payment reference settlement issued for a bank-transfer load (else None)."""
    funding = obj.raw.get("funding")
    if isinstance(funding, dict) and funding.get("method") == BANK_TRANSFER:
        reference = funding.get("reference")
        return str(reference) if reference else None
    return None


class Settlement(Protocol):
    """What the flows need from settlement; :class:`SettlementClient` is the HTTP one."""

    async def create(
        self,
        kind: Kind,
        amount: int,
        *,
        description: str,
        reference: str,
        funding: str | None = None,
        card_number: str | None = None,
    ) -> SettlementObject:
        """A payment, or a load funded by ``funding`` (one of :data:`FUNDING_METHODS`),
        bound to ``card_number`` when given (required for a bank transfer)."""
        ...

    async def float_balance(self) -> FloatBalance: ...

    async def get(self, kind: Kind, object_id: str) -> SettlementObject: ...

    async def authorise(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes,
        initialize: bytes,
        terminal_id: bytes,
    ) -> SettlementObject: ...

    async def finish(self, kind: Kind, object_id: str, card_response: bytes) -> SettlementObject:
        """Capture a payment (DEBIT's TAC ‖ MAC2) or complete a load (CREDIT's TAC)."""
        ...

    async def uncertain(self, kind: Kind, object_id: str) -> SettlementObject: ...

    async def resolve(
        self, kind: Kind, object_id: str, *, initialize: bytes, prove: bytes | None
    ) -> SettlementObject: ...

    async def cancel(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes | None = None,
        status_word: int | None = None,
    ) -> SettlementObject: ...

    async def answer_card_check(self, check_id: str, initialize_response: bytes) -> str:
        """Post the card's answer to a card check; settlement's verdict."""
        ...

    async def heal(self, *, issuer_data: bytes, transaction_type: int, prove: bytes) -> None: ...


def _card_check(body: dict[str, Any]) -> CardCheck | None:
    raw = body.get("card_check")
    if not isinstance(raw, dict):
        return None
    try:
        apdu = bytes.fromhex(str(raw["initialize_apdu"]))
        check_id = str(raw["id"])
    except (KeyError, ValueError):
        return None
    # Only what a card check is: INITIALIZE FOR LOAD (80 50 00 02), amount 0.
    if len(apdu) != 17 or apdu[:6] != bytes.fromhex("805000020B01") or any(apdu[6:10]):
        return None
    return CardCheck(check_id, apdu)


def _recovery_hint(body: dict[str, Any]) -> RecoveryHint | None:
    raw = body.get("recover")
    if not isinstance(raw, dict):
        return None
    try:
        if raw.get("heal") is True:
            ttype = raw["transaction_type"]
            ttype_int = int(ttype, 16) if isinstance(ttype, str) else int(ttype)
            kind = Kind.PAYMENT if ttype_int == TransactionType.EP_PURCHASE else Kind.LOAD
            return RecoveryHint(kind, "", ttype_int, int(raw["counter"]), heal=True)
        if raw.get("payment_id"):
            kind, object_id = Kind.PAYMENT, str(raw["payment_id"])
        else:
            kind, object_id = Kind.LOAD, str(raw["load_id"])
        ttype = raw["transaction_type"]
        ttype_int = int(ttype, 16) if isinstance(ttype, str) else int(ttype)
        return RecoveryHint(kind, object_id, ttype_int, int(raw["counter"]))
    except (KeyError, TypeError, ValueError):
        return None


class SettlementClient:
    """HTTP client of settlement's `/v1`, with the merchant's API key.

    ``client`` is injected (an :class:`httpx.AsyncClient`), so tests can hand in one bound
    to an in-process ASGI app and the composition root one with a base URL.
    """

    def __init__(self, client: httpx.AsyncClient, api_key: str) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._new_key = _IdempotencyKeys()

    def __repr__(self) -> str:
        return f"SettlementClient({self._client.base_url!s}, key=<redacted>)"

    async def _request(
        self, kind: Kind, method: str, path: str, json: dict[str, Any] | None = None
    ) -> SettlementObject:
        headers = dict(self._headers)
        if method == "POST":
            headers["Idempotency-Key"] = self._new_key()
        status, body = await self._exchange(method, path, json, headers)
        if status == 402:
            raise Declined(
                str(body.get("detail") or body.get("title") or "declined"),
                code=str(body.get("code") or "card_declined"),
                decline_code=body.get("decline_code"),
                recover=_recovery_hint(body),
                card_check=_card_check(body),
            )
        if status >= 400:
            raise SettlementError(
                f"settlement {method} {path}: {status} "
                f"{body.get('code', '')} {body.get('detail', '')}".strip(),
                status=status,
                code=body.get("code"),
            )
        return SettlementObject.from_json(kind, body)

    async def _exchange(
        self, method: str, path: str, json: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """One call: its status and its JSON body (``{}`` when the body is not an object)."""
        response = await self._send(method, path, json, headers)
        try:
            body = _loads(response.content)
        except ValueError:
            body = {}
        return response.status_code, body if isinstance(body, dict) else {}

    async def _send(
        self, method: str, path: str, json: dict[str, Any] | None, headers: dict[str, str]
    ) -> httpx.Response:
        """Send, retrying a broken connection with the *same* Idempotency-Key.

        A keep-alive connection the server closed just as we reused it, or an answer lost
        on the way back, says nothing about whether settlement acted. Every POST carries an
        idempotency key, so sending it again is safe: settlement replays the stored answer
        (or says 409 ``idempotency_in_flight`` while the first attempt still runs, which we
        wait out). After the last attempt the outcome is reported as unknown, never guessed.
        """
        body = _encoded(json)
        for attempt, pause in enumerate((*RETRY_PAUSES, None)):
            try:
                response: httpx.Response
                if body is None:
                    response = await self._client.request(method, path, json=json, headers=headers)
                else:  # the same request, headers in the same order, its body by orjson
                    request = self._client.build_request(
                        method, path, content=body, headers=headers
                    )
                    request.headers["Content-Type"] = "application/json"
                    response = await self._client.send(request)
            except httpx.TransportError as exc:
                if pause is None:
                    raise SettlementError(f"settlement unreachable: {type(exc).__name__}") from exc
                log.warning(
                    "settlement.retry",
                    method=method,
                    path=path,
                    attempt=attempt + 1,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(pause)
                continue
            in_flight = response.status_code == 409 and _code(response) == "idempotency_in_flight"
            if in_flight and attempt > 0 and pause is not None:
                await asyncio.sleep(pause)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def heal(self, *, issuer_data: bytes, transaction_type: int, prove: bytes) -> None:
        """Send the card's proof for the counter settlement is missing (``recover.heal``)."""
        headers = {**self._headers, "Idempotency-Key": self._new_key()}
        payload = {
            "issuer_data": issuer_data.hex().upper(),
            "transaction_type": f"{transaction_type:02X}",
            "prove_response": prove.hex().upper(),
        }
        status, body = await self._exchange("POST", "/v1/heal", payload, headers)
        if status >= 400:
            raise SettlementError(
                f"settlement POST /v1/heal: {status} {body.get('code', '')}".strip(),
                status=status,
                code=body.get("code"),
            )
        log.info("settlement.healed", counter=body.get("counter"))

    async def create(
        self,
        kind: Kind,
        amount: int,
        *,
        description: str,
        reference: str,
        funding: str | None = None,
        card_number: str | None = None,
    ) -> SettlementObject:
        if kind is Kind.PAYMENT:
            payload: dict[str, Any] = {
                "amount": amount,
                "currency": "CNY",
                "description": description,
                "merchant_reference": reference,
            }
        else:
            if funding not in FUNDING_METHODS:
                raise SettlementError(f"a load needs its funding, not {funding!r}")
            method: dict[str, Any] = {"method": funding}
            if funding == MERCHANT_FLOAT:
                method["reference"] = reference  # the till's order: on settlement's books
            payload = {"amount": amount, "currency": "CNY", "funding": method}
            if card_number is not None:
                payload["card_number"] = card_number
        return await self._request(kind, "POST", f"/v1/{kind.value}", payload)

    async def float_balance(self) -> FloatBalance:
        status, body = await self._exchange("GET", "/v1/float", None, dict(self._headers))
        if status != 200:
            raise SettlementError(
                f"settlement GET /v1/float: {status} {body.get('code', '')}".strip(),
                status=status,
                code=body.get("code"),
            )
        try:
            return FloatBalance(
                balance=int(body["balance"]),
                low_threshold=int(body.get("low_threshold") or 0),
                currency=str(body.get("currency") or "CNY"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SettlementError(f"settlement sent a malformed float: {exc}") from exc

    async def get(self, kind: Kind, object_id: str) -> SettlementObject:
        return await self._request(kind, "GET", f"/v1/{kind.value}/{object_id}")

    async def authorise(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes,
        initialize: bytes,
        terminal_id: bytes,
    ) -> SettlementObject:
        payload = {
            "issuer_data": issuer_data.hex().upper(),
            "initialize_response": initialize.hex().upper(),
            "terminal_id": terminal_id.hex().upper(),
        }
        return await self._request(kind, "POST", f"/v1/{kind.value}/{object_id}/authorise", payload)

    async def finish(self, kind: Kind, object_id: str, card_response: bytes) -> SettlementObject:
        if kind is Kind.PAYMENT:
            path, payload = "capture", {"debit_response": card_response.hex().upper()}
        else:
            path, payload = "complete", {"credit_response": card_response.hex().upper()}
        return await self._request(kind, "POST", f"/v1/{kind.value}/{object_id}/{path}", payload)

    async def uncertain(self, kind: Kind, object_id: str) -> SettlementObject:
        return await self._request(kind, "POST", f"/v1/{kind.value}/{object_id}/uncertain", {})

    async def resolve(
        self, kind: Kind, object_id: str, *, initialize: bytes, prove: bytes | None
    ) -> SettlementObject:
        payload = {
            "initialize_response": initialize.hex().upper(),
            "prove_response": prove.hex().upper() if prove is not None else None,
        }
        return await self._request(kind, "POST", f"/v1/{kind.value}/{object_id}/resolve", payload)

    async def cancel(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes | None = None,
        status_word: int | None = None,
    ) -> SettlementObject:
        """Cancel before any debit/credit; with the card's refusal (EF 0x15, SW) if known."""
        payload: dict[str, Any] = {}
        if issuer_data is not None:
            payload["issuer_data"] = issuer_data.hex().upper()
        if status_word is not None:
            payload["card_status_word"] = f"{status_word:04X}"
        return await self._request(kind, "POST", f"/v1/{kind.value}/{object_id}/cancel", payload)

    async def answer_card_check(self, check_id: str, initialize_response: bytes) -> str:
        headers = {**self._headers, "Idempotency-Key": self._new_key()}
        path = f"/v1/card_checks/{check_id}"
        payload = {"initialize_response": initialize_response.hex().upper()}
        status, body = await self._exchange("POST", path, payload, headers)
        if status != 200:
            raise SettlementError(
                f"settlement POST {path}: {status} {body.get('code', '')}".strip(),
                status=status,
                code=body.get("code"),
            )
        return str(body.get("verdict"))


_BATCHABLE = re.compile(
    r"^/v1/payments(?:/[A-Za-z0-9_]{1,40}/(?:authorise|capture|uncertain|resolve|cancel))?$"
)


def batch_size(queued: int, max_batch: int) -> int:
    """How many of ``queued`` calls the next batch carries: all of them up to ``max_batch``,
    else an equal share of the fewest batches that carry them all."""
    batches = -(-queued // max_batch)
    return -(-queued // batches)


class BatchingSettlementClient(SettlementClient):
    """A :class:`SettlementClient` that sends concurrent payment calls as one batch.

    Group commit from the merchant's side (docs/settlement-api.md "Batches"): a payment
    POST made while ``max_in_flight`` batches are already on their way waits in a queue;
    as soon as one comes back, everything queued (up to ``max_batch``) goes as the next
    ``POST /v1/batch``; calls that become ready in the same turn of the event loop (the
    shoppers a returning batch wakes) queue together first, so a free slot does not send
    the first of them alone. With two or more in flight, more than ``max_batch`` queued go
    as equal batches (512 as two of 256, not 500 and 12); with one, as ``max_batch`` and
    the rest (measured a little faster: the small batch's trip overlaps the client's work
    on the big one's callers). A batch goes while another is on its way only if it is
    worth its fixed cost: at least half the largest one in flight; smaller, it waits for
    the next one back (then it goes at the front of the queue, with whatever is queued),
    so a handful of callers does not cycle in batches of their own beside a big one, each
    paying a whole request for a few items and taking the server's CPU from the big one
    (issue 20: two in flight lost to one). Nothing waits on a timer, and nothing waits for
    more than the batches already on their way: with one shopper at the till a batch
    holds one item and costs what the single call costs; with hundreds, one commit carries
    hundreds of them. Each item keeps its own idempotency key, so a batch resent after a
    broken connection replays what settlement already did. Callers see exactly the answers
    (and exceptions) of :class:`SettlementClient`.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_key: str,
        *,
        max_batch: int = 500,
        max_in_flight: int = 1,
    ) -> None:
        super().__init__(client, api_key)
        if not 1 <= max_batch <= 1000 or max_in_flight < 1:
            raise ValueError("max_batch must be 1..1000 and max_in_flight at least 1")
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[tuple[dict[str, Any], asyncio.Future[tuple[int, dict[str, Any]]]]] = []
        self._flying: list[int] = []  # the sizes of the batches on their way
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches_sent = 0
        self.items_sent = 0

    async def _exchange(
        self, method: str, path: str, json: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        if method != "POST" or not _BATCHABLE.fullmatch(path):
            return await super()._exchange(method, path, json, headers)
        item = {"path": path, "idempotency_key": headers.get("Idempotency-Key"), "body": json}
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, dict[str, Any]]] = loop.create_future()
        self._queue.append((item, future))
        if not self._scheduled:
            # Let every caller that is ready this turn of the loop queue first, so that
            # a batch coming back is followed by one batch, not by one of one item.
            self._scheduled = True
            loop.call_soon(self._pump)
        return await future

    def _pump(self) -> None:
        self._scheduled = False
        while self._queue and len(self._flying) < self._max_in_flight:
            size = (
                batch_size(len(self._queue), self._max_batch)
                if self._max_in_flight > 1
                else min(len(self._queue), self._max_batch)
            )
            if self._flying and 2 * size < max(self._flying):
                break  # not worth a request beside a big one: it goes with the next one back
            taken = self._queue[:size]
            del self._queue[:size]
            self._flying.append(size)
            task = asyncio.create_task(self._flush(taken))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(
        self, taken: list[tuple[dict[str, Any], asyncio.Future[tuple[int, dict[str, Any]]]]]
    ) -> None:
        try:
            self.batches_sent += 1
            self.items_sent += len(taken)
            response = await super()._send(
                "POST", "/v1/batch", {"requests": [item for item, _ in taken]}, self._headers
            )
            answers: list[tuple[int, dict[str, Any]]]
            if response.status_code == 200:
                answers = [
                    (
                        int(answer["status"]),
                        body if type(body := answer["body"]) is dict else dict(body),
                    )
                    for answer in _loads(response.content)["responses"]
                ]
                if len(answers) != len(taken):
                    raise SettlementError("settlement answered a batch with the wrong count")
            else:  # the batch as a whole was refused (401, 422, 503 …): so is each item
                try:
                    refusal = _loads(response.content)
                except ValueError:
                    refusal = {}
                whole = (response.status_code, refusal if isinstance(refusal, dict) else {})
                answers = [whole] * len(taken)
            for (_, future), answer in zip(taken, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
        except Exception as exc:  # each caller sees the failure as its own call's
            log.warning("settlement.batch_failed", items=len(taken), error=type(exc).__name__)
            error = (
                exc
                if isinstance(exc, SettlementError)
                else SettlementError(f"settlement sent a malformed batch answer: {exc!r}")
            )
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._flying.remove(len(taken))
            self._pump()
