"""Webhook verification: settlement's verify when installed, and the built-in fallback."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from webpurse.merchant.webhooks import SeenEvents, WebhookRejected, _local_verify, verify_delivery

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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_seen_events_keep_at_most_max_size_ids_least_recently_delivered_first() -> None:
    seen = SeenEvents(max_size=3, max_age=60, clock=Clock())
    for event_id in ("evt_1", "evt_2", "evt_3"):
        seen.add(event_id)
    assert "evt_1" in seen  # redelivered: now the most recent
    seen.add("evt_4")

    assert len(seen) == 3
    assert "evt_2" not in seen  # the least recently delivered went first
    assert all(e in seen for e in ("evt_1", "evt_3", "evt_4"))


def test_seen_events_are_forgotten_max_age_after_their_last_delivery() -> None:
    clock = Clock()
    seen = SeenEvents(max_size=100, max_age=60, clock=clock)
    for n in range(50):
        seen.add(f"evt_{n}")
    clock.now += 30
    assert "evt_0" in seen  # delivered again: kept another 60 s
    clock.now += 59
    assert "evt_0" in seen and "evt_1" not in seen
    assert len(seen) == 1
    clock.now += 60
    assert "evt_0" not in seen and len(seen) == 0
