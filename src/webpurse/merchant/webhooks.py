"""Verifying settlement's webhooks (Standard Webhooks; docs/team/contracts.md).

Uses ``webpurse.settlement.webhooks.verify`` when it is installed; otherwise the same
check here: HMAC-SHA256 over ``id.timestamp.body`` with the base64 secret after
``whsec_``, compared in constant time, timestamps at most 5 minutes off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

TOLERANCE = 300


class WebhookRejected(Exception):
    """The delivery is not genuine (or too old): refuse it with 400 and change nothing."""


def _local_verify(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> None:
    lowered = {key.lower(): value for key, value in headers.items()}
    msg_id = lowered.get("webhook-id", "").strip()
    stamp = lowered.get("webhook-timestamp", "").strip()
    signatures = lowered.get("webhook-signature", "").strip()
    if not (msg_id and stamp and signatures):
        raise WebhookRejected("missing webhook headers")
    if not stamp.isdigit() or len(stamp) > 12:
        raise WebhookRejected("webhook-timestamp is not unix seconds")
    if abs(now - int(stamp)) > TOLERANCE:
        raise WebhookRejected("webhook-timestamp too far from now")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError as exc:
        raise WebhookRejected("webhook secret is not base64") from exc
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = ("v1," + base64.b64encode(digest).decode("ascii")).encode("ascii")
    matched = False
    for candidate in signatures.split():
        matched |= hmac.compare_digest(candidate.encode("utf-8", "replace"), expected)
    if not matched:
        raise WebhookRejected("no webhook-signature matches the body")


def verify_delivery(
    secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> None:
    """Raise :class:`WebhookRejected` unless the delivery is genuine and fresh."""
    when = time.time() if now is None else now
    try:
        from webpurse.settlement import webhooks as settlement_webhooks
    except ImportError:  # settlement not installed beside the merchant
        _local_verify(secret, headers, body, when)
        return
    try:
        settlement_webhooks.verify(secret, headers, body, when)
    except (settlement_webhooks.WebhookError, ValueError) as exc:
        raise WebhookRejected(str(exc)) from exc
