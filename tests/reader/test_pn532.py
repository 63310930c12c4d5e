"""Pn532Reader end to end: backend → pty (a real serial line) → simulated PN532 → card emulator."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agent.test_cli import WEBPURSE, finish, run_agent
from tests.card.support import make_card, make_state
from tests.reader.remote_support import load, merchant_app, purchase, serve
from tests.reader.support import GET_BALANCE, SELECT_EP, HostTerminal, step
from webpurse.card import CardApplet, ImageFile
from webpurse.card.pn532sim import ApduEvent, Phase, Pn532Chip, PtyServer
from webpurse.card.vpcd import CARD_ATR
from webpurse.protocol import commands as cmd
from webpurse.reader import CardRemoved, NoCard, Reader, ReaderTimeout
from webpurse.reader.factory import ReaderSpecError, open_reader
from webpurse.reader.messages import Outcome
from webpurse.reader.pn532 import Pn532Reader, Pn532Unavailable, parse_port
from webpurse.reader.remote import ReaderHub


@dataclass
class Rig:
    card: CardApplet
    chip: Pn532Chip
    server: PtyServer
    reader: Pn532Reader

    def remove(self) -> None:
        with self.server.lock:
            self.chip.remove()

    def insert(self) -> None:
        with self.server.lock:
            self.chip.insert()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    card = make_card()
    chip = Pn532Chip(card)
    with PtyServer(chip) as server:
        reader = Pn532Reader(server.path, poll_interval=0.01)
        try:
            yield Rig(card, chip, server, reader)
        finally:
            await reader.close()


def leave_at(chip: Pn532Chip, phase: Phase, ins: int) -> None:
    """The card leaves the field at the first APDU with ``ins``, ``phase`` its processing."""

    def hook(event: ApduEvent) -> None:
        if event.phase is phase and event.apdu[1] == ins:
            chip.remove_hook(hook)
            chip.remove()

    chip.add_hook(hook)


def test_pn532_reader_is_a_reader(rig: Rig) -> None:
    assert isinstance(rig.reader, Reader)
    assert rig.reader.firmware == "PN532 v1.6"


async def test_load_then_purchase_over_the_serial_line(rig: Rig) -> None:
    terminal = HostTerminal(rig.reader)
    loaded = await terminal.load(5_000)
    assert loaded.balance_before == 0
    bought = await terminal.purchase(1_234)
    assert bought.balance_before == 5_000
    assert await terminal.balance() == 3_766
    assert (rig.card.state.online_counter, rig.card.state.offline_counter) == (1, 1)
    assert rig.chip.stats.bad_frames == 0 and rig.chip.stats.unknown_commands == []


async def test_presence(rig: Rig) -> None:
    info = await rig.reader.wait_for_card(timeout=5)
    assert info.atr == CARD_ATR  # the same ATR pcscd shows for this card through vpcd
    assert info.reader == f"PN532 {rig.server.path}"
    with pytest.raises(ReaderTimeout):
        await rig.reader.wait_for_removal(timeout=0.05)
    rig.remove()
    await rig.reader.wait_for_removal(timeout=5)
    with pytest.raises(NoCard):
        await rig.reader.transmit([step(SELECT_EP)])
    with pytest.raises(ReaderTimeout):
        await rig.reader.wait_for_card(timeout=0.05)
    waiting = asyncio.create_task(rig.reader.wait_for_card(timeout=5))
    rig.insert()
    assert (await waiting).atr == CARD_ATR
    [selected] = await rig.reader.transmit([step(SELECT_EP)])
    assert selected.sw == 0x9000


@pytest.mark.parametrize(
    ("phase", "changed"), [(Phase.BEFORE, False), (Phase.AFTER, True)], ids=["before", "after"]
)
async def test_card_leaves_during_the_debit(rig: Rig, phase: Phase, changed: bool) -> None:
    terminal = HostTerminal(rig.reader)
    await terminal.load(5_000)
    init = await terminal.purchase_init(1_000)
    leave_at(rig.chip, phase, cmd.INS_DEBIT_FOR_PURCHASE)
    with pytest.raises(CardRemoved) as removed:
        await rig.reader.transmit([step(terminal.debit_apdu(1_000, init[-1]))])
    assert removed.value.responses == []
    # the card committed the debit only if it left after processing it (the torn case)
    assert rig.card.state.balance == (4_000 if changed else 5_000)
    assert rig.card.state.offline_counter == (1 if changed else 0)


async def test_pending_initialize_survives_between_batches(rig: Rig) -> None:
    terminal = HostTerminal(rig.reader)
    await terminal.load(2_000)
    init = await terminal.purchase_init(500)  # one batch
    [debit] = await rig.reader.transmit([step(terminal.debit_apdu(500, init[-1]))])  # the next
    assert debit.sw == 0x9000
    assert rig.card.state.balance == 1_500


class EchoCard:
    """Answers every APDU with its own bytes and 9000: shows chaining both ways."""

    def process(self, apdu: bytes) -> bytes:
        return apdu + b"\x90\x00"

    def reset(self) -> None:
        pass


@pytest.fixture(scope="module")
def echo() -> Iterator[Pn532Reader]:
    chip = Pn532Chip(EchoCard())
    with PtyServer(chip) as server:
        reader = Pn532Reader(server.path)
        yield reader
        asyncio.run(reader.close())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(size=st.integers(4, 700), data=st.data())
def test_long_apdus_chain_both_ways(echo: Pn532Reader, size: int, data: st.DataObject) -> None:
    apdu = b"\x80\xca\x00\x00" + data.draw(st.binary(min_size=size - 4, max_size=size - 4))
    [response] = asyncio.run(echo.transmit([step(apdu)]))
    assert (response.data, response.sw) == (apdu, 0x9000)


def test_nobody_on_the_line() -> None:
    master, slave = os.openpty()
    try:
        with pytest.raises(Pn532Unavailable, match="no PN532 answers"):
            Pn532Reader(os.ttyname(slave))
    finally:
        os.close(master)
        os.close(slave)


def test_not_a_serial_line() -> None:
    with pytest.raises(Pn532Unavailable):
        Pn532Reader("/dev/null")
    with pytest.raises(Pn532Unavailable, match="cannot open"):
        Pn532Reader("/nonexistent/ttyUSB9")


async def test_factory_spec() -> None:
    assert parse_port("/dev/ttyUSB0") == ("/dev/ttyUSB0", 115200)
    assert parse_port("/dev/ttyUSB0:57600") == ("/dev/ttyUSB0", 57600)
    with pytest.raises(ReaderSpecError, match="baud"):
        open_reader("pn532:/dev/ttyUSB0:12345")
    with pytest.raises(ReaderSpecError, match="serial line"):
        open_reader("pn532:")
    with PtyServer(Pn532Chip(make_card())) as server:
        reader = open_reader(f"pn532:{server.path}:115200")
        try:
            assert isinstance(reader, Pn532Reader)
            responses = await reader.transmit([step(SELECT_EP), step(GET_BALANCE)])
            assert [r.sw for r in responses] == [0x9000, 0x9000]
        finally:
            await reader.close()


async def test_the_agent_process_on_a_pn532_line_loads_and_pays(tmp_path: Path) -> None:
    """Two real processes: ``webpurse card serve-pn532`` and ``webpurse agent --reader pn532:``;
    the merchant's hub runs a load and a purchase through the agent, the PN532 and the card."""
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    served = subprocess.Popen(
        [*WEBPURSE, "card", "serve-pn532", str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert served.stdout is not None
        path = served.stdout.readline().strip()
        hub = ReaderHub()
        async with serve(merchant_app(hub)) as base:
            try:
                pairing = hub.issue("pn532_cli")
                process = await run_agent(
                    "--reader",
                    f"pn532:{path}",
                    "--yes",
                    "--code",
                    pairing.display_code,
                    "--server",
                    f"{base}/reader",
                )
                try:
                    remote = await hub.wait_for_reader("pn532_cli", 15)
                    await remote.wait_for_card(5)
                    await load(remote, 3000)
                    await purchase(remote, 1000)
                    await remote.end(Outcome.SUCCEEDED, "paid", 1000)
                finally:
                    out = await finish(process)
            finally:
                await hub.close()
        assert process.returncode == 0, out
        assert "¥30.00" in out and "¥10.00" in out
    finally:
        served.terminate()
        assert served.wait(timeout=10) == 0
    assert ImageFile(image).load().balance == 2000
