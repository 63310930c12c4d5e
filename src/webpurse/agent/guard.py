"""What the agent lets through to the card: a sans-I/O state machine fed the APDUs it relays.

The agent is the shopper's trusted display (ARCHITECTURE.md, "Terminal agent and
reader"). The merchant server drives the card, but only the agent sees what really goes
to it, so the agent decides, relaying only what a purchase, a load or a recovery needs
(least privilege, ``docs/agent.md``):

- SELECT of the e-purse application by its name (``A00000000386980701``) and nothing
  else: no other application, no file ids; every other command needs that application
  selected (on this card connection) first;
- READ BINARY of EF 0x15 (issuer data), GET BALANCE, INITIALIZE, GET TRANSACTION PROVE;
- READ BINARY of EF 0x16 (the holder's name and ID number) and READ RECORD of EF 0x18
  (the transaction log) only after the shopper agreed to share that file with this
  origin (a separate :data:`Kind.SHARE` consent, remembered for this session only; a "no"
  too); any other file is refused;
- DEBIT FOR PURCHASE only directly after an INITIALIZE FOR PURCHASE that the card
  accepted for a non-zero amount (the same rule as the card's own, spec §3), and only once
  the shopper has confirmed that amount: MAC1 binds the debit to the INITIALIZE amount,
  so the amount the agent read from the INITIALIZE it relayed is the amount debited;
- a DEBIT whose INITIALIZE amount differs from the confirmed one is refused, and so is a
  second DEBIT after one that succeeded or whose outcome is unknown;
- one consent covers at most one failed completion: after the card definitely refuses a
  DEBIT (e.g. 9302, bad MAC) the next one needs the shopper's "yes" again, and after
  :data:`MAX_FAILED_COMPLETIONS` failures in one session the agent refuses every further
  DEBIT/CREDIT (``too_many_failures``): the card counts bad MACs and locks itself for
  good at ten, so a hostile merchant cannot spend one "yes" on locking it;
- CREDIT FOR LOAD likewise, so loads are shown and confirmed too.

Feed it with :meth:`Guard.check` before sending an APDU, :meth:`Guard.decide` with the
shopper's answer when ``check`` asks, :meth:`Guard.sent` with the card's answer, and
:meth:`Guard.card_changed` when the card left or entered the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import CommandApdu, ResponseApdu
from webpurse.protocol.errors import ProtocolError
from webpurse.reader.messages import ErrorCode


class Kind(StrEnum):
    PURCHASE = "purchase"
    LOAD = "load"
    SHARE = "share"
    """Reading the holder's personal data (EF 0x16) or transaction log (EF 0x18)."""


MAX_FAILED_COMPLETIONS = 2
"""DEBIT/CREDIT the card definitely refused, per session, before the agent sends no more."""

SHARED_FILES = frozenset({cmd.SFI_CARDHOLDER, cmd.SFI_LOG})
"""The files a merchant reads only with the shopper's separate consent."""


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    """What the shopper is asked to confirm. ``origin`` and ``amount`` are trusted (the
    pairing request's Origin header; the INITIALIZE the agent relayed); ``merchant`` is the
    merchant's own description, shown as secondary, cleaned (``webpurse.agent.display``).
    For :data:`Kind.SHARE`, ``amount`` is 0 and ``files`` names the EF(s) to read."""

    kind: Kind
    amount: int
    origin: str
    merchant: str | None = None
    currency: str = "CNY"
    files: tuple[int, ...] = ()

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

_FILE_READS: dict[int, frozenset[int]] = {
    cmd.INS_READ_BINARY: frozenset({cmd.SFI_ISSUER, cmd.SFI_CARDHOLDER}),
    cmd.INS_READ_RECORD: frozenset({cmd.SFI_LOG}),
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
    _selected: bool = False
    _pending: _Pending | None = None
    _confirmed: dict[Kind, int] = field(default_factory=dict)
    _refused: set[Kind] = field(default_factory=set)
    _done: set[Kind] = field(default_factory=set)
    _shared: set[int] = field(default_factory=set)
    _not_shared: set[int] = field(default_factory=set)
    failures: int = 0
    """DEBIT/CREDIT the card definitely refused in this session."""

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
        try:
            return self._check(command, name)
        except ProtocolError as exc:
            return Refuse(ErrorCode.APDU_NOT_ALLOWED, f"{name} not relayed: {exc}")

    def _check(self, command: CommandApdu, name: str) -> Verdict:
        """``command`` is one of the relayed commands; ProtocolError if malformed."""
        if command.ins == cmd.INS_SELECT:
            select = cmd.Select.from_apdu(command)
            if select.name != cmd.EP_AID:
                return Refuse(
                    ErrorCode.APDU_NOT_ALLOWED,
                    f"the agent selects only the e-purse application ({cmd.EP_AID.hex().upper()})",
                )
            return Allow()
        completing = _COMPLETING.get(command.ins)
        if completing is not None:  # needs a pending INITIALIZE, hence the e-purse selected
            return self._check_completion(completing, name)
        if not self._selected:
            return Refuse(
                ErrorCode.APDU_NOT_ALLOWED,
                f"{name} only after the e-purse application is selected on this card",
            )
        if command.ins in _FILE_READS:
            return self._check_read(command, name)
        if command.ins == cmd.INS_GET_BALANCE:
            cmd.GetBalance.from_apdu(command)
            return Allow()
        if command.ins == cmd.INS_INITIALIZE:
            cmd.parse_initialize(command)
            return Allow()
        cmd.GetTransactionProve.from_apdu(command)
        return Allow()

    def _check_read(self, command: CommandApdu, name: str) -> Verdict:
        if command.ins == cmd.INS_READ_BINARY:
            sfi = cmd.ReadBinary.from_apdu(command).sfi
        else:
            sfi = cmd.ReadRecord.from_apdu(command).sfi
        if sfi not in _FILE_READS[command.ins]:
            return Refuse(
                ErrorCode.APDU_NOT_ALLOWED, f"the agent does not relay {name} of EF {sfi:02X}"
            )
        if sfi not in SHARED_FILES or sfi in self._shared:
            return Allow()
        if sfi in self._not_shared:
            return Refuse(ErrorCode.SHARE_REFUSED, f"the shopper did not share EF {sfi:02X}")
        return Ask(ConsentRequest(Kind.SHARE, 0, self.origin, self.merchant, files=(sfi,)))

    def _check_completion(self, kind: Kind, name: str) -> Verdict:
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
        if self.failures >= MAX_FAILED_COMPLETIONS:
            return Refuse(
                ErrorCode.TOO_MANY_FAILURES,
                f"the card refused {self.failures} DEBIT/CREDIT in this session; the agent "
                "sends no more (each failure counts towards locking the card for good)",
            )
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
        if request.kind is Kind.SHARE:
            (self._shared if granted else self._not_shared).update(request.files)
            if granted:
                return Allow()
            return Refuse(ErrorCode.SHARE_REFUSED, "the shopper did not share this data")
        if not granted:
            self._refused.add(request.kind)
            return Refuse(ErrorCode.CONSENT_REFUSED, f"the shopper refused this {request.kind}")
        self._confirmed[request.kind] = request.amount
        return Allow()

    def card_changed(self) -> None:
        """The card left or entered the field: nothing is selected or pending on it now."""
        self._selected = False
        self._pending = None

    def sent(self, apdu: bytes, response: bytes | None) -> None:
        """The card answered ``response`` to ``apdu`` (None: the answer was lost)."""
        command = CommandApdu.from_bytes(apdu)
        answer = ResponseApdu.from_bytes(response) if response is not None else None
        # Read through the command's own status table (protocol.status): a result, or not.
        ok = answer is not None and cmd.statuses_for(command).is_answer(answer.sw)
        # Any command ends the card's pending INITIALIZE (spec §3); a new one starts one.
        self._pending = None
        if command.cla == cmd.CLA_ISO and command.ins == cmd.INS_SELECT:
            self._selected = ok  # only the e-purse is ever selected through the agent
            return
        if command.cla == cmd.CLA_PROPRIETARY and command.ins == cmd.INS_INITIALIZE and ok:
            try:
                init = cmd.parse_initialize(command)
            except ProtocolError:
                return
            kind = Kind.LOAD if isinstance(init, cmd.InitializeForLoad) else Kind.PURCHASE
            self._pending = _Pending(kind, init.amount)
            return
        completing = _COMPLETING.get(command.ins) if command.cla == cmd.CLA_PROPRIETARY else None
        if completing is None:
            return
        if answer is None or ok:
            self._done.add(completing)
            return
        # A definite refusal (bad MAC 9302, …): this consent is spent, and it counts.
        self.failures += 1
        self._confirmed.pop(completing, None)
