"""Both ways to top up a card, end to end in Chromium (issue 12): value only for money paid.

Real settlement and shop (uvicorn processes, see conftest), the real agent with an emulated
card: at the till, staff sign in, record the cash and load it onto the card on the till's
reader (the float pays for it); online, the cardholder orders a bank transfer, the operator
imports the bank statement that pays it, and the page loads the card. A screenshot of each
goes to docs/img/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from tests.e2e.conftest import Shopper
from webpurse.card.image import ImageFile
from webpurse.demo import DemoStack

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
TIMEOUT = 30_000  # ms


def balance(shopper: Shopper) -> int:
    return ImageFile(shopper.image).load().balance


def card_number(shopper: Shopper) -> str:
    return ImageFile(shopper.image).load().serial.hex().upper()


async def new_page(browser: Browser) -> Page:
    context = await browser.new_context(locale="en-GB", viewport={"width": 1100, "height": 900})
    return await context.new_page()


def float_balance(stack: DemoStack) -> int:
    with stack.settlement_client() as client:
        answer = client.get("/v1/float")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["balance"])


def load(stack: DemoStack, load_id: str) -> dict[str, Any]:
    with stack.settlement_client() as client:
        body: dict[str, Any] = client.get(f"/v1/loads/{load_id}").json()
    return body


async def status_of(page: Page, stack: DemoStack, order_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await (
        await page.request.get(f"{stack.merchant_url}/orders/{order_id}/status")
    ).json()
    return body


@pytest.mark.balance(0)
async def test_cash_at_the_till_staff_sign_in_and_load_the_card(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    assert stack.state is not None
    float_before = float_balance(stack)
    page = await new_page(browser)
    await page.goto(f"{stack.merchant_url}/staff")
    await expect(page.locator("[data-testid=staff-signin]")).to_be_visible()
    await page.fill("[data-testid=staff-name]", stack.state.staff_name)
    await page.fill("[data-testid=staff-password]", stack.state.staff_password)
    await page.click("[data-testid=staff-signin]")
    await expect(page.locator("[data-testid=staff-who]")).to_have_text(stack.state.staff_name)
    await expect(page.locator("[data-testid=float-balance]")).to_contain_text("¥")
    await page.fill("[data-testid=cash]", "200")
    await page.click("[data-testid=load-cash]")
    # The payment page on the till: the till's agent pairs like a shopper's and loads.
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Loaded. Your new balance is on the card.", timeout=TIMEOUT)
    order_id = await page.get_attribute("#pay", "data-order")
    assert order_id is not None
    await page.goto(f"{stack.merchant_url}/staff")
    await expect(page.locator(f"[data-testid=till-{order_id}]")).to_contain_text("Loaded")
    await page.screenshot(path=DOCS_IMG / "topup-till.png", full_page=True)
    status = await status_of(page, stack, order_id)
    assert (status["status"], status["funding"]) == ("loaded", "merchant_float")
    assert balance(shopper) == 20_000
    assert load(stack, status["settlement_id"])["status"] == "succeeded"
    assert float_balance(stack) == float_before - 20_000  # the float paid for the value
    await page.goto(f"{stack.merchant_url}/staff/report")
    name = stack.state.staff_name
    await expect(page.locator(f"[data-testid=cash-{name}]")).to_have_text("¥200.00")
    await expect(page.locator(f"[data-testid=loaded-{name}]")).to_have_text("¥200.00")
    await page.screenshot(path=DOCS_IMG / "shift-report.png", full_page=True)
    assert stack.ledger_check()["ok"]


@pytest.mark.balance(0)
async def test_online_bank_transfer_statement_import_then_load(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    page = await new_page(browser)
    await page.goto(f"{stack.merchant_url}/topup")
    await page.click("[data-testid=method-cash]")
    await expect(page.locator("[data-testid=cash-help]")).to_be_visible()
    await page.click("[data-testid=method-bank_transfer]")
    # The card number, read off the card through the shopper's agent (or typed).
    await page.click("[data-testid=read-card]")
    await expect(page.locator("[data-testid=card-number]")).to_have_value(
        card_number(shopper), timeout=TIMEOUT
    )
    await page.click("[data-testid=topup-5000]")
    reference = page.locator("[data-testid=payment-reference]")
    await expect(reference).to_be_visible(timeout=TIMEOUT)
    ref = await reference.get_attribute("data-reference") or ""
    assert ref.startswith("RF")
    await expect(page.locator("[data-testid=transfer-message]")).to_have_text(
        "Waiting for your transfer…"
    )
    await page.locator("#transfer").screenshot(path=DOCS_IMG / "topup-transfer.png")
    order_id = await page.get_attribute("#transfer", "data-order")
    assert order_id is not None
    assert balance(shopper) == 0  # nothing before the money
    # The bank's statement arrives; the operator imports it.
    summary = stack.import_statement([(f"top-up {ref}", 5000)])
    assert [m["reference"] for m in summary["matched"]] == [ref], summary
    await expect(page.locator("[data-testid=transfer-message]")).to_have_text(
        "Your money has arrived: load it onto your card now.", timeout=TIMEOUT
    )
    await page.click("[data-testid=load-now]")
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Loaded. Your new balance is on the card.", timeout=TIMEOUT)
    await page.locator("#pay").screenshot(path=DOCS_IMG / "topup-online.png")
    status = await status_of(page, stack, order_id)
    assert (status["status"], status["funding"]) == ("loaded", "bank_transfer")
    assert balance(shopper) == 5000
    assert load(stack, status["settlement_id"])["status"] == "succeeded"
    # The receipt link opens the finished top-up; a second load is impossible.
    await page.goto(f"{stack.merchant_url}/orders/{order_id}/pay")
    await expect(page.locator("[data-testid=order-status]")).to_have_text("Loaded")
    assert balance(shopper) == 5000
    assert stack.ledger_check()["ok"]
