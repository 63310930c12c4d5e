"""Settlement's webhook deliveries: verified, deduplicated, then the object re-fetched."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from webpurse.merchant import i18n
from webpurse.merchant.till import FloatAlert
from webpurse.merchant.web import ShopDep
from webpurse.merchant.webhooks import WebhookRejected, verify_delivery

log = logging.getLogger("webpurse.merchant.app")

router = APIRouter()


@router.post("/webhooks/settlement")
async def settlement_webhook(request: Request, shop: ShopDep) -> Response:
    body = await request.body()
    if not shop.settings.webhook_secret:
        raise HTTPException(503, "webhooks are not configured")
    try:
        verify_delivery(shop.settings.webhook_secret, dict(request.headers), body)
    except WebhookRejected as exc:
        log.warning("rejected a webhook delivery: %s", exc)
        return JSONResponse({"error": "invalid_signature", "detail": str(exc)}, 400)
    try:
        event = json.loads(body)
        event_id = str(event["id"])
        obj = event["data"]["object"]
        if event.get("type") == "float.low":
            alert = FloatAlert(int(obj["balance"]), int(obj.get("low_threshold") or 0))
            object_id = ""
        else:
            object_id = str(obj["id"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "malformed_event"}, 400)
    if await shop.seen_events.seen(event_id):
        return Response(status_code=204)
    if not object_id:
        log.warning(
            "float.low: the top-up float at settlement is down to %s (threshold %s)",
            i18n.format_fen(alert.balance),
            i18n.format_fen(alert.low_threshold),
        )
        shop.till.float_alert = alert
        await shop.seen_events.remember(event_id)
        return Response(status_code=204)
    order = shop.orders.by_settlement_id(object_id)
    if order is not None:
        # Deliveries come in any order: re-fetch the object instead of trusting the body.
        await shop.cashier.refresh(order.id)
    await shop.seen_events.remember(
        event_id
    )  # only once handled: a failed delivery is retried in full
    return Response(status_code=204)
