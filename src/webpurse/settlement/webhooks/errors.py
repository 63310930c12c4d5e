"""Webhook failures: the exception classes and their stable machine codes."""

from __future__ import annotations


class WebhookError(Exception):
    """Base class of webhook failures; ``code`` is the stable machine code."""

    code = "webhook_error"


class WebhookVerificationError(WebhookError):
    """A delivery that must not be trusted. Subclasses say why."""

    code = "webhook_verification_failed"


class MissingHeaderError(WebhookVerificationError):
    """A Standard Webhooks header is absent or empty."""

    code = "webhook_missing_header"


class InvalidTimestampError(WebhookVerificationError):
    """``webhook-timestamp`` is not an integer, or too far from now (stale or future)."""

    code = "webhook_invalid_timestamp"


class InvalidSignatureError(WebhookVerificationError):
    """No ``v1`` signature in ``webhook-signature`` matches the body under the secret."""

    code = "webhook_invalid_signature"


class TargetNotAllowedError(WebhookError):
    """A webhook URL whose host is, or resolves to, an address that is not public (SSRF)."""

    code = "webhook_url_not_allowed"


class InvalidSecretError(WebhookError, ValueError):
    """A secret that is not ``whsec_<base64>``."""

    code = "webhook_invalid_secret"
