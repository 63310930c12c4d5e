"""An anonymous guesser at the staff sign-in must not stall the shop.

A sign-in verifies an Argon2id hash: tens of milliseconds of CPU each. Verified on the
shop's event loop, a burst of guesses held every other request back, the balancer's health
checks (1 s) included, and HAProxy took the whole shop out of service (seen as 503s in
``test_attacks_proxy`` on a loaded machine). The verification runs off the loop now.

The hasher here blocks inside ``verify`` until the test lets it go, so the test knows a
sign-in is mid-verification (no timing) and asks for ``/health`` meanwhile: answered at
once when the loop is free; with the verification on the loop, ``/health`` could only be
answered after the hasher gave up waiting, which the test sees and fails.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher

from tests.merchant.fakes import FakeSettlement
from tests.proof.conftest import Proof
from webpurse.merchant.app import create_app
from webpurse.merchant.settings import MerchantSettings

SUITE = "attacks_signin"
PASSWORD = "correct horse battery"
PATIENCE = 20.0  # seconds the blocked hasher waits at most (a safety valve, not a sync)


class HeldHasher(PasswordHasher):
    """A fast Argon2id hasher whose ``verify`` waits for the test's word."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.gave_up = False

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.entered.set()
        if not self.release.wait(PATIENCE):
            self.gave_up = True
        return super().verify(hash, password)


async def test_a_sign_in_being_verified_does_not_stall_the_shop(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "anonymous visitor: staff sign-in guesses, each costing an Argon2id verification, "
        "while the balancer checks /health",
        expected="/health answers while a verification runs (it is off the event loop); "
        "the guess is then refused 401",
    ) as row:
        hasher = HeldHasher()
        settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32)
        app: Any = create_app(settings, settlement=FakeSettlement(), password_hasher=hasher)
        app.state.till.staff.add("mei", PASSWORD)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as shop:
            page = await shop.get("/staff/signin")
            match = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert match
            guess = asyncio.create_task(
                shop.post(
                    "/staff/signin",
                    data={"name": "mei", "password": "guess", "csrf": match.group(1)},
                )
            )
            assert await asyncio.to_thread(hasher.entered.wait, PATIENCE)
            health = await shop.get("/health")
            answered_mid_verification = not hasher.gave_up and not hasher.release.is_set()
            hasher.release.set()
            refused = await guess
        await app.state.cashier.close()
        assert health.status_code == 200
        assert answered_mid_verification, "the shop answered only after the verification"
        assert refused.status_code == 401
        row.observed = (
            f"/health {health.status_code} while the guess was being verified; "
            f"the guess {refused.status_code}"
        )
