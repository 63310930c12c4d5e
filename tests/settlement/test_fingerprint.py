"""An idempotency key's fingerprint is SHA-256 of json.dumps(sort_keys, compact,
default=str) text, byte for byte, whatever makes it faster (issue 20).

Stored keys were fingerprinted that way: a fingerprint that changed would refuse every
retry of a stored request as a reused key.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.settlement.support import fingerprint_formula
from webpurse.settlement.idempotency import fingerprint


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(alphabet=st.characters(max_codepoint=0x80))
    | st.sampled_from(
        [
            Colour.RED,
            Level.HIGH,
            Name("x"),
            uuid.UUID(int=1),
            dt.date(2026, 1, 2),
            "\x7f",
            "\\u",
            "\ud800",
            "a\udfff",
        ]
    )
)
_payloads = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=600, deadline=None)
@given(_payloads)
def test_a_fingerprint_is_sha256_of_json_dumps(payload: Any) -> None:
    assert fingerprint("POST", "/v1/payments", payload) == fingerprint_formula(
        "POST", "/v1/payments", payload
    )


def test_typical_payloads_fingerprint_as_they_always_did() -> None:
    payloads: list[Any] = [
        {},
        {"amount": 5, "currency": "CNY", "description": "", "metadata": {"b": "1", "a": "2"}},
        {"issuer_data": "00" * 30, "initialize_response": "AB" * 15, "terminal_id": "0A0B0C0D0E0F"},
        {"amount": None, "x": [1, True, False, None, 'q"\\\n\t']},
        {"description": "caf\u00e9 \u4e2d", "control": "\x01\x1f", "del": "\x7f"},
        {"big": 2**64, "neg": -(2**63), "float": 1.0, "huge": 1e16},
        {1: "int key"},
        {"when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)},
    ]
    for payload in payloads:
        assert fingerprint("POST", "/p", payload) == fingerprint_formula("POST", "/p", payload), (
            payload
        )
    # Two pinned from before any change to the fingerprint.
    capture = {"debit_response": "0011223344556677"}
    assert fingerprint("POST", "/v1/payments/pay_1/capture", capture) == (
        "af1b868f7a2177daa764866f4a7d8048c7c0027012d494890fb4d27fc9f91783"
    )
    create = {
        "amount": 120,
        "currency": "CNY",
        "description": "x",
        "merchant_reference": "",
        "metadata": {"b": "1", "a": "2"},
    }
    assert fingerprint("POST", "/v1/payments", create) == (
        "c7df55702ff84c04deab01eca4806b765ea8324c303201c5d2c6c58e55a8eb79"
    )


_plain_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 1)  # orjson takes u64, json too
    | st.text()
    | st.text(alphabet=st.characters(max_codepoint=0x80))
    | st.sampled_from(["\x7f", "\\u", "\ud800", "a\udfff"])
)
_plain_payloads = st.recursive(
    _plain_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=600, deadline=None)
@given(_plain_payloads)
def test_a_payload_known_plain_fingerprints_as_any_other(payload: Any) -> None:
    """``plain=True`` (the batch's validated bodies of JSON-native schemas) skips the walk,
    never the digest: big ints, lone surrogates, DEL and non-ASCII still agree."""
    assert fingerprint("POST", "/v1/payments", payload, plain=True) == fingerprint_formula(
        "POST", "/v1/payments", payload
    )
