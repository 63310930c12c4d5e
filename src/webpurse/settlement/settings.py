"""Settlement server settings: where the database and the key-encryption key live.

Read from the environment by :meth:`Settings.from_env`; tests build them directly. The
clock is part of the settings so that every decision about time is injected.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _flag(value: str) -> bool:
    """An on/off environment setting: 1, true, yes or on (any case) is on."""
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Everything the composition root (:func:`webpurse.settlement.app.create_app`) needs."""

    database_url: str
    data_dir: Path = Path("data")
    kek: bytes | None = field(default=None, repr=False)
    kek_file: Path | None = None
    migrate: bool = False
    clock: Clock = utc_now
    requires_card_ttl: dt.timedelta = dt.timedelta(minutes=30)
    authorised_ttl: dt.timedelta = dt.timedelta(minutes=2)
    pool_size: int = 10
    max_overflow: int = 10
    # Seconds between expiry sweeps inside the server (0: off, e.g. tests that sweep
    # themselves); `serve` takes WEBPURSE_SWEEP_INTERVAL, default 30.
    sweep_interval: float = 0.0
    # Webhooks and clearing: the delivery worker runs in the app's lifespan unless off (tests
    # that drive deliver_due themselves); the clearing day's zone (None: WEBPURSE_CLEARING_TZ,
    # else China Standard Time, UTC+8).
    webhook_worker: bool = True
    webhook_interval: float = 1.0
    clearing_timezone: dt.tzinfo | None = None
    # Webhook URLs on loopback, private or link-local addresses are refused (SSRF) unless
    # the operator allows them: WEBPURSE_WEBHOOK_ALLOW_PRIVATE=1 (the demo and the tests,
    # whose shops listen on 127.0.0.1). Off by default.
    webhook_allow_private: bool = False
    # Each delivery attempt gets this many seconds in all (not per read), and at most this
    # many messages of one endpoint are in flight at once (docs/webhooks.md, "Slow endpoints").
    webhook_deadline: float = 10.0
    webhook_per_endpoint: int = 4
    # Request bodies are refused with 413 beyond these sizes, before routing and
    # authentication (webpurse.body_limit): 1 MiB, and 8 MiB for POST /v1/batch (up to
    # 1000 items). WEBPURSE_MAX_BODY_BYTES, WEBPURSE_MAX_BATCH_BODY_BYTES.
    max_body_bytes: int = 1 << 20
    # requires_card payments, and load orders, one merchant may have open at once (429
    # too_many_open_orders beyond; quotas.py). WEBPURSE_MAX_OPEN_ORDERS.
    max_open_orders: int = 1000
    max_batch_body_bytes: int = 8 << 20

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, migrate: bool = False) -> Settings:
        env = dict(os.environ) if env is None else env
        data_dir = Path(env.get("WEBPURSE_DATA_DIR", "data"))
        url = env.get("WEBPURSE_DATABASE_URL") or f"sqlite:///{data_dir / 'settlement.db'}"
        kek_file = env.get("WEBPURSE_KEK_FILE")
        kek_text = env.get("WEBPURSE_KEK")
        from webpurse.settlement.security import parse_kek

        return cls(
            database_url=url,
            data_dir=data_dir,
            kek=parse_kek(kek_text) if kek_text else None,
            kek_file=Path(kek_file) if kek_file else None,
            migrate=migrate,
            sweep_interval=float(env.get("WEBPURSE_SWEEP_INTERVAL", "30")),
            webhook_allow_private=_flag(env.get("WEBPURSE_WEBHOOK_ALLOW_PRIVATE", "")),
            max_open_orders=int(env.get("WEBPURSE_MAX_OPEN_ORDERS", "1000")),
            max_body_bytes=int(env.get("WEBPURSE_MAX_BODY_BYTES", str(1 << 20))),
            max_batch_body_bytes=int(env.get("WEBPURSE_MAX_BATCH_BODY_BYTES", str(8 << 20))),
        )

    @property
    def default_kek_file(self) -> Path:
        return self.data_dir / "kek.key"
