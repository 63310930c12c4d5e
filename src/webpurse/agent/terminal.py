"""The terminal agent: one local reader, at most one merchant session at a time.

:meth:`TerminalAgent.pair` is what both pairing paths call: the loopback endpoint (token
and the page's Origin) and ``webpurse agent --code`` (code and the server URL the shopper
typed). It dials, waits for the server's hello, and then serves the session in the
background until the merchant's ``end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from webpurse.agent.consent import Consent
from webpurse.agent.session import (
    AgentSession,
    Connector,
    PairingRefused,
    default_connector,
    target_for,
)
from webpurse.reader.base import Reader
from webpurse.reader.messages import End, ServerHello

log = logging.getLogger(__name__)


class AgentBusy(Exception):
    """A session is already running on this agent."""


class TerminalAgent:
    def __init__(
        self,
        reader: Reader,
        *,
        consent: Consent,
        show: Callable[[str], None] = print,
        connector: Connector = default_connector,
        idle_timeout: float = 60.0,
    ) -> None:
        self.reader = reader
        self._consent = consent
        self._show = show
        self._connector = connector
        self._idle_timeout = idle_timeout
        self._lock = asyncio.Lock()
        self.session: AgentSession | None = None
        self._task: asyncio.Task[End | None] | None = None
        self.sessions_ended = 0
        self._ended = asyncio.Event()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def pair(
        self,
        server: str,
        *,
        token: str | None = None,
        code: str | None = None,
        origin: str | None = None,
    ) -> ServerHello:
        """Pair with the merchant at ``server``. If ``origin`` is given (the pairing page's
        Origin), ``server`` must be at that same origin. Raises ValueError for a bad URL,
        :class:`AgentBusy`, or :class:`PairingRefused`."""
        target = target_for(server)
        if origin is not None and target.origin != origin:
            raise ValueError(f"server {target.origin} is not at the page's origin {origin}")
        async with self._lock:
            if self.busy:
                raise AgentBusy("the agent is already serving a session")
            session = AgentSession(
                self.reader,
                target,
                consent=self._consent,
                show=self._show,
                connector=self._connector,
                idle_timeout=self._idle_timeout,
            )
            hello = await session.start(token=token, code=code)
            self.session = session
            self._ended.clear()
            self._task = asyncio.create_task(self._serve(session))
            return hello

    async def _serve(self, session: AgentSession) -> End | None:
        try:
            return await session.serve()
        except Exception:
            log.exception("agent session failed")
            return None
        finally:
            self.sessions_ended += 1
            self._ended.set()

    async def wait_session(self) -> End | None:
        """Wait for the current session to finish; its ``end`` (None if it was lost)."""
        task = self._task
        if task is None:
            return None
        return await asyncio.shield(task)

    async def wait_ended(self) -> None:
        """Return once a session has ended (the latest one, if it is still running)."""
        await self._ended.wait()

    async def close(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.session is not None:
            await self.session.close()


__all__ = ["AgentBusy", "PairingRefused", "TerminalAgent"]
