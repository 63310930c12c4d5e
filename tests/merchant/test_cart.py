"""The signed cart cookie: round trip, tampering, limits."""

from __future__ import annotations

import pytest

from webpurse.merchant.cart import MAX_QUANTITY, Cart

SECRET = b"s" * 32


def test_cart_round_trips_through_its_signed_cookie() -> None:
    cart = Cart()
    cart.add("tea")
    cart.add("tea")
    cart.add("bun", 3)
    again = Cart.decode(cart.encode(SECRET), SECRET)
    assert again.items == {"tea": 2, "bun": 3}
    assert again.total == 2 * 3800 + 3 * 350 and again.count == 5


def test_a_cookie_signed_with_another_secret_or_edited_is_an_empty_cart() -> None:
    cart = Cart({"tea": 1})
    cookie = cart.encode(SECRET)
    assert Cart.decode(cookie, b"t" * 32).items == {}
    payload, signature = cookie.split(".")
    assert Cart.decode(payload[:-2] + "xx." + signature, SECRET).items == {}
    assert Cart.decode("not a cookie", SECRET).items == {}
    assert Cart.decode(None, SECRET).items == {}


def test_unknown_products_are_refused_and_quantities_capped() -> None:
    cart = Cart()
    with pytest.raises(KeyError):
        cart.add("caviar")
    cart.add("tea", 1000)
    assert cart.items["tea"] == MAX_QUANTITY
    cart.set("tea", 0)
    assert cart.items == {}
