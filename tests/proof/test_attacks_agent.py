"""A hostile merchant against the shopper's terminal agent (issue 14, ``docs/agent.md``).

Real components: the merchant's ``ReaderHub`` in a FastAPI app served by uvicorn, the real
``TerminalAgent`` dialling it over a WebSocket and relaying to the card emulator through a
``SimReader``; the merchant's side is driven through the ``RemoteReader`` it gets, exactly
as a merchant's own code would. The shopper is scripted: in the display attack it reads
the terminal prompt as a VT100 terminal shows it (pyte) and says yes only to what it sees.
Rows go to the ``attacks_agent`` proof table.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pyte
import pytest
from rich.console import Console

from tests.card.support import TERMINAL, WHEN, make_card
from tests.proof.conftest import Proof
from tests.reader.remote_support import (
    ConsentRecorder,
    debit_step,
    load,
    merchant_app,
    select_read_initialize,
)
from tests.reader.remote_support import serve as serve_app
from webpurse.agent.consent import Consent, show_text, terminal_consent
from webpurse.agent.guard import Kind
from webpurse.agent.terminal import TerminalAgent
from webpurse.card.applet import CardApplet
from webpurse.protocol import commands as cmd
from webpurse.reader.base import BatchRefused, Step
from webpurse.reader.messages import Outcome
from webpurse.reader.remote import ReaderHub, RemoteReader
from webpurse.reader.sim import ApduEvent, Phase, SimReader

SUITE = "attacks_agent"
COLUMNS = 100
LIE = "Tea House\x1b[2A\x1b[8G¥1.00 (100 fen CNY) …"


@dataclass
class Shop:
    hub: ReaderHub
    url: str
    card: CardApplet
    sim: SimReader
    reached: list[bytes]
    """Every APDU that reached the card (the reader's own record, before the card)."""


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    hub = ReaderHub(grace=5.0, batch_timeout=10.0)
    card = make_card()
    sim = SimReader(card)
    await load(sim, 100_000)  # ¥1,000.00 on the card
    reached: list[bytes] = []

    def record(event: ApduEvent) -> None:
        if event.phase is Phase.BEFORE:
            reached.append(event.apdu)

    sim.add_hook(record)
    async with serve_app(merchant_app(hub)) as url:
        try:
            yield Shop(hub, url, card, sim, reached)
        finally:
            await hub.close()


async def paired(
    shop: Shop, consent: Consent, binding: str, display: str | None = None, **kw: object
) -> tuple[TerminalAgent, RemoteReader]:
    """The shopper's agent, paired with the (hostile) merchant for ``binding``."""
    agent = TerminalAgent(shop.sim, consent=consent, show=kw.get("show", lambda _: None))  # type: ignore[arg-type]
    pairing = shop.hub.issue(binding, display=display)
    await agent.pair(f"{shop.url}/reader", token=pairing.token)
    return agent, await shop.hub.wait_for_reader(binding, 5)


def purse(card: CardApplet) -> tuple[int, int, int, bool]:
    s = card.state
    return s.balance, s.offline_counter, s.mac_failures, s.locked


class Terminal:
    """What the shopper's terminal shows (a VT100 screen), and the shopper typing."""

    def __init__(self, expect: str) -> None:
        self.out = io.StringIO()
        self.console = Console(
            file=self.out, force_terminal=True, color_system="truecolor", width=COLUMNS
        )
        self.expect = expect
        self.seen: list[list[str]] = []

    def screen(self) -> list[str]:
        screen = pyte.Screen(COLUMNS, 60)
        pyte.Stream(screen).feed(self.out.getvalue().replace("\n", "\r\n"))
        return [row.rstrip() for row in screen.display if row.strip()]

    def readline(self) -> str:
        """The shopper answers: yes only if the amount line reads what they expect to pay."""
        rows = self.screen()
        self.seen.append(rows)
        return "y\n" if any(row.startswith(f"│ Pay: {self.expect} ") for row in rows) else "n\n"


async def test_the_merchants_words_cannot_change_the_amount_the_shopper_reads(
    shop: Shop, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "display lie: hello.merchant with ANSI cursor moves + '¥1.00', INITIALIZE for ¥500.00",
        expected="prompt shows 'Pay: ¥500.00', the escapes as text on their own line; "
        "shopper expecting ¥1.00 says no; card unchanged",
    ) as row:
        terminal = Terminal(expect="¥1.00")
        consent = terminal_consent(terminal.console, stream=terminal)  # type: ignore[arg-type]
        agent, reader = await paired(
            shop, consent, "pay_lie", display=LIE, show=show_text(terminal.console)
        )
        before = purse(shop.card)
        try:
            first = await reader.transmit(
                select_read_initialize(cmd.InitializeForPurchase(1, 50_000, TERMINAL))
            )
            assert [r.sw for r in first] == [0x9000] * 3
            with pytest.raises(BatchRefused) as refused:
                await reader.transmit([debit_step(50_000, first[2])])
            await reader.end(Outcome.SUCCEEDED, "Paid\x1b[1A\x1b[2K ¥1.00, thank you")
            await agent.wait_session()
        finally:
            await agent.close()
        (rows,) = terminal.seen
        inside = [r[2:].rstrip(" │") for r in rows if r.startswith("│ ")]
        assert inside[0] == "Pay: ¥500.00 (50000 fen CNY)"
        assert inside[1] == f"Merchant site: {shop.url}"
        assert inside[2] == r"The merchant says: Tea House\x1b[2A\x1b[8G¥1.00 (100 fen CNY) …"
        assert refused.value.code == "consent_refused"
        assert purse(shop.card) == before
        last = terminal.screen()[-1]
        assert last == r"succeeded: Paid\x1b[1A\x1b[2K ¥1.00, thank you"
        row.observed = f"screen: '{inside[0]}'; shopper said no; {refused.value.code}; purse same"


async def test_one_yes_cannot_lock_the_card(shop: Shop, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "card locking: ten INITIALIZE ¥0.01 + DEBIT with MAC 00000000, the shopper says yes",
        expected="one failed DEBIT per 'yes', none after two (too_many_failures); "
        "card MAC failures 2 of 10, not locked; the next honest payment succeeds",
    ) as row:
        shopper = ConsentRecorder(answer=True)  # the worst case: a shopper who always agrees
        agent, reader = await paired(shop, shopper, "pay_lock")
        bad_debit = cmd.DebitForPurchase(1, WHEN[0], WHEN[1], b"\0" * 4).to_apdu().to_bytes()
        answers: list[str] = []
        try:
            for _ in range(10):
                first = await reader.transmit(
                    select_read_initialize(cmd.InitializeForPurchase(1, 1, TERMINAL))
                )
                assert [r.sw for r in first] == [0x9000] * 3
                try:
                    (debit,) = await reader.transmit([Step(bad_debit)])
                    answers.append(f"{debit.sw:04X}")
                except BatchRefused as exc:
                    answers.append(exc.code)
            await reader.end(Outcome.CANCELED, "")
            await agent.wait_session()
        finally:
            await agent.close()
        assert answers == ["9302", "9302"] + ["too_many_failures"] * 8
        assert len(shopper.asked) == 2  # a new "yes" for the second attempt, none after
        balance, _, failures, locked = purse(shop.card)
        assert (failures, locked) == (2, False)
        honest, reader = await paired(shop, ConsentRecorder(answer=True), "pay_after")
        try:
            first = await reader.transmit(
                select_read_initialize(cmd.InitializeForPurchase(1, 100, TERMINAL))
            )
            (debit,) = await reader.transmit([debit_step(100, first[2])])
            await reader.end(Outcome.SUCCEEDED, "")
            await honest.wait_session()
        finally:
            await honest.close()
        assert debit.sw == 0x9000 and purse(shop.card)[0] == balance - 100
        row.observed = (
            f"{', '.join(answers[:3])} ×8; asked {len(shopper.asked)}×; "
            f"card {failures}/10 MAC failures, unlocked; next payment 9000"
        )


async def test_card_data_does_not_leave_without_the_shoppers_consent(
    shop: Shop, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "data grab: SELECT other applications, READ EF16 (name, ID), EF18 (log), other files",
        expected="apdu_not_allowed for other applications/files; EF16/EF18 asked separately, "
        "shopper says no → share_refused; none of it reaches the card",
    ) as row:
        shopper = ConsentRecorder(answer=False)
        agent, reader = await paired(shop, shopper, "pay_grab")
        select_ep = Step(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes())
        attempts = {
            "other application": [Step(bytes.fromhex("00A4040007A0000003330101"))],
            "PSE": [Step(cmd.Select(name=cmd.PSE_NAME).to_apdu().to_bytes())],
            "MF by file id": [Step(cmd.Select(fid=cmd.MF_FID).to_apdu().to_bytes())],
            "EF16": [select_ep, Step(cmd.ReadBinary(cmd.SFI_CARDHOLDER).to_apdu().to_bytes())],
            "EF18": [select_ep, Step(cmd.ReadRecord(cmd.SFI_LOG, 1).to_apdu().to_bytes())],
            "EF16 again": [
                select_ep,
                Step(cmd.ReadBinary(cmd.SFI_CARDHOLDER).to_apdu().to_bytes()),
            ],
            "EF01": [select_ep, Step(cmd.ReadBinary(0x01).to_apdu().to_bytes())],
            "EF17 record": [select_ep, Step(cmd.ReadRecord(0x17, 1).to_apdu().to_bytes())],
        }
        codes: dict[str, str] = {}
        shop.reached.clear()
        try:
            for name, batch in attempts.items():
                with pytest.raises(BatchRefused) as refused:
                    await reader.transmit(batch)
                codes[name] = refused.value.code
                assert [r.sw for r in refused.value.responses] == [0x9000] * (len(batch) - 1)
            await reader.end(Outcome.CANCELED, "")
            await agent.wait_session()
        finally:
            await agent.close()
        assert codes == {
            "other application": "apdu_not_allowed",
            "PSE": "apdu_not_allowed",
            "MF by file id": "apdu_not_allowed",
            "EF16": "share_refused",
            "EF18": "share_refused",
            "EF16 again": "share_refused",
            "EF01": "apdu_not_allowed",
            "EF17 record": "apdu_not_allowed",
        }
        assert [(r.kind, r.files) for r in shopper.asked] == [
            (Kind.SHARE, (cmd.SFI_CARDHOLDER,)),
            (Kind.SHARE, (cmd.SFI_LOG,)),
        ]  # asked once per file; the "no" is remembered for the session
        ep = cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()
        assert shop.reached and set(shop.reached) == {ep}, "only SELECT of the e-purse reached it"
        row.observed = (
            f"{len(attempts)} batches refused ({', '.join(sorted(set(codes.values())))}); "
            f"asked {len(shopper.asked)}× (EF16, EF18); card saw only SELECT EP"
        )
