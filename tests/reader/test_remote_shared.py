"""Reader hubs of two shop processes sharing one real Redis (``WEBPURSE_REDIS_URL``).

Each hub is served by its own uvicorn server with its own Redis connection pool and node
id, as two shop processes would be: a pairing issued by one is redeemed on the other, the
cashier on one drives the agent connected to the other (two round trips of the agent for
a purchase), a token is single use across both, and a code guessed wrong on one counts
on the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest

from tests.card.support import TERMINAL, make_card
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
from tests.redis_support import drop_prefix, redis_url, unique_prefix
from webpurse.agent.terminal import TerminalAgent
from webpurse.protocol import commands as cmd
from webpurse.reader.base import OutcomeUnknown
from webpurse.reader.messages import Outcome
from webpurse.reader.remote import CODE_ATTEMPTS, PairingError, ReaderHub
from webpurse.reader.remote.routed import RoutedReader
from webpurse.reader.remote.shared import SharedState
from webpurse.reader.sim import ApduEvent, Phase, SimReader

pytestmark = pytest.mark.timeout(60)


@dataclass
class Node:
    hub: ReaderHub
    url: str


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Node, Node]]:
    url = redis_url()
    prefix = unique_prefix(request.node.name)
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(2):
            shared = SharedState.from_url(url, prefix=prefix)
            stack.push_async_callback(shared.close)
            hub = ReaderHub(grace=5.0, batch_timeout=10.0, shared=shared)
            stack.push_async_callback(hub.close)
            base = await stack.enter_async_context(serve(merchant_app(hub)))
            made.append(Node(hub, base))
        yield made[0], made[1]
    drop_prefix(url, prefix)


@pytest.fixture
async def agents() -> AsyncIterator[list[TerminalAgent]]:
    made: list[TerminalAgent] = []
    yield made
    for agent in made:
        await agent.close()


async def test_the_cashier_on_one_process_drives_the_agent_on_another(
    nodes: tuple[Node, Node], agents: list[TerminalAgent]
) -> None:
    cashier_node, agent_node = nodes
    card = make_card()
    sim = SimReader(card)
    await load(sim, 5000)
    consent = ConsentRecorder()
    agent = TerminalAgent(sim, consent=consent, show=lambda _: None)
    agents.append(agent)

    pairing = await cashier_node.hub.open_pairing("pay_x", display="Order X")
    hello = await agent.pair(f"{agent_node.url}/reader", token=pairing.token)
    reader = await cashier_node.hub.wait_for_reader("pay_x", 5)
    assert isinstance(reader, RoutedReader) and reader.session == hello.session
    assert hello.merchant == "Order X"
    await reader.wait_for_card(5)

    await purchase(reader, 1000)

    assert card.state.balance == 4000
    local = agent_node.hub.reader_for("pay_x")
    assert local is not None and local._next_id - 1 == 2  # two round trips of the agent
    await cashier_node.hub.finish("pay_x", Outcome.SUCCEEDED, "paid", 1000)
    end = await asyncio.wait_for(agent.wait_session(), 5)
    assert end is not None and end.outcome is Outcome.SUCCEEDED and end.amount == 1000


async def test_a_token_is_single_use_across_processes(
    nodes: tuple[Node, Node], agents: list[TerminalAgent]
) -> None:
    a, b = nodes
    pairing = await a.hub.open_pairing("pay_once")
    first = TerminalAgent(SimReader(make_card()), consent=ConsentRecorder(), show=lambda _: None)
    second = TerminalAgent(SimReader(make_card()), consent=ConsentRecorder(), show=lambda _: None)
    agents.extend([first, second])
    await first.pair(f"{b.url}/reader", token=pairing.token)
    with pytest.raises(Exception, match="unknown or already used"):
        await second.pair(f"{a.url}/reader", token=pairing.token)
    with pytest.raises(Exception, match="unknown or already used"):
        await second.pair(f"{a.url}/reader", code=pairing.code)


async def test_wrong_codes_on_one_process_count_on_the_other(
    nodes: tuple[Node, Node], agents: list[TerminalAgent]
) -> None:
    a, b = nodes
    pairing = await a.hub.open_pairing("pay_guess")
    guesser = TerminalAgent(SimReader(make_card()), consent=ConsentRecorder(), show=lambda _: None)
    agents.append(guesser)
    for _ in range(CODE_ATTEMPTS):
        with pytest.raises(Exception, match="unknown or already used"):
            await guesser.pair(f"{a.url}/reader", code="AAAA-AAAA")
    # The limit is reached on A; B refuses this client's next code, even the right one.
    with pytest.raises(Exception, match="too many wrong codes"):
        await guesser.pair(f"{b.url}/reader", code=pairing.code)
    # The pairing itself is untouched: its link still pairs on either process.
    await guesser.pair(f"{b.url}/reader", token=pairing.token)


async def test_a_redeemed_code_is_gone_for_every_process(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert a.hub._shared_pairings is not None and b.hub._shared_pairings is not None
    pairing = await a.hub.open_pairing("pay_code")
    record = await b.hub._shared_pairings.redeem(code=pairing.display_code.lower())
    assert record.binding == "pay_code"
    with pytest.raises(PairingError):
        await a.hub._shared_pairings.redeem(token=pairing.token)


async def test_an_agent_that_resumes_on_another_process_keeps_its_session(
    nodes: tuple[Node, Node], agents: list[TerminalAgent]
) -> None:
    """The network drops as the DEBIT reaches the card; the agent's resume lands on the
    other process (round-robin), which takes the session over; recovery runs there."""
    a, b = nodes
    card = make_card()
    sim = SimReader(card)
    await load(sim, 5000)
    resumed = asyncio.Event()

    def show(line: str) -> None:
        if line == "resumed":
            resumed.set()

    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=show)
    agents.append(agent)
    port_a = int(a.url.rsplit(":", 1)[1])
    async with TcpProxy(port_a) as proxy:
        pairing = await b.hub.open_pairing("pay_move")
        hello = await agent.pair(f"http://127.0.0.1:{proxy.port}/reader", token=pairing.token)
        remote = await b.hub.wait_for_reader("pay_move", 5)  # the cashier is on B
        assert isinstance(remote, RoutedReader)
        await remote.wait_for_card(5)
        first = await remote.transmit(
            select_read_initialize(cmd.InitializeForPurchase(1, 1000, TERMINAL))
        )
        init = cmd.InitializeForPurchaseResponse.from_data(first[2].data)

        def cut_at_debit(event: ApduEvent) -> None:
            if event.phase is Phase.BEFORE and event.apdu[1] == cmd.INS_DEBIT_FOR_PURCHASE:
                proxy.target_port = int(b.url.rsplit(":", 1)[1])  # the next connection: B
                proxy.cut()

        sim.add_hook(cut_at_debit)
        with pytest.raises(OutcomeUnknown):
            await remote.transmit([debit_step(1000, first[2])])
        sim.remove_hook(cut_at_debit)

        await asyncio.wait_for(resumed.wait(), 10)  # the agent's resume, answered by B
        moved = b.hub.reader_for("pay_move")
        assert moved is not None and moved.session == hello.session
        await moved.wait_connected(10)
        assert a.hub.reader_for("pay_move") is None  # A gave it up
        recovery = await moved.transmit(
            select_read_initialize(cmd.InitializeForPurchase(1, 0, TERMINAL))[::2]
        )
        now = cmd.InitializeForPurchaseResponse.from_data(recovery[1].data)
        assert now.offline_counter == init.offline_counter + 1  # the debit happened, once
        assert card.state.balance == 4000
