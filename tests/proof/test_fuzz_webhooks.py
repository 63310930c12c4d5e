"""Hypothesis on the shop's webhook check: whatever headers and body arrive, the answer is
"genuine" only for a delivery signed with the shop's secret, and any other input is a
:class:`WebhookRejected` (a 400 at the endpoint) — never another exception (a 500)."""

from __future__ import annotations

import base64
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.proof.proof_table import Row, record
from webpurse.merchant.webhooks import WebhookRejected, verify_delivery
from webpurse.settlement.webhooks import signed_headers

SECRET = "whsec_" + base64.b64encode(b"s" * 24).decode()
NOW = 1_800_000_000
_COUNTS = {"rejected": 0, "accepted": 0}
_FIRST: list[float] = []

header_values = st.text(max_size=80) | st.sampled_from(
    ["", " ", "v1,", "v1,AAAA", "v2,x", str(NOW), str(NOW - 301), "1e9", "-1", "0x10"]
)


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(
    msg_id=header_values,
    stamp=header_values,
    signature=header_values,
    body=st.binary(max_size=64),
    sign=st.booleans(),
    tamper=st.booleans(),
)
def test_only_a_delivery_signed_with_the_secret_is_accepted(
    msg_id: str, stamp: str, signature: str, body: bytes, sign: bool, tamper: bool
) -> None:
    _FIRST[:] = _FIRST or [time.perf_counter()]
    headers = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    genuine = False
    if sign and msg_id.strip() and msg_id.isprintable() and msg_id.isascii():
        headers = signed_headers(SECRET, msg_id.strip(), NOW, body)
        genuine = not tamper
        if tamper:
            body += b"!"
    try:
        verify_delivery(SECRET, headers, body, now=NOW)
    except WebhookRejected:
        assert not genuine, "a genuine delivery was rejected"
        _COUNTS["rejected"] += 1
        return
    assert genuine, f"accepted a delivery not signed with the secret: {headers}"
    _COUNTS["accepted"] += 1


def test_record_the_webhook_fuzz_row() -> None:
    assert _COUNTS["accepted"] > 0 and _COUNTS["rejected"] > 0, _COUNTS
    record(
        Row(
            suite="fuzz-hypothesis",
            scenario="Hypothesis: the shop's webhook check fed arbitrary headers and bodies",
            expected="accepted only when signed with the secret; else WebhookRejected, no crash",
            observed=f"{_COUNTS['accepted']} genuine accepted, {_COUNTS['rejected']} rejected",
            passed=True,
            seconds=round(time.perf_counter() - _FIRST[0], 2),
        )
    )
