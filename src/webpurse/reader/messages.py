"""The remote-reader protocol's messages, sans-I/O (``docs/remote-reader.md``).

One WebSocket carries one session between the merchant server and the shopper's terminal
agent. Every frame is a text frame holding one JSON object with a ``type``. This module
turns text into typed, validated messages and back, and nothing else: no socket, no
clock. :func:`parse_message` raises only :class:`MessageError`, whose ``code`` is one of
the stable :class:`ErrorCode` values the peer receives in an ``error`` message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeAlias

PROTOCOL_VERSIONS: Final[tuple[int, ...]] = (1,)
"""Versions this implementation speaks, best last."""

MAX_MESSAGE_BYTES: Final = 16 * 1024
"""No frame, in either direction, may be longer (UTF-8 bytes)."""

MAX_BATCH_APDUS: Final = 16
"""No ``transmit`` may carry more APDUs."""

MAX_TIMEOUT_MS: Final = 300_000
"""The longest batch a server may ask for (a shopper reads and confirms inside it)."""

MAX_ID: Final = 2**31 - 1
_MAX_TEXT: Final = 200
_MAX_TOKEN: Final = 128
_HEX = re.compile(r"\A(?:[0-9A-Fa-f]{2})*\Z")
_SW = re.compile(r"\A[0-9A-Fa-f]{4}\Z")
_TOKEN = re.compile(r"\A[A-Za-z0-9_\-]{1,128}\Z")


class ErrorCode(StrEnum):
    """Stable error codes carried by ``error`` messages (and :class:`MessageError`)."""

    MALFORMED = "malformed"
    """Not JSON, not an object, unknown type, a missing or badly typed field."""
    TOO_LARGE = "too_large"
    """The frame exceeds :data:`MAX_MESSAGE_BYTES`."""
    BATCH_TOO_LONG = "batch_too_long"
    """A ``transmit`` with more than :data:`MAX_BATCH_APDUS` APDUs (or none)."""
    UNSUPPORTED_VERSION = "unsupported_version"
    UNEXPECTED = "unexpected"
    """A valid message at the wrong moment (e.g. ``transmit`` before ``hello``)."""
    UNKNOWN_ID = "unknown_id"
    """A ``result`` for a batch that is not the one in flight."""
    BUSY = "busy"
    """A second ``transmit`` while one is in flight."""
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - an error code, not a secret
    """Pairing token or code unknown, already used, or expired."""
    SESSION_EXPIRED = "session_expired"
    """``resume`` after the grace period, or with an unknown resume token."""
    TIMEOUT = "timeout"
    """The batch's deadline passed before it could run to the end."""
    NO_CARD = "no_card"
    CARD_REMOVED = "card_removed"
    """The card left the field mid-batch: the step after ``responses`` has an unknown outcome."""
    READER_FAILURE = "reader_failure"
    APDU_NOT_ALLOWED = "apdu_not_allowed"
    """The agent does not relay this command (e.g. VERIFY, or a malformed APDU)."""
    NO_INITIALIZE = "no_initialize"
    """DEBIT/CREDIT not directly after an INITIALIZE for a non-zero amount."""
    CONSENT_REFUSED = "consent_refused"
    """The shopper said no."""
    AMOUNT_MISMATCH = "amount_mismatch"
    """The INITIALIZE amount differs from the amount the shopper confirmed."""
    ALREADY_DONE = "already_done"
    """A second DEBIT (or CREDIT) in a session whose first may have happened."""
    TOO_MANY_FAILURES = "too_many_failures"
    """The card refused two DEBIT/CREDIT in this session; the agent sends no more."""
    SHARE_REFUSED = "share_refused"
    """The shopper did not agree to share the holder's data (EF 0x16) or log (EF 0x18)."""
    INTERNAL = "internal"


class MessageError(Exception):
    """A message that cannot be accepted; ``code`` goes back to the peer verbatim."""

    def __init__(self, code: ErrorCode, message: str, msg_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id


class CardEvent(StrEnum):
    INSERTED = "inserted"
    REMOVED = "removed"


class Outcome(StrEnum):
    """What the agent shows at the ``end`` of a session."""

    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    CANCELED = "canceled"
    UNCERTAIN = "uncertain"
    FAILED = "failed"


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardStatus:
    """Whether a card is in the reader's field, and its ATR."""

    present: bool
    atr: bytes | None = None


@dataclass(frozen=True, slots=True)
class AgentHello:
    """First message of a new session, agent → server. Exactly one of ``token``/``code``."""

    versions: tuple[int, ...]
    agent: str
    reader: str
    card: CardStatus
    token: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ServerHello:
    """The server's answer to ``hello`` or ``resume``: the session is up."""

    version: int
    session: str
    resume_token: str
    grace_ms: int
    merchant: str | None = None
    unknown_batch: int | None = None
    """On resume: the batch whose result was lost (reported to the merchant as unknown)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """First message on a new socket after a drop, agent → server."""

    resume_token: str
    reader: str
    card: CardStatus


@dataclass(frozen=True, slots=True)
class ApduStep:
    apdu: bytes
    ok: frozenset[int] = field(default=frozenset({0x9000}))


@dataclass(frozen=True, slots=True)
class Transmit:
    """Server → agent: run these APDUs in order, stop after the first SW not in its ``ok``."""

    id: int
    apdus: tuple[ApduStep, ...]
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class Result:
    """Agent → server: the responses (data ‖ SW) of a batch; ``complete`` if none stopped it."""

    id: int
    responses: tuple[bytes, ...]
    complete: bool


@dataclass(frozen=True, slots=True)
class Card:
    """Agent → server: the card entered or left the field."""

    event: CardEvent
    atr: bytes | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: something was refused. ``id`` names the batch when there is one;
    ``responses`` holds the answers of a batch's steps that ran before it was refused."""

    code: str
    message: str
    id: int | None = None
    responses: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class End:
    """Server → agent: the session is over; the agent shows the outcome and hangs up."""

    outcome: Outcome
    message: str = ""
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: str = ""


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: str = ""


Message: TypeAlias = (
    AgentHello | ServerHello | Resume | Transmit | Result | Card | Error | End | Ping | Pong
)


# --- parsing --------------------------------------------------------------------------


def _bad(text: str, msg_id: int | None = None) -> MessageError:
    return MessageError(ErrorCode.MALFORMED, text, msg_id)


def _get(obj: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise _bad(f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; the protocol keeps them apart.
    if kind is int and isinstance(value, bool):
        raise _bad(f"field {key!r} must be an integer")
    if not isinstance(value, kind):
        raise _bad(f"field {key!r} must be {kind.__name__}")
    return value


def _text(obj: dict[str, Any], key: str, *, optional: bool = False, limit: int = _MAX_TEXT) -> Any:
    value = _get(obj, key, str, optional=optional)
    if value is not None and len(value) > limit:
        raise _bad(f"field {key!r} is longer than {limit} characters")
    return value


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX.match(value):
        raise _bad(f"{what} must be a hex string of whole bytes")
    return bytes.fromhex(value)


def _msg_id(obj: dict[str, Any]) -> int:
    value = _get(obj, "id", int)
    if not 1 <= value <= MAX_ID:
        raise _bad(f"id must be between 1 and {MAX_ID}")
    assert isinstance(value, int)
    return value


def _token(obj: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = _text(obj, key, optional=optional, limit=_MAX_TOKEN)
    if value is not None and not _TOKEN.match(value):
        raise _bad(f"field {key!r} must be URL-safe base64 characters")
    return value  # type: ignore[no-any-return]


def _card_status(obj: dict[str, Any]) -> CardStatus:
    card = _get(obj, "card", dict)
    present = _get(card, "present", bool)
    atr_text = _get(card, "atr", str, optional=True)
    atr = (_hex(atr_text, "card.atr") or None) if atr_text is not None else None
    if atr is not None and len(atr) > 33:
        raise _bad("an ATR is at most 33 bytes")
    return CardStatus(present, atr)


def _responses(obj: dict[str, Any], key: str, *, optional: bool = False) -> tuple[bytes, ...]:
    items = _get(obj, key, list, optional=optional)
    if items is None:
        return ()
    if len(items) > MAX_BATCH_APDUS:
        raise MessageError(ErrorCode.BATCH_TOO_LONG, f"more than {MAX_BATCH_APDUS} responses")
    out = []
    for i, item in enumerate(items):
        raw = _hex(item, f"{key}[{i}]")
        if not 2 <= len(raw) <= 258:
            raise _bad(f"{key}[{i}] must be 2 to 258 bytes (data ‖ SW)")
        out.append(raw)
    return tuple(out)


def _parse_hello(obj: dict[str, Any]) -> AgentHello | ServerHello:
    if "versions" in obj:
        versions = _get(obj, "versions", list)
        if not 1 <= len(versions) <= 8 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1000 for v in versions
        ):
            raise _bad("versions must list 1 to 8 positive integers")
        token = _token(obj, "token", optional=True)
        code = _text(obj, "code", optional=True, limit=16)
        if (token is None) == (code is None):
            raise _bad("hello carries exactly one of token or code")
        return AgentHello(
            versions=tuple(versions),
            agent=_text(obj, "agent"),
            reader=_text(obj, "reader"),
            card=_card_status(obj),
            token=token,
            code=code,
        )
    version = _get(obj, "version", int)
    grace = _get(obj, "grace_ms", int)
    unknown = _get(obj, "unknown_batch", int, optional=True)
    if version < 1 or grace < 0 or (unknown is not None and not 1 <= unknown <= MAX_ID):
        raise _bad("version, grace_ms or unknown_batch out of range")
    return ServerHello(
        version=version,
        session=_token(obj, "session") or "",
        resume_token=_token(obj, "resume_token") or "",
        grace_ms=grace,
        merchant=_text(obj, "merchant", optional=True),
        unknown_batch=unknown,
    )


def _parse_transmit(obj: dict[str, Any]) -> Transmit:
    msg_id = _msg_id(obj)
    items = _get(obj, "apdus", list)
    if not 1 <= len(items) <= MAX_BATCH_APDUS:
        raise MessageError(
            ErrorCode.BATCH_TOO_LONG, f"a batch holds 1 to {MAX_BATCH_APDUS} APDUs", msg_id
        )
    steps = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"apdus[{i}] must be an object", msg_id)
        apdu = _hex(item.get("apdu"), f"apdus[{i}].apdu")
        if not 4 <= len(apdu) <= 261:
            raise _bad(f"apdus[{i}].apdu must be 4 to 261 bytes", msg_id)
        ok_list = item.get("ok", ["9000"])
        if (
            not isinstance(ok_list, list)
            or not 1 <= len(ok_list) <= 16
            or not all(isinstance(sw, str) and _SW.match(sw) for sw in ok_list)
        ):
            raise _bad(f"apdus[{i}].ok must list 1 to 16 status words as 4 hex digits", msg_id)
        steps.append(ApduStep(apdu, frozenset(int(sw, 16) for sw in ok_list)))
    timeout = _get(obj, "timeout_ms", int)
    if not 1 <= timeout <= MAX_TIMEOUT_MS:
        raise _bad(f"timeout_ms must be 1 to {MAX_TIMEOUT_MS}", msg_id)
    return Transmit(msg_id, tuple(steps), timeout)


def _parse_result(obj: dict[str, Any]) -> Result:
    msg_id = _msg_id(obj)
    return Result(msg_id, _responses(obj, "responses"), _get(obj, "complete", bool))


def _parse_card(obj: dict[str, Any]) -> Card:
    try:
        event = CardEvent(_get(obj, "event", str))
    except ValueError:
        raise _bad("card event must be 'inserted' or 'removed'") from None
    atr_text = _get(obj, "atr", str, optional=True)
    atr = (_hex(atr_text, "atr") or None) if atr_text is not None else None
    if atr is not None and len(atr) > 33:
        raise _bad("an ATR is at most 33 bytes")
    return Card(event, atr)


def _parse_error(obj: dict[str, Any]) -> Error:
    msg_id = _get(obj, "id", int, optional=True)
    if msg_id is not None and not 1 <= msg_id <= MAX_ID:
        raise _bad("id out of range")
    return Error(
        code=_text(obj, "code", limit=40),
        message=_text(obj, "message", limit=1000),
        id=msg_id,
        responses=_responses(obj, "responses", optional=True),
    )


def _parse_end(obj: dict[str, Any]) -> End:
    try:
        outcome = Outcome(_get(obj, "outcome", str))
    except ValueError:
        raise _bad(f"outcome must be one of {[o.value for o in Outcome]}") from None
    amount = _get(obj, "amount", int, optional=True)
    if amount is not None and not 0 <= amount <= 0xFFFFFFFF:
        raise _bad("amount out of range")
    return End(outcome, _text(obj, "message", optional=True, limit=1000) or "", amount)


def _parse_resume(obj: dict[str, Any]) -> Resume:
    return Resume(
        resume_token=_token(obj, "resume_token") or "",
        reader=_text(obj, "reader"),
        card=_card_status(obj),
    )


def _parse_ping(obj: dict[str, Any]) -> Ping:
    return Ping(_text(obj, "nonce", optional=True, limit=64) or "")


def _parse_pong(obj: dict[str, Any]) -> Pong:
    return Pong(_text(obj, "nonce", optional=True, limit=64) or "")


_PARSERS: Final = {
    "hello": _parse_hello,
    "resume": _parse_resume,
    "transmit": _parse_transmit,
    "result": _parse_result,
    "card": _parse_card,
    "error": _parse_error,
    "end": _parse_end,
    "ping": _parse_ping,
    "pong": _parse_pong,
}


def parse_message(text: str | bytes) -> Message:
    """Parse one frame. Raises :class:`MessageError` (and nothing else) when it is refused."""
    if isinstance(text, bytes):
        if len(text) > MAX_MESSAGE_BYTES:
            raise MessageError(ErrorCode.TOO_LARGE, f"frame longer than {MAX_MESSAGE_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("frame is not UTF-8") from None
    if len(text) > MAX_MESSAGE_BYTES or len(text.encode("utf-8", "surrogatepass")) > (
        MAX_MESSAGE_BYTES
    ):
        raise MessageError(ErrorCode.TOO_LARGE, f"frame longer than {MAX_MESSAGE_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise _bad("frame is not JSON") from None
    if not isinstance(obj, dict):
        raise _bad("frame must be a JSON object")
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise _bad("unknown or missing message type")
    try:
        return parser(obj)  # type: ignore[no-any-return]
    except MessageError as exc:
        if exc.msg_id is None and isinstance(obj.get("id"), int):
            exc.msg_id = obj["id"] if 1 <= obj["id"] <= MAX_ID else None
        raise


# --- encoding -------------------------------------------------------------------------


def _card_json(card: CardStatus) -> dict[str, Any]:
    return {"present": card.present, "atr": card.atr.hex().upper() if card.atr else None}


def _drop_none(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


def _agent_hello_json(message: AgentHello) -> dict[str, Any]:
    return _drop_none(
        {
            "type": "hello",
            "versions": list(message.versions),
            "agent": message.agent,
            "reader": message.reader,
            "card": _card_json(message.card),
            "token": message.token,
            "code": message.code,
        }
    )


def _server_hello_json(message: ServerHello) -> dict[str, Any]:
    return _drop_none(
        {
            "type": "hello",
            "version": message.version,
            "session": message.session,
            "resume_token": message.resume_token,
            "grace_ms": message.grace_ms,
            "merchant": message.merchant,
            "unknown_batch": message.unknown_batch,
        }
    )


def _resume_json(message: Resume) -> dict[str, Any]:
    return {
        "type": "resume",
        "resume_token": message.resume_token,
        "reader": message.reader,
        "card": _card_json(message.card),
    }


def _transmit_json(message: Transmit) -> dict[str, Any]:
    return {
        "type": "transmit",
        "id": message.id,
        "apdus": [
            {"apdu": s.apdu.hex().upper(), "ok": [f"{sw:04X}" for sw in sorted(s.ok)]}
            for s in message.apdus
        ],
        "timeout_ms": message.timeout_ms,
    }


def _result_json(message: Result) -> dict[str, Any]:
    return {
        "type": "result",
        "id": message.id,
        "responses": [r.hex().upper() for r in message.responses],
        "complete": message.complete,
    }


def _card_event_json(message: Card) -> dict[str, Any]:
    return _drop_none(
        {
            "type": "card",
            "event": message.event.value,
            "atr": message.atr.hex().upper() if message.atr else None,
        }
    )


def _error_json(message: Error) -> dict[str, Any]:
    out = _drop_none(
        {
            "type": "error",
            "code": message.code,
            "message": message.message[:1000],
            "id": message.id,
        }
    )
    if message.responses:
        out["responses"] = [r.hex().upper() for r in message.responses]
    return out


def _end_json(message: End) -> dict[str, Any]:
    return _drop_none(
        {
            "type": "end",
            "outcome": message.outcome.value,
            "message": message.message,
            "amount": message.amount,
        }
    )


def to_json(message: Message) -> dict[str, Any]:
    """The JSON object for a message (see :func:`encode_message`)."""
    match message:
        case AgentHello():
            return _agent_hello_json(message)
        case ServerHello():
            return _server_hello_json(message)
        case Resume():
            return _resume_json(message)
        case Transmit():
            return _transmit_json(message)
        case Result():
            return _result_json(message)
        case Card():
            return _card_event_json(message)
        case Error():
            return _error_json(message)
        case End():
            return _end_json(message)
        case Ping():
            return {"type": "ping", "nonce": message.nonce}
        case Pong():
            return {"type": "pong", "nonce": message.nonce}
    raise TypeError(f"not a message: {message!r}")  # pragma: no cover


def encode_message(message: Message) -> str:
    """One compact JSON text frame; ``parse_message(encode_message(m)) == m``."""
    return json.dumps(to_json(message), separators=(",", ":"), ensure_ascii=False)


def error_for(exc: MessageError) -> Error:
    """The ``error`` message that refuses a frame which raised ``exc``."""
    return Error(code=exc.code.value, message=exc.message, id=exc.msg_id)
