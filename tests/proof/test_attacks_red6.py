"""Red-team attacks on issue 20 session 6's merged changes (i20-edge, i20-pg, i20-client).

Tried as a hostile terminal against the card emulator's DEBIT fast path (``card.macs``),
as a hostile merchant against the idempotency fingerprint's inline orjson path and the
batch's payment reads (``coalesce(merchant_id, '') = :merchant``), and as the merchant's
own process against its settlement client (orjson request bodies, idempotency keys drawn
256 at a time). Real components: the card applet, the settlement app (ASGI) on SQLite and
PostgreSQL, the merchant's client over ``httpx.MockTransport``. Rows go to the
``attacks_red6`` proof table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import importlib.util
import json
import os
import random as pyrandom
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import httpx
import pytest
from sqlalchemy import func, select

from tests.proof.conftest import Proof
from tests.settlement.support import (
    BACKENDS,
    World,
    database_url,
    deterministic_random,
    fingerprint_formula,
    make_world,
    ok,
)
from webpurse.card import CardApplet, MasterKeys, MemoryStore, personalise
from webpurse.card.macs import CardCiphers
from webpurse.merchant import settlement as merchant_settlement
from webpurse.protocol import host
from webpurse.protocol.commands import EP_AID, DebitForPurchase, InitializeForPurchase, Select
from webpurse.protocol.crypto import diversify
from webpurse.protocol.issuance import personalise_with_card_keys
from webpurse.settlement import clearing, idempotency
from webpurse.settlement.models import Entry, IdempotencyRecord, Payment, PaymentHold

SUITE = "attacks_red6"
ROOT = Path(__file__).resolve().parents[2]


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


# --- 4. the card's DEBIT fast path against a hostile terminal ------------------------------

_MASTER = MasterKeys(dpk=bytes(range(16)), dlk=bytes(range(16, 32)), dtk=bytes(range(32, 48)))
_SERIAL = bytes.fromhex("01020304050607080910")
_TERMINAL = bytes.fromhex("112233445566")


def _old_applet_module() -> ModuleType | None:
    """The applet as it was before session 6 (``git show 22981c1``), or None without git."""
    try:
        source = subprocess.run(
            ["git", "show", "22981c1:src/webpurse/card/applet.py"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("_red6_old_applet", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, "old_applet.py", "exec"), module.__dict__)
    return module


_TODAY, _NOW = dt.date(2026, 12, 6), dt.time(20, 0, 0)


def _hostile_command(rng: pyrandom.Random) -> bytes | tuple[str, int, dt.date]:
    """One command a hostile terminal might send: mostly INITIALIZE FOR PURCHASE and DEBIT
    (right or wrong MAC1, a second one, wrong lengths, P1/P2, CLA, key index, dates), some
    others. ``("debit", seq, date)`` asks for a DEBIT with the right MAC1 if one can be made."""
    choice = rng.randrange(12)
    if choice == 0:
        return Select(name=EP_AID).to_apdu().to_bytes()
    if choice in (1, 2):
        key_index = rng.choice([1, 1, 1, 0, 2, 0xFF])
        amount = rng.choice([0, 1, 7, 100, 5000, 10**6, 0xFFFFFFFF])
        raw = InitializeForPurchase(key_index, amount, _TERMINAL).to_apdu().to_bytes()
        if rng.random() < 0.2:  # odd CLA, P1/P2, Lc or Le
            broken = bytearray(raw)
            where = rng.choice([0, 2, 3, 4, len(raw) - 1])
            broken[where] ^= rng.choice([1, 0x80, 0xFF])
            return bytes(broken)
        return raw
    if choice in (3, 4, 5):
        seq = rng.choice([0, 1, 0xFFFFFFFF])
        date = rng.choice([_TODAY, dt.date(2000, 1, 1), dt.date(2099, 12, 31)])
        return ("debit", seq, date)
    if choice == 6:  # a well-formed DEBIT with a guessed MAC1
        mac1 = bytes(rng.randrange(256) for _ in range(4))
        return DebitForPurchase(rng.randrange(3), _TODAY, _NOW, mac1).to_apdu().to_bytes()
    if choice == 7:
        return bytes.fromhex("805C000204")  # GET BALANCE
    if choice == 8:  # GET TRANSACTION PROVE, purchase, counters 0..2
        return bytes.fromhex("805A000602") + bytes([0, rng.randrange(3)]) + b"\x08"
    if choice in (9, 10):  # DEBIT of odd shapes (length, CLA, P1/P2, Le, bad BCD)
        data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 14, 15, 15, 16, 40])))
        head = bytes([rng.choice([0x80, 0x80, 0x00, 0x84]), 0x54, rng.choice([1, 1, 0, 2]), 0])
        tail = bytes([rng.choice([8, 0, 4])]) if rng.random() < 0.7 else b""
        return head + (bytes([len(data)]) + data if data else b"") + tail
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 9)))


def _right_debit(init: bytes, answer: bytes, dpk: bytes, seq: int, date: dt.date) -> bytes:
    """A DEBIT whose MAC1 is right for the INITIALIZE ``init`` the card answered ``answer``."""
    mac1 = host.purchase_mac1(
        dpk,
        random=answer[11:15],
        offline_counter=int.from_bytes(answer[4:6], "big"),
        terminal_seq=seq,
        amount=int.from_bytes(init[6:10], "big"),
        terminal_id=_TERMINAL,
        date=date,
        time=_NOW,
    )
    return DebitForPurchase(seq, date, _NOW, mac1).to_apdu().to_bytes()


def test_hostile_terminal_gets_the_host_path_s_answers_byte_for_byte(proof: Proof) -> None:
    old = _old_applet_module()
    with proof.row(
        SUITE,
        "hostile terminal against the card's DEBIT fast path (card.macs): 6000 commands of"
        " right and wrong MAC1s, second DEBITs, DEBIT without INITIALIZE, key indexes 0/2/FF,"
        " odd P1/P2/CLA/Lc/Le, bad BCD dates, truncated and garbage APDUs, to 3 cards holding"
        " 5000 (default keys; key index 2, version 7F, algorithm 02; a DPK whose halves are"
        " equal and a DTK whose TAC key is all zeros); the same stream to the card with the"
        " fast path off (protocol.host)"
        " and to the applet as it was before session 6 (git 22981c1)",
        expected="every answer byte-identical (data and status word) and the card's state"
        " equal after every command; refusals leave the balance and counter unchanged",
    ) as row:
        plain = personalise(_MASTER, _SERIAL, start=dt.date(2026, 1, 1))
        halves = bytes(range(8)) * 2  # K1 == K2: single DES; the TAC key's halves cancel
        cards_of = [
            (diversify(_MASTER.dpk, _SERIAL), plain),
            (
                bytes(range(100, 116)),
                personalise_with_card_keys(
                    _SERIAL,
                    dpk=bytes(range(100, 116)),
                    dlk=bytes(16),
                    dtk=bytes(range(200, 216)),
                    start=dt.date(2026, 1, 1),
                    key_index=2,
                    key_version=0x7F,
                    algorithm_id=0x02,
                ),
            ),
            (
                halves,
                personalise_with_card_keys(
                    _SERIAL, dpk=halves, dlk=halves, dtk=halves, start=dt.date(2026, 1, 1)
                ),
            ),
        ]
        compared, paid, refused = 0, 0, 0
        paid_per_card: list[int] = []
        slow_path = staticmethod(lambda *_: False)
        for seed, (dpk, personalised) in enumerate(cards_of):
            start = replace(personalised, balance=5000)
            rng = pyrandom.Random(seed)
            fast = CardApplet(start, MemoryStore(start), deterministic_random(seed))
            slow = CardApplet(start, MemoryStore(start), deterministic_random(seed))
            others: list[Any] = []
            if old is not None:
                others.append(old.CardApplet(start, MemoryStore(start), deterministic_random(seed)))
            init, init_answer = b"", b""
            for step in range(2000):
                if step % 50 == 0 and (fast.state.locked or fast.state.balance < 1000):  # refill
                    cards = [fast, slow, *others]
                    for card in cards:
                        card._state = replace(start, balance=5000)
                command = _hostile_command(rng)
                if init_answer[-2:] == b"\x90\x00" and rng.random() < 0.6:  # DEBIT next
                    seq = rng.choice([0, 1, 0xFFFFFFFF])
                    command = ("debit", seq, _TODAY)
                    if rng.random() < 0.3:  # with a guessed MAC1
                        mac1 = bytes(rng.randrange(256) for _ in range(4))
                        command = DebitForPurchase(seq, _TODAY, _NOW, mac1).to_apdu().to_bytes()
                if isinstance(command, tuple):
                    _, seq, date = command
                    if len(init_answer) == 17 and init_answer[-2:] == b"\x90\x00":
                        command = _right_debit(init, init_answer, dpk, seq, date)
                    else:  # no INITIALIZE answered: a DEBIT with a MAC1 of zeros
                        command = DebitForPurchase(seq, date, _NOW, bytes(4)).to_apdu().to_bytes()
                raw = command
                before = fast.state
                with mock.patch.object(CardCiphers, "fast", slow_path):
                    reference = slow.process(raw)
                    theirs = [card.process(raw) for card in others]
                answer = fast.process(raw)
                assert answer == reference, (raw.hex(), answer.hex(), reference.hex())
                assert all(other == answer for other in theirs), raw.hex()
                assert fast.state == slow.state
                assert all(card.state == fast.state for card in others)
                if raw[:2] == b"\x80\x54":
                    if answer[-2:] == b"\x90\x00":
                        paid += 1
                    else:
                        refused += 1
                        assert fast.state.balance == before.balance
                        assert fast.state.offline_counter == before.offline_counter
                init, init_answer = (raw, answer) if raw[:2] == b"\x80\x50" else (b"", b"")
                compared += 1
            paid_per_card.append(paid - sum(paid_per_card))
        assert min(paid_per_card) >= 3 and refused > 100, (paid_per_card, refused)
        row.observed = (
            f"{compared} commands: answers and states identical on the fast path, the host"
            f" path{' and the pre-session applet' if old is not None else ''}; {paid} DEBITs"
            f" paid {paid_per_card}, {refused} refused with the balance and counter unchanged"
        )


# --- 3. the merchant's settlement client: its bodies and its idempotency keys ----------------


class _Level(enum.IntEnum):
    ONE = 1


class _Text(str):
    pass


class _Flag(int):
    pass


_ODD_BODIES: list[Any] = [
    {"amount": 1, "description": "plain"},
    {"amount": 2**63 - 1, "n": -(2**63), "big": 2**64 - 1, "bigger": 2**64, "neg": -(2**63) - 1},
    {"f": 1.0, "g": 0.1, "h": 1e300, "i": -0.0, "j": 10**20 * 1.0},
    {"e": _Level.ONE, "s": _Text("x"), "b": True, "n": None, "i": _Flag(3)},
    {1: "int key", "x": {True: 1, None: 2}},
    {"nested": [{"a": [1, [2, {"b": "é"}]]}], "z": {"y": {"x": "\u2028\u2029\x7f"}}},
    {"ctl": "".join(chr(c) for c in range(32)), "nul": "\x00", "quote": '"\\/'},
    {"astral": "😀𝄞", "cjk": "键", "combining": "e\u0301", "bom": "\ufeff"},
    {"t": (1, 2), "keys_out_of_order": {"b": 1, "a": 2}},
]


def _sent(payload: Any, *, by_json: bool) -> tuple[str, list[tuple[str, str]], bytes] | str:
    """What the merchant's client puts on the wire for a POST of ``payload``: its method and
    URL, its headers in order and its body; or the error it raises instead."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    async def send() -> None:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://settle") as http:
            client = merchant_settlement.SettlementClient(http, "sk_test")
            headers = {"Authorization": "Bearer sk_test", "Idempotency-Key": "mer-fixed"}
            await client._send("POST", "/v1/payments", payload, headers)

    import asyncio

    try:
        if by_json:
            with mock.patch.object(merchant_settlement, "_encoded", lambda _: None):
                asyncio.run(send())
        else:
            asyncio.run(send())
    except Exception as exc:
        return type(exc).__name__
    (request,) = seen
    return f"{request.method} {request.url}", list(request.headers.multi_items()), request.content


def test_merchant_bodies_are_what_httpx_json_sends(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "the merchant's own process sends odd bodies through its settlement client (orjson"
        " where _plain): 64-bit edges and beyond, floats (-0.0, 1e300, 0.1), IntEnum, str and"
        " int subclasses, non-str keys, tuples, control characters, U+2028, DEL, NUL,"
        " astral and combining text, a lone surrogate",
        expected="the request on the wire (method, URL, headers in order, body bytes) is"
        " byte-identical to httpx's json= for every body; a lone surrogate fails the same"
        " way on both, sending nothing",
    ) as row:
        bodies = [*_ODD_BODIES, {"lone": "\ud800"}, {"\udfff": 1}]
        differ = [
            body for body in bodies if _sent(body, by_json=False) != _sent(body, by_json=True)
        ]
        assert differ == []
        assert isinstance(_sent({"lone": "\ud800"}, by_json=False), str)  # refused, not sent
        fast = sum(merchant_settlement._encoded(body) is not None for body in bodies)
        row.observed = (
            f"{len(bodies)} bodies ({fast} by orjson): wire bytes and headers identical to"
            " json=; lone surrogates raise before sending on both"
        )


def test_merchant_idempotency_keys_never_repeat(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "two idempotency keys alike from the merchant's client (keys drawn 256 at a time):"
        " 8 threads on one client with a 1 µs switch interval, two clients in one process,"
        " a forked child drawing from the parent's half-used pool (twice, nested fork);"
        " keys looked for in reprs and the retry's log line",
        expected="every key distinct (mer- and 32 hex digits); the child redraws after"
        " fork; no key or pool text in repr(client), repr(pool) or logs",
    ) as row:
        keys = merchant_settlement._IdempotencyKeys()
        drawn: list[str] = []
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:

            def draw() -> None:
                mine = [keys() for _ in range(20_000)]
                drawn.extend(mine)

            threads = [threading.Thread(target=draw) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        other = merchant_settlement._IdempotencyKeys()
        drawn += [other() for _ in range(1000)]
        assert len(set(drawn)) == len(drawn) == 161_000
        assert all(k.startswith("mer-") and len(k) == 36 and int(k[4:], 16) >= 0 for k in drawn)

        parent_pool = merchant_settlement._IdempotencyKeys()
        parent_pool()  # a pool drawn, 255 keys left in it
        child_keys: set[str] = set()
        for nested in (False, True):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: its keys to the pipe, nothing else
                try:
                    if nested:  # a grandchild, forked from a child that drew its own pool
                        parent_pool()
                        inner = os.fork()
                        if inner != 0:
                            os.waitpid(inner, 0)
                            os._exit(0)
                    os.write(write, "\n".join(parent_pool() for _ in range(300)).encode())
                finally:
                    os._exit(0)
            os.close(write)
            chunks = []
            while chunk := os.read(read, 65536):
                chunks.append(chunk)
            os.close(read)
            os.waitpid(pid, 0)
            child_keys |= set(b"".join(chunks).decode().split("\n"))
        parents = {parent_pool() for _ in range(300)}
        assert len(child_keys) == 600 and not child_keys & parents

        client = merchant_settlement.SettlementClient(
            httpx.AsyncClient(base_url="http://settle"), "sk_test"
        )
        key = client._new_key()
        ahead = [drawn[4:] for drawn in client._new_key._keys]
        assert len(ahead) == 255
        for text in (repr(client), repr(keys), str(keys), repr(client.__dict__.get("_client"))):
            assert key[4:] not in text and not any(drawn in text for drawn in ahead)
        row.observed = (
            "161000 keys from threads and two clients all distinct; 600 keys of forked"
            " children (one nested) share none with the parent's pool; no key in reprs"
        )


# --- 1. the idempotency fingerprint's inline orjson path -----------------------------------


def test_fingerprint_fast_path_is_the_stored_formula(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "idempotency.fingerprint's inline orjson path against the stored formula: every"
        " Unicode scalar value (and DEL, NUL, controls) as a key and as a value, nested;"
        " 64-bit integer edges and beyond; floats, bools, None, str/int subclasses, IntEnum;"
        " 20000 random bodies of mixed keys (ASCII, CJK, astral) in any order",
        expected="the digest equals sha256 of json.dumps(sort_keys, compact, ASCII) for"
        " every payload, so no two different bodies share a digest the formula keeps"
        " apart and no key reuse goes undetected",
    ) as row:
        checked = 0
        for point in [*range(0xD800), *range(0xE000, 0x110000, 7)]:
            char = chr(point)
            for payload in ({"k" + char: char}, {"a": [char, {char: 1}], char + "b": None}):
                assert idempotency.fingerprint("POST", "/p", payload) == fingerprint_formula(
                    "POST", "/p", payload
                )
                checked += 1
        for lone in ("\ud800", "\udfff", "a\udc00b"):
            for payload in ({"d": lone}, {lone: 1}, {"x": [{"y": lone}]}):
                assert idempotency.fingerprint("POST", "/p", payload) == fingerprint_formula(
                    "POST", "/p", payload
                )
                checked += 1
        edges: list[Any] = [
            2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, 10**400, 0, -1,
            1.5, -0.0, 1e300, True, False, None, _Level.ONE, _Text("t"), _Flag(2), [], {},
        ]  # fmt: skip
        for value in edges:
            payload = {"v": value, "w": [value, {"z": value}]}
            assert idempotency.fingerprint("POST", "/p", payload) == fingerprint_formula(
                "POST", "/p", payload
            )
            checked += 1
        rng = pyrandom.Random(20)
        alphabet = [*map(chr, range(32, 127)), "\x00", "\x7f", "é", "键", "😀", "\u2028"]
        for _ in range(20_000):
            body = {
                "".join(rng.choice(alphabet) for _ in range(rng.randrange(4))): rng.choice(
                    [1, "a", None, True, 2**63 - 1, "键", [1, {"b": "\x7f", "a": 2}]]
                )
                for _ in range(rng.randrange(6))
            }
            assert idempotency.fingerprint("POST", "/p", body) == fingerprint_formula(
                "POST", "/p", body
            )
            checked += 1
        row.observed = f"{checked} payloads: every digest the stored formula's"


_HOSTILE: list[Any] = [
    "\ud800", "a\udfffb", "a\x00b", 2**64, -(2**70), 10**40, 1.5, 1e308, True, None, [],
    {"x": {"\ud800": 1}}, {"\x00": "\x00"}, "x" * 20_000, "é\u2028\x7f",
]  # fmt: skip


def _raw(body: Any) -> bytes:
    """JSON as a hostile client writes it: a lone surrogate as its \\u escape."""
    return json.dumps(body, ensure_ascii=True).encode()


def _counts(world: World) -> tuple[int, ...]:
    with world.factory() as session:
        return tuple(
            int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Payment, Entry, PaymentHold, IdempotencyRecord)
        )


def _nothing_moved(world: World, before: tuple[int, ...], code: Any, what: Any) -> None:
    """After a refusal: no payment, entry or hold more; no idempotency row either where the
    schema refused the request (docs/settlement-api.md "Idempotency": other refusals are
    stored under their key and replayed)."""
    after = _counts(world)
    if code == "validation_error":
        assert after == before, what
    else:
        assert after[:3] == before[:3] and after[3] in (before[3], before[3] + 1), what


def _ledger_problems(world: World) -> list[str]:
    with world.factory() as session:
        return list(clearing.ledger_check(session).problems)


def test_hostile_text_and_numbers_in_every_field_single_and_batch(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant puts lone surrogates, NUL, DEL, U+2028, 20000-character text,"
        f" huge and 64-bit-overflowing ints, floats, bools, nested objects with odd keys"
        f" into every field of every merchant POST route (payments and their actions,"
        f" loads, refunds, heal, card checks, holds) and of /v1/batch items, whose"
        f" idempotency keys are also a lone surrogate, NUL, 300 characters or a number"
        f" ({backend(world)})",
        expected="never a 5xx (single or any batch item); every refusal a 4xx problem that"
        " stores nothing (payments, entries, holds, idempotency rows unchanged); ledger"
        " check clean",
    ) as row:
        card = world.funded_card(1000)
        terminal = world.terminal
        pid = terminal.create_payment(10)["id"]
        issuer, init = terminal.purchase_batch1(card, 10)
        bases: dict[str, dict[str, Any]] = {
            "/v1/payments": {"amount": 5, "description": "d", "metadata": {"k": "v"}},
            f"/v1/payments/{pid}/authorise": {
                "issuer_data": issuer.hex(),
                "initialize_response": init.hex(),
                "terminal_id": world.terminal_id,
                "amount": 10,
            },
            f"/v1/payments/{pid}/capture": {"debit_response": "00" * 8},
            f"/v1/payments/{pid}/cancel": {"issuer_data": issuer.hex(), "card_status_word": "9303"},
            f"/v1/payments/{pid}/resolve": {"initialize_response": init.hex()},
            f"/v1/payments/{pid}/uncertain": {},
            "/v1/loads": {"amount": 5, "funding": {"method": "merchant_float"}},
            "/v1/refunds": {"payment": pid, "amount": 1},
            "/v1/heal": {"issuer_data": issuer.hex(), "transaction_type": "06", "prove": "00"},
            "/v1/card_checks/chk_1": {"initialize_response": "00" * 16},
            f"/v1/holds/{pid}/release": {"reason": "because"},
        }
        headers = {**world.auth(world.merchant_key), "content-type": "application/json"}
        statuses: dict[int, int] = {}
        sent, refused_quietly = 0, 0
        for path, base in bases.items():
            names = [*base, "extra"]
            for name in names:
                for value in _HOSTILE:
                    body = {**base, name: value}
                    before = _counts(world)
                    answer = world.client.post(
                        path,
                        content=_raw(body),
                        headers={**headers, "idempotency-key": f"h{sent}"},
                    )
                    sent += 1
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    assert answer.status_code < 500, (path, name, answer.text[:300])
                    if answer.status_code >= 400:
                        assert answer.headers["content-type"].startswith("application/problem")
                        _nothing_moved(world, before, answer.json().get("code"), (path, name))
                        refused_quietly += 1
                    if not path.startswith("/v1/payments"):
                        continue
                    for key in (f"b{sent}", "\ud800", "a\x00", "x" * 300, 5):
                        items = [{"path": path, "idempotency_key": key, "body": body}]
                        before = _counts(world)
                        answer = world.client.post(
                            "/v1/batch", content=_raw({"requests": items}), headers=headers
                        )
                        sent += 1
                        assert answer.status_code < 500, answer.text[:300]
                        inner = answer.json().get("responses", []) if answer.is_success else []
                        assert all(item["status"] < 500 for item in inner), inner
                        if answer.status_code >= 400:
                            _nothing_moved(world, before, "validation_error", (path, name, key))
                            refused_quietly += 1
                        elif all(item["status"] >= 400 for item in inner):
                            code = inner[0]["body"].get("code")
                            _nothing_moved(world, before, code, (path, name, key))
                            refused_quietly += 1
        for odd in ("/v1/payments/\ud800/capture", "/v1/payments/pay_\x00/cancel", 5, None):
            items = [{"path": odd, "idempotency_key": "p", "body": {}}]
            answer = world.client.post(
                "/v1/batch", content=_raw({"requests": items}), headers=headers
            )
            assert answer.status_code < 500
        assert _ledger_problems(world) == []
        row.observed = (
            f"{sent} requests: statuses {dict(sorted(statuses.items()))} on the single"
            f" routes, no 5xx anywhere; {refused_quietly} refusals moved nothing; ledger"
            " check clean"
        )


def test_a_key_reuse_is_caught_across_the_fast_and_the_slow_fingerprint(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant reuses one key for bodies that take different fingerprint paths"
        f" (ASCII on orjson's; non-ASCII, DEL or a lone surrogate on json.dumps'), on the"
        f" single route and in batches, and sends the same body again written differently"
        f" (\\u escapes, keys reordered) ({backend(world)})",
        expected="a different body is 422 idempotency_key_reused on both paths, never a"
        " replay of the other body's answer; the same body written differently replays",
    ) as row:
        headers = {**world.auth(world.merchant_key), "content-type": "application/json"}
        first = world.client.post(
            "/v1/payments",
            content=b'{"amount": 7, "description": "caf\\u00e9"}',
            headers={**headers, "idempotency-key": "reuse"},
        )
        assert first.status_code == 201, first.text
        others = [
            {"amount": 7, "description": "cafe"},
            {"amount": 7, "description": "caf\x7f"},
            {"amount": 7, "description": "caf\ud800"},
            {"amount": 7, "description": "café", "metadata": {"k": "é"}},
            {"amount": 8, "description": "café"},
        ]
        codes = []
        for body in others:
            single = world.client.post(
                "/v1/payments", content=_raw(body), headers={**headers, "idempotency-key": "reuse"}
            )
            codes.append((single.status_code, single.json().get("code")))
            item = {"path": "/v1/payments", "idempotency_key": "reuse", "body": body}
            batched = world.client.post(
                "/v1/batch", content=_raw({"requests": [item]}), headers=headers
            )
            (answer,) = batched.json()["responses"]
            codes.append((answer["status"], answer["body"].get("code")))
        surrogate = {(422, "idempotency_key_reused"), (422, "validation_error")}
        assert set(codes[:4] + codes[6:]) == {(422, "idempotency_key_reused")}, codes
        assert set(codes[4:6]) <= surrogate, codes  # the lone surrogate: refused either way
        again = world.client.post(
            "/v1/payments",
            content='{"description": "café", "amount": 7}'.encode(),
            headers={**headers, "idempotency-key": "reuse"},
        )
        assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true"
        assert again.json() == first.json()
        item = {
            "path": "/v1/payments",
            "idempotency_key": "reuse",
            "body": {"amount": 7, "description": "café"},
        }
        (batched,) = world.client.post(
            "/v1/batch", content=_raw({"requests": [item]}), headers=headers
        ).json()["responses"]
        assert batched["replayed"] and batched["body"] == first.json()
        with world.factory() as session:
            assert session.scalar(select(func.count()).select_from(Payment)) == 1
        row.observed = (
            f"{len(codes)} different bodies refused {sorted(set(codes))}; the same body"
            " replayed on both paths; 1 payment"
        )


# --- 2. the batch's payment reads by coalesce(merchant_id, '') ------------------------------


def _payment_rows(world: World) -> list[tuple[Any, ...]]:
    with world.factory() as session:
        return [
            tuple(row)
            for row in session.execute(
                select(Payment.id, Payment.merchant_id, Payment.status, Payment.card_id).order_by(
                    Payment.id
                )
            ).all()
        ]


def test_another_merchant_s_payments_in_a_batch_are_not_found(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"merchant B's batch names merchant A's payments (open, authorised, with the card's"
        f" right data) to authorise, capture, cancel, mark uncertain and resolve, mixed with"
        f" B's own payments in one batch, plus A's load and refund ids, an empty id and"
        f" pay_ with nothing after it; the operator's key (no merchant) naming A's payments"
        f" ({backend(world)})",
        expected="each foreign item gets what B's single route answers for it (404"
        " not_found / the same problem), B's own items succeed beside them; A's payments,"
        " the ledger and the holds unchanged; ledger check clean",
    ) as row:
        a, b = world.terminal, world.other_terminal
        card = world.funded_card(1000)
        open_a = a.create_payment(10)["id"]
        issuer, init = a.purchase_batch1(card, 10)
        authorised_a = a.create_payment(10)["id"]
        answer = a.authorise_payment(authorised_a, issuer, init)
        assert answer.status_code == 200, answer.text
        debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
        card2 = world.funded_card(1000)
        issuer2, init2 = a.purchase_batch1(card2, 10)
        load_a = a.load(world.funded_card(0), 5)["id"]
        own_b = b.create_payment(3)["id"]
        foreign: list[tuple[str, dict[str, Any]]] = [
            (
                f"/v1/payments/{open_a}/authorise",
                {
                    "issuer_data": issuer2.hex(),
                    "initialize_response": init2.hex(),
                    "terminal_id": world.other_terminal_id,
                },
            ),
            (f"/v1/payments/{authorised_a}/capture", {"debit_response": debit.hex()}),
            (f"/v1/payments/{authorised_a}/cancel", {}),
            (f"/v1/payments/{open_a}/cancel", {}),
            (f"/v1/payments/{authorised_a}/uncertain", {}),
            (f"/v1/payments/{authorised_a}/resolve", {"initialize_response": init2.hex()}),
            (f"/v1/payments/{load_a}/cancel", {}),
            ("/v1/payments/pay_/cancel", {}),
            ("/v1/payments//cancel", {}),
        ]
        before_rows = _payment_rows(world)
        singles = []
        for n, (path, body) in enumerate(foreign):
            single = b.post(path, body, idempotency_key=f"single-{n}")
            singles.append((single.status_code, single.json().get("code")))
        assert all(status in (400, 404, 422) for status, _ in singles), singles
        assert _payment_rows(world) == before_rows
        items: list[dict[str, Any]] = []
        for n, (path, body) in enumerate(foreign):
            items.append({"path": path, "idempotency_key": f"batch-{n}", "body": body})
            items.append(  # one of B's own beside each foreign item
                {"path": "/v1/payments", "idempotency_key": f"own-{n}", "body": {"amount": 1}}
            )
        items.append(
            {"path": f"/v1/payments/{own_b}/cancel", "idempotency_key": "own-c", "body": {}}
        )
        answer = world.client.post(
            "/v1/batch", json={"requests": items}, headers=world.auth(world.other_key)
        )
        assert answer.status_code == 200, answer.text
        responses = answer.json()["responses"]
        batched = [
            (r["status"], r["body"].get("code"))
            for r, i in zip(responses, items, strict=True)
            if i["idempotency_key"].startswith("batch-")
        ]
        # "/v1/payments//cancel" is no payment path: the router's 404 alone, the batch's
        # batch_path_not_supported; every other item as the single route answers it
        assert batched[-1] == (404, "batch_path_not_supported") and singles[-1][0] == 404
        batched, kept = batched[:-1], singles[:-1]
        assert batched == kept, (batched, kept)
        own = [
            r
            for r, i in zip(responses, items, strict=True)
            if i["idempotency_key"].startswith("own")
        ]
        assert all(r["status"] in (200, 201) for r in own), own
        after = {row[0]: row for row in _payment_rows(world)}
        assert all(after[row[0]] == row for row in before_rows if row[1] == world.merchant_id)
        assert (
            after[own_b][2] != dict((r[0], r) for r in before_rows)[own_b][2]
        )  # B's own cancel ran
        # the operator's key (no merchant: merchant_id NULL, never '') names A's payments
        operator_items = [i for i in items if i["idempotency_key"].startswith("batch-")]
        by_operator = world.client.post(
            "/v1/batch",
            json={
                "requests": [
                    {**i, "idempotency_key": "op-" + i["idempotency_key"]} for i in operator_items
                ]
            },
            headers=world.auth(world.operator_key),
        )
        assert by_operator.status_code == 403 or all(
            r["status"] in (403, 404) for r in by_operator.json()["responses"]
        ), by_operator.text
        assert all(
            after[row[0]] == row for row in _payment_rows(world) if row[1] == world.merchant_id
        )
        assert _ledger_problems(world) == []
        row.observed = (
            f"operator's batch: {by_operator.status_code}; {len(batched)} foreign items"
            " answered as B's single routes do:"
            f" {sorted(set(batched))}; {len(own)} own items beside them succeeded; A's"
            " payments unchanged; ledger check clean"
        )


def test_a_copied_or_pickled_key_pool_does_not_repeat_or_carry_keys(proof: Proof) -> None:
    import copy
    import pickle

    with proof.row(
        SUITE,
        "the merchant's idempotency key pool (256 keys drawn ahead) copied (copy.copy,"
        " copy.deepcopy, as a containing object would be) or pickled (a cache, a"
        " multiprocessing spawn, a crash dump) and then used beside the original",
        expected="the copy hands out keys of its own, never the original's next ones, and"
        " the pickle holds none of the keys drawn ahead",
    ) as row:
        pool = merchant_settlement._IdempotencyKeys()
        pool()  # drawn: 255 keys ahead in memory
        ahead = [key[4:] for key in pool._keys]
        pickled = pickle.dumps(pool)
        assert len(ahead) == 255
        assert ahead[0].encode() not in pickled and ahead[-1].encode() not in pickled
        copies = [copy.copy(pool), copy.deepcopy(pool), pickle.loads(pickled)]
        theirs = {key for other in copies for key in (other() for _ in range(300))}
        ours = {pool() for _ in range(300)}
        assert len(theirs) == 900 and not theirs & ours
        row.observed = (
            f"3 copies drew 900 keys of their own, none of the original's; the pickle"
            f" ({len(pickled)} bytes) holds no key drawn ahead"
        )


def test_a_retried_call_resends_its_bytes_and_key_and_logs_neither(
    proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import structlog

    monkeypatch.setattr(merchant_settlement, "RETRY_PAUSES", (0, 0, 0))
    with proof.row(
        SUITE,
        "the merchant's connection breaks twice under a payment's creation whose"
        " description is odd text (a lone surrogate cannot be sent; U+2028, DEL, astral"
        " and a 64-bit reference are): the client retries through its orjson body",
        expected="every attempt carries the same body bytes and the same Idempotency-Key"
        " (mer- and 32 hex digits); the retry's log lines name neither key nor API key",
    ) as row:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if len(seen) < 3:
                raise httpx.ConnectError("reset", request=request)
            return httpx.Response(
                201,
                json={"id": "pay_1", "object": "payment", "status": "requires_card", "amount": 5},
            )

        async def create() -> None:
            transport = httpx.MockTransport(handler)
            async with httpx.AsyncClient(transport=transport, base_url="http://settle") as http:
                client = merchant_settlement.SettlementClient(http, "sk_secret_key")
                await client.create(
                    merchant_settlement.Kind.PAYMENT,
                    5,
                    description="odd \u2028\x7f😀",
                    reference=str(2**63),
                )

        # the fake answer may not be a full payment: only the wire matters
        with (
            structlog.testing.capture_logs() as logs,
            contextlib.suppress(merchant_settlement.SettlementError, KeyError, ValueError),
        ):
            asyncio.run(create())
        assert len(seen) == 3
        keys = {request.headers["idempotency-key"] for request in seen}
        bodies = {request.content for request in seen}
        assert len(keys) == 1 and len(bodies) == 1
        (key,) = keys
        assert key.startswith("mer-") and len(key) == 36
        assert json.loads(next(iter(bodies)))["description"] == "odd \u2028\x7f😀"
        text = repr(logs)
        assert key[4:] not in text and "sk_secret_key" not in text
        assert sum(log.get("event") == "settlement.retry" for log in logs) == 2
        row.observed = "3 attempts, 1 body, 1 key; 2 retry log lines without key or API key"
