"""Bank statements of the settlement account: parsed, checked and matched (pure).

:func:`parse` turns an MT940 (through the ``mt-940`` library) or CSV statement into a
:class:`Statement` and refuses, with a :class:`StatementError` naming the rule, anything
settlement must not book: a malformed file, another account or currency, zero or negative
line amounts, opening balance + lines ≠ closing balance. :func:`plan` decides, for each
credit line, whether it funds an order or is an exception — from the lines and the orders
alone, so the database adapter (:mod:`webpurse.settlement.funding`) only carries it out.
The CSV format is documented in docs/settlement-api.md ("Bank statements").
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum

from webpurse.settlement import references
from webpurse.settlement.transactions import Status

CURRENCY = "CNY"
MAX_FEN = 10**15  # a bound far above any real statement (and inside BIGINT)
MAX_NUMBER = 2**31 - 1  # statement numbers (an INTEGER column)
_NUMBER = re.compile(r"[0-9]{1,10}")
CSV_HEADER = (
    "record",
    "account",
    "statement",
    "date",
    "amount",
    "currency",
    "bank_reference",
    "payer",
    "remittance",
)


class StatementError(Exception):
    """A statement settlement refuses as a whole; nothing of it is booked."""

    def __init__(self, code: str, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


@dataclass(frozen=True, slots=True)
class Line:
    line_no: int
    amount: int  # fen, signed: + credit, - debit
    booked_on: dt.date
    bank_reference: str = ""
    payer: str = ""
    remittance: str = ""


@dataclass(frozen=True, slots=True)
class Statement:
    account: str
    number: int
    currency: str
    opening_balance: int
    closing_balance: int
    lines: tuple[Line, ...]

    @property
    def digest(self) -> str:
        """What identifies the content (a re-import must be exactly this)."""
        data = asdict(self)
        return hashlib.sha256(
            json.dumps(data, sort_keys=True, default=str).encode("utf-8")
        ).hexdigest()


def normalise_account(account: str) -> str:
    return "".join(account.split()).upper()


def to_fen(amount: Decimal | str, what: str) -> int:
    """Yuan with at most two decimals → fen; anything else is malformed."""
    try:
        value = Decimal(amount) if isinstance(amount, str) else amount
    except InvalidOperation:
        raise StatementError(
            "statement_malformed", f"{what}: {amount!r} is not an amount"
        ) from None
    if not value.is_finite():
        raise StatementError("statement_malformed", f"{what}: {amount!r} is not an amount")
    fen = value * 100
    if fen != fen.to_integral_value():
        raise StatementError("statement_malformed", f"{what}: more than two decimals")
    if abs(fen) >= MAX_FEN:
        raise StatementError("statement_malformed", f"{what}: {amount} is out of range")
    return int(fen)


def check(statement: Statement, *, account: str, currency: str = CURRENCY) -> None:
    """The rules every parsed statement must pass before anything is booked."""
    if normalise_account(statement.account) != normalise_account(account):
        raise StatementError(
            "statement_wrong_account",
            f"statement of account {statement.account}, not the settlement account",
        )
    if statement.currency != currency:
        raise StatementError(
            "statement_wrong_currency", f"statement in {statement.currency}, not {currency}"
        )
    for line in statement.lines:
        if line.amount == 0:
            raise StatementError("statement_amount_invalid", f"line {line.line_no}: a line of zero")
    total = statement.opening_balance + sum(line.amount for line in statement.lines)
    if total != statement.closing_balance:
        raise StatementError(
            "statement_unbalanced",
            f"opening {statement.opening_balance} + lines"
            f" {total - statement.opening_balance} = {total} fen, but the closing balance is"
            f" {statement.closing_balance} fen",
        )


# --- MT940 ---------------------------------------------------------------------------


_TAG = re.compile(r"^:(\d{2}[A-Z]?):", re.MULTILINE)
# :61: 6!n[4!n]2a[1!a]15d1!a3!c… (value date, entry date, C/D/RC/RD, funds code, amount with
# its decimal comma, transaction type): the library accepts less, settlement does not.
_LINE_61 = re.compile(r"^:61:\d{6}(\d{4})?(C|D|RC|RD)[A-Z]?\d{1,12},\d{0,2}[NFS][A-Z0-9]{3}")


def parse_mt940(text: str) -> Statement:
    import mt940  # the mt-940 library

    tags = _TAG.findall(text)
    for tag in ("20", "25", "28C"):
        if tags.count(tag) != 1:
            raise StatementError(
                "statement_malformed",
                f"an MT940 statement has one :{tag}: field, found {tags.count(tag)}",
            )
    if tags.count("60F") + tags.count("60M") != 1 or tags.count("62F") + tags.count("62M") != 1:
        raise StatementError("statement_malformed", "one opening and one closing balance needed")
    for no, raw in enumerate(re.findall(r"^:61:.*$", text, re.MULTILINE), start=1):
        if not _LINE_61.match(raw):
            raise StatementError("statement_malformed", f"MT940 line {no}: {raw[:60]!r}")
    try:
        parsed = mt940.models.Transactions()
        parsed.parse(text)
    except Exception as exc:  # the library raises many kinds on bad input
        raise StatementError("statement_malformed", f"MT940: {exc}") from None
    data = parsed.data
    opening = data.get("final_opening_balance") or data.get("intermediate_opening_balance")
    closing = data.get("final_closing_balance") or data.get("intermediate_closing_balance")
    account = data.get("account_identification")
    number = data.get("statement_number")
    if opening is None or closing is None or not account or not number:
        raise StatementError("statement_malformed", "MT940: missing account, number or balance")
    if not _NUMBER.fullmatch(str(number)) or int(str(number)) > MAX_NUMBER:
        raise StatementError("statement_malformed", f"MT940: statement number {number!r}")
    if len(parsed.transactions) != tags.count("61"):
        raise StatementError("statement_malformed", "MT940: a :61: line could not be read")
    currency = str(opening.amount.currency)
    if str(closing.amount.currency) != currency:
        raise StatementError("statement_wrong_currency", "opening and closing currencies differ")
    lines = []
    for no, transaction in enumerate(parsed.transactions, start=1):
        t = transaction.data
        status = str(t.get("status", ""))
        amount = t.get("amount")
        if amount is None or status not in ("C", "D", "RC", "RD"):
            raise StatementError("statement_malformed", f"MT940 line {no}: status {status!r}")
        if str(amount.currency) != currency:
            raise StatementError(
                "statement_wrong_currency", f"line {no} in {amount.currency}, not {currency}"
            )
        fen = to_fen(amount.amount, f"line {no}")
        # The library signs debits (D, RC) negative; a line itself is never signed.
        if fen == 0:
            raise StatementError("statement_amount_invalid", f"line {no}: a line of zero")
        booked = t.get("date")
        if booked is None:
            raise StatementError("statement_malformed", f"MT940 line {no}: no date")
        lines.append(
            Line(
                line_no=no,
                amount=fen,
                booked_on=dt.date(booked.year, booked.month, booked.day),
                bank_reference=str(t.get("bank_reference") or "")[:100],
                payer=str(t.get("applicant_name") or "")[:200],
                remittance=str(t.get("transaction_details") or ""),
            )
        )
    return Statement(
        account=str(account),
        number=int(number),
        currency=currency,
        opening_balance=to_fen(opening.amount.amount, "opening balance"),
        closing_balance=to_fen(closing.amount.amount, "closing balance"),
        lines=tuple(lines),
    )


# --- CSV -----------------------------------------------------------------------------


def parse_csv(text: str) -> Statement:
    try:
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    except csv.Error as exc:
        raise StatementError("statement_malformed", f"CSV: {exc}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows or tuple(cell.strip() for cell in rows[0]) != CSV_HEADER:
        raise StatementError("statement_malformed", f"the header must be {','.join(CSV_HEADER)}")
    body = rows[1:]
    if len(body) < 2:
        raise StatementError("statement_malformed", "an opening and a closing row are needed")
    for index, row in enumerate(body, start=2):
        if len(row) != len(CSV_HEADER):
            raise StatementError(
                "statement_malformed", f"row {index}: {len(row)} fields, not {len(CSV_HEADER)}"
            )
    records = [dict(zip(CSV_HEADER, (cell.strip() for cell in row), strict=True)) for row in body]
    if records[0]["record"] != "opening" or records[-1]["record"] != "closing":
        raise StatementError("statement_malformed", "the first row is opening, the last closing")
    account, number = records[0]["account"], records[0]["statement"]
    currency = records[0]["currency"]
    if not _NUMBER.fullmatch(number) or int(number) > MAX_NUMBER:
        raise StatementError("statement_malformed", f"statement number {number!r}")
    lines = []
    for index, rec in enumerate(records[1:-1], start=1):
        row_no = index + 2
        if rec["account"] != account or rec["statement"] != number:
            raise StatementError(
                "statement_malformed", f"row {row_no}: another account or statement number"
            )
        if rec["currency"] != currency:
            raise StatementError(
                "statement_wrong_currency", f"row {row_no} in {rec['currency']}, not {currency}"
            )
        if rec["record"] not in ("credit", "debit"):
            raise StatementError(
                "statement_malformed", f"row {row_no}: record {rec['record']!r} (credit or debit)"
            )
        fen = to_fen(rec["amount"], f"row {row_no}")
        if fen <= 0:
            raise StatementError(
                "statement_amount_invalid", f"row {row_no}: {rec['record']} of {rec['amount']}"
            )
        try:
            booked = dt.date.fromisoformat(rec["date"])
        except ValueError:
            raise StatementError(
                "statement_malformed", f"row {row_no}: date {rec['date']!r}"
            ) from None
        lines.append(
            Line(
                line_no=index,
                amount=fen if rec["record"] == "credit" else -fen,
                booked_on=booked,
                bank_reference=rec["bank_reference"][:100],
                payer=rec["payer"][:200],
                remittance=rec["remittance"],
            )
        )
    closing = records[-1]
    if closing["account"] != account or closing["statement"] != number:
        raise StatementError("statement_malformed", "the closing row names another statement")
    if closing["currency"] != currency:
        raise StatementError("statement_wrong_currency", "opening and closing currencies differ")
    return Statement(
        account=account,
        number=int(number),
        currency=currency,
        opening_balance=to_fen(records[0]["amount"], "opening balance"),
        closing_balance=to_fen(closing["amount"], "closing balance"),
        lines=tuple(lines),
    )


def parse(text: str, fmt: str) -> Statement:
    """The statement in ``text``; anything unreadable is a ``statement_malformed`` refusal."""
    parsers = {"mt940": parse_mt940, "csv": parse_csv}
    if fmt not in parsers:
        raise StatementError("statement_malformed", f"unknown format {fmt!r} (mt940 or csv)")
    try:
        return parsers[fmt](text)
    except StatementError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError) as exc:
        raise StatementError("statement_malformed", f"{fmt}: {exc}") from None


def render_csv(statement: Statement) -> str:
    """The CSV form of ``statement`` (the demo and the tests write statements with it)."""

    def yuan(fen: int) -> str:
        sign = "-" if fen < 0 else ""
        return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    first = statement.lines[0].booked_on if statement.lines else dt.date(2026, 1, 1)
    last = statement.lines[-1].booked_on if statement.lines else first
    head = (statement.account, str(statement.number))
    writer.writerow(
        (
            "opening",
            *head,
            first.isoformat(),
            yuan(statement.opening_balance),
            statement.currency,
            "",
            "",
            "",
        )
    )
    for line in statement.lines:
        writer.writerow(
            (
                "credit" if line.amount > 0 else "debit",
                *head,
                line.booked_on.isoformat(),
                yuan(abs(line.amount)),
                statement.currency,
                line.bank_reference,
                line.payer,
                line.remittance,
            )
        )
    writer.writerow(
        (
            "closing",
            *head,
            last.isoformat(),
            yuan(statement.closing_balance),
            statement.currency,
            "",
            "",
            "",
        )
    )
    return out.getvalue()


# --- matching ------------------------------------------------------------------------


class Exceptional(StrEnum):
    UNMATCHED = "unmatched"
    BAD_CHECK_DIGIT = "bad_check_digit"
    DUPLICATE = "duplicate"
    SHORT_PAYMENT = "short_payment"
    OVER_PAYMENT = "over_payment"
    EXPIRED_ORDER = "expired_order"
    LOAD_CANCELED = "load_canceled"


@dataclass(frozen=True, slots=True)
class Order:
    """A bank-transfer order as matching needs it."""

    load_id: str
    amount: int
    status: str
    expires_at: dt.datetime | None
    funded: bool = False  # a statement line funded it already


@dataclass(frozen=True, slots=True)
class Decision:
    line: Line
    reference: str | None
    load_id: str | None = None
    exception: Exceptional | None = None
    detail: str = ""
    deposit: str | None = None  # the bank reference of a float deposit already booked

    @property
    def matched(self) -> bool:
        return self.exception is None and self.load_id is not None


def plan(
    lines: Sequence[Line],
    orders: Mapping[str, Order],
    now: dt.datetime,
    deposits: Mapping[str, int] | None = None,
) -> list[Decision]:
    """What each credit line does (debit lines are left out): fund an order or be listed.

    A line funds the order its reference names when that order is ``requires_funding``,
    not past ``expires_at``, for exactly the line's amount, and no earlier line funded it.
    A line whose bank reference and amount are those of a float deposit the operator
    already recorded (``deposits``: bank reference → fen, not yet seen on a statement) is
    that deposit arriving: it was booked when it was recorded, so it is neither.
    """
    decisions: list[Decision] = []
    funded: set[str] = set()
    open_deposits = dict(deposits or {})
    for line in lines:
        if line.amount <= 0:
            continue
        if open_deposits.get(line.bank_reference) == line.amount:
            del open_deposits[line.bank_reference]
            decisions.append(Decision(line, None, deposit=line.bank_reference))
            continue
        valid, invalid = references.find_in(line.remittance)
        known = [ref for ref in dict.fromkeys(valid) if ref in orders]
        if not known:
            if invalid and not valid:
                decisions.append(
                    Decision(
                        line,
                        invalid[0],
                        exception=Exceptional.BAD_CHECK_DIGIT,
                        detail="the reference's check digits are wrong",
                    )
                )
            else:
                decisions.append(
                    Decision(
                        line,
                        valid[0] if valid else None,
                        exception=Exceptional.UNMATCHED,
                        detail="no order has this reference" if valid else "no reference",
                    )
                )
            continue
        if len(known) > 1:
            decisions.append(
                Decision(
                    line,
                    known[0],
                    exception=Exceptional.UNMATCHED,
                    detail="the line names several orders",
                )
            )
            continue
        ref = known[0]
        order = orders[ref]
        kind: Exceptional | None = None
        detail = ""
        if order.funded or order.load_id in funded:
            kind, detail = Exceptional.DUPLICATE, "the order is already funded"
        elif order.status != Status.REQUIRES_FUNDING or (
            order.expires_at is not None and order.expires_at <= now
        ):
            kind, detail = Exceptional.EXPIRED_ORDER, f"the order is {order.status}, unpaid"
        elif line.amount < order.amount:
            kind, detail = Exceptional.SHORT_PAYMENT, f"paid {line.amount} of {order.amount} fen"
        elif line.amount > order.amount:
            kind, detail = Exceptional.OVER_PAYMENT, f"paid {line.amount} for {order.amount} fen"
        if kind is None:
            funded.add(order.load_id)
            decisions.append(Decision(line, ref, load_id=order.load_id))
        else:
            decisions.append(
                Decision(line, ref, load_id=order.load_id, exception=kind, detail=detail)
            )
    return decisions
