"""The batch's response, encoded once (issue 20): byte for byte what encoding each item's
body alone and joining the texts wrote, for fresh answers (non-ASCII and escapes
included), answers stored by reference (never encoded on their own) and replays of stored
bodies, which go out exactly as stored whatever encoder wrote them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from webpurse.settlement.batch import Item
from webpurse.settlement.routes_batch import encode_responses

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
BODY = st.dictionaries(TEXT, JSON, max_size=6)


def _before(items: list[Item]) -> bytes:
    """The response as the route wrote it before: each body's text, joined, then UTF-8."""
    responses = ",".join(
        f'{{"status":{status},"body":{body},"replayed":{"true" if replayed else "false"}}}'
        for status, body, replayed in ((i.answer[0], i.encoded, i.replayed) for i in items)  # type: ignore[index]
    )
    return f'{{"object":"batch","responses":[{responses}]}}'.encode()


def _now(items: list[Item]) -> bytes:
    return encode_responses([(i.answer[0], i.sent, i.replayed) for i in items])  # type: ignore[index]


def _item(index: int, status: int, body: dict[str, Any], stored: str | None = None) -> Item:
    item = Item(index, "/v1/payments", "create", None, None, f"key-{index}")
    item.answer = (status, body)
    if stored is not None:
        item.replayed, item._encoded = True, stored
    return item


def _stored_texts(body: dict[str, Any]) -> list[str]:
    """Texts a stored body may hold: this version's, and other encoders' spacing/escapes."""
    return [
        orjson.dumps(body).decode(),
        json.dumps(body),  # ", " and ": ", ASCII with \\u escapes
        json.dumps(body, ensure_ascii=False, indent=1),
    ]


ODD = {
    "id": "pay_é咖啡☕🎉",
    "description": 'quote " backslash \\ newline \n tab \t \u2028 \u2029 \x1f \x7f </script>',
    "metadata": {"ключ": "значение", "": "", "nested": [1, -2, None, True, False, {"a": []}]},
    "amount": 2**62,
    "decline_code": None,
}


def test_the_response_is_the_joined_texts_for_varied_answers() -> None:
    items = [
        _item(0, 201, ODD),
        _item(1, 200, {}),
        _item(2, 402, {"type": "about:blank", "code": "card_declined", "detail": "ü"}),
    ]
    items[0].as_of = "create"  # stored by reference: never encoded alone
    items += [_item(3 + n, 200, ODD, text) for n, text in enumerate(_stored_texts(ODD))]
    sent = _now(items)
    assert items[0]._encoded is None and items[1]._encoded is None
    assert sent == _before(items)
    for n, text in enumerate(_stored_texts(ODD)):  # a stored body goes out exactly as stored
        assert text.encode() in sent
        assert json.loads(sent)["responses"][3 + n] == {
            "status": 200,
            "body": ODD,
            "replayed": True,
        }


def test_an_empty_batch() -> None:
    assert _now([]) == _before([]) == b'{"object":"batch","responses":[]}'


@given(st.lists(st.tuples(st.sampled_from((200, 201, 402, 409, 422)), BODY, st.integers(0, 3))))
def test_the_response_is_the_joined_texts(answers: list[tuple[int, dict[str, Any], int]]) -> None:
    items = []
    for index, (status, body, how) in enumerate(answers):
        if how == 0:
            items.append(_item(index, status, body))
        elif how == 1:  # encoded already (a key stored with its text)
            items.append(_item(index, status, body))
            assert items[-1].encoded
        else:
            items.append(_item(index, status, body, _stored_texts(body)[how - 1]))
    assert _now(items) == _before(items)
