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

from webpurse.settlement.kek import SecurityError, parse_kek

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def user_config_dir(env: dict[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/webpurse``, else ``~/.config/webpurse``: where the KEK lives by
    default, outside the data folder, so one backup of the data does not open the keys."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "webpurse"


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
    # Where the default KEK file lives (None: the user's config dir, see user_config_dir).
    config_dir: Path | None = None
    # A KEK inside the data folder is refused unless asked for (WEBPURSE_KEK_IN_DATA_DIR=1,
    # which the throwaway demo sets): then the default file is ``data_dir/kek.key``.
    kek_in_data_dir: bool = False
    migrate: bool = False
    clock: Clock = utc_now
    requires_card_ttl: dt.timedelta = dt.timedelta(minutes=30)
    authorised_ttl: dt.timedelta = dt.timedelta(minutes=2)
    # The longest one merchant's open transaction (authorised or uncertain) may keep a card
    # from other merchants, counted from its authorisation (holds.py); then the sweep
    # releases it. WEBPURSE_CARD_HOLD_TTL, seconds.
    card_hold_ttl: dt.timedelta = dt.timedelta(hours=1)
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
    # The API documentation (/docs, /openapi.json) is public only when asked:
    # WEBPURSE_PUBLIC_DOCS=1 (the demo sets it). /health is always public.
    public_docs: bool = False
    # Funding (issue 12, docs/settlement-api.md "Funding"): the settlement bank account whose
    # statements are imported, how long an unpaid bank-transfer order waits, and the float
    # balance (fen) below which the merchant gets a float.low event.
    settlement_account: str = "WEBPURSE-SETTLEMENT-0001"
    bank_transfer_ttl: dt.timedelta = dt.timedelta(days=3)
    float_low_threshold: int = 10_000
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
    # Where the master keys live: "software" (sealed in the database under the KEK) or
    # "pkcs11" (a PKCS#11 token: WEBPURSE_PKCS11_MODULE, WEBPURSE_PKCS11_TOKEN_LABEL or
    # WEBPURSE_PKCS11_SLOT, and the user PIN in WEBPURSE_PKCS11_PIN_FILE). See
    # docs/security-module.md.
    security_module: str = "software"
    pkcs11_module: Path | None = None
    pkcs11_token_label: str | None = None
    pkcs11_slot: int | None = None
    pkcs11_pin_file: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, migrate: bool = False) -> Settings:
        env = dict(os.environ) if env is None else env
        data_dir = Path(env.get("WEBPURSE_DATA_DIR", "data"))
        url = env.get("WEBPURSE_DATABASE_URL") or f"sqlite:///{data_dir / 'settlement.db'}"
        kek_file = env.get("WEBPURSE_KEK_FILE")
        kek_text = env.get("WEBPURSE_KEK")
        module = env.get("WEBPURSE_SECURITY_MODULE", "software").strip().lower() or "software"
        if module not in ("software", "pkcs11"):
            raise SecurityError(
                f"WEBPURSE_SECURITY_MODULE must be software or pkcs11, not {module!r}"
            )
        slot = env.get("WEBPURSE_PKCS11_SLOT")
        pin_file = env.get("WEBPURSE_PKCS11_PIN_FILE")
        p11_module = env.get("WEBPURSE_PKCS11_MODULE")

        return cls(
            database_url=url,
            data_dir=data_dir,
            kek=parse_kek(kek_text) if kek_text else None,
            kek_file=Path(kek_file) if kek_file else None,
            config_dir=user_config_dir(env),
            kek_in_data_dir=_flag(env.get("WEBPURSE_KEK_IN_DATA_DIR", "")),
            migrate=migrate,
            sweep_interval=float(env.get("WEBPURSE_SWEEP_INTERVAL", "30")),
            card_hold_ttl=dt.timedelta(seconds=float(env.get("WEBPURSE_CARD_HOLD_TTL", "3600"))),
            webhook_allow_private=_flag(env.get("WEBPURSE_WEBHOOK_ALLOW_PRIVATE", "")),
            public_docs=_flag(env.get("WEBPURSE_PUBLIC_DOCS", "")),
            settlement_account=env.get("WEBPURSE_SETTLEMENT_ACCOUNT", cls.settlement_account),
            bank_transfer_ttl=dt.timedelta(
                seconds=float(env.get("WEBPURSE_BANK_TRANSFER_TTL", str(3 * 86400)))
            ),
            float_low_threshold=int(env.get("WEBPURSE_FLOAT_LOW_THRESHOLD", "10000")),
            max_open_orders=int(env.get("WEBPURSE_MAX_OPEN_ORDERS", "1000")),
            max_body_bytes=int(env.get("WEBPURSE_MAX_BODY_BYTES", str(1 << 20))),
            max_batch_body_bytes=int(env.get("WEBPURSE_MAX_BATCH_BODY_BYTES", str(8 << 20))),
            security_module=module,
            pkcs11_module=Path(p11_module) if p11_module else None,
            pkcs11_token_label=env.get("WEBPURSE_PKCS11_TOKEN_LABEL") or None,
            pkcs11_slot=int(slot) if slot else None,
            pkcs11_pin_file=Path(pin_file) if pin_file else None,
        )

    @property
    def default_kek_file(self) -> Path:
        if self.kek_in_data_dir:
            return self.data_dir / "kek.key"
        return (self.config_dir or user_config_dir(dict(os.environ))) / "kek.key"
