"""RemoteReader end to end: a real uvicorn server mounting the hub, a real WebSocket, the
agent (in-process task) and the card emulator behind a SimReader.

What the merchant relies on: a purchase and a load run through RemoteReader exactly as
through a local reader; a socket dropped mid-batch is an outcome-unknown error, never a
guess or a re-send; the agent's resume brings the reader back for recovery; bad tokens,
bad frames and out-of-order messages are refused without hurting anyone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import connect

from tests.card.support import DPK, TERMINAL, make_card
from tests.reader.remote_support import (
    ConsentRecorder,
    TcpProxy,
    debit_step,
    load,
    merchant_app,
    purchase,
    select_read_initialize,
    serve,
)
from webpurse.agent.guard import Kind
from webpurse.agent.terminal import PairingRefused, TerminalAgent
from webpurse.card.applet import CardApplet
from webpurse.protocol import commands as cmd
from webpurse.protocol import host
from webpurse.reader.base import (
    BatchRefused,
    OutcomeUnknown,
    ReaderDisconnected,
    ReaderTimeout,
    Step,
)
from webpurse.reader.messages import MAX_MESSAGE_BYTES, Error, Outcome
from webpurse.reader.remote import (
    CODE_ALPHABET,
    CODE_ATTEMPTS,
    CODE_GUESS_BUDGET,
    CODE_SITE_ATTEMPTS,
    PAIRING_LIFETIME,
    CodeLimiter,
    MemoryPairingStore,
    PairingError,
    Pairings,
    ReaderHub,
    RemoteReader,
    client_network,
)
from webpurse.reader.sim import ApduEvent, Phase, SimReader


@pytest.fixture
async def hub() -> AsyncIterator[ReaderHub]:
    hub = ReaderHub(grace=5.0, batch_timeout=10.0)
    yield hub
    await hub.close()


@pytest.fixture
async def base(hub: ReaderHub) -> AsyncIterator[str]:
    async with serve(merchant_app(hub)) as url:
        yield url


@pytest.fixture
def card() -> CardApplet:
    return make_card()


@pytest.fixture
def sim(card: CardApplet) -> SimReader:
    return SimReader(card)


@pytest.fixture
async def agent_factory() -> AsyncIterator[list[TerminalAgent]]:
    agents: list[TerminalAgent] = []
    yield agents
    for agent in agents:
        await agent.close()


def make_agent(
    sim: SimReader, agents: list[TerminalAgent], consent: ConsentRecorder, shown: list[str]
) -> TerminalAgent:
    agent = TerminalAgent(sim, consent=consent, show=shown.append)
    agents.append(agent)
    return agent


async def test_purchase_through_remote_reader(
    hub: ReaderHub,
    base: str,
    sim: SimReader,
    card: CardApplet,
    agent_factory: list[TerminalAgent],
) -> None:
    await load(sim, 5000)  # fund the card locally: the same helper runs over any Reader
    consent, shown = ConsentRecorder(), []
    agent = make_agent(sim, agent_factory, consent, shown)
    pairing = hub.issue("pay_1", display="Order 42")

    hello = await agent.pair(f"{base}/reader", token=pairing.token, origin=base)
    remote = await hub.wait_for_reader("pay_1", 5)
    info = await remote.wait_for_card(5)

    assert hello.session == remote.session and hello.merchant == "Order 42"
    assert info.atr and remote.name == f"remote:{sim.name}"
    await purchase(remote, 1000)
    assert card.state.balance == 4000
    assert [(r.kind, r.amount, r.origin, r.merchant) for r in consent.asked] == [
        (Kind.PURCHASE, 1000, base, "Order 42")
    ]
    await remote.end(Outcome.SUCCEEDED, "paid", 1000)
    end = await asyncio.wait_for(agent.wait_session(), 5)
    assert end is not None and end.outcome is Outcome.SUCCEEDED and end.amount == 1000
    assert any("succeeded ¥10.00" in line for line in shown)


async def test_load_through_remote_reader_shows_the_load(
    hub: ReaderHub,
    base: str,
    sim: SimReader,
    card: CardApplet,
    agent_factory: list[TerminalAgent],
) -> None:
    consent = ConsentRecorder()
    agent = make_agent(sim, agent_factory, consent, [])
    pairing = hub.issue("load_1")
    await agent.pair(f"{base}/reader", code=pairing.display_code.lower())
    remote = await hub.wait_for_reader("load_1", 5)

    await load(remote, 2500)

    assert card.state.balance == 2500
    assert [(r.kind, r.amount) for r in consent.asked] == [(Kind.LOAD, 2500)]


async def test_refused_consent_leaves_the_card_untouched(
    hub: ReaderHub,
    base: str,
    sim: SimReader,
    card: CardApplet,
    agent_factory: list[TerminalAgent],
) -> None:
    await load(sim, 5000)
    agent = make_agent(sim, agent_factory, ConsentRecorder(answer=False), [])
    pairing = hub.issue("pay_2")
    await agent.pair(f"{base}/reader", token=pairing.token)
    remote = await hub.wait_for_reader("pay_2", 5)
    first = await remote.transmit(
        select_read_initialize(cmd.InitializeForPurchase(1, 1000, TERMINAL))
    )
    before = card.state

    with pytest.raises(BatchRefused) as refused:
        await remote.transmit([debit_step(1000, first[2])])

    assert refused.value.code == "consent_refused" and refused.value.responses == []
    assert card.state == before


async def test_after_a_failed_debit_another_amount_is_asked_again(
    hub: ReaderHub,
    base: str,
    sim: SimReader,
    card: CardApplet,
    agent_factory: list[TerminalAgent],
) -> None:
    await load(sim, 5000)
    consent = ConsentRecorder()
    agent = make_agent(sim, agent_factory, consent, [])
    pairing = hub.issue("pay_3")
    await agent.pair(f"{base}/reader", token=pairing.token)
    remote = await hub.wait_for_reader("pay_3", 5)
    # The shopper confirms 10.00; that DEBIT fails at the card (MAC1 for the wrong sequence).
    first = await remote.transmit(
        select_read_initialize(cmd.InitializeForPurchase(1, 1000, TERMINAL))
    )
    bad = debit_step(1000, first[2], seq=1)
    bad = Step(bad.apdu[:5] + (2).to_bytes(4, "big") + bad.apdu[9:])
    (answer,) = await remote.transmit([bad])
    assert answer.sw == 0x9302
    # The failed DEBIT spent that consent: INITIALIZE for 20.00 and a DEBIT ask again, with
    # the new amount, and the shopper (who meant 10.00) says no.
    second = await remote.transmit(
        select_read_initialize(cmd.InitializeForPurchase(1, 2000, TERMINAL))
    )
    before = card.state
    consent.answer = False

    with pytest.raises(BatchRefused) as refused:
        await remote.transmit([debit_step(2000, second[2])])

    assert refused.value.code == "consent_refused"
    assert card.state == before and card.state.balance == 5000
    assert [r.amount for r in consent.asked] == [1000, 2000]


async def test_socket_dropped_mid_batch_is_outcome_unknown_and_resume_allows_recovery(
    hub: ReaderHub,
    base: str,
    sim: SimReader,
    card: CardApplet,
    agent_factory: list[TerminalAgent],
) -> None:
    await load(sim, 5000)
    shown: list[str] = []
    agent = make_agent(sim, agent_factory, ConsentRecorder(), shown)
    port = int(base.rsplit(":", 1)[1])
    async with TcpProxy(port) as proxy:
        pairing = hub.issue("pay_4")
        await agent.pair(f"http://127.0.0.1:{proxy.port}/reader", token=pairing.token)
        remote = await hub.wait_for_reader("pay_4", 5)
        first = await remote.transmit(
            select_read_initialize(cmd.InitializeForPurchase(1, 1000, TERMINAL))
        )
        init = cmd.InitializeForPurchaseResponse.from_data(first[2].data)

        def cut_at_debit(event: ApduEvent) -> None:
            if event.phase is Phase.BEFORE and event.apdu[1] == cmd.INS_DEBIT_FOR_PURCHASE:
                proxy.cut()  # the network fails as the DEBIT reaches the card

        sim.add_hook(cut_at_debit)
        with pytest.raises(OutcomeUnknown):
            await remote.transmit([debit_step(1000, first[2])])
        sim.remove_hook(cut_at_debit)

        # The agent resumes through a new connection; the merchant recovers (spec §6).
        await remote.wait_connected(10)
        recovery = await remote.transmit(
            select_read_initialize(cmd.InitializeForPurchase(1, 0, TERMINAL))[::2]
        )
        now = cmd.InitializeForPurchaseResponse.from_data(recovery[1].data)
        assert now.offline_counter == init.offline_counter + 1  # the debit happened
        (prove,) = await remote.transmit(
            [Step(cmd.GetTransactionProve(0x06, now.offline_counter).to_apdu().to_bytes())]
        )
        proof = cmd.TransactionProof.from_data(prove.data)
        assert host.verify_purchase_mac2(
            DPK,
            proof.mac2,
            random=init.random,
            offline_counter=init.offline_counter,
            terminal_seq=1,
            amount=1000,
        )
        assert proxy.connections == 2
    assert card.state.balance == 4000
    assert any("was cut off" in line for line in shown)


async def test_session_not_resumed_within_grace_ends(sim: SimReader) -> None:
    hub = ReaderHub(grace=0.3, batch_timeout=5.0)
    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
    try:
        async with serve(merchant_app(hub)) as base:
            port = int(base.rsplit(":", 1)[1])
            async with TcpProxy(port) as proxy:
                pairing = hub.issue("pay_5")
                await agent.pair(f"http://127.0.0.1:{proxy.port}/reader", token=pairing.token)
                remote = await hub.wait_for_reader("pay_5", 5)
                proxy.target_port = 1  # nothing listens there: every resume attempt fails
                proxy.cut()
                assert await asyncio.wait_for(agent.wait_session(), 10) is None
                with pytest.raises(ReaderDisconnected):
                    await remote.wait_for_card(5)
                with pytest.raises(ReaderDisconnected):
                    await remote.transmit([Step(bytes.fromhex("805C000204"))])
                assert hub.reader_for("pay_5") is None
    finally:
        await agent.close()
        await hub.close()


async def test_reused_expired_and_unknown_tokens_are_refused(
    hub: ReaderHub, base: str, sim: SimReader, agent_factory: list[TerminalAgent]
) -> None:
    pairing = hub.issue("pay_6")
    first = make_agent(sim, agent_factory, ConsentRecorder(), [])
    await first.pair(f"{base}/reader", token=pairing.token)
    second = make_agent(sim, agent_factory, ConsentRecorder(), [])

    with pytest.raises(PairingRefused) as reused:
        await second.pair(f"{base}/reader", token=pairing.token)
    with pytest.raises(PairingRefused) as code_too:
        await second.pair(f"{base}/reader", code=pairing.code)
    with pytest.raises(PairingRefused) as unknown:
        await second.pair(f"{base}/reader", token="x" * 43)

    assert reused.value.code == code_too.value.code == unknown.value.code == "token_invalid"
    assert hub.reader_for("pay_6") is not None  # the first session is unharmed
    await hub.reader_for("pay_6").wait_for_card(5)  # type: ignore[union-attr]


async def test_expired_token_is_refused(sim: SimReader) -> None:
    now = [dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)]
    hub = ReaderHub(Pairings(clock=lambda: now[0]))
    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
    try:
        async with serve(merchant_app(hub)) as base:
            pairing = hub.issue("pay_7")
            now[0] += dt.timedelta(minutes=5)
            with pytest.raises(PairingRefused) as expired:
                await agent.pair(f"{base}/reader", token=pairing.token)
            assert expired.value.code == "token_invalid" and "expired" in expired.value.message
    finally:
        await agent.close()
        await hub.close()


async def _recv_json(ws: object) -> dict[str, object]:
    frame = await asyncio.wait_for(ws.recv(), 5)  # type: ignore[attr-defined]
    return json.loads(frame)  # type: ignore[no-any-return]


async def test_bad_first_messages_are_refused_and_closed(hub: ReaderHub, base: str) -> None:
    url = base.replace("http", "ws") + "/reader"
    for frame, code in [
        ("not json", "malformed"),
        ('{"type":"transmit","id":1,"apdus":[{"apdu":"00A4"}],"timeout_ms":5}', "malformed"),
        ('{"type":"result","id":1,"responses":["9000"],"complete":true}', "unexpected"),
        ('{"type":"ping"}', "unexpected"),
        ("x" * (MAX_MESSAGE_BYTES + 1), "too_large"),
    ]:
        async with connect(url) as ws:
            await ws.send(frame)
            reply = await _recv_json(ws)
            assert reply["type"] == "error" and reply["code"] == code, frame[:40]
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1008


async def test_bad_messages_in_a_session_are_refused_and_the_session_lives_on(
    hub: ReaderHub, base: str
) -> None:
    url = base.replace("http", "ws") + "/reader"
    pairing = hub.issue("pay_8")
    async with connect(url) as ws:
        hello = {
            "type": "hello",
            "versions": [1, 7],
            "agent": "raw-test",
            "reader": "r",
            "card": {"present": True, "atr": "3B00"},
            "token": pairing.token,
        }
        await ws.send(json.dumps(hello))
        welcome = await _recv_json(ws)
        assert welcome["type"] == "hello" and welcome["version"] == 1
        remote = await hub.wait_for_reader("pay_8", 5)

        refused = []
        for frame in [
            "{",
            '{"type":"result","id":99,"responses":["9000"],"complete":true}',
            json.dumps(hello),
            '{"type":"card","event":"exploded"}',
            "y" * (MAX_MESSAGE_BYTES + 10),
        ]:
            await ws.send(frame)
            refused.append((await _recv_json(ws))["code"])
        await ws.send('{"type":"ping","nonce":"n1"}')
        pong = await _recv_json(ws)

        # A batch still works: the raw agent answers it by hand.
        batch = asyncio.create_task(remote.transmit([Step(bytes.fromhex("805C000204"))]))
        transmit = await _recv_json(ws)
        await ws.send(
            json.dumps(
                {
                    "type": "result",
                    "id": transmit["id"],
                    "responses": ["00000064" + "9000"],
                    "complete": True,
                }
            )
        )
        (balance,) = await asyncio.wait_for(batch, 5)

    assert refused == ["malformed", "unknown_id", "unexpected", "malformed", "too_large"]
    assert pong == {"type": "pong", "nonce": "n1"}
    assert transmit["apdus"] == [{"apdu": "805C000204", "ok": ["9000"]}]
    assert balance.data == bytes.fromhex("00000064") and balance.sw == 0x9000


async def test_resume_with_unknown_token_is_refused(hub: ReaderHub, base: str) -> None:
    url = base.replace("http", "ws") + "/reader"
    async with connect(url) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "resume",
                    "resume_token": "z" * 43,
                    "reader": "r",
                    "card": {"present": False},
                }
            )
        )
        reply = await _recv_json(ws)
    assert reply["code"] == "session_expired"


async def test_incoherent_result_is_outcome_unknown(hub: ReaderHub, base: str) -> None:
    url = base.replace("http", "ws") + "/reader"
    pairing = hub.issue("pay_9")
    async with connect(url) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "hello",
                    "versions": [1],
                    "agent": "raw-test",
                    "reader": "r",
                    "card": {"present": True},
                    "token": pairing.token,
                }
            )
        )
        await _recv_json(ws)
        remote = await hub.wait_for_reader("pay_9", 5)
        batch = asyncio.create_task(remote.transmit([Step(bytes.fromhex("805C000204"))]))
        transmit = await _recv_json(ws)
        # Claims completion, but with two responses for a one-step batch.
        await ws.send(
            json.dumps(
                {
                    "type": "result",
                    "id": transmit["id"],
                    "responses": ["9000", "9000"],
                    "complete": True,
                }
            )
        )
        with pytest.raises(OutcomeUnknown):
            await asyncio.wait_for(batch, 5)


def test_pairings_are_single_use_short_lived_and_stored_hashed() -> None:
    now = [dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)]
    store = MemoryPairingStore()
    pairings = Pairings(store, clock=lambda: now[0])
    a, b = pairings.issue("pay_a"), pairings.issue("pay_b")

    assert len(a.token) >= 43 and a.token != b.token  # token_urlsafe(32): 256 bits
    assert len(a.code) == 8 and set(a.code) <= set(CODE_ALPHABET)
    assert a.expires_at == now[0] + dt.timedelta(minutes=5)
    assert a.token not in repr(a) and a.code not in repr(a)
    assert all(a.token.encode() not in r.token_hash for r in store._by_token.values())
    assert pairings.redeem(code=f" {a.code[:4].lower()}-{a.code[4:]} ").binding == "pay_a"
    with pytest.raises(PairingError):
        pairings.redeem(token=a.token)  # the code spent the token too
    now[0] += dt.timedelta(minutes=5)
    with pytest.raises(PairingError, match="expired"):
        pairings.redeem(token=b.token)
    with pytest.raises(PairingError):
        pairings.redeem(token=b.token)
    with pytest.raises(PairingError):
        pairings.redeem()


async def test_the_agent_answers_keep_alives_and_a_silent_peer_is_dropped(
    sim: SimReader, agent_factory: list[TerminalAgent]
) -> None:
    hub = ReaderHub(ping_interval=0.05, grace=5.0)
    try:
        async with serve(merchant_app(hub)) as base:
            agent = make_agent(sim, agent_factory, ConsentRecorder(), [])
            await agent.pair(f"{base}/reader", token=hub.issue("pay_k").token)
            remote = await hub.wait_for_reader("pay_k", 5)
            # Many ping intervals pass (bounded wait for an event that must not happen).
            with pytest.raises(ReaderTimeout):
                await remote.wait_for_removal(0.5)
            assert remote.connected
            await select_over(remote)

            silent = hub.issue("pay_s")
            url = base.replace("http", "ws") + "/reader"
            async with connect(url) as ws:
                await ws.send(
                    json.dumps(
                        {
                            "type": "hello",
                            "versions": [1],
                            "agent": "mute",
                            "reader": "r",
                            "card": {"present": True},
                            "token": silent.token,
                        }
                    )
                )
                await _recv_json(ws)
                mute = await hub.wait_for_reader("pay_s", 5)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5
                while mute.connected:  # bounded polling: 3 silent intervals drop the link
                    assert loop.time() < deadline
                    await asyncio.sleep(0.02)
    finally:
        await hub.close()


async def select_over(remote: RemoteReader) -> None:
    (balance,) = await remote.transmit([Step(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes())])
    assert balance.sw == 0x9000


async def test_wrong_codes_are_bounded_per_client(
    hub: ReaderHub, base: str, sim: SimReader, agent_factory: list[TerminalAgent]
) -> None:
    pairing = hub.issue("pay_c")
    agent = make_agent(sim, agent_factory, ConsentRecorder(), [])
    for _ in range(CODE_ATTEMPTS):
        with pytest.raises(PairingRefused):
            await agent.pair(f"{base}/reader", code="AAAAAAAA")
    with pytest.raises(PairingRefused) as blocked:
        await agent.pair(f"{base}/reader", code=pairing.code)
    assert "too many" in blocked.value.message
    await agent.pair(f"{base}/reader", token=pairing.token)  # the token still works


async def test_a_code_guessed_at_too_often_is_retired_and_the_token_still_pairs(
    hub: ReaderHub, base: str, sim: SimReader, agent_factory: list[TerminalAgent]
) -> None:
    """Per pairing: however many networks guess, a code lives through at most
    CODE_GUESS_BUDGET wrong codes at the hub; then it no longer pairs, the token does."""
    pairing = hub.issue("pay_r")
    hub.code_limiter.wrong_codes += CODE_GUESS_BUDGET + 1  # a distributed flood's count
    agent = make_agent(sim, agent_factory, ConsentRecorder(), [])
    with pytest.raises(PairingRefused) as retired:
        await agent.pair(f"{base}/reader", code=pairing.code)
    assert "retired" in retired.value.message
    await agent.pair(f"{base}/reader", token=pairing.token)
    fresh = hub.issue("pay_r2")  # issued after the flood: its own budget
    other = make_agent(sim, agent_factory, ConsentRecorder(), [])
    await other.pair(f"{base}/reader", code=fresh.code)


def test_a_reader_failure_is_an_unknown_outcome_and_a_refusal_is_not() -> None:
    """``reader_failure``: the failing step may have reached the card (docs/remote-reader.md);
    a guard refusal never did."""
    select_answer = bytes.fromhex("6F009000")
    failed = RemoteReader._batch_error(
        Error("reader_failure", "the reader stopped answering", 4, (select_answer,))
    )
    refused = RemoteReader._batch_error(Error("consent_refused", "the shopper said no", 5, ()))

    assert isinstance(failed, OutcomeUnknown)
    assert [r.to_bytes() for r in failed.responses] == [select_answer]
    assert isinstance(refused, BatchRefused) and not isinstance(refused, OutcomeUnknown)
    assert refused.code == "consent_refused"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_wrong_codes_are_forgotten_once_a_window_has_passed() -> None:
    clock = Clock()
    start = clock.now
    limiter = CodeLimiter(clock=clock)
    for n in range(1000):  # many addresses, each wrong once, and never seen again
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
    clock.now += dt.timedelta(seconds=10)
    for _ in range(CODE_ATTEMPTS):
        limiter.failed("192.0.2.7")
    assert not limiter.allows("192.0.2.7") and len(limiter) == 1001

    clock.now = start + PAIRING_LIFETIME
    assert not limiter.allows("192.0.2.7")  # its failures are still recent
    assert len(limiter) == 1  # the one-off addresses are gone

    clock.now += dt.timedelta(seconds=10)
    assert limiter.allows("192.0.2.7") and len(limiter) == 0


def test_an_ipv6_64_is_one_client_however_many_addresses_it_uses() -> None:
    clock = Clock()
    limiter = CodeLimiter(clock=clock, max_clients=100)
    for n in range(5_000):  # one /64, a fresh address per guess
        host = f"2001:db8:1:2::{n:x}"
        if limiter.allows(host):
            limiter.failed(host)
    assert len(limiter) == 1
    assert not limiter.allows("2001:db8:1:2::ffff")  # the whole /64 is limited
    assert limiter.allows("2001:db8:9:9::1") and limiter.allows("192.0.2.1")  # others are not


def test_a_48_flood_stops_before_it_can_fill_the_table_and_lock_others_out() -> None:
    clock = Clock()
    limiter = CodeLimiter(clock=clock, max_clients=500)
    for n in range(20_000):  # one site's /48: a new /64 for every guess
        host = f"2001:db8:7:{n:x}::1"
        if limiter.allows(host):
            limiter.failed(host)
    assert len(limiter) == CODE_SITE_ATTEMPTS < 500  # stopped at the site's budget
    assert not limiter.allows("2001:db8:7:ffff::2")
    assert limiter.allows("2001:db8:8::1") and limiter.allows("198.51.100.7")


def test_ipv4_mapped_addresses_count_as_the_ipv4_client() -> None:
    assert client_network("::ffff:192.0.2.9") == ("192.0.2.9", "192.0.2.9")
    assert client_network("2001:db8:1:2:3:4:5:6") == ("2001:db8:1:2::/64", "2001:db8:1::/48")


def test_a_full_limiter_does_not_lock_out_networks_it_does_not_hold() -> None:
    clock = Clock()
    limiter = CodeLimiter(clock=clock, max_clients=3)
    for client in ("a", "b", "c"):
        limiter.failed(client)
    limiter.failed("d")  # full: not remembered

    assert len(limiter) == 3
    assert limiter.allows("d")  # the table filling up locks nobody else out
    assert limiter.wrong_codes == 4  # but every wrong code counts against open pairings
    assert limiter.allows("a")  # a remembered client keeps its own count
    for _ in range(CODE_ATTEMPTS):
        limiter.failed("a")
    assert not limiter.allows("a") and len(limiter) == 3

    clock.now += PAIRING_LIFETIME
    assert limiter.allows("a") and len(limiter) == 0
