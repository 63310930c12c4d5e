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
from starlette.concurrency import run_in_threadpool

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


def _day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


@dataclass
class _StaffRoutes:
    """The till's handlers, over the shop's order book, cashier and pages."""

    settings: MerchantSettings
    orders: OrderBook
    cashier: Cashier
    till: TillState
    render: Render
    session_id: Callable[[Request], str]
    finish: Callable[[Request, Response], Response]

    @property
    def staff(self) -> StaffBook:
        return self.till.staff

    def secure(self, request: Request) -> bool:
        return request.url.scheme == "https" or self.settings.public_url.startswith("https://")

    def signed_in(self, request: Request) -> SignedIn | None:
        sid = unsign(
            self.settings.cookie_secret, SESSION_PURPOSE, request.cookies.get(STAFF_COOKIE)
        )
        return self.staff.session(sid)

    def require(self, request: Request, csrf: str | None) -> SignedIn:
        """The signed-in staff member of a POST with its CSRF token, else 403 (logged)."""
        who = self.signed_in(request)
        if who is None:
            log.warning(
                "staff POST %s without a session from %s", request.url.path, _client(request)
            )
            raise HTTPException(403, "staff sign-in required")
        if not csrf or not secrets.compare_digest(csrf.encode(), who.csrf_token.encode()):
            log.warning(
                "staff POST %s by %s without a valid CSRF token", request.url.path, who.name
            )
            self.staff.audit(
                who.name, "csrf_refused", {"path": request.url.path}, client=_client(request)
            )
            raise HTTPException(403, "missing or wrong CSRF token")
        return who

    async def float_now(self) -> tuple[FloatBalance | None, str | None]:
        try:
            return await self.cashier.settlement.float_balance(), None
        except SettlementError as exc:
            log.warning("could not read the float at settlement: %s", exc)
            return None, str(exc)

    async def till_page(
        self, request: Request, who: SignedIn, status_code: int = 200, **extra: Any
    ) -> Response:
        balance, float_error = await self.float_now()
        alert = self.till.float_alert
        if balance is not None and alert is not None and not balance.is_low:
            self.till.float_alert = alert = None  # refilled since the warning
        since, until = _day_bounds(dt.datetime.now(dt.UTC).date())
        return self.render(
            request,
            "staff.html",
            status_code=status_code,
            who=who,
            float_balance=balance,
            float_error=float_error,
            float_low=(balance is not None and balance.is_low) or alert is not None,
            recent=list(reversed(self.orders.till_orders(since, until)))[:20],
            **extra,
        )

    async def signin_page(self, request: Request) -> Response:
        if self.signed_in(request) is not None:
            return RedirectResponse("/staff", status_code=303)
        pre = secrets.token_urlsafe(24)
        response = self.render(request, "staff_signin.html", csrf=pre)
        response.set_cookie(
            PRE_COOKIE,
            pre,
            max_age=3600,
            httponly=True,
            samesite="lax",
            secure=self.secure(request),
        )
        return response

    async def signin(
        self,
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
        till = self.till
        wait = max(
            await till.by_account.refused_for(account), await till.by_address.refused_for(address)
        )
        if wait:
            log.warning("staff sign-in as %r from %s refused: too many attempts", name, client)
            self.staff.audit(name, "signin_limited", {}, client=client)
            response = self.render(
                request, "staff_signin.html", status_code=429, csrf=pre, error="signin_limited"
            )
            response.headers["Retry-After"] = str(wait)
            return response
        # Argon2id costs tens of milliseconds of CPU: off the event loop, so a burst of
        # sign-ins (guessers included) cannot stall the shop's other requests or the
        # balancer's health checks, which would take the whole shop out of service.
        member = await run_in_threadpool(self.staff.authenticate, name, password)
        if member is None:
            await till.by_account.record_failure(account)
            await till.by_address.record_failure(address)
            log.info("staff sign-in as %r from %s failed", name, client)
            self.staff.audit(name, "signin_failed", {}, client=client)
            return self.render(
                request, "staff_signin.html", status_code=401, csrf=pre, error="signin_failed"
            )
        await till.by_account.clear(account)
        sid, who = self.staff.open_session(member)
        self.staff.audit(who.name, "signin", {}, client=client)
        response = RedirectResponse("/staff", status_code=303)
        response.set_cookie(
            STAFF_COOKIE,
            sign(self.settings.cookie_secret, SESSION_PURPOSE, sid),
            httponly=True,
            samesite="lax",
            secure=self.secure(request),
        )
        response.delete_cookie(PRE_COOKIE)
        return response

    async def signout(
        self, request: Request, csrf: Annotated[str, Form(max_length=128)] = ""
    ) -> Response:
        who = self.require(request, csrf)
        sid = unsign(
            self.settings.cookie_secret, SESSION_PURPOSE, request.cookies.get(STAFF_COOKIE)
        )
        if sid:
            self.staff.close_session(sid)
        self.staff.audit(who.name, "signout", {}, client=_client(request))
        response = RedirectResponse("/staff/signin", status_code=303)
        response.delete_cookie(STAFF_COOKIE)
        return response

    async def till_home(self, request: Request) -> Response:
        who = self.signed_in(request)
        if who is None:
            return RedirectResponse("/staff/signin", status_code=303)
        return await self.till_page(request, who)

    async def till_topup(
        self,
        request: Request,
        cash: Annotated[str, Form(max_length=32)],
        csrf: Annotated[str, Form(max_length=128)] = "",
    ) -> Response:
        who = self.require(request, csrf)
        client = _client(request)
        staff = self.staff
        amount = parse_yuan(cash)
        if amount is None or not MIN_CASH <= amount <= MAX_CASH:
            log.info("till: %s typed %r, not an amount of cash", who.name, cash)
            staff.audit(who.name, "topup_refused", {"cash": cash[:32]}, client=client)
            return await self.till_page(request, who, status_code=422, error="bad_cash")
        order = self.orders.create(
            session_id=self.session_id(request),
            kind=TOPUP,
            amount=amount,
            funding=MERCHANT_FLOAT,
            staff_id=who.staff_id,
            cash_received=amount,
        )
        staff.audit(who.name, "cash_taken", {"order": order.id, "cash": amount}, client=client)
        try:
            order = await self.cashier.open_settlement(
                order, f"till top-up {order.id} by {who.name}"
            )
        except SettlementError as exc:
            code = exc.code or "settlement_error"
            self.orders.update(order.id, status=CANCELED, decline_code=code)
            staff.audit(who.name, "topup_refused", {"order": order.id, "code": code}, client=client)
            log.warning("till top-up %s refused by settlement: %s", order.id, exc)
            error = "insufficient_float" if code == "insufficient_float" else "settlement_error"
            status = 409 if code == "insufficient_float" else 502
            return await self.till_page(
                request, who, status_code=status, error=error, refused=order
            )
        staff.audit(
            who.name,
            "load_created",
            {"order": order.id, "load": order.settlement_id, "amount": amount},
            client=client,
        )
        return self.finish(request, RedirectResponse(f"/orders/{order.id}/pay", status_code=303))

    async def report(self, request: Request, day: str | None = None) -> Response:
        who = self.signed_in(request)
        if who is None:
            return RedirectResponse("/staff/signin", status_code=303)
        try:
            chosen = dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date()
        except ValueError:
            raise HTTPException(422, "day is YYYY-MM-DD") from None
        since, until = _day_bounds(chosen)
        rows = shift_report(self.orders.till_orders(since, until), self.staff.names_by_id())
        self.staff.audit(
            who.name, "report_viewed", {"day": chosen.isoformat()}, client=_client(request)
        )
        return self.render(
            request,
            "staff_report.html",
            who=who,
            day=chosen,
            rows=rows,
            total=totals(rows),
            audit=self.staff.audit_trail(since, until),
        )


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
    """Mount the till's ``/staff`` routes on the shop."""
    routes = _StaffRoutes(settings, orders, cashier, till, render, session_id, finish)
    app.get("/staff/signin")(routes.signin_page)
    app.post("/staff/signin")(routes.signin)
    app.post("/staff/signout")(routes.signout)
    app.get("/staff")(routes.till_home)
    app.post("/staff/topups")(routes.till_topup)
    app.get("/staff/report")(routes.report)
