"""Status words (spec §5) and, per card command, what each one means (Keyple's model).

One table per command: the status words that command may answer and, for each, its meaning
and the reason a terminal gives the shopper when the card refuses. The card emulator answers
only what its command's table lists; the merchant turns a refusal into a reason through the
table of the command that was refused, never one map for all commands (6A80 is "balance
limit" only for INITIALIZE FOR LOAD); the agent reads a completion's answer through it.

Pure data and lookups: imports nothing else of the package, so ``apdu`` and ``errors``
can both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum


class StatusWord(IntEnum):
    """The status words of pboc-epurse.md §5, plus the ISO ones a reader path produces."""

    SUCCESS = 0x9000
    WRONG_LENGTH = 0x6700
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    PIN_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    APPLICATION_BLOCKED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    WRONG_P1P2 = 0x6A86
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    MEMORY_FAILURE = 0x6581
    NO_PRECISE_DIAGNOSIS = 0x6F00
    MAC_INVALID = 0x9302
    APPLICATION_LOCKED = 0x9303
    INSUFFICIENT_FUNDS = 0x9401
    COUNTER_AT_MAXIMUM = 0x9402
    KEY_INDEX_NOT_SUPPORTED = 0x9403
    PROOF_NOT_AVAILABLE = 0x9406


_NAMES: dict[int, str] = {
    0x9000: "success",
    0x6700: "wrong length",
    0x6982: "security status not satisfied (PIN needed)",
    0x6983: "PIN blocked",
    0x6985: "conditions not satisfied",
    0x6A80: "wrong data",
    0x6A81: "application blocked",
    0x6A82: "file not found",
    0x6A83: "record not found",
    0x6A86: "wrong P1/P2",
    0x6D00: "INS not supported",
    0x6E00: "CLA not supported",
    0x6581: "memory failure",
    0x6F00: "no precise diagnosis",
    0x9302: "MAC invalid",
    0x9303: "application permanently locked",
    0x9401: "insufficient funds",
    0x9402: "transaction counter at its maximum",
    0x9403: "key index not supported",
    0x9406: "MAC/TAC not available",
}


def describe_sw(sw: int) -> str:
    """A human name for a status word, including the parameterised 61xx, 6Cxx and 63Cx."""
    if sw in _NAMES:
        return _NAMES[sw]
    hi, lo = sw >> 8, sw & 0xFF
    if hi == 0x61:
        return f"{lo} more bytes available (GET RESPONSE)"
    if hi == 0x6C:
        return f"wrong Le, {lo} bytes available"
    if hi == 0x63 and lo & 0xF0 == 0xC0:
        return f"wrong PIN, {lo & 0x0F} tries left"
    return "unknown status word"


def is_success(sw: int) -> bool:
    return sw == StatusWord.SUCCESS


class Refusal(StrEnum):
    """Why the card said no, as a terminal tells the shopper (merchant decline reasons)."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    BALANCE_LIMIT = "balance_limit"
    NOT_AN_EPURSE = "not_an_epurse"
    CARD_BLOCKED = "card_blocked"
    KEY_NOT_SUPPORTED = "key_not_supported"
    COUNTER_AT_MAXIMUM = "counter_at_maximum"


@dataclass(frozen=True, slots=True)
class Status:
    """One row of a command's table: what the status word means for that command."""

    meaning: str
    refusal: Refusal | None = None
    """The shopper-facing reason when this answer refuses the transaction; None when the
    answer is not a refusal a shopper can act on (success, a protocol error)."""
    answer: bool = False
    """True when the answer is a result, not a failure (9000; 9406 for PROVE)."""


@dataclass(frozen=True, slots=True)
class CommandStatuses:
    """The status words one command may answer (spec §3, §5), and their meanings."""

    command: str
    table: Mapping[int, Status] = field(default_factory=dict)

    def allows(self, sw: int) -> bool:
        """True when ``sw`` is an answer this command may give."""
        return sw in self.table

    def meaning(self, sw: int) -> str:
        status = self.table.get(sw)
        return status.meaning if status is not None else describe_sw(sw)

    def is_answer(self, sw: int) -> bool:
        """True when ``sw`` is a result of the command (success, or PROVE's 9406)."""
        status = self.table.get(sw)
        return status is not None and status.answer

    def answers(self) -> frozenset[int]:
        """The status words that are results, for a reader batch's ``ok`` set."""
        return frozenset(sw for sw, status in self.table.items() if status.answer)

    def reason(self, sw: int, default: str) -> str:
        """The shopper-facing reason this command's refusal ``sw`` gives, else ``default``."""
        status = self.table.get(sw)
        if status is None or status.refusal is None:
            return default
        return status.refusal.value


def _table(command: str, *rows: tuple[int, Status]) -> CommandStatuses:
    return CommandStatuses(command, {**_COMMON, **dict(rows)})


_SUCCESS = Status("success", answer=True)
# What any command may answer (ISO 7816-4 and spec §5): a malformed command, an unknown
# instruction, a failed write; and on a locked or blocked application, 9303 / 6A81 to every
# command (spec §5, "(choice)" after 10 MAC failures).
_COMMON: dict[int, Status] = {
    StatusWord.SUCCESS: _SUCCESS,
    StatusWord.WRONG_LENGTH: Status("wrong length"),
    StatusWord.WRONG_P1P2: Status("wrong P1/P2"),
    StatusWord.WRONG_DATA: Status("wrong data"),
    StatusWord.INS_NOT_SUPPORTED: Status("INS not supported"),
    StatusWord.CLA_NOT_SUPPORTED: Status("CLA not supported"),
    StatusWord.MEMORY_FAILURE: Status("memory failure"),
    StatusWord.NO_PRECISE_DIAGNOSIS: Status("no precise diagnosis"),
    StatusWord.CONDITIONS_NOT_SATISFIED: Status("conditions not satisfied"),
    StatusWord.FILE_NOT_FOUND: Status("no e-purse application", Refusal.NOT_AN_EPURSE),
    StatusWord.APPLICATION_BLOCKED: Status("application blocked", Refusal.CARD_BLOCKED),
    StatusWord.APPLICATION_LOCKED: Status("application permanently locked", Refusal.CARD_BLOCKED),
}

UNKNOWN_COMMAND = _table("unknown command")
SELECT = _table("SELECT")
# 6Cxx: Le asked for more than the file holds; xx is what it has (ISO 7816-4).
_WRONG_LE = tuple((0x6C00 | n, Status(f"wrong Le, {n} bytes available")) for n in range(256))
READ_BINARY = _table("READ BINARY", *_WRONG_LE)
READ_RECORD = _table(
    "READ RECORD", (StatusWord.RECORD_NOT_FOUND, Status("record not found")), *_WRONG_LE
)
VERIFY = _table(
    "VERIFY",
    (StatusWord.PIN_BLOCKED, Status("PIN blocked")),
    *((0x63C0 | tries, Status(f"wrong PIN, {tries} tries left")) for tries in range(16)),
)
GET_BALANCE = _table("GET BALANCE")
INITIALIZE_FOR_PURCHASE = _table(
    "INITIALIZE FOR PURCHASE",
    (
        StatusWord.KEY_INDEX_NOT_SUPPORTED,
        Status("key index not supported", Refusal.KEY_NOT_SUPPORTED),
    ),
    (
        StatusWord.COUNTER_AT_MAXIMUM,
        Status("offline counter at its maximum", Refusal.COUNTER_AT_MAXIMUM),
    ),
    (StatusWord.INSUFFICIENT_FUNDS, Status("balance below the amount", Refusal.INSUFFICIENT_FUNDS)),
)
INITIALIZE_FOR_LOAD = _table(
    "INITIALIZE FOR LOAD",
    (
        StatusWord.KEY_INDEX_NOT_SUPPORTED,
        Status("key index not supported", Refusal.KEY_NOT_SUPPORTED),
    ),
    (StatusWord.SECURITY_STATUS_NOT_SATISFIED, Status("PIN needed before a load")),
    (
        StatusWord.COUNTER_AT_MAXIMUM,
        Status("online counter at its maximum", Refusal.COUNTER_AT_MAXIMUM),
    ),
    (StatusWord.WRONG_DATA, Status("balance + amount above the maximum", Refusal.BALANCE_LIMIT)),
)
DEBIT_FOR_PURCHASE = _table("DEBIT FOR PURCHASE", (StatusWord.MAC_INVALID, Status("MAC1 invalid")))
CREDIT_FOR_LOAD = _table("CREDIT FOR LOAD", (StatusWord.MAC_INVALID, Status("MAC2 invalid")))
GET_TRANSACTION_PROVE = _table(
    "GET TRANSACTION PROVE",
    (StatusWord.PROOF_NOT_AVAILABLE, Status("no proof for that counter", answer=True)),
)
