"""PcscReader against a real pcscd: pyscard → pcscd → vpcd → ``webpurse card serve`` → card.

Needs pyscard and pcscd with the vsmartcard vpcd driver (``scripts/services.sh``); skips
without them, fails under ``CI=true``. Waits for pcscd's ~400 ms polling through
SCardGetStatusChange (``wait_for_card``/``wait_for_removal``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.card.support import SERIAL, make_state
from tests.reader.support import GET_BALANCE, SELECT_EP, HostTerminal, step
from tests.reader.vpcd_support import ServedCard, require_pcsc, unavailable, vpcd_slot
from webpurse.card import ImageFile
from webpurse.card.vpcd import CARD_ATR
from webpurse.reader import (
    CardRemoved,
    NoCard,
    PcscReader,
    Reader,
    ReaderNotFound,
    ReaderTimeout,
    open_reader,
)
from webpurse.reader.pcsc import match_reader

pytestmark = pytest.mark.pcsc

EVENT_TIMEOUT = 15.0  # generous bound for pcscd's polling on a loaded machine


@dataclass
class Rig:
    reader: PcscReader
    served: ServedCard
    image: Path
    name: str


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    require_pcsc()
    with vpcd_slot() as (port, name):
        image = tmp_path / "card.json"
        ImageFile(image).create(make_state())
        reader = PcscReader(name)
        served = ServedCard(image, port, tmp_path / "serve.log")
        try:
            await reader.wait_for_removal(timeout=EVENT_TIMEOUT)  # the slot starts empty
            served.start()
            await reader.wait_for_card(timeout=EVENT_TIMEOUT)
            yield Rig(reader, served, image, name)
        finally:
            served.stop()
            await reader.close()
            print(served.output())


def test_the_vpcd_readers_are_listed() -> None:
    names = require_pcsc()
    assert "Virtual PCD 00 00" in names


def test_reader_names_match_exactly_or_by_unique_part() -> None:
    names = ["ACS ACR122U PICC Interface 00 00", "Virtual PCD 00 00", "Virtual PCD 00 01"]
    assert match_reader(None, names) == names[0]
    assert match_reader("Virtual PCD 00 01", names) == names[2]
    assert match_reader("acr122", names) == names[0]
    with pytest.raises(ReaderNotFound, match="several"):
        match_reader("Virtual", names)
    with pytest.raises(ReaderNotFound, match="no PC/SC reader named"):
        match_reader("Omnikey", names)
    with pytest.raises(ReaderNotFound):
        match_reader(None, [])


async def test_load_and_purchase_through_pcscd(rig: Rig) -> None:
    assert isinstance(rig.reader, Reader)
    terminal = HostTerminal(rig.reader)
    loaded = await terminal.load(5_000)
    assert loaded.issuer.serial == SERIAL
    assert (loaded.balance_before, loaded.counter) == (0, 0)
    bought = await terminal.purchase(1_234)
    assert (bought.balance_before, bought.counter) == (5_000, 0)
    assert await terminal.balance() == 3_766

    # 6Cxx through the real stack: Le 0x20 for a 30-byte file, resent with Le 0x1E.
    responses = await rig.reader.transmit([step(SELECT_EP), step(bytes.fromhex("00B0950020"))])
    issuer = responses[1]
    assert (len(issuer.data), issuer.sw) == (30, 0x9000)

    # The image is the card's EEPROM: every commit is on disk.
    rig.served.stop()
    await rig.reader.wait_for_removal(timeout=EVENT_TIMEOUT)
    state = ImageFile(rig.image).load()
    assert (state.balance, state.online_counter, state.offline_counter) == (3_766, 1, 1)


async def test_per_apdu_latency_is_reported(rig: Rig) -> None:
    batch = [step(SELECT_EP)] + [step(GET_BALANCE)] * 500
    started = time.perf_counter()
    responses = await rig.reader.transmit(batch)
    elapsed = time.perf_counter() - started
    assert [r.sw for r in responses] == [0x9000] * len(batch)
    print(f"vpcd per-APDU latency: {elapsed / len(batch) * 1e6:.0f} µs over {len(batch)} APDUs")


async def test_a_card_pulled_during_a_batch_is_card_removed(rig: Rig) -> None:
    terminal = HostTerminal(rig.reader)
    first = await terminal.load_init(1_000)
    # CREDIT commits the load, then the card answers GET BALANCE for seconds. Once the
    # image shows the load, the batch is surely in flight: pull the card (SIGTERM).
    batch = [step(terminal.credit_apdu(1_000, first[2]))] + [step(GET_BALANCE)] * 40_000
    running = asyncio.create_task(rig.reader.transmit(batch))
    deadline = time.monotonic() + EVENT_TIMEOUT
    while ImageFile(rig.image).load().balance != 1_000:
        assert time.monotonic() < deadline, "the CREDIT never committed"
        assert not running.done(), running
        await asyncio.sleep(0.01)  # bounded polling for the commit on disk
    rig.served.stop()
    with pytest.raises(CardRemoved) as caught:
        await running
    responses = caught.value.responses
    assert 1 <= len(responses) < len(batch)
    assert all(r.sw == 0x9000 for r in responses)
    assert all(r.data == bytes.fromhex("000003E8") for r in responses[1:])

    await rig.reader.wait_for_removal(timeout=EVENT_TIMEOUT)
    with pytest.raises(NoCard):
        await rig.reader.transmit([step(SELECT_EP)])

    # Put it back: the same card, its committed load intact, on a new connection.
    rig.served.start()
    info = await rig.reader.wait_for_card(timeout=EVENT_TIMEOUT)
    assert info.atr == CARD_ATR
    assert await terminal.balance() == 1_000


async def test_a_pending_initialize_survives_between_batches_but_not_a_new_contact(
    rig: Rig,
) -> None:
    terminal = HostTerminal(rig.reader)
    await terminal.load(2_000)
    first = await terminal.purchase_init(500)
    rig.served.stop()
    await rig.reader.wait_for_removal(timeout=EVENT_TIMEOUT)
    rig.served.start()
    await rig.reader.wait_for_card(timeout=EVENT_TIMEOUT)
    [debit] = await rig.reader.transmit([step(terminal.debit_apdu(500, first[2]))])
    assert debit.sw == 0x6985  # power was lost: nothing pending, nothing debited
    assert await terminal.balance() == 2_000


async def test_waiting_for_a_card_wakes_on_insertion_and_times_out_without(rig: Rig) -> None:
    rig.served.stop()
    await rig.reader.wait_for_removal(timeout=EVENT_TIMEOUT)
    with pytest.raises(ReaderTimeout):
        await rig.reader.wait_for_card(timeout=0.2)
    waiting = asyncio.create_task(rig.reader.wait_for_card(timeout=60))
    rig.served.start()
    info = await asyncio.wait_for(waiting, EVENT_TIMEOUT)
    assert (info.reader, info.atr) == (rig.name, CARD_ATR)


async def test_a_cancelled_wait_releases_its_thread_at_once(rig: Rig) -> None:
    waiting = asyncio.create_task(rig.reader.wait_for_removal(timeout=600))
    await asyncio.sleep(0)  # let it start: not synchronisation, the outcome is the same
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The worker blocked in SCardGetStatusChange for up to 600 s must return now
    # (SCardCancel), or shutting the default executor down would hang.
    await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 10)


async def test_open_reader_pcsc_by_name(rig: Rig) -> None:
    reader = open_reader(f"pcsc:{rig.name}")
    try:
        assert isinstance(reader, PcscReader)
        assert reader.name == rig.name
        assert await HostTerminal(reader).balance() == 0
    finally:
        await reader.close()


async def test_opensc_tool_sees_the_card(rig: Rig) -> None:
    tool = shutil.which("opensc-tool")
    if tool is None:
        unavailable("opensc-tool is not installed (Debian package opensc)")
    assert tool is not None
    await rig.reader.close()  # let the other application have the card
    result = subprocess.run(
        [tool, "--reader", rig.name, "--atr"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert CARD_ATR.hex(":") in result.stdout.lower()
