"""Asking the shopper: the agent's trusted display (a dialog window, or the terminal).

A :data:`Consent` callback receives a :class:`~webpurse.agent.guard.ConsentRequest` and
answers True (go ahead) or False. The agent injects one: :func:`terminal_consent` asks on
the terminal with Rich, :func:`webpurse.agent.dialog.dialog_consent` in a native window,
:func:`always_yes` (``--yes``) shows the request and agrees, and tests pass their own.

Everything shown comes from :func:`webpurse.agent.display.lines`: the trusted facts
first, the merchant's cleaned words last, printed as :class:`rich.text.Text` (never as
markup), so nothing the merchant says can restyle, move or hide the amount.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TextIO

from rich.console import Console, Group
from rich.panel import Panel
from rich.prompt import Confirm
from rich.text import Text

from webpurse.agent.display import lines, screen
from webpurse.agent.guard import ConsentRequest, Kind

Consent = Callable[[ConsentRequest], Awaitable[bool]]


def describe(request: ConsentRequest, language: str = "en") -> str:
    """The lines the shopper reads, as plain text: trusted facts first, the merchant's last."""
    return "\n".join(lines(request, language))


def render(request: ConsentRequest, language: str = "en") -> Group:
    """The Rich renderable of :func:`describe`: plain Text objects, the amount in bold."""
    shown = screen(request, language)
    first, *rest = shown.facts
    head = Text(first)
    head.stylize("bold", len(shown.action) + 2, len(shown.action) + 2 + len(shown.amount))
    parts = [head, *(Text(line) for line in rest)]
    if shown.words:  # one line, cut with … rather than wrapped: it can never start a line
        parts.append(Text(shown.words, style="dim", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def panel(request: ConsentRequest, language: str = "en") -> Panel:
    """The box the terminal prompt shows (its title is the agent's, never the merchant's)."""
    title = Text(screen(request, language).title)
    return Panel(render(request, language), title=title, expand=False)


def show_text(console: Console) -> Callable[[str], None]:
    """A ``show`` callback that prints agent status lines as text, never as markup."""

    def show(text: str) -> None:
        console.print(Text(text), highlight=False)

    return show


def terminal_consent(
    console: Console | None = None, language: str = "en", stream: TextIO | None = None
) -> Consent:
    """Ask on the terminal; the prompt runs in a thread so the agent keeps answering pings.

    ``stream`` is where the answer is read (standard input by default)."""
    out = console or Console()

    def ask(request: ConsentRequest) -> bool:
        out.print(panel(request, language))
        return Confirm.ask("Allow this?", console=out, default=False, stream=stream)

    async def consent(request: ConsentRequest) -> bool:
        return await asyncio.to_thread(ask, request)

    return consent


def always_yes(console: Console | None = None) -> Consent:
    """``--yes``: unattended payments and loads; the request is still shown. Sharing the
    holder's data (:data:`Kind.SHARE`) is never agreed unattended."""
    out = console or Console()

    async def consent(request: ConsentRequest) -> bool:
        granted = request.kind is not Kind.SHARE
        title = "webpurse agent: allowed (--yes)" if granted else "webpurse agent: not shared"
        out.print(Panel(render(request), title=title, expand=False))
        return granted

    return consent
