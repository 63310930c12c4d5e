"""The progress bus keeps the latest event of recent orders only."""

from __future__ import annotations

from webpurse.merchant.progress import OrderEvent, ProgressBus


def _event(order: str, phase: str = "reading") -> OrderEvent:
    return OrderEvent(order_id=order, phase=phase, status="open")


def test_the_latest_events_of_the_most_recent_orders_are_kept_and_no_more() -> None:
    bus = ProgressBus(keep=3)
    for order in ("o1", "o2", "o3"):
        bus.publish(_event(order))
    bus.publish(_event("o1", "paid"))  # o1 is recent again
    bus.publish(_event("o4"))  # o2, the least recently published, is forgotten
    assert bus.last("o2") is None
    assert [bus.last(o).phase for o in ("o1", "o3", "o4")] == ["paid", "reading", "reading"]  # type: ignore[union-attr]
