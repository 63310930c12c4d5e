"""The agent's honest display: whatever the merchant writes, the amount line is the guard's.

The terminal prompt is rendered exactly as the shopper's terminal would draw it: Rich
writes the prompt's box with colours to a terminal-like stream, and pyte (a VT100
emulator) plays it onto a screen, cursor movements and all. The screen must show the
trusted facts (amount, origin) on their own lines, and the merchant's words on one line
below them.
"""

from __future__ import annotations

import io
import unicodedata

import pyte
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from webpurse.agent.consent import always_yes, panel
from webpurse.agent.display import MERCHANT_COLUMNS, buttons, clean, lines, outcome_line, screen
from webpurse.agent.guard import ConsentRequest, Kind

ORIGIN = "https://shop.example"
COLUMNS = 100
ATTACK = "Tea House\x1b[2A\x1b[8G¥1.00 (100 fen CNY) …"

hostile_pieces = st.sampled_from(
    [
        "\x1b[2A",
        "\x1b[8G",
        "\x1b[2J",
        "\x1b[1;1H",
        "\x1b]0;title\x07",
        "\x9b2A",  # the 8-bit CSI
        "\r",
        "\n",
        "\r\n",
        "\x08" * 10,
        "\t",
        "\u202e",  # RIGHT-TO-LEFT OVERRIDE
        "\u2066",
        "\u200f",
        "\u2028",
        "\u200b",
        "\ufeff",
        "[bold red]",
        "[/]",
        "[link=https://evil.example]",
        "Pay: ¥1.00 (100 fen CNY)",
        "Merchant site: https://bank.example",
        "¥",
        "付款：¥1.00",
        "全角ＷＩＤＥ",
        "\u0301\u0301\u0301\u0301",
        "😀",
        " " * 30,
    ]
)
merchant_text = st.lists(hostile_pieces | st.text(max_size=30), max_size=12).map("".join)


def rendered_screen(request: ConsentRequest) -> list[str]:
    """The terminal prompt's box as a real terminal shows it, one string per screen row."""
    out = io.StringIO()
    console = Console(
        file=out, force_terminal=True, color_system="truecolor", width=COLUMNS, legacy_windows=False
    )
    console.print(panel(request))
    terminal = pyte.Screen(COLUMNS, 40)
    stream = pyte.Stream(terminal)
    stream.feed(out.getvalue().replace("\n", "\r\n"))
    return [row.rstrip() for row in terminal.display if row.strip()]


def box_contents(rows: list[str]) -> list[str]:
    """The lines inside the box (between its top and bottom border)."""
    assert rows[0].startswith("╭") and rows[-1].startswith("╰"), rows
    inner = []
    for row in rows[1:-1]:
        assert row.startswith("│ ") and row.endswith("│"), row
        inner.append(row[2:-1].rstrip())
    return inner


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    words=st.none() | merchant_text,
    amount=st.integers(1, 0xFFFFFFFF),
    kind=st.sampled_from([Kind.PURCHASE, Kind.LOAD]),
)
def test_the_amount_line_on_screen_is_always_the_guards_amount(
    words: str | None, amount: int, kind: Kind
) -> None:
    request = ConsentRequest(kind, amount, ORIGIN, words)
    inside = box_contents(rendered_screen(request))
    action = "Pay" if kind is Kind.PURCHASE else "Load onto your card"
    assert inside[0] == f"{action}: {request.amount_text} ({amount} fen CNY)"
    assert inside[1] == f"Merchant site: {ORIGIN}"
    if words and clean(words):
        assert len(inside) == 3, inside  # the merchant's words: one line, below the facts
        assert inside[2].startswith("The merchant says: ")
    else:
        assert len(inside) == 2


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(words=merchant_text)
def test_cleaned_text_is_inert_and_bounded(words: str) -> None:
    cleaned = clean(words)
    for char in cleaned:
        assert unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
    width = sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in cleaned
    )
    assert width <= MERCHANT_COLUMNS
    assert cleaned == cleaned.strip() or cleaned.endswith("…")


def test_the_issues_lie_shows_the_real_amount_and_the_escapes_as_text() -> None:
    request = ConsentRequest(Kind.PURCHASE, 50_000, ORIGIN, ATTACK)
    inside = box_contents(rendered_screen(request))
    assert inside[0] == "Pay: ¥500.00 (50000 fen CNY)"
    assert inside[2] == r"The merchant says: Tea House\x1b[2A\x1b[8G¥1.00 (100 fen CNY) …"
    assert not any(line.startswith("Pay: ¥1.00") for line in inside)


def test_markup_is_shown_as_typed() -> None:
    request = ConsentRequest(Kind.PURCHASE, 100, ORIGIN, "[bold]Free[/bold] [link=x]tea[/link]")
    inside = box_contents(rendered_screen(request))
    assert inside[2] == "The merchant says: [bold]Free[/bold] [link=x]tea[/link]"


def test_rtl_override_and_newlines_are_escaped() -> None:
    assert clean("abc\u202edef\nPay: ¥1") == r"abc\u202edef\x0aPay: ¥1"
    assert clean("  many    spaces  ") == "many spaces"
    assert clean("宽" * 100).endswith("…") and len(clean("宽" * 100)) == 60


def test_the_dialog_and_the_prompt_share_one_layout_in_both_languages() -> None:
    request = ConsentRequest(Kind.PURCHASE, 12_345, ORIGIN, "茶馆 Tea House")
    assert lines(request, "en") == [
        "Pay: ¥123.45 (12345 fen CNY)",
        "Merchant site: https://shop.example",
        "The merchant says: 茶馆 Tea House",
    ]
    assert lines(request, "zh_CN.UTF-8") == [
        "付款: ¥123.45 (12345 分 CNY)",
        "商户网站: https://shop.example",
        "商户说明: 茶馆 Tea House",
    ]
    assert buttons(Kind.PURCHASE, "zh") == ("付款", "取消")
    assert buttons(Kind.LOAD, "en") == ("Load", "Cancel")
    share = ConsentRequest(Kind.SHARE, 0, ORIGIN, None, files=(0x16,))
    assert (
        screen(share, "en").facts[0] == "Share with the merchant: your name and ID number (EF 0x16)"
    )


def test_the_end_message_is_cleaned_too() -> None:
    line = outcome_line("succeeded", 100, "ok\x1b[2A\x1b[8GPaid ¥0.00")
    assert line == r"succeeded ¥1.00: ok\x1b[2A\x1b[8GPaid ¥0.00"


async def test_yes_agrees_to_payments_and_loads_but_never_to_sharing_data() -> None:
    out = io.StringIO()
    consent = always_yes(Console(file=out, width=COLUMNS))
    assert await consent(ConsentRequest(Kind.PURCHASE, 100, ORIGIN)) is True
    assert await consent(ConsentRequest(Kind.LOAD, 100, ORIGIN)) is True
    assert await consent(ConsentRequest(Kind.SHARE, 0, ORIGIN, files=(0x16,))) is False
    assert "not shared" in out.getvalue() and "your name and ID number" in out.getvalue()
