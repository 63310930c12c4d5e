"""Webhooks: signed event notifications to merchants, delivered at least once from an outbox.

Standard Webhooks 1.0 (design/payments-api.md, "Webhooks"): each delivery carries
``webhook-id`` (the event id, stable across retries so receivers can dedupe),
``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>``, several space-separated while a
secret is rotated). The secret is ``whsec_<base64 of 32 random bytes>``; the key bytes are
the base64-decoded part after the prefix.

Layers, from pure to I/O:

- signing: :func:`sign`, :func:`verify`, :func:`new_secret` (pure; the merchant web server
  uses :func:`verify` to check what it receives);
- the retry schedule: :class:`RetryPolicy` (pure; exponential backoff with jitter, capped,
  given up after a maximum age);
- persistence: the ORM rows (endpoints, events, outbox, delivery attempts) and
  :func:`enqueue_event`, which writes an event and its outbox rows in the *caller's*
  transaction, so an event exists if and only if the state change that caused it committed;
- delivery targets: :func:`address_allowed` (pure) and :func:`check_target` refuse URLs whose
  host is or resolves to a private, loopback, link-local or otherwise non-public address
  (SSRF), at registration and again, pinned to the checked address, at every delivery
  (DNS rebinding), unless the operator allows private targets
  (``Settings.webhook_allow_private``);
- delivery: :func:`deliver_due` sends what is due with an injected HTTP client and clock;
  :class:`WebhookWorker` runs it in a loop inside the application's lifespan;
- retention: :func:`prune_delivered` forgets delivered messages, their attempt log and
  fully delivered events after :data:`DELIVERY_RETENTION` (called by the periodic sweep).

One noun per module: :mod:`.errors`, :mod:`.signing`, :mod:`.retry`, :mod:`.targets`,
:mod:`.bodies` (event types and bodies), :mod:`.secret_box`, :mod:`.tables`, :mod:`.outbox`
(enqueue and prune), :mod:`.delivery` (one claim/send/record pass) and :mod:`.worker`. This
package re-exports their public names, so ``from webpurse.settlement.webhooks import …`` keeps
working.
"""

from __future__ import annotations

from webpurse.settlement.webhooks.bodies import (
    EVENT_FILTER_RE,
    EVENT_TYPE_RE,
    EVENT_TYPES,
    event_body,
    event_matches,
)
from webpurse.settlement.webhooks.delivery import (
    DEFAULT_POLICY,
    DeliveryReport,
    SessionMaker,
    _claim_due,
    deliver_due,
)
from webpurse.settlement.webhooks.errors import (
    InvalidSecretError,
    InvalidSignatureError,
    InvalidTimestampError,
    MissingHeaderError,
    TargetNotAllowedError,
    WebhookError,
    WebhookVerificationError,
)
from webpurse.settlement.webhooks.outbox import (
    DELIVERY_RETENTION,
    PRUNE_BATCH,
    enqueue_event,
    event_bytes,
    event_fields,
    new_message,
    prune_delivered,
)
from webpurse.settlement.webhooks.retry import RetryPolicy
from webpurse.settlement.webhooks.secret_box import SecretBox
from webpurse.settlement.webhooks.signing import (
    DEFAULT_TOLERANCE,
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SECRET_PREFIX,
    SIGNATURE_VERSION,
    new_secret,
    secret_key,
    sign,
    signed_headers,
    verify,
)
from webpurse.settlement.webhooks.tables import (
    MessageStatus,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEvent,
    WebhookMessage,
    new_id,
)
from webpurse.settlement.webhooks.targets import (
    Resolver,
    address_allowed,
    check_target,
    resolve_host,
)
from webpurse.settlement.webhooks.worker import WebhookWorker

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_TOLERANCE",
    "DELIVERY_RETENTION",
    "EVENT_FILTER_RE",
    "EVENT_TYPES",
    "EVENT_TYPE_RE",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "PRUNE_BATCH",
    "SECRET_PREFIX",
    "SIGNATURE_VERSION",
    "DeliveryReport",
    "InvalidSecretError",
    "InvalidSignatureError",
    "InvalidTimestampError",
    "MessageStatus",
    "MissingHeaderError",
    "Resolver",
    "RetryPolicy",
    "SecretBox",
    "SessionMaker",
    "TargetNotAllowedError",
    "WebhookAttempt",
    "WebhookEndpoint",
    "WebhookError",
    "WebhookEvent",
    "WebhookMessage",
    "WebhookVerificationError",
    "WebhookWorker",
    "_claim_due",
    "address_allowed",
    "check_target",
    "deliver_due",
    "enqueue_event",
    "event_body",
    "event_bytes",
    "event_fields",
    "event_matches",
    "new_id",
    "new_message",
    "new_secret",
    "prune_delivered",
    "resolve_host",
    "secret_key",
    "sign",
    "signed_headers",
    "verify",
]
