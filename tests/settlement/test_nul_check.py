"""The request bodies' U+0000 check (schemas._holds_nul) finds a NUL wherever it is.

Its flat-object fast path must answer as the plain recursive definition does, for any
JSON-shaped value: strings, numbers, booleans, null, lists and objects, nested."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from webpurse.settlement.schemas import _holds_nul

TEXT = st.text(st.sampled_from("ab\x00é"), max_size=4)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(TEXT, inner, max_size=3)
    ),
    max_leaves=12,
)


def _reference(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_reference(k) or _reference(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_reference(v) for v in value)
    return False


@given(JSON)
def test_the_check_answers_as_the_recursive_definition(value: Any) -> None:
    assert _holds_nul(value) is _reference(value)


def test_a_nul_anywhere_is_found() -> None:
    assert _holds_nul({"a": "x\x00"})
    assert _holds_nul({"a\x00": "x"})
    assert _holds_nul({"a": {"b": ["c", "\x00"]}})
    assert _holds_nul({1: "x", (2, "\x00"): "y"})  # keys of any hashable type
    assert not _holds_nul({"a": "x", "b": [1, None, {"c": "d"}]})
