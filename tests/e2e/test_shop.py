"""The shop in a real browser: buy, be declined, be interrupted, top up (pytest -m browser)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, expect

from tests.e2e.conftest import ARTIFACTS, Shopper
from webpurse.card.image import ImageFile
from webpurse.demo import DemoStack
from webpurse.merchant.i18n import format_fen
from webpurse.protocol.commands import INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import Fault

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

PAY_TIMEOUT = 30_000  # ms; each step normally takes well under a second


def balance(shopper: Shopper) -> int:
    return ImageFile(shopper.image).load().balance


async def new_page(browser: Browser, locale: str = "en-GB") -> Page:
    context = await browser.new_context(locale=locale, viewport={"width": 1100, "height": 900})
    return await context.new_page()


async def order_status(page: Page) -> dict[str, Any]:
    order_id = await page.get_attribute("#pay", "data-order")
    origin = "/".join(page.url.split("/")[:3])
    response = await page.request.get(f"{origin}/orders/{order_id}/status")
    body: dict[str, Any] = await response.json()
    return body


def settlement_object(stack: DemoStack, kind: str, object_id: str) -> dict[str, Any]:
    with stack.settlement_client() as client:
        response = client.get(f"/v1/{kind}/{object_id}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def webhook_delivered(stack: DemoStack, event_type: str, object_id: str) -> bool:
    """Settlement delivered the event to the shop, which verified it (204; forged → 400)."""
    for _ in range(150):
        with stack.settlement_client() as client:
            events = client.get("/v1/events", params={"type": event_type, "limit": 100}).json()
        for event in events["data"]:
            if event["data"]["object"]["id"] != object_id:
                continue
            for delivery in event["deliveries"]:
                if delivery["status"] == "succeeded":
                    return bool(delivery["last_status_code"] == 204)
        await asyncio.sleep(0.1)
    return False


def ledger_ok(stack: DemoStack) -> None:
    report = stack.ledger_check()
    assert report["ok"], report["problems"]


async def buy(page: Page, stack: DemoStack, *products: str) -> None:
    for product in products:
        await page.goto(f"{stack.merchant_url}/")
        await page.click(f"[data-testid=add-{product}]")
        await expect(page.locator(f"[data-testid=line-{product}]")).to_be_visible()
    await page.click("[data-testid=checkout]")
    await expect(page.locator("#pay")).to_be_visible()


async def test_purchase_in_the_browser_pays_and_debits_the_card_once(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    page = await new_page(browser)
    await buy(page, stack, "tea", "bun")
    await expect(page.locator("[data-testid=cart-total]")).to_have_count(0)
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
    await page.screenshot(path=ARTIFACTS / "e2e-paid.png", full_page=True)
    await page.locator("#pay").screenshot(path=ARTIFACTS / "payment.png")  # README's picture
    status = await order_status(page)
    assert status["status"] == "paid"
    assert status["amount"] == 3800 + 350
    assert status["round_trips"] == 2
    assert balance(shopper) == before - 4150
    payment = settlement_object(stack, "payments", status["settlement_id"])
    assert payment["status"] == "succeeded" and payment["tac"] == status["tac"]
    ledger_ok(stack)
    assert await webhook_delivered(stack, "payment.succeeded", payment["id"])
    await page.click("[data-testid=receipt-link]")
    await expect(page.locator("[data-testid=order-status]")).to_have_text("Paid")
    await expect(page.locator("[data-testid=balance-after]")).to_have_text(
        format_fen(before - 4150)
    )
    await page.screenshot(path=ARTIFACTS / "e2e-receipt.png", full_page=True)
    await page.goto(f"{stack.merchant_url}/orders")
    await expect(page.locator(f"[data-testid=order-{status['id']}]")).to_contain_text("Paid")
    await page.screenshot(path=ARTIFACTS / "e2e-orders.png", full_page=True)


@pytest.mark.balance(1000)
async def test_insufficient_funds_is_declined_with_the_reason(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    page = await new_page(browser, locale="zh-CN")
    await buy(page, stack, "lantern")
    await expect(page.locator("[data-testid=pay-message]")).to_have_text(
        "已拒绝", timeout=PAY_TIMEOUT
    )
    await expect(page.locator("[data-testid=pay-detail]")).to_have_text("卡内余额不足")
    await expect(page.locator("[data-testid=retry]")).to_be_visible()
    await page.screenshot(path=ARTIFACTS / "e2e-declined-zh.png", full_page=True)
    status = await order_status(page)
    assert (status["status"], status["decline_code"]) == ("declined", "insufficient_funds")
    assert balance(shopper) == 1000
    assert settlement_object(stack, "payments", status["settlement_id"])["status"] != "succeeded"
    ledger_ok(stack)


async def test_interrupted_debit_asks_for_the_card_again_and_ends_paid_once(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    shopper.reader.inject(Fault.after(INS_DEBIT_FOR_PURCHASE))
    page = await new_page(browser)
    await buy(page, stack, "umbrella")
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Interrupted: present the card again.", timeout=PAY_TIMEOUT)
    await page.screenshot(path=ARTIFACTS / "e2e-interrupted.png", full_page=True)
    status = await order_status(page)
    assert status["status"] == "interrupted"
    assert settlement_object(stack, "payments", status["settlement_id"])["status"] == "uncertain"
    assert balance(shopper) == before - 4500  # the DEBIT reached the card before it left
    shopper.reader.insert()
    await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
    await page.screenshot(path=ARTIFACTS / "e2e-recovered.png", full_page=True)
    status = await order_status(page)
    assert status["status"] == "paid"
    assert balance(shopper) == before - 4500  # debited once, not twice
    payment = settlement_object(stack, "payments", status["settlement_id"])
    assert payment["status"] == "succeeded"
    ledger_ok(stack)


async def test_phone_sized_payment_page_in_chinese(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    context = await browser.new_context(
        locale="zh-CN", viewport={"width": 390, "height": 844}, device_scale_factor=2
    )
    page = await context.new_page()
    await page.goto(f"{stack.merchant_url}/")
    await page.screenshot(path=ARTIFACTS / "e2e-catalogue-phone-zh.png")
    await buy(page, stack, "dumplings")
    await expect(page.locator("[data-testid=pay-message]")).to_have_text(
        "付款成功，谢谢！", timeout=PAY_TIMEOUT
    )
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "the payment page scrolls sideways on a phone"
    await page.screenshot(path=ARTIFACTS / "e2e-paid-phone-zh.png", full_page=True)
    async with httpx.AsyncClient(base_url=stack.merchant_url) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}


@pytest.mark.no_loopback
async def test_short_code_pairs_an_agent_the_page_cannot_reach(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    page = await new_page(browser)
    await buy(page, stack, "notebook")
    await expect(page.locator("#agent-error")).to_be_visible(timeout=PAY_TIMEOUT)
    await expect(page.locator("[data-testid=pay-message]")).to_have_text("Waiting for your reader…")
    # The other device's reader is a visible choice (patent claims 2 and 10), remembered.
    await page.click("[data-testid=reader-other]")
    await expect(page.locator("#agent-error")).to_be_hidden()
    await expect(page.locator("#connect")).to_be_hidden()
    await expect(page.locator("#pairing [data-for=other]")).to_be_visible()
    await page.screenshot(path=ARTIFACTS / "e2e-short-code.png", full_page=True)
    code = "".join((await page.inner_text("[data-testid=short-code]")).split())
    assert code.isalnum() and len(code) == 8
    await shopper.agent.pair(f"{stack.merchant_url}/reader", code=code)
    await expect(page.locator("[data-testid=pay-message]")).to_have_text(
        "Paid. Thank you!", timeout=PAY_TIMEOUT
    )
    assert balance(shopper) == before - 1250
    await buy(page, stack, "tea")  # the next payment page remembers the choice
    await expect(page.locator("[data-testid=reader-other]")).to_be_checked()
    await expect(page.locator("#pairing [data-for=other]")).to_be_visible()
    await expect(page.locator("#agent-error")).to_be_hidden()  # it did not try this device


async def test_a_debit_lost_before_the_card_is_released_then_paid_in_a_new_session(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    shopper.reader.inject(Fault.before(INS_DEBIT_FOR_PURCHASE))
    page = await new_page(browser)
    await buy(page, stack, "fan")
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Interrupted: present the card again.", timeout=PAY_TIMEOUT)
    first = await order_status(page)
    assert balance(shopper) == before  # the DEBIT never reached the card
    shopper.reader.insert()
    await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
    status = await order_status(page)
    assert status["settlement_id"] != first["settlement_id"]
    assert settlement_object(stack, "payments", first["settlement_id"])["status"] == "canceled"
    assert settlement_object(stack, "payments", status["settlement_id"])["status"] == "succeeded"
    assert balance(shopper) == before - 2450
    ledger_ok(stack)


@pytest.mark.refuse_consent
async def test_saying_no_on_the_agent_declines_and_takes_nothing(
    stack: DemoStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    page = await new_page(browser)
    await buy(page, stack, "mug")
    await expect(page.locator("[data-testid=pay-message]")).to_have_text(
        "Declined", timeout=PAY_TIMEOUT
    )
    await expect(page.locator("[data-testid=pay-detail]")).to_have_text(
        "you declined on your device"
    )
    status = await order_status(page)
    assert (status["status"], status["decline_code"]) == ("declined", "consent_refused")
    assert settlement_object(stack, "payments", status["settlement_id"])["status"] == "canceled"
    assert balance(shopper) == before
    ledger_ok(stack)
