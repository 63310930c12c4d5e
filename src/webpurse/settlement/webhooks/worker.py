"""The worker that delivers due messages continuously while the app serves."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
import structlog

from webpurse.settlement.webhooks.delivery import (
    DEFAULT_POLICY,
    SessionMaker,
    _claim_due,
    _Job,
    _record,
    _send,
)
from webpurse.settlement.webhooks.retry import RetryPolicy
from webpurse.settlement.webhooks.secret_box import SecretBox
from webpurse.settlement.webhooks.tables import _aware, _utcnow
from webpurse.settlement.webhooks.targets import Resolver, resolve_host

log = structlog.get_logger(__name__)


class WebhookWorker:
    """Delivers due messages continuously while the app serves (its lifespan).

    Never a pass that waits for its slowest request: each claimed message is sent by its own
    task, which records its outcome itself, and the loop claims more whenever a task ends
    (or every ``interval`` seconds). Each attempt has a total deadline (``deadline``
    seconds, then it is a failure retried per the policy); at most ``per_endpoint`` messages
    of one endpoint are in flight at once and at most ``max_in_flight`` in all. So an
    endpoint that answers slowly, or one byte at a time, delays only its own messages: the
    other endpoints keep the rest of the slots (issue 19, finding 3).
    """

    def __init__(
        self,
        session_factory: SessionMaker,
        secret_box: SecretBox,
        *,
        clock: Callable[[], datetime] = _utcnow,
        interval: float = 1.0,
        policy: RetryPolicy = DEFAULT_POLICY,
        http_client: httpx.AsyncClient | None = None,
        allow_private: bool = False,
        deadline: float = 10.0,
        per_endpoint: int = 4,
        max_in_flight: int = 256,
        lease: timedelta = timedelta(minutes=2),
        resolver: Resolver = resolve_host,
    ) -> None:
        if lease.total_seconds() <= deadline:
            raise ValueError("the lease must outlast an attempt's deadline")
        self._session_factory = session_factory
        self._allow_private = allow_private
        self._secret_box = secret_box
        self._clock = clock
        self._interval = interval
        self._policy = policy
        self._client = http_client
        self._deadline = deadline
        self._per_endpoint = per_endpoint
        self._max_in_flight = max_in_flight
        self._lease = lease
        self._resolver = resolver
        self._rng = random.Random()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._busy: dict[str, int] = {}

    async def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="webhook-worker")

    async def stop(self) -> None:
        """Stop claiming; abandon sends in flight (their lease makes them due again)."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    def in_flight(self) -> dict[str, int]:
        """Messages being sent now, per endpoint id."""
        return dict(self._busy)

    async def _run(self) -> None:
        owns_client = self._client is None
        client = self._client or httpx.AsyncClient(follow_redirects=False)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                room = self._max_in_flight - len(self._sending)
                full = False
                if room > 0:
                    try:
                        full = await self._claim_and_send(client, room)
                    except Exception:  # the loop must survive a bad pass (DB restart, ...)
                        log.exception("webhooks.pass_failed")
                if full:  # every slot offered was taken: more may be due right away
                    continue
                with contextlib.suppress(TimeoutError):
                    # a send that ends frees a slot (and its endpoint) right away
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
        finally:
            for task in list(self._sending):
                task.cancel()
            if self._sending:
                await asyncio.gather(*self._sending, return_exceptions=True)
            if owns_client:
                await client.aclose()

    async def _claim_and_send(self, client: httpx.AsyncClient, room: int) -> bool:
        now = _aware(self._clock())
        jobs, canceled = await asyncio.to_thread(
            _claim_due,
            self._session_factory,
            now,
            self._secret_box,
            room,
            self._lease,
            dict(self._busy),
            self._per_endpoint,
        )
        for job in jobs:
            self._busy[job.endpoint_id] = self._busy.get(job.endpoint_id, 0) + 1
            task = asyncio.create_task(self._deliver(client, job, now))
            self._sending.add(task)
            task.add_done_callback(self._sent)
        return len(jobs) + canceled >= room

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._wake.set()

    async def _deliver(self, client: httpx.AsyncClient, job: _Job, now: datetime) -> None:
        try:
            outcome = await _send(
                client, job, now, self._deadline, self._allow_private, self._resolver
            )
            await asyncio.to_thread(
                _record,
                self._session_factory,
                [outcome],
                _aware(self._clock()),
                self._policy,
                self._rng,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # recorded next time: the lease makes the message due again
            log.exception("webhooks.delivery_failed", message_id=job.message_id)
        finally:
            left = self._busy.get(job.endpoint_id, 1) - 1
            if left > 0:
                self._busy[job.endpoint_id] = left
            else:
                self._busy.pop(job.endpoint_id, None)
