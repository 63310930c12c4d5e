"""The agent's honest display: what the shopper reads, built as data, never as markup.

The trusted facts come first, each on its own line, from what the agent itself knows: the
amount of the INITIALIZE it relayed and the origin it paired with. The merchant's own
words (``hello.merchant``, the ``end`` message) are untrusted data: :func:`clean` removes
nothing silently but makes every character that could move the cursor, reorder the line
or hide text visible as an escape (``\\x1b``, ``\\u202e``), collapses blank runs, and
bounds the length in display columns, so the merchant's text always stays on its own line
below the facts and cannot draw over them.

:func:`lines` is the single layout both the terminal prompt and the dialog show; the
terminal prints it through Rich as :class:`rich.text.Text` (markup off), the dialog puts
each line in its own label.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from webpurse.agent.guard import ConsentRequest, Kind

MERCHANT_COLUMNS = 120
"""The merchant's text is cut to this many display columns (wide characters count two)."""

_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Control, format (bidi overrides, zero-width joiners), surrogates, private use,
unassigned, line and paragraph separators: shown as escapes, never acted on."""

_MAX_COMBINING = 2
"""Combining marks kept after one base character; more are escaped (no stacked overdraw)."""


def _disputed(char: str) -> bool:
    """Characters whose width terminals disagree on (emoji, flags, variation selectors):
    shown as escapes so no renderer draws them wider than the layout reserved."""
    code = ord(char)
    if 0xFE00 <= code <= 0xFE0F or 0xE0000 <= code <= 0xE01EF:
        return True
    return code > 0xFFFF and not 0x20000 <= code <= 0x3FFFF  # keep CJK extension B…


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def clean(text: str, columns: int = MERCHANT_COLUMNS) -> str:
    """``text`` as inert, single-line, bounded data (see the module doc)."""
    out: list[str] = []
    used = 0
    combining = 0
    pending_space = False
    for char in text:
        category = unicodedata.category(char)
        if category == "Zs" or char == " ":
            pending_space = bool(out)
            continue
        if category in _ESCAPED_CATEGORIES or _disputed(char):
            piece = _escape(char)
            combining = 0
        elif category in ("Mn", "Me"):
            combining += 1
            piece = char if out and combining <= _MAX_COMBINING else _escape(char)
        else:
            piece = char
            combining = 0
        if pending_space:
            piece = " " + piece
            pending_space = False
        width = sum(_width(c) for c in piece)
        if used + width > columns - 1:
            out.append("…")
            break
        out.append(piece)
        used += width
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Screen:
    """What the shopper is shown, line by line: ``facts`` are the agent's own, ``words``
    the merchant's (cleaned); ``action`` and ``amount`` form the first fact line."""

    title: str
    action: str
    amount: str
    facts: tuple[str, ...]
    words: str | None


_TEXT = {
    "en": {
        "title": "webpurse: confirm",
        Kind.PURCHASE: "Pay",
        Kind.LOAD: "Load onto your card",
        Kind.SHARE: "Share with the merchant",
        "site": "Merchant site",
        "says": "The merchant says",
        "fen": "fen",
        "ok": {Kind.PURCHASE: "Pay", Kind.LOAD: "Load", Kind.SHARE: "Share"},
        "cancel": "Cancel",
    },
    "zh": {
        "title": "webpurse：请确认",
        Kind.PURCHASE: "付款",
        Kind.LOAD: "充值到卡",
        Kind.SHARE: "向商户提供",
        "site": "商户网站",
        "says": "商户说明",
        "fen": "分",
        "ok": {Kind.PURCHASE: "付款", Kind.LOAD: "充值", Kind.SHARE: "提供"},
        "cancel": "取消",
    },
}

_FILES = {
    "en": {0x16: "your name and ID number (EF 0x16)", 0x18: "your transaction log (EF 0x18)"},
    "zh": {0x16: "持卡人姓名和证件号（EF 0x16）", 0x18: "交易明细（EF 0x18）"},
}


def _lang(language: str) -> str:
    return "zh" if language.lower().startswith("zh") else "en"


def screen(request: ConsentRequest, language: str = "en") -> Screen:
    """The consent screen for ``request`` in ``language`` (``zh…`` Chinese, else English)."""
    lang = _lang(language)
    text = _TEXT[lang]
    if request.kind is Kind.SHARE:
        amount = "; ".join(_FILES[lang].get(f, f"EF 0x{f:02X}") for f in request.files)
        first = f"{text[request.kind]}: {amount}"
    else:
        amount = request.amount_text
        first = (
            f"{text[request.kind]}: {amount} ({request.amount} {text['fen']} {request.currency})"
        )
    facts = (first, f"{text['site']}: {clean(request.origin)}")
    said = clean(request.merchant) if request.merchant else ""
    words = f"{text['says']}: {said}" if said else None
    return Screen(str(text["title"]), str(text[request.kind]), amount, facts, words)


def buttons(kind: Kind, language: str = "en") -> tuple[str, str]:
    """(the go-ahead label, the cancel label)."""
    text = _TEXT[_lang(language)]
    labels = text["ok"]
    assert isinstance(labels, dict)
    return str(labels[kind]), str(text["cancel"])


def lines(request: ConsentRequest, language: str = "en") -> list[str]:
    """The screen as plain lines: the facts, then the merchant's words last."""
    shown = screen(request, language)
    return [*shown.facts, *([shown.words] if shown.words else [])]


def outcome_line(outcome: str, amount: int | None, message: str) -> str:
    """The line shown at the merchant's ``end``: outcome and amount, then its words, cleaned."""
    money = "" if amount is None else f" ¥{amount // 100:,}.{amount % 100:02d}"
    words = clean(message)
    return f"{clean(outcome, 40)}{money}" + (f": {words}" if words else "")
