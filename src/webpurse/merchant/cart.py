"""The cart, kept in a signed cookie: no server state until checkout.

The cookie is ``base64url(json) . base64url(HMAC-SHA256)``; a cookie whose signature does
not match (tampered, or signed by another secret) is an empty cart, never an error page.
Prices are never stored in the cookie: they come from the catalogue at checkout.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from webpurse.merchant.catalogue import BY_ID, Product

COOKIE = "wp_cart"
MAX_QUANTITY = 20


@dataclass(frozen=True, slots=True)
class CartLine:
    product: Product
    quantity: int

    @property
    def subtotal(self) -> int:
        return self.product.price * self.quantity


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Cart:
    """Product id → quantity; unknown ids and silly quantities are dropped on load."""

    def __init__(self, items: dict[str, int] | None = None) -> None:
        self.items: dict[str, int] = {}
        for product_id, quantity in (items or {}).items():
            self.set(product_id, quantity)

    def set(self, product_id: str, quantity: int) -> None:
        if product_id not in BY_ID:
            raise KeyError(product_id)
        if quantity <= 0:
            self.items.pop(product_id, None)
        else:
            self.items[product_id] = min(quantity, MAX_QUANTITY)

    def add(self, product_id: str, quantity: int = 1) -> None:
        self.set(product_id, self.items.get(product_id, 0) + quantity)

    @property
    def lines(self) -> list[CartLine]:
        return [CartLine(BY_ID[pid], qty) for pid, qty in self.items.items()]

    @property
    def total(self) -> int:
        return sum(line.subtotal for line in self.lines)

    @property
    def count(self) -> int:
        return sum(self.items.values())

    def encode(self, secret: bytes) -> str:
        payload = json.dumps(self.items, separators=(",", ":"), sort_keys=True).encode()
        signature = hmac.new(secret, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(signature)}"

    @classmethod
    def decode(cls, cookie: str | None, secret: bytes) -> Cart:
        if not cookie or "." not in cookie:
            return cls()
        try:
            payload_text, signature_text = cookie.split(".", 1)
            payload = _unb64(payload_text)
            expected = hmac.new(secret, payload, hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(signature_text)):
                return cls()
            raw = json.loads(payload)
            if not isinstance(raw, dict):
                return cls()
            items = {
                str(k): int(v) for k, v in raw.items() if str(k) in BY_ID and isinstance(v, int)
            }
            return cls(items)
        except (ValueError, TypeError):
            return cls()
