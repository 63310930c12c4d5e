"""Asking the shopper: the agent's trusted display (a terminal prompt by default).

A :data:`Consent` callback receives a :class:`~webpurse.agent.guard.ConsentRequest` and
answers True (go ahead) or False. The agent injects one: :func:`terminal_consent` asks on
the terminal with Rich, :func:`always_yes` (``--yes``) shows the request and agrees, and
tests pass their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.panel import Panel
from rich.prompt import Confirm

from webpurse.agent.guard import ConsentRequest, Kind

Consent = Callable[[ConsentRequest], Awaitable[bool]]


def describe(request: ConsentRequest) -> str:
    """The lines the shopper reads: trusted facts first, the merchant's words last."""
    action = "Pay" if request.kind is Kind.PURCHASE else "Load onto your card"
    lines = [
        f"{action}: [bold]{request.amount_text}[/bold] ({request.amount} fen {request.currency})",
        f"Merchant site: [bold]{request.origin}[/bold]",
    ]
    if request.merchant:
        lines.append(f"[dim]The merchant says: {request.merchant}[/dim]")
    return "\n".join(lines)


def terminal_consent(console: Console | None = None) -> Consent:
    """Ask on the terminal; the prompt runs in a thread so the agent keeps answering pings."""
    out = console or Console()

    def ask(request: ConsentRequest) -> bool:
        out.print(Panel(describe(request), title="webpurse agent: confirm", expand=False))
        return Confirm.ask("Allow this?", console=out, default=False)

    async def consent(request: ConsentRequest) -> bool:
        return await asyncio.to_thread(ask, request)

    return consent


def always_yes(console: Console | None = None) -> Consent:
    """``--yes``: unattended use; the request is still shown."""
    out = console or Console()

    async def consent(request: ConsentRequest) -> bool:
        out.print(Panel(describe(request), title="webpurse agent: allowed (--yes)", expand=False))
        return True

    return consent
