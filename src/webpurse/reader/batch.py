"""Running a batch of APDU steps over one link: the part every local backend shares.

Sans-I/O in the sense that matters: the link is an injected ``send(apdu) -> response``
callable, so the same code drives an in-process card, a PC/SC card and a scripted fake.

What it does (ISO 7816-4 §5.3 and §7.1; ``reader/base.py``):
- sends the steps in order and stops after the first response whose status word is not in
  that step's ``ok`` set;
- ``61xx``: the card has ``xx`` more bytes; fetch them with GET RESPONSE ``00 C0 00 00 xx``
  (repeatedly) and hand back one response, the data joined, with the last status word;
- ``6Cxx``: wrong Le, ``xx`` bytes available; send the same command once more with Le=xx;
- a broken link (``LinkBroken`` from ``send``) becomes :class:`CardRemoved` carrying the
  responses of the steps that completed: the step in flight may or may not have reached
  the card, and its outcome must be recovered (spec §6), never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from webpurse.protocol.apdu import CommandApdu, ResponseApdu
from webpurse.protocol.errors import ApduFormatError
from webpurse.reader.base import CardRemoved, Step

#: A card never needs more GET RESPONSE rounds than this for a short APDU; a card that
#: keeps answering 61xx beyond it is broken and its last 61xx fails the step.
MAX_GET_RESPONSE = 32


class LinkBroken(Exception):
    """Raised by a ``send`` callable: the card or the link to it went away."""


Send = Callable[[bytes], bytes]


def get_response(length: int) -> bytes:
    """GET RESPONSE for ``length`` bytes (the xx of a 61xx; 0 means 256)."""
    return bytes((0x00, 0xC0, 0x00, 0x00, length & 0xFF))


def with_le(apdu: bytes, le: int) -> bytes | None:
    """The same command with Le set to ``le``, or None if ``apdu`` is not a short APDU."""
    try:
        command = CommandApdu.from_bytes(apdu)
    except ApduFormatError:
        return None
    return CommandApdu(
        command.cla, command.ins, command.p1, command.p2, command.data, le & 0xFF
    ).to_bytes()


def exchange(apdu: bytes, send: Send) -> ResponseApdu:
    """One command with 6Cxx and 61xx handled: the response the caller should see."""
    response = ResponseApdu.from_bytes(send(apdu))
    if response.sw >> 8 == 0x6C:
        retry = with_le(apdu, response.sw & 0xFF)
        if retry is not None:
            response = ResponseApdu.from_bytes(send(retry))
    data = response.data
    rounds = 0
    while response.sw >> 8 == 0x61 and rounds < MAX_GET_RESPONSE:
        response = ResponseApdu.from_bytes(send(get_response(response.sw & 0xFF)))
        data += response.data
        rounds += 1
    return ResponseApdu(data, response.sw)


def run_batch(batch: Sequence[Step], send: Send) -> list[ResponseApdu]:
    """Send ``batch`` over ``send`` with stop-at-first-failure; see the module docstring."""
    responses: list[ResponseApdu] = []
    for step in batch:
        try:
            response = exchange(step.apdu, send)
        except LinkBroken as exc:
            raise CardRemoved(str(exc) or "the card left the field", responses) from exc
        except ApduFormatError as exc:  # fewer than 2 bytes back: the outcome is unknown
            raise CardRemoved(f"malformed response from the card: {exc}", responses) from exc
        responses.append(response)
        if response.sw not in step.ok:
            break
    return responses
