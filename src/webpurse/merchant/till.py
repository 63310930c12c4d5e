"""The till: shop staff sign in, record the cash they took, and load it onto the card.

Routes under ``/staff`` (added to the shop by :func:`add_staff_routes`):

- ``GET/POST /staff/signin``: name and password (Argon2id), a CSRF token bound to a
  pre-session cookie, attempts limited per account and per client address;
- ``GET /staff``: the float at settlement (and a banner when it runs low, from the balance
  or a ``float.low`` webhook), the cash form, today's till top-ups;
- ``POST /staff/topups``: the cash taken becomes a top-up order funded by the merchant's
  float (``merchant_float``), whose load runs on the till's own reader through the usual
  payment page (an agent on the till's PC, paired like a shopper's);
- ``GET /staff/report``: the shift report (cash taken against loads made, per staff
  member) and the day's audit trail;
- ``POST /staff/signout``.

Every POST needs the session and its CSRF token; a request without either is refused
(403), logged, and changes nothing. Every staff action is written to the audit trail.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from webpurse.merchant.cashier import Cashier
from webpurse.merchant.orders import CANCELED, TOPUP, OrderBook
from webpurse.merchant.security import RateLimiter, RedisRateLimiter, parse_yuan, sign, unsign
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import MERCHANT_FLOAT, FloatBalance, SettlementError
from webpurse.merchant.staff import SignedIn, StaffBook, shift_report, totals

log = logging.getLogger(__name__)

STAFF_COOKIE = "wp_staff"
PRE_COOKIE = "wp_staff_pre"
SESSION_PURPOSE = "staff-session"
MIN_CASH = 100  # ¥1
MAX_CASH = 100_000  # ¥1,000: more is a matter for the office, not the till
ACCOUNT_FAILURES = 5
ADDRESS_FAILURES = 20
WINDOW = 15 * 60.0


@dataclass
class FloatAlert:
    """The last ``float.low`` event settlement sent (the till shows it until refilled)."""

    balance: int
    low_threshold: int


@dataclass
class TillState:
    staff: StaffBook
    by_account: RateLimiter | RedisRateLimiter
    by_address: RateLimiter | RedisRateLimiter
    float_alert: FloatAlert | None = None


Render = Callable[..., Response]


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def add_staff_routes(
    app: FastAPI,
    *,
    settings: MerchantSettings,
    orders: OrderBook,
    cashier: Cashier,
    till: TillState,
    render: Render,
    session_id: Callable[[Request], str],
    finish: Callable[[Request, Response], Response],
) -> None:
    staff = till.staff

    def secure(request: Request) -> bool:
        return request.url.scheme == "https" or settings.public_url.startswith("https://")

    def signed_in(request: Request) -> SignedIn | None:
        sid = unsign(settings.cookie_secret, SESSION_PURPOSE, request.cookies.get(STAFF_COOKIE))
        return staff.session(sid)

    def require(request: Request, csrf: str | None) -> SignedIn:
        """The signed-in staff member of a POST with its CSRF token, else 403 (logged)."""
        who = signed_in(request)
        if who is None:
            log.warning(
                "staff POST %s without a session from %s", request.url.path, _client(request)
            )
            raise HTTPException(403, "staff sign-in required")
        if not csrf or not secrets.compare_digest(csrf.encode(), who.csrf_token.encode()):
            log.warning(
                "staff POST %s by %s without a valid CSRF token", request.url.path, who.name
            )
            staff.audit(
                who.name, "csrf_refused", {"path": request.url.path}, client=_client(request)
            )
            raise HTTPException(403, "missing or wrong CSRF token")
        return who

    async def float_now() -> tuple[FloatBalance | None, str | None]:
        try:
            return await cashier.settlement.float_balance(), None
        except SettlementError as exc:
            log.warning("could not read the float at settlement: %s", exc)
            return None, str(exc)

    def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        return start, start + dt.timedelta(days=1)

    async def till_page(
        request: Request, who: SignedIn, status_code: int = 200, **extra: Any
    ) -> Response:
        balance, float_error = await float_now()
        alert = till.float_alert
        if balance is not None and alert is not None and not balance.is_low:
            till.float_alert = alert = None  # refilled since the warning
        since, until = day_bounds(dt.datetime.now(dt.UTC).date())
        return render(
            request,
            "staff.html",
            status_code=status_code,
            who=who,
            float_balance=balance,
            float_error=float_error,
            float_low=(balance is not None and balance.is_low) or alert is not None,
            recent=list(reversed(orders.till_orders(since, until)))[:20],
            **extra,
        )

    @app.get("/staff/signin")
    async def signin_page(request: Request) -> Response:
        if signed_in(request) is not None:
            return RedirectResponse("/staff", status_code=303)
        pre = secrets.token_urlsafe(24)
        response = render(request, "staff_signin.html", csrf=pre)
        response.set_cookie(
            PRE_COOKIE, pre, max_age=3600, httponly=True, samesite="lax", secure=secure(request)
        )
        return response

    @app.post("/staff/signin")
    async def signin(
        request: Request,
        name: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=256)],
        csrf: Annotated[str, Form(max_length=128)] = "",
    ) -> Response:
        client = _client(request)
        pre = request.cookies.get(PRE_COOKIE, "")
        if not pre or not csrf or not secrets.compare_digest(pre.encode(), csrf.encode()):
            log.warning("staff sign-in from %s without a valid CSRF token", client)
            raise HTTPException(403, "missing or wrong CSRF token")
        account, address = f"name:{name.lower()}", f"addr:{client}"
        wait = max(
            await till.by_account.refused_for(account), await till.by_address.refused_for(address)
        )
        if wait:
            log.warning("staff sign-in as %r from %s refused: too many attempts", name, client)
            staff.audit(name, "signin_limited", {}, client=client)
            response = render(
                request, "staff_signin.html", status_code=429, csrf=pre, error="signin_limited"
            )
            response.headers["Retry-After"] = str(wait)
            return response
        member = staff.authenticate(name, password)
        if member is None:
            await till.by_account.record_failure(account)
            await till.by_address.record_failure(address)
            log.info("staff sign-in as %r from %s failed", name, client)
            staff.audit(name, "signin_failed", {}, client=client)
            return render(
                request, "staff_signin.html", status_code=401, csrf=pre, error="signin_failed"
            )
        await till.by_account.clear(account)
        sid, who = staff.open_session(member)
        staff.audit(who.name, "signin", {}, client=client)
        response = RedirectResponse("/staff", status_code=303)
        response.set_cookie(
            STAFF_COOKIE,
            sign(settings.cookie_secret, SESSION_PURPOSE, sid),
            httponly=True,
            samesite="lax",
            secure=secure(request),
        )
        response.delete_cookie(PRE_COOKIE)
        return response

    @app.post("/staff/signout")
    async def signout(
        request: Request, csrf: Annotated[str, Form(max_length=128)] = ""
    ) -> Response:
        who = require(request, csrf)
        sid = unsign(settings.cookie_secret, SESSION_PURPOSE, request.cookies.get(STAFF_COOKIE))
        if sid:
            staff.close_session(sid)
        staff.audit(who.name, "signout", {}, client=_client(request))
        response = RedirectResponse("/staff/signin", status_code=303)
        response.delete_cookie(STAFF_COOKIE)
        return response

    @app.get("/staff")
    async def till_home(request: Request) -> Response:
        who = signed_in(request)
        if who is None:
            return RedirectResponse("/staff/signin", status_code=303)
        return await till_page(request, who)

    @app.post("/staff/topups")
    async def till_topup(
        request: Request,
        cash: Annotated[str, Form(max_length=32)],
        csrf: Annotated[str, Form(max_length=128)] = "",
    ) -> Response:
        who = require(request, csrf)
        client = _client(request)
        amount = parse_yuan(cash)
        if amount is None or not MIN_CASH <= amount <= MAX_CASH:
            log.info("till: %s typed %r, not an amount of cash", who.name, cash)
            staff.audit(who.name, "topup_refused", {"cash": cash[:32]}, client=client)
            return await till_page(request, who, status_code=422, error="bad_cash")
        order = orders.create(
            session_id=session_id(request),
            kind=TOPUP,
            amount=amount,
            funding=MERCHANT_FLOAT,
            staff_id=who.staff_id,
            cash_received=amount,
        )
        staff.audit(who.name, "cash_taken", {"order": order.id, "cash": amount}, client=client)
        try:
            order = await cashier.open_settlement(order, f"till top-up {order.id} by {who.name}")
        except SettlementError as exc:
            code = exc.code or "settlement_error"
            orders.update(order.id, status=CANCELED, decline_code=code)
            staff.audit(who.name, "topup_refused", {"order": order.id, "code": code}, client=client)
            log.warning("till top-up %s refused by settlement: %s", order.id, exc)
            error = "insufficient_float" if code == "insufficient_float" else "settlement_error"
            status = 409 if code == "insufficient_float" else 502
            return await till_page(request, who, status_code=status, error=error, refused=order)
        staff.audit(
            who.name,
            "load_created",
            {"order": order.id, "load": order.settlement_id, "amount": amount},
            client=client,
        )
        return finish(request, RedirectResponse(f"/orders/{order.id}/pay", status_code=303))

    @app.get("/staff/report")
    async def report(request: Request, day: str | None = None) -> Response:
        who = signed_in(request)
        if who is None:
            return RedirectResponse("/staff/signin", status_code=303)
        try:
            chosen = dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date()
        except ValueError:
            raise HTTPException(422, "day is YYYY-MM-DD") from None
        since, until = day_bounds(chosen)
        rows = shift_report(orders.till_orders(since, until), staff.names_by_id())
        staff.audit(who.name, "report_viewed", {"day": chosen.isoformat()}, client=_client(request))
        return render(
            request,
            "staff_report.html",
            who=who,
            day=chosen,
            rows=rows,
            total=totals(rows),
            audit=staff.audit_trail(since, until),
        )
