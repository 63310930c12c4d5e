"""The simulated PN532: its answers on the wire, and libnfc's ``nfc-list`` finding the card."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.card.support import make_card, make_state
from tests.reader.vpcd_support import unavailable
from webpurse.card import ImageFile
from webpurse.card.pn532sim import DEFAULT_UID, Pn532Chip, PtyServer
from webpurse.protocol.pn532frame import (
    ACK_FRAME,
    ERROR_FRAME,
    NACK_FRAME,
    TFI_CHIP,
    WAKEUP,
    FrameDecoder,
    Information,
    command_frame,
    decode_list_passive_a,
)


def answers(chip: Pn532Chip, data: bytes) -> list[object]:
    return FrameDecoder().feed(chip.receive(data))


def test_wakeup_then_firmware_version() -> None:
    chip = Pn532Chip(make_card())
    out = chip.receive(WAKEUP + command_frame(0x14, b"\x01\x14\x01") + command_frame(0x02))
    assert out.startswith(ACK_FRAME)
    events = FrameDecoder().feed(out)
    assert events[1] == Information(TFI_CHIP, b"\x15")
    assert events[3] == Information(TFI_CHIP, b"\x03\x32\x01\x06\x01")  # PN532 v1.6


def test_libnfc_communication_test_is_echoed() -> None:
    chip = Pn532Chip(None)
    events = answers(chip, command_frame(0x00, b"\x00libnfc"))
    assert events[1] == Information(TFI_CHIP, b"\x01\x00libnfc")


def test_nack_repeats_the_last_answer_and_unknown_commands_get_a_syntax_error() -> None:
    chip = Pn532Chip(make_card())
    first = chip.receive(command_frame(0x02))
    assert chip.receive(NACK_FRAME) == first[len(ACK_FRAME) :]
    assert chip.receive(command_frame(0x7E)) == ACK_FRAME + ERROR_FRAME
    assert chip.stats.unknown_commands == [0x7E]


def test_bad_frame_is_ignored_and_counted() -> None:
    chip = Pn532Chip(make_card())
    bad = bytearray(command_frame(0x02))
    bad[-2] ^= 0xFF
    assert chip.receive(bytes(bad)) == b""
    assert chip.stats.bad_frames == 1


def test_registers_remember_writes() -> None:
    chip = Pn532Chip(None)
    answers(chip, command_frame(0x08, bytes.fromhex("630242") + bytes.fromhex("630301")))
    events = answers(chip, command_frame(0x06, bytes.fromhex("63026303630D")))
    assert events[1] == Information(TFI_CHIP, b"\x07\x42\x01\x00")


def test_list_passive_target_reports_an_iso14443_4_card_or_nothing() -> None:
    chip = Pn532Chip(make_card())
    events = answers(chip, command_frame(0x4A, b"\x01\x00"))
    answer = events[1]
    assert isinstance(answer, Information)
    [target] = decode_list_passive_a(answer.params)
    assert (target.atqa, target.sak, target.uid) == (b"\x00\x04", 0x20, DEFAULT_UID)
    assert target.historical == b"WEBPURSE"
    assert answers(chip, command_frame(0x4A, b"\x01\x01\x00\xff\xff\x00\x00"))[1] == Information(
        TFI_CHIP, b"\x4b\x00"
    )  # FeliCa: nothing
    chip.remove()
    assert answers(chip, command_frame(0x4A, b"\x01\x00"))[1] == Information(TFI_CHIP, b"\x4b\x00")
    # an APDU after the card left: status 27, no such target (it must be listed again)
    assert answers(chip, command_frame(0x40, b"\x01\x00\xa4\x04\x00"))[1] == Information(
        TFI_CHIP, b"\x41\x27"
    )


def _nfc_list_or_skip() -> str:
    found = shutil.which("nfc-list")
    if found is None:
        unavailable("nfc-list is not installed (Debian: apt-get install libnfc-bin)")
    assert found is not None
    return found


def test_nfc_list_finds_the_reader_and_the_card_over_the_pty() -> None:
    nfc_list = _nfc_list_or_skip()
    chip = Pn532Chip(make_card())
    with PtyServer(chip) as server:
        env = dict(os.environ, LIBNFC_DEFAULT_DEVICE=f"pn532_uart:{server.path}")
        env.pop("LIBNFC_DEVICE", None)
        done = subprocess.run(
            [nfc_list, "-v"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert "NFC device: user defined default device opened" in out
    assert "1 ISO14443A passive target(s) found" in out
    assert "UID (NFCID3): 08  a1  b2  c3" in out
    assert "SAK (SEL_RES): 20" in out
    assert "Compliant with ISO/IEC 14443-4" in out
    assert "57  45  42  50  55  52  53  45" in out  # historical bytes "WEBPURSE"
    assert chip.stats.bad_frames == 0 and chip.stats.unknown_commands == []


def test_serve_pn532_prints_a_pty_that_nfc_list_opens(tmp_path: Path) -> None:
    nfc_list = _nfc_list_or_skip()
    image = tmp_path / "card.img"
    ImageFile(image).create(make_state())
    serve = subprocess.Popen(
        [sys.executable, "-m", "webpurse", "card", "serve-pn532", str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        path = serve.stdout.readline().strip()
        assert path.startswith("/dev/pts/")
        env = dict(os.environ, LIBNFC_DEFAULT_DEVICE=f"pn532_uart:{path}")
        done = subprocess.run(
            [nfc_list, "-t", "1"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert "1 ISO14443A passive target(s) found" in done.stdout, done.stderr
    finally:
        serve.terminate()
        assert serve.wait(timeout=10) == 0


def test_nfcpys_start_up_extras_are_answered() -> None:
    """nfcpy switches the baud rate and tests the line with a 265-byte extended frame."""
    chip = Pn532Chip(None)
    assert answers(chip, command_frame(0x10, b"\x07"))[1] == Information(TFI_CHIP, b"\x11")
    line_test = b"\x00" + bytes(x & 0xFF for x in range(262))
    assert answers(chip, command_frame(0x00, line_test))[1] == Information(
        TFI_CHIP, b"\x01" + line_test
    )
