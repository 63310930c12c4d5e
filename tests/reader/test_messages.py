"""The remote-reader message model: every message round-trips, and nothing but a typed
``MessageError`` with a stable code ever comes out of ``parse_message``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webpurse.reader.messages import (
    MAX_BATCH_APDUS,
    MAX_MESSAGE_BYTES,
    AgentHello,
    ApduStep,
    Card,
    CardEvent,
    CardStatus,
    End,
    Error,
    ErrorCode,
    Message,
    MessageError,
    Outcome,
    Ping,
    Pong,
    Result,
    Resume,
    ServerHello,
    Transmit,
    encode_message,
    error_for,
    parse_message,
)

TOKEN = "A" * 43

EXAMPLES: list[Message] = [
    AgentHello((1,), "webpurse-agent/0.1.0", "sim", CardStatus(True, b"\x3b\x8f"), token=TOKEN),
    AgentHello((1, 2), "a", "pcsc", CardStatus(False), code="ABCD-EFGH"),
    ServerHello(1, "ses_x", TOKEN, 30000, merchant="Shop 小店", unknown_batch=3),
    ServerHello(1, "ses_x", TOKEN, 0),
    Resume(TOKEN, "sim", CardStatus(True, b"\x3b")),
    Transmit(
        7,
        (ApduStep(bytes.fromhex("00A404000A"), frozenset({0x9000, 0x6A82})),),
        30000,
    ),
    Result(7, (bytes.fromhex("9000"), bytes.fromhex("00000064 9000")), True),
    Card(CardEvent.INSERTED, b"\x3b\x00"),
    Card(CardEvent.REMOVED),
    Error("amount_mismatch", "differs", 7, (bytes.fromhex("6985"),)),
    Error("malformed", "bad"),
    End(Outcome.SUCCEEDED, "paid", 1000),
    End(Outcome.UNCERTAIN),
    Ping("1"),
    Pong("1"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert parse_message(encode_message(message)) == message
    assert parse_message(encode_message(message).encode()) == message


def _refused(obj: Any) -> MessageError:
    with pytest.raises(MessageError) as caught:
        parse_message(obj if isinstance(obj, str) else json.dumps(obj))
    return caught.value


def test_transmit_wire_format_is_plain_json() -> None:
    frame = json.loads(encode_message(EXAMPLES[5]))
    assert frame == {
        "type": "transmit",
        "id": 7,
        "apdus": [{"apdu": "00A404000A", "ok": ["6A82", "9000"]}],
        "timeout_ms": 30000,
    }


def test_ok_defaults_to_9000() -> None:
    message = parse_message(
        '{"type":"transmit","id":1,"apdus":[{"apdu":"805c000204"}],"timeout_ms":1000}'
    )
    assert isinstance(message, Transmit)
    assert message.apdus[0] == ApduStep(bytes.fromhex("805C000204"), frozenset({0x9000}))


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ("", ErrorCode.MALFORMED),
        ("[1,2]", ErrorCode.MALFORMED),
        ('{"type":"teleport"}', ErrorCode.MALFORMED),
        ({"type": "result", "id": True, "responses": [], "complete": True}, ErrorCode.MALFORMED),
        ({"type": "result", "id": 0, "responses": [], "complete": True}, ErrorCode.MALFORMED),
        ({"type": "result", "id": 1, "responses": ["9"], "complete": True}, ErrorCode.MALFORMED),
        ({"type": "result", "id": 1, "responses": ["90"], "complete": True}, ErrorCode.MALFORMED),
        ({"type": "transmit", "id": 1, "apdus": [], "timeout_ms": 5}, ErrorCode.BATCH_TOO_LONG),
        (
            {
                "type": "transmit",
                "id": 1,
                "apdus": [{"apdu": "805C000204"}] * (MAX_BATCH_APDUS + 1),
                "timeout_ms": 5,
            },
            ErrorCode.BATCH_TOO_LONG,
        ),
        (
            {"type": "transmit", "id": 1, "apdus": [{"apdu": "805C"}], "timeout_ms": 5},
            ErrorCode.MALFORMED,
        ),
        (
            {
                "type": "transmit",
                "id": 1,
                "apdus": [{"apdu": "805C0002", "ok": ["90"]}],
                "timeout_ms": 5,
            },
            ErrorCode.MALFORMED,
        ),
        (
            {"type": "transmit", "id": 1, "apdus": [{"apdu": "805C0002"}], "timeout_ms": 0},
            ErrorCode.MALFORMED,
        ),
        (
            {
                "type": "hello",
                "versions": [1],
                "agent": "a",
                "reader": "r",
                "card": {"present": True},
            },
            ErrorCode.MALFORMED,
        ),
        (
            {
                "type": "hello",
                "versions": [1],
                "agent": "a",
                "reader": "r",
                "card": {"present": True},
                "token": "bad token!",
            },
            ErrorCode.MALFORMED,
        ),
        ({"type": "end", "outcome": "maybe"}, ErrorCode.MALFORMED),
        ("x" * (MAX_MESSAGE_BYTES + 1), ErrorCode.TOO_LARGE),
        ("[" * 5000, ErrorCode.MALFORMED),
    ],
)
def test_bad_frames_are_refused_with_a_code(obj: Any, code: ErrorCode) -> None:
    assert _refused(obj).code is code


def test_a_refusal_names_the_batch_when_it_can() -> None:
    error = _refused({"type": "transmit", "id": 5, "apdus": [], "timeout_ms": 5})
    assert error.msg_id == 5
    assert error_for(error) == Error("batch_too_long", error.message, 5)


def test_multibyte_text_counts_in_bytes() -> None:
    frame = json.dumps({"type": "ping", "nonce": "中" * 6000}, ensure_ascii=False)
    assert len(frame) < MAX_MESSAGE_BYTES < len(frame.encode())
    assert _refused(frame).code is ErrorCode.TOO_LARGE


def test_invalid_utf8_bytes_are_malformed() -> None:
    with pytest.raises(MessageError) as caught:
        parse_message(b"\xff\xfe{}")
    assert caught.value.code is ErrorCode.MALFORMED


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
_types = st.sampled_from(
    ["hello", "resume", "transmit", "result", "card", "error", "end", "ping", "pong", "x"]
)
_keys = st.sampled_from(
    [
        "id",
        "apdus",
        "apdu",
        "ok",
        "responses",
        "complete",
        "versions",
        "version",
        "agent",
        "reader",
        "card",
        "present",
        "atr",
        "token",
        "code",
        "session",
        "resume_token",
        "grace_ms",
        "timeout_ms",
        "event",
        "outcome",
        "message",
        "amount",
        "nonce",
    ]
)


@st.composite
def _near_messages(draw: st.DrawFn) -> str:
    obj = draw(st.dictionaries(_keys, _json, max_size=8))
    obj["type"] = draw(_types)
    return json.dumps(obj)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300) | _near_messages() | st.binary(max_size=200))
def test_parse_message_raises_only_message_error(frame: str | bytes) -> None:
    try:
        message = parse_message(frame)
    except MessageError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        # Whatever parses also encodes, and means the same thing again.
        assert parse_message(encode_message(message)) == message


def test_empty_atr_means_none() -> None:
    message = parse_message('{"type":"card","event":"inserted","atr":""}')
    assert message == Card(CardEvent.INSERTED, None)
    assert parse_message(encode_message(message)) == message
