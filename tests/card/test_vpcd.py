"""The vpcd wire: frame codec, the card's session, and the socket loop against a fake vpcd."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.card.support import make_card, make_state
from webpurse.card import ImageFile, open_card
from webpurse.card.vpcd import (
    CARD_ATR,
    Control,
    FrameDecoder,
    VpcdClient,
    VpcdProtocolError,
    VpcdSession,
    encode_frame,
)
from webpurse.protocol import commands as cmd

SELECT_EP = cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()
GET_BALANCE = cmd.GetBalance().to_apdu().to_bytes()


def test_a_frame_is_a_two_byte_big_endian_length_then_the_payload() -> None:
    assert encode_frame(b"\x04") == b"\x00\x01\x04"
    assert encode_frame(b"\xaa" * 300)[:2] == b"\x01\x2c"
    with pytest.raises(VpcdProtocolError):
        encode_frame(b"\x00" * 0x10000)


@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1),
)
def test_frames_split_anywhere_come_out_whole_and_in_order(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    out: list[bytes] = []
    position, n = 0, 0
    while position < len(stream):
        size = cuts[n % len(cuts)]
        out += decoder.feed(stream[position : position + size])
        position += size
        n += 1
    assert out == payloads
    assert decoder.pending == 0


def test_an_empty_frame_is_a_protocol_error() -> None:
    with pytest.raises(VpcdProtocolError):
        FrameDecoder().feed(b"\x00\x00")


def test_the_atr_is_a_t1_contactless_atr_with_a_valid_checksum() -> None:
    assert CARD_ATR[:4] == bytes.fromhex("3B888001")
    assert CARD_ATR[4:-1] == b"WEBPURSE"
    check = 0
    for byte in CARD_ATR[1:]:
        check ^= byte
    assert check == 0


def test_the_session_answers_get_atr_and_apdus_and_resets_on_power_events() -> None:
    card = make_card()
    session = VpcdSession(card)
    assert session.receive(encode_frame(bytes([Control.POWER_ON]))) == b""
    assert session.receive(encode_frame(bytes([Control.GET_ATR]))) == encode_frame(CARD_ATR)
    answer = session.receive(encode_frame(SELECT_EP) + encode_frame(GET_BALANCE))
    frames = FrameDecoder().feed(answer)
    assert [f[-2:] for f in frames] == [b"\x90\x00", b"\x90\x00"]
    assert frames[1] == bytes.fromhex("000000009000")
    assert card.selected.value == "ep"
    for code in (Control.POWER_OFF, Control.RESET):
        session.receive(encode_frame(SELECT_EP))
        assert session.receive(encode_frame(bytes([code]))) == b""
        assert card.selected.value == "mf"  # power lost: selection gone
    assert session.stats.apdus == 4
    assert session.stats.power_cycles == 3


def test_unknown_control_codes_are_ignored() -> None:
    assert VpcdSession(make_card()).receive(encode_frame(b"\x07")) == b""


class FakeVpcd:
    """A listening socket that speaks vpcd's side of the wire (as pcscd's driver does)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder()

    def accept(self) -> None:
        self.server.settimeout(10)
        self.conn, _ = self.server.accept()
        self.conn.settimeout(10)

    def exchange(self, payload: bytes) -> bytes:
        assert self.conn is not None
        # vpcd writes length and body separately; the card must cope.
        frame = encode_frame(payload)
        self.conn.sendall(frame[:2])
        self.conn.sendall(frame[2:])
        while True:
            data = self.conn.recv(4096)
            assert data, "the card closed the connection"
            frames = self.decoder.feed(data)
            if frames:
                return frames[0]

    def send_only(self, payload: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(encode_frame(payload))

    def wait_closed(self) -> None:
        assert self.conn is not None
        assert self.conn.recv(1) == b""

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture
def fake_vpcd() -> Iterator[FakeVpcd]:
    fake = FakeVpcd()
    yield fake
    fake.close()


def test_the_client_serves_the_card_until_stopped_and_stop_removes_it(
    fake_vpcd: FakeVpcd,
) -> None:
    card = make_card()
    statuses: list[str] = []
    client = VpcdClient(card, "127.0.0.1", fake_vpcd.port, on_status=statuses.append)
    runner = threading.Thread(target=client.run)
    runner.start()
    try:
        fake_vpcd.accept()
        fake_vpcd.send_only(bytes([Control.POWER_ON]))
        assert fake_vpcd.exchange(bytes([Control.GET_ATR])) == CARD_ATR
        assert fake_vpcd.exchange(SELECT_EP)[-2:] == b"\x90\x00"
        assert fake_vpcd.exchange(GET_BALANCE) == bytes.fromhex("000000009000")
    finally:
        client.stop()
        runner.join(timeout=10)
    assert not runner.is_alive()
    fake_vpcd.wait_closed()  # closing the socket is taking the card out
    assert card.selected.value == "mf"
    assert statuses[-1] == "card removed"
    client.close()


def test_the_client_reconnects_when_vpcd_goes_away(fake_vpcd: FakeVpcd) -> None:
    client = VpcdClient(make_card(), "127.0.0.1", fake_vpcd.port, retry_interval=0.05)
    runner = threading.Thread(target=client.run)
    runner.start()
    try:
        fake_vpcd.accept()
        assert fake_vpcd.exchange(bytes([Control.GET_ATR])) == CARD_ATR
        assert fake_vpcd.conn is not None
        fake_vpcd.conn.close()  # pcscd stopped
        fake_vpcd.accept()  # ...and the card comes back by itself
        assert fake_vpcd.exchange(bytes([Control.GET_ATR])) == CARD_ATR
    finally:
        client.stop()
        runner.join(timeout=10)
        client.close()
    assert not runner.is_alive()


def test_the_client_waits_for_vpcd_and_can_be_stopped_while_waiting() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here
    statuses: list[str] = []
    client = VpcdClient(make_card(), "127.0.0.1", port, retry_interval=5, on_status=statuses.append)
    runner = threading.Thread(target=client.run)
    runner.start()
    client.stop()
    runner.join(timeout=10)
    client.close()
    assert not runner.is_alive()


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "webpurse", "card", "serve", *args]


def test_serve_refuses_a_missing_image_with_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_command(str(tmp_path / "absent.json")), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no card image" in " ".join(result.stderr.split())


def test_serve_refuses_a_card_that_is_in_another_reader(tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    with open_card(image):
        result = subprocess.run(
            serve_command(str(image)), capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 2
    assert "in use by another process" in " ".join(result.stderr.split())


def test_serve_puts_the_card_in_and_sigterm_takes_it_out(
    tmp_path: Path, fake_vpcd: FakeVpcd
) -> None:
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    process = subprocess.Popen(
        serve_command(str(image), "--port", str(fake_vpcd.port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        fake_vpcd.accept()
        assert fake_vpcd.exchange(bytes([Control.GET_ATR])) == CARD_ATR
        assert fake_vpcd.exchange(SELECT_EP)[-2:] == b"\x90\x00"
        process.send_signal(signal.SIGTERM)
        fake_vpcd.wait_closed()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stdout is not None
    assert "card removed" in process.stdout.read()
