"""Webhook verification: settlement's verify when installed, and the built-in fallback."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from webpurse.merchant.webhooks import WebhookRejected, _local_verify, verify_delivery

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()
NOW = 1_800_000_000
BODY = b'{"id":"evt_1","type":"payment.succeeded"}'


def headers(secret: str = SECRET, ts: int = NOW, extra: str = "") -> dict[str, str]:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"msg_1.{ts}.".encode() + BODY, hashlib.sha256).digest()
    signature = f"v1,{base64.b64encode(digest).decode()}"
    return {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(ts),
        "Webhook-Signature": f"{extra} {signature}".strip(),
    }


@pytest.mark.parametrize("verify", [verify_delivery, _local_verify])
def test_genuine_deliveries_pass_even_among_rotated_signatures(verify: object) -> None:
    assert callable(verify)
    verify(SECRET, headers(), BODY, NOW)
    verify(SECRET, headers(extra="v1,AAAA"), BODY, NOW + 299)


@pytest.mark.parametrize("verify", [verify_delivery, _local_verify])
@pytest.mark.parametrize(
    ("hdrs", "body", "now"),
    [
        (headers(), BODY + b" ", NOW),  # body changed
        (headers(secret="whsec_" + base64.b64encode(b"x" * 20).decode()), BODY, NOW),
        (headers(ts=NOW - 301), BODY, NOW),  # stale
        (headers(ts=NOW + 301), BODY, NOW),  # from the future
        ({"webhook-id": "msg_1"}, BODY, NOW),  # headers missing
    ],
)
def test_forged_stale_or_incomplete_deliveries_are_rejected(
    verify: object, hdrs: dict[str, str], body: bytes, now: int
) -> None:
    assert callable(verify)
    with pytest.raises(WebhookRejected):
        verify(SECRET, hdrs, body, now)
