"""Money as ¥12.50 and the language choice (query, cookie, Accept-Language)."""

from __future__ import annotations

import pytest

from webpurse.merchant.i18n import STRINGS, choose_language, decline_text, format_fen


@pytest.mark.parametrize(
    ("fen", "text"),
    [(0, "¥0.00"), (5, "¥0.05"), (1250, "¥12.50"), (123456789, "¥1,234,567.89"), (-350, "-¥3.50")],
)
def test_amounts_are_yuan_with_two_decimals(fen: int, text: str) -> None:
    assert format_fen(fen) == text


@pytest.mark.parametrize(
    ("query", "cookie", "header", "lang"),
    [
        (None, None, None, "en"),
        (None, None, "zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        (None, None, "en-US,en;q=0.9,zh;q=0.8", "en"),
        (None, None, "fr-FR, zh-TW;q=0.5", "zh"),
        (None, None, "zh;q=0, en;q=0.1", "en"),
        (None, "zh", "en", "zh"),
        ("en", "zh", "zh-CN", "en"),
        ("xx", None, "zh-CN", "zh"),
        (None, None, "garbage;q=abc", "en"),
    ],
)
def test_language_choice(
    query: str | None, cookie: str | None, header: str | None, lang: str
) -> None:
    assert choose_language(query, cookie, header) == lang


def test_every_string_has_both_languages() -> None:
    for key, (en, zh) in STRINGS.items():
        assert en and zh, key


def test_unknown_decline_codes_still_read_well() -> None:
    assert decline_text("en", "insufficient_funds") == "insufficient funds on the card"
    assert decline_text("zh", "insufficient_funds") == "卡内余额不足"
    assert "counter_mismatch" in decline_text("en", "counter_mismatch")
