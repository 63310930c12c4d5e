"""The settlement client reads answers exactly as ``json.loads`` does, by orjson or not."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
from typing import Any

import pytest

from webpurse.merchant.settlement import Authorisation, Kind, SettlementObject, _loads

ANSWERS: list[bytes] = [
    b'{"responses": [{"status": 200, "body": {"id": "pay_1", "amount": 1234}}]}',
    b'{"amount": 18446744073709551615, "n": -9223372036854775808}',  # orjson's own ints
    b'{"amount": 18446744073709551616}',  # beyond 64 bits: orjson would read a float
    b'{"amount": -9223372036854775809}',
    b"[ -9999999999999999999 ]",
    b"123456789012345678901234567890",
    b'{"a":\n\t 99999999999999999999999}',
    b'{"card_number": "8888000000000000123", "apdu": "00000000000000000000000000A1"}',
    b'{"s": "x,12345678901234567890123", "n": 1}',
    b'{"a": 1, "b": 2, "a": 3}',
    b"[-0, 0, -0.0, 0.1, 1e-400, 1E5, 2.2250738585072011e-308, 1.7976931348623157e308]",
    b'{"x": NaN, "y": Infinity, "z": -Infinity}',
    b'\xef\xbb\xbf{"bom": 1}',
    '{"utf16": 1}'.encode("utf-16"),
    b'{"surrogate": "\\ud800"}',
    b'{"text": "\xc3\xa9 \\u00e9 \\n"}',
    b"[" * 200 + b"]" * 200,
    b"1e400",
]
BROKEN: list[bytes] = [b"", b"{", b"not json", b'{"a": 1}x', b"\xff"]


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack("d", a) == struct.pack("d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


@pytest.mark.parametrize("content", ANSWERS)
def test_answers_read_as_json_loads(content: bytes) -> None:
    assert _same(_loads(content), json.loads(content))


@pytest.mark.parametrize("content", BROKEN)
def test_broken_answers_raise_as_json_loads(content: bytes) -> None:
    with pytest.raises(ValueError) as ours:
        _loads(content)
    with pytest.raises(ValueError) as theirs:
        json.loads(content)
    assert type(ours.value) is type(theirs.value)


def test_nesting_too_deep_raises_as_json_loads() -> None:
    content = b"[" * 5000 + b"]" * 5000
    with pytest.raises(RecursionError):
        json.loads(content)
    with pytest.raises(RecursionError):
        _loads(content)


def test_floats_and_long_integers_read_as_json_loads() -> None:
    draw = random.Random(20)
    numbers = [repr(struct.unpack("d", draw.getrandbits(64).to_bytes(8, "little"))[0])]
    for _ in range(3000):
        x = struct.unpack("d", draw.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            numbers.append(repr(x))
        digits = str(draw.getrandbits(draw.randint(1, 90)))
        numbers += [digits, "-" + digits, f"{digits[:3]}.{digits}e{draw.randint(-330, 300)}"]
    content = ("[" + ",".join(n for n in numbers if "n" not in n) + "]").encode()
    assert _same(_loads(content), json.loads(content))
    for number in numbers[:500]:
        one = ('{"n": ' + number + "}").encode() if "n" not in number else b"{}"
        assert _same(_loads(one), json.loads(one))


def test_settlement_objects_are_what_the_constructor_makes() -> None:
    body = {
        "id": "pay_1",
        "status": "authorised",
        "amount": 1234,
        "terminal_id": "0000000000A1",
        "key_index": 2,
        "card_number": "8888000000000000123",
        "tac": None,
        "authorisation": {"debit_apdu": "8054010000", "date": "20261206", "time": "190000"},
    }
    parsed = SettlementObject.from_json(Kind.PAYMENT, body)
    built = SettlementObject(
        kind=Kind.PAYMENT,
        id="pay_1",
        status="authorised",
        amount=1234,
        terminal_id=bytes.fromhex("0000000000A1"),
        key_index=2,
        card_number="8888000000000000123",
        authorisation=Authorisation(bytes.fromhex("8054010000"), "20261206", "190000"),
        raw=body,
    )
    assert parsed == built and repr(parsed) == repr(built) and hash(parsed) == hash(built)
    for name in (f.name for f in dataclasses.fields(SettlementObject)):  # every slot set
        assert getattr(parsed, name) == getattr(built, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.status = "succeeded"  # type: ignore[misc]
