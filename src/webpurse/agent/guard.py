"""What the agent lets through to the card: a sans-I/O state machine fed the APDUs it relays.

The agent is the shopper's trusted display (ARCHITECTURE.md, "Terminal agent and
reader"). The merchant server drives the card, but only the agent sees what really goes
to it, so the agent decides:

- only the e-purse commands a purchase, a load or a recovery needs pass (SELECT, READ
  BINARY, READ RECORD, GET BALANCE, INITIALIZE, DEBIT FOR PURCHASE, CREDIT FOR LOAD, GET
  TRANSACTION PROVE); anything else (VERIFY, writes, proprietary commands) is refused;
- DEBIT FOR PURCHASE passes only directly after an INITIALIZE FOR PURCHASE that the card
  accepted for a non-zero amount (the same rule as the card's own, spec §3), and only once
  the shopper has confirmed that amount: MAC1 binds the debit to the INITIALIZE amount,
  so the amount the agent read from the INITIALIZE it relayed is the amount debited;
- a DEBIT whose INITIALIZE amount differs from the confirmed one is refused, and so is a
  second DEBIT after one that succeeded or whose outcome is unknown;
- CREDIT FOR LOAD likewise, so loads are shown and confirmed too.

Feed it with :meth:`Guard.check` before sending an APDU, :meth:`Guard.decide` with the
shopper's answer when ``check`` asks, and :meth:`Guard.sent` with the card's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import CommandApdu, ResponseApdu, StatusWord
from webpurse.protocol.errors import ProtocolError
from webpurse.reader.messages import ErrorCode


class Kind(StrEnum):
    PURCHASE = "purchase"
    LOAD = "load"


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    """What the shopper is asked to confirm. ``origin`` and ``amount`` are trusted (the
    pairing request's Origin header; the INITIALIZE the agent relayed); ``merchant`` is the
    merchant's own description, shown as secondary."""

    kind: Kind
    amount: int
    origin: str
    merchant: str | None = None
    currency: str = "CNY"

    @property
    def amount_text(self) -> str:
        return f"¥{self.amount // 100:,}.{self.amount % 100:02d}"


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Ask:
    request: ConsentRequest


@dataclass(frozen=True, slots=True)
class Refuse:
    code: ErrorCode
    message: str


Verdict = Allow | Ask | Refuse

_RELAYED: dict[tuple[int, int], str] = {
    (cmd.CLA_ISO, cmd.INS_SELECT): "SELECT",
    (cmd.CLA_ISO, cmd.INS_READ_BINARY): "READ BINARY",
    (cmd.CLA_ISO, cmd.INS_READ_RECORD): "READ RECORD",
    (cmd.CLA_PROPRIETARY, cmd.INS_GET_BALANCE): "GET BALANCE",
    (cmd.CLA_PROPRIETARY, cmd.INS_INITIALIZE): "INITIALIZE",
    (cmd.CLA_PROPRIETARY, cmd.INS_DEBIT_FOR_PURCHASE): "DEBIT FOR PURCHASE",
    (cmd.CLA_PROPRIETARY, cmd.INS_CREDIT_FOR_LOAD): "CREDIT FOR LOAD",
    (cmd.CLA_PROPRIETARY, cmd.INS_GET_TRANSACTION_PROVE): "GET TRANSACTION PROVE",
}

_COMPLETING: dict[int, Kind] = {
    cmd.INS_DEBIT_FOR_PURCHASE: Kind.PURCHASE,
    cmd.INS_CREDIT_FOR_LOAD: Kind.LOAD,
}


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: Kind
    amount: int


@dataclass
class Guard:
    """One agent session's view of the card. Not shared between sessions."""

    origin: str
    merchant: str | None = None
    _pending: _Pending | None = None
    _confirmed: dict[Kind, int] = field(default_factory=dict)
    _refused: set[Kind] = field(default_factory=set)
    _done: set[Kind] = field(default_factory=set)

    def check(self, apdu: bytes) -> Verdict:
        """May ``apdu`` go to the card now?"""
        try:
            command = CommandApdu.from_bytes(apdu)
        except ProtocolError as exc:
            return Refuse(ErrorCode.APDU_NOT_ALLOWED, f"not a valid command APDU: {exc}")
        name = _RELAYED.get((command.cla, command.ins))
        if name is None:
            return Refuse(
                ErrorCode.APDU_NOT_ALLOWED,
                f"the agent does not relay CLA {command.cla:02X} INS {command.ins:02X}",
            )
        kind = _COMPLETING.get(command.ins)
        if kind is None:
            return Allow()
        pending = self._pending
        if pending is None or pending.kind is not kind or pending.amount == 0:
            return Refuse(
                ErrorCode.NO_INITIALIZE,
                f"{name} must follow an INITIALIZE FOR {kind.value.upper()} the card accepted",
            )
        if kind in self._done:
            return Refuse(ErrorCode.ALREADY_DONE, f"this session already sent a {name}")
        if kind in self._refused:
            return Refuse(ErrorCode.CONSENT_REFUSED, f"the shopper refused this {kind.value}")
        confirmed = self._confirmed.get(kind)
        if confirmed is None:
            return Ask(ConsentRequest(kind, pending.amount, self.origin, self.merchant))
        if confirmed != pending.amount:
            return Refuse(
                ErrorCode.AMOUNT_MISMATCH,
                f"INITIALIZE amount {pending.amount} differs from the {confirmed} confirmed",
            )
        return Allow()

    def decide(self, request: ConsentRequest, granted: bool) -> Verdict:
        """Record the shopper's answer to ``request``; Allow or Refuse the waiting APDU."""
        if not granted:
            self._refused.add(request.kind)
            return Refuse(ErrorCode.CONSENT_REFUSED, f"the shopper refused this {request.kind}")
        self._confirmed[request.kind] = request.amount
        return Allow()

    def sent(self, apdu: bytes, response: bytes | None) -> None:
        """The card answered ``response`` to ``apdu`` (None: the answer was lost)."""
        command = CommandApdu.from_bytes(apdu)
        answer = ResponseApdu.from_bytes(response) if response is not None else None
        ok = answer is not None and answer.sw == StatusWord.SUCCESS
        # Any command ends the card's pending INITIALIZE (spec §3); a new one starts one.
        self._pending = None
        if command.cla == cmd.CLA_PROPRIETARY and command.ins == cmd.INS_INITIALIZE and ok:
            try:
                init = cmd.parse_initialize(command)
            except ProtocolError:
                return
            kind = Kind.LOAD if isinstance(init, cmd.InitializeForLoad) else Kind.PURCHASE
            self._pending = _Pending(kind, init.amount)
            return
        completing = _COMPLETING.get(command.ins) if command.cla == cmd.CLA_PROPRIETARY else None
        if completing is not None and (answer is None or ok):
            self._done.add(completing)
