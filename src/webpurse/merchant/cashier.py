"""The cashier: runs each order's payment (or top-up) from reader to settlement's verdict.

One background task per order (``start`` is idempotent). It waits for the shopper's
reader, runs :func:`~webpurse.merchant.flows.run_transaction`, writes the outcome to the
order book and publishes progress for the page. After an interrupted DEBIT/CREDIT it
waits for the card's next contact and runs :func:`~webpurse.merchant.flows.recover`:
settlement then says whether the card was debited (the order is paid) or not (a new
payment is created and the purchase continues). ``refresh`` is the polling fallback and
the webhook's follow-up: it re-reads the settlement object and applies its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict

from webpurse.merchant.flows import (
    CardRefused,
    Outcome,
    Phase,
    Progress,
    ProgressSink,
    first_batch,
    read_first_contact,
    recover,
    run_transaction,
)
from webpurse.merchant.leases import RedisFlowLeases
from webpurse.merchant.orders import (
    CANCELED,
    DECLINED,
    INTERRUPTED,
    LOADED,
    PAID,
    PENDING,
    PURCHASE,
    Order,
    OrderBook,
)
from webpurse.merchant.progress import OrderEvent, ProgressBus
from webpurse.merchant.readers import ReaderBroker
from webpurse.merchant.settlement import (
    BANK_TRANSFER,
    REQUIRES_FUNDING,
    Kind,
    RecoveryHint,
    Settlement,
    SettlementError,
    SettlementObject,
    TxStatus,
    funding_reference,
)
from webpurse.protocol.records import TransactionType
from webpurse.reader.base import Reader, ReaderError
from webpurse.reader.messages import Outcome as AgentOutcome
from webpurse.reader.remote.shared import SharedStateUnavailable

log = logging.getLogger(__name__)

MAX_CONTACTS = 10
RECENT_TASKS = 256
"""Finished payment tasks the cashier still hands out from :meth:`Cashier.task` (newest)."""
FUNDED = "funded"  # detail of a waiting_reader event: a bank transfer's money arrived
REPAIR = "repair"  # detail of a waiting_reader event: the page must pair the agent again


class _NewSession(Exception):
    """The agent's session is over but the order goes on: wait for a new pairing."""


_AGENT_OUTCOMES: dict[str, AgentOutcome] = {
    PAID: AgentOutcome.SUCCEEDED,
    LOADED: AgentOutcome.SUCCEEDED,
    DECLINED: AgentOutcome.DECLINED,
}
"""Order status → the outcome the agent shows at the session's end (else ``failed``)."""


def kind_of(order: Order) -> Kind:
    return Kind.PAYMENT if order.kind == PURCHASE else Kind.LOAD


def success_status(order: Order) -> str:
    return PAID if order.kind == PURCHASE else LOADED


class Cashier:
    def __init__(
        self,
        orders: OrderBook,
        settlement: Settlement,
        broker: ReaderBroker,
        bus: ProgressBus,
        *,
        reader_timeout: float = 300.0,
        card_timeout: float = 120.0,
        leases: RedisFlowLeases | None = None,
    ) -> None:
        self.orders = orders
        self.settlement = settlement
        self.broker = broker
        self.bus = bus
        self.reader_timeout = reader_timeout
        self.card_timeout = card_timeout
        self.leases = leases
        """With several shop processes: only the lease holder drives an order."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """Running payment tasks only: a task leaves when it ends (see ``_task_done``)."""
        self._finished: OrderedDict[str, asyncio.Task[None]] = OrderedDict()
        self._finishing: set[str] = set()
        """Orders whose task is past its payment, ending the agent's session."""
        self._again: set[str] = set()
        """Orders started again while finishing: a new task follows the one that ends."""
        self._closing = False
        self._sessions: dict[str, str] = {}
        """The agent session each running order last drove (ended when it finishes)."""

    # --- settlement objects --------------------------------------------------------

    async def open_settlement(self, order: Order, description: str) -> Order:
        """Create the order's payment (or load) at settlement and remember its id.

        A load carries the order's funding: the float (a till top-up) may be re-created
        after a decline, for the cash was taken once and only one load succeeds; a bank
        transfer never is, for the money matched to its load belongs to that load alone.
        """
        if order.funding == BANK_TRANSFER and order.settlement_id is not None:
            raise SettlementError(
                f"order {order.id}: a bank-transfer top-up keeps its own load", code="funded_once"
            )
        obj = await self.settlement.create(
            kind_of(order),
            order.amount,
            description=description,
            reference=order.id,
            funding=order.funding if order.kind != PURCHASE else None,
            card_number=order.card_number if order.funding == BANK_TRANSFER else None,
        )
        fields: dict[str, object] = {
            "settlement_id": obj.id,
            "status": PENDING,
            "settlement_status": obj.status,
        }
        reference = funding_reference(obj)
        if reference:
            fields["payment_reference"] = reference
            fields["funding_expires_at"] = obj.raw.get("expires_at")
        return self.orders.update(order.id, **fields)

    def publish(self, order: Order, phase: Phase, detail: str = "") -> None:
        self.bus.publish(
            OrderEvent(
                order_id=order.id,
                phase=phase.value,
                status=order.status,
                detail=detail,
                balance_after=order.balance_after,
                final=order.is_final or order.status == DECLINED,
            )
        )

    def apply(self, order_id: str, obj: SettlementObject, **extra: object) -> Order:
        """Move the order to what settlement says; ``succeeded`` is the only way to paid."""
        order = self.orders.get(order_id)
        if order is None:
            raise KeyError(order_id)
        if obj.id != order.settlement_id:
            log.warning("order %s: ignoring %s, not its settlement object", order_id, obj.id)
            return order
        fields: dict[str, object] = dict(extra)
        fields["settlement_status"] = obj.status
        unfunded = order.funding == BANK_TRANSFER and order.settlement_status == REQUIRES_FUNDING
        if unfunded and obj.status in (TxStatus.EXPIRED, TxStatus.CANCELED):
            # Never paid: the top-up is over; nothing was taken, nothing was loaded.
            fields["status"] = CANCELED
            fields["decline_code"] = "unpaid_" + obj.status
        elif obj.status == TxStatus.SUCCEEDED:
            fields["status"] = success_status(order)
            if obj.tac:
                fields["tac"] = obj.tac
        elif obj.status == TxStatus.UNCERTAIN:
            fields["status"] = INTERRUPTED
        elif obj.status in (TxStatus.DECLINED, TxStatus.EXPIRED):
            fields["status"] = DECLINED
            fields["decline_code"] = obj.decline_code or extra.get("decline_code") or obj.status
        elif obj.status == TxStatus.CANCELED and order.status != INTERRUPTED:
            fields.setdefault("status", DECLINED)
        if obj.card_number and "card_number" not in fields:
            fields["card_number"] = obj.card_number
        return self.orders.update(order_id, **fields)

    async def refresh(self, order_id: str) -> Order | None:
        """Polling fallback: re-read the settlement object and apply it."""
        order = self.orders.get(order_id)
        if order is None or order.settlement_id is None or order.is_final:
            return order
        try:
            obj = await self.settlement.get(kind_of(order), order.settlement_id)
        except SettlementError as exc:
            log.warning("order %s: settlement poll failed: %s", order_id, exc)
            return order
        before, was = order.status, order.settlement_status
        order = self.apply(order_id, obj)
        if order.status != before and order.is_final:
            self.publish(order, Phase.FAILED if order.status == CANCELED else Phase.SUCCEEDED)
        elif was == REQUIRES_FUNDING and obj.status == TxStatus.REQUIRES_CARD:
            log.info("order %s: the bank transfer arrived; the load can run", order_id)
            self.publish(order, Phase.WAITING_READER, FUNDED)
        return order

    async def poll(self, interval: float) -> None:
        """The fallback when webhooks do not arrive: re-read open orders every ``interval``.

        Runs for the life of the server: an unexpected error (the order database, one
        order's refresh) is logged and the next round comes after the same interval.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                open_orders = self.orders.open_orders()
            except Exception:
                log.exception(
                    "settlement poll: could not list open orders; next try in %gs", interval
                )
                continue
            for order in open_orders:
                task = self._tasks.get(order.id)
                if task is not None and not task.done():
                    continue
                try:
                    await self.refresh(order.id)
                except Exception:
                    log.exception("order %s: settlement poll failed; polling goes on", order.id)

    async def take_over(self) -> list[str]:
        """With several shop processes: start the payment of every open order whose driving
        process died (its lease outlives its node's heartbeat); returns their ids.

        The order goes on here as after a restart of its process: settlement's word and the
        card's counter decide whether its DEBIT/CREDIT ran (``_learn_counter``, recovery),
        never a second one blindly; then the agent's session is ended so the page can pair
        again if it must.
        """
        if self.leases is None or self._closing:
            return []
        taken: list[str] = []
        for order_id, node in (await self.leases.orphaned()).items():
            if not await self.leases.clear_dead(order_id, node):
                continue  # another survivor was first, or the node came back
            log.warning(
                "order %s: its shop process %s is gone; this process takes the payment over",
                order_id,
                node,
            )
            self.start(order_id)
            taken.append(order_id)
        return taken

    async def watch(self, interval: float) -> None:
        """Run :meth:`take_over` every ``interval`` seconds for the life of the server;
        an error (Redis or the order database away) is logged and the next round follows."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.take_over()
            except Exception:
                log.warning(
                    "takeover of dead processes' orders failed; next try in %gs",
                    interval,
                    exc_info=True,
                )

    # --- running a payment -----------------------------------------------------------

    def start(self, order_id: str) -> None:
        task = self._tasks.get(order_id)
        if task is not None and not task.done():
            if order_id in self._finishing:
                # The page paired again as the last attempt gave up: run once more after it.
                self._again.add(order_id)
                log.info("order %s: paired again while finishing: will run once more", order_id)
            return
        task = asyncio.create_task(self._drive(order_id), name=f"pay {order_id}")
        self._tasks[order_id] = task
        self._finished.pop(order_id, None)
        task.add_done_callback(functools.partial(self._task_done, order_id))

    def _task_done(self, order_id: str, task: asyncio.Task[None]) -> None:
        """A payment task ended: it leaves ``_tasks``; the last :data:`RECENT_TASKS` ended
        ones stay reachable through :meth:`task` (a caller may wait on one that just ended)."""
        if self._tasks.get(order_id) is task:
            del self._tasks[order_id]
        self._finished[order_id] = task
        self._finished.move_to_end(order_id)
        while len(self._finished) > RECENT_TASKS:
            self._finished.popitem(last=False)
        self._finishing.discard(order_id)
        self._sessions.pop(order_id, None)
        if order_id in self._again:
            self._again.discard(order_id)
            if not self._closing:
                self.start(order_id)

    def task(self, order_id: str) -> asyncio.Task[None] | None:
        """The order's running payment task, or its recently ended one."""
        return self._tasks.get(order_id) or self._finished.get(order_id)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("%s failed while the cashier closed", task.get_name())

    async def _drive(self, order_id: str) -> None:
        """Run the order's payment here unless another shop process already does."""
        if self.leases is None:
            await self._drive_here(order_id)
            return
        try:
            held = await self.leases.acquire(order_id)
        except SharedStateUnavailable:
            log.warning("order %s: shared state unavailable; not starting its payment", order_id)
            self._publish_failure(order_id, SharedStateUnavailable.code)
            return
        if not held:
            log.info("order %s: another shop process drives its payment", order_id)
            return
        log.info("order %s: this shop process drives its payment", order_id)
        keeper = asyncio.create_task(self.leases.keep(order_id), name=f"lease {order_id}")
        drive = asyncio.create_task(self._drive_here(order_id), name=f"drive {order_id}")
        try:
            await asyncio.wait({keeper, drive}, return_when=asyncio.FIRST_COMPLETED)
            if not drive.done():
                # Another process took the order over (this one looked dead): never two
                # drivers; it recovers from the card's counter whatever this one did.
                log.warning("order %s: lease lost; this process stops driving it", order_id)
        finally:
            for task in (drive, keeper):
                task.cancel()
            for task in (drive, keeper):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.leases.release(order_id)

    async def _drive_here(self, order_id: str) -> None:
        """Run the order's payment; whatever happens, end the agent's session after it."""
        outcome, message, amount = AgentOutcome.FAILED, "internal error", None
        try:
            order = self.orders.get(order_id)
            if order is None:
                return
            if not order.is_final:
                await self._drive_order(order)
            final = self.orders.get(order_id) or order
            outcome = _AGENT_OUTCOMES.get(final.status, AgentOutcome.FAILED)
            message, amount = final.decline_code or "", final.amount
        except asyncio.CancelledError:
            raise  # server shutdown: the hub ends every session itself
        except Exception:
            log.exception("order %s: payment task failed", order_id)
            self._publish_failure(order_id)
        self._finishing.add(order_id)
        await self._finish(order_id, outcome, message, amount, self._sessions.pop(order_id, None))

    def _publish_failure(self, order_id: str, detail: str = "internal_error") -> None:
        try:
            order = self.orders.get(order_id)
        except Exception:
            log.exception("order %s: cannot read the order to report its failure", order_id)
            return
        if order is not None:
            self.publish(order, Phase.FAILED, detail)

    async def _finish(
        self,
        order_id: str,
        outcome: str,
        message: str,
        amount: int | None,
        session: str | None = None,
    ) -> None:
        """Tell the agent how it ended and close its session; a failure is logged, not raised.
        With ``session`` (the one this task drove) a newer session is left alone."""
        try:
            if session is None:
                await self.broker.finish(order_id, outcome, message, amount)
            else:
                await self.broker.finish(order_id, outcome, message, amount, session=session)
        except Exception:
            log.warning(
                "order %s: could not end the agent's session (%s)", order_id, outcome, exc_info=True
            )

    async def _drive_order(self, order: Order) -> None:
        self.publish(order, Phase.WAITING_READER)
        reader: Reader | None = None
        for _ in range(MAX_CONTACTS):
            current = self.orders.get(order.id)
            assert current is not None
            order = current
            if order.is_final:
                break
            if reader is None:
                try:
                    reader = await self.broker.reader_for(order.id, self.reader_timeout)
                    session = getattr(reader, "session", None)
                    if isinstance(session, str):
                        self._sessions[order.id] = session
                except ReaderError as exc:
                    # No agent came: the order stays payable; reopening the page retries.
                    log.info("order %s: no reader (%s)", order.id, exc)
                    self.publish(order, Phase.FAILED, "no_reader")
                    return
            try:
                done = await self._contact(order, reader)
            except _NewSession:
                reader = None
                continue
            except ReaderError as exc:
                # Batch 1 or recovery could not run: nothing changed anywhere. Try again
                # with the reader the broker has now (the agent may have reconnected).
                log.info("order %s: reader problem %s; waiting again", order.id, exc)
                reader = None
                latest = self.orders.get(order.id) or order
                self.publish(latest, Phase.WAITING_READER, type(exc).__name__)
                continue
            if done:
                break

    async def _contact(self, order: Order, reader: Reader) -> bool:
        """One card contact; True when the order needs no more contacts."""
        kind = kind_of(order)

        async def progress(step: Progress) -> None:
            latest = self.orders.get(order.id) or order
            self.publish(latest, step.phase, step.detail)

        if order.status == INTERRUPTED and order.settlement_id and order.counter is not None:
            return await self._recovery_contact(order, reader, progress)

        if order.funding == BANK_TRANSFER:
            return await self._funded_contact(order, reader, progress)
        if order.settlement_id is None or order.status == DECLINED:
            order = await self.open_settlement(order, order.id)
        assert order.settlement_id is not None
        obj = await self.settlement.get(kind, order.settlement_id)
        if obj.status == TxStatus.SUCCEEDED:
            order = self.apply(order.id, obj)
            self.publish(order, Phase.SUCCEEDED)
            return True
        if obj.status in (TxStatus.AUTHORISED, TxStatus.UNCERTAIN):
            return await self._learn_counter(order, obj, reader, progress)
        if obj.status in (TxStatus.CANCELED, TxStatus.EXPIRED, TxStatus.DECLINED):
            # Released before this order heard of it: nothing was taken; pay afresh.
            order = await self.open_settlement(order, order.id)
            assert order.settlement_id is not None
            obj = await self.settlement.get(kind, order.settlement_id)
        return await self._transact(order, obj, reader, progress)

    async def _transact(
        self,
        order: Order,
        obj: SettlementObject,
        reader: Reader,
        progress: ProgressSink,
        *,
        bound_card: str | None = None,
    ) -> bool:
        """Run ``obj``'s transaction with the card and publish how it ended; True when the
        order needs no more contacts. ``bound_card``: the card a bank-transfer top-up was
        paid for (settlement declines any other; the order keeps naming its own)."""
        try:
            outcome = await run_transaction(
                reader, self.settlement, obj, card_timeout=self.card_timeout, progress=progress
            )
        except CardRefused as refused:
            order = self.orders.update(order.id, status=DECLINED, decline_code=refused.reason)
            self.publish(order, Phase.DECLINED, refused.reason)
            return True
        order = self._record(order, outcome)
        if bound_card and outcome.card_number and outcome.card_number != bound_card:
            # Another card than the one the money was paid for: settlement declined it
            # (its code says only "invalid state"); the order keeps naming its own card.
            fields: dict[str, object] = {"card_number": bound_card}
            if order.status == DECLINED:
                fields["decline_code"] = "wrong_card"
            order = self.orders.update(order.id, **fields)
        if order.status == INTERRUPTED:
            self.publish(order, Phase.INTERRUPTED)
            # The card must leave and come back; recovery waits for it.
            await self._await_removal(order, reader)
            return False
        if order.status in (PAID, LOADED):
            self.publish(order, Phase.SUCCEEDED)
        elif order.status == DECLINED:
            self.publish(order, Phase.DECLINED, order.decline_code or "")
        return True

    async def _recovery_contact(self, order: Order, reader: Reader, progress: ProgressSink) -> bool:
        """The contact of an interrupted order: recover its uncertain transaction first."""
        kind = kind_of(order)
        assert order.settlement_id is not None and order.counter is not None
        obj = await self.settlement.get(kind, order.settlement_id)
        ttype = TransactionType.EP_PURCHASE if kind is Kind.PAYMENT else TransactionType.EP_LOAD
        hint = RecoveryHint(kind, order.settlement_id, ttype, order.counter)

        async def recovery_progress(step: Progress) -> None:
            # Until the card is back, the page keeps saying "present the card again".
            if step.phase is Phase.PRESENT_CARD:
                step = Progress(Phase.INTERRUPTED)
            await progress(step)

        try:
            outcome = await recover(
                reader,
                self.settlement,
                hint,
                key_index=obj.key_index,
                terminal_id=obj.terminal_id,
                card_timeout=self.card_timeout,
                progress=recovery_progress,
            )
        except CardRefused as refused:
            self.publish(order, Phase.INTERRUPTED, refused.reason)
            await self._await_removal(order, reader)
            return False
        assert outcome.object is not None
        order = self.apply(order.id, outcome.object)
        if order.is_final:
            self.publish(order, Phase.SUCCEEDED)
            return True
        if outcome.status == TxStatus.CANCELED:
            # The card proved nothing happened: pay again with a fresh payment. The
            # agent refuses a second DEBIT in a session whose first may have run, so
            # end this session; the page pairs a new one (phase waiting_reader, "repair").
            order = self.orders.update(order.id, status=PENDING, counter=None)
            order = await self.open_settlement(order, order.id)
            await self._finish(order.id, AgentOutcome.CANCELED, "present the card again", None)
            self.publish(order, Phase.WAITING_READER, REPAIR)
            raise _NewSession
        self.publish(order, Phase.INTERRUPTED)
        await self._await_removal(order, reader)
        return False

    async def _funded_contact(self, order: Order, reader: Reader, progress: ProgressSink) -> bool:
        """One contact of a bank-transfer top-up: only its own load, once the money is in.

        Its load is bound to one card at settlement, which declines any other card
        (``wrong_card``); a decline leaves the load ``requires_card`` for the right card.
        """
        assert order.settlement_id is not None
        obj = await self.settlement.get(Kind.LOAD, order.settlement_id)
        order = self.apply(order.id, obj)
        if obj.status == REQUIRES_FUNDING:
            self.publish(order, Phase.FAILED, "awaiting_funds")
            return True
        if obj.status == TxStatus.SUCCEEDED:
            self.publish(order, Phase.SUCCEEDED)
            return True
        if obj.status in (TxStatus.AUTHORISED, TxStatus.UNCERTAIN):
            return await self._learn_counter(order, obj, reader, progress)
        if obj.status != TxStatus.REQUIRES_CARD:
            self.publish(order, Phase.FAILED, obj.status)
            return True
        return await self._transact(order, obj, reader, progress, bound_card=order.card_number)

    async def _learn_counter(
        self,
        order: Order,
        obj: SettlementObject,
        reader: Reader,
        progress: ProgressSink,
    ) -> bool:
        """The order's DEBIT/CREDIT may have reached the card, but its outcome never reached
        the order (the merchant restarted, or settlement's answer was lost): never authorise
        again nor guess. Read the card's counter (INITIALIZE, amount 0), then recover on the
        next pass: PROVE names the card's current counter (spec §3) and settlement decides by
        the counter whether the transaction ran (proof verified) or not (released).
        """
        kind = obj.kind
        if obj.status == TxStatus.AUTHORISED:
            obj = await self.settlement.uncertain(kind, obj.id)
        await progress(Progress(Phase.INTERRUPTED))
        await reader.wait_for_card(self.card_timeout)
        await progress(Progress(Phase.RECOVERING))
        steps = first_batch(kind, key_index=obj.key_index, amount=0, terminal_id=obj.terminal_id)
        try:
            contact = read_first_contact(kind, await reader.transmit(steps))
        except CardRefused as refused:
            self.publish(order, Phase.INTERRUPTED, refused.reason)
            await self._await_removal(order, reader)
            return False
        if obj.card_number and contact.card_number != obj.card_number:
            self.publish(order, Phase.INTERRUPTED, "wrong_card")
            await self._await_removal(order, reader)
            return False
        self.orders.update(order.id, status=INTERRUPTED, counter=contact.counter - 1)
        return False

    async def _await_removal(self, order: Order, reader: Reader) -> None:
        """The next contact must be a new tap: wait until the card has left the field.

        Without this a card that refuses recovery (or is the wrong one) would be asked
        again at once, and the order's :data:`MAX_CONTACTS` would be spent in a moment.
        """
        try:
            await reader.wait_for_removal(self.card_timeout)
        except ReaderError as exc:
            log.info("order %s: card not seen leaving (%s); trying the next contact", order.id, exc)

    def _record(self, order: Order, outcome: Outcome) -> Order:
        extra: dict[str, object] = {"round_trips": outcome.round_trips}
        for name in ("card_number", "balance_before", "balance_after", "counter"):
            value = getattr(outcome, name)
            if value is not None:
                extra[name] = value
        if outcome.status == TxStatus.DECLINED:
            extra["decline_code"] = outcome.decline_code
            if outcome.object is None or outcome.object.status != TxStatus.DECLINED:
                extra["status"] = DECLINED
        if outcome.object is None:
            return self.orders.update(order.id, **extra)
        kept = (TxStatus.REQUIRES_CARD, TxStatus.CANCELED)
        if outcome.status == TxStatus.DECLINED and outcome.object.status in kept:
            return self.orders.update(order.id, **extra)
        return self.apply(order.id, outcome.object, **extra)
