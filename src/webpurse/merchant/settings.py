"""The merchant server's settings, from the environment (secrets also from files)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """``NAME`` or the contents of the file named by ``NAME_FILE``."""
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    if path:
        return Path(path).read_text(encoding="utf-8").strip()
    return None


@dataclass(frozen=True)
class MerchantSettings:
    data_dir: Path = Path("data")
    database_url: str = ""
    settlement_url: str = "http://127.0.0.1:8100"
    settlement_api_key: str = field(default="", repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    cookie_secret: bytes = field(default=b"", repr=False)
    agent_url: str = "http://127.0.0.1:47800"
    public_url: str = ""
    shop_name: str | None = None
    poll_interval: float = 15.0  # seconds between settlement polls (webhook fallback)
    # With shared state: seconds between looks for orders whose driving shop process died
    # (its heartbeat lapsed, NODE_TTL); a survivor takes each over (Cashier.take_over).
    takeover_interval: float = 2.0
    # Payment calls of concurrent shoppers go to settlement together (POST /v1/batch).
    settlement_batching: bool = True
    # How many of those batches may be on their way at once. Two let settlement's Python
    # and PostgreSQL work on one while the other is in the other's hands: 1.7x the
    # purchases/s of one on 2 cores at 512 shoppers, lower latency too (bench/findings.md,
    # issue 20); a lone shopper's call still goes at once.
    settlement_batches_in_flight: int = 2
    # Request bodies over this are refused with 413 before any route reads them
    # (webpurse.body_limit); the shop's forms and settlement's webhooks are a few KB.
    max_body_bytes: int = 1 << 20
    # The shop's shared state (several shop processes behind a load balancer): reader
    # sessions, pairings, code limits, progress events, webhook dedupe and order leases
    # in this Redis, every key under ``redis_prefix``. Empty: all in this one process.
    redis_url: str = field(default="", repr=False)
    redis_prefix: str = "webpurse"
    # The start of this process's node id in the shared state (``shop1`` in the cluster).
    node_name: str = "node"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'merchant.db'}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MerchantSettings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("WEBPURSE_DATA_DIR", "data"))
        cookie = _secret(env, "WEBPURSE_MERCHANT_COOKIE_SECRET")
        return cls(
            data_dir=data_dir,
            database_url=env.get("WEBPURSE_MERCHANT_DATABASE_URL", ""),
            settlement_url=env.get("WEBPURSE_SETTLEMENT_URL", "http://127.0.0.1:8100"),
            settlement_api_key=_secret(env, "WEBPURSE_SETTLEMENT_API_KEY") or "",
            webhook_secret=_secret(env, "WEBPURSE_MERCHANT_WEBHOOK_SECRET"),
            cookie_secret=cookie.encode() if cookie else _cookie_secret_file(data_dir),
            agent_url=env.get("WEBPURSE_AGENT_URL", "http://127.0.0.1:47800"),
            public_url=env.get("WEBPURSE_MERCHANT_PUBLIC_URL", ""),
            settlement_batching=env.get("WEBPURSE_SETTLEMENT_BATCHING", "1") != "0",
            settlement_batches_in_flight=_at_least_one(
                env, "WEBPURSE_SETTLEMENT_BATCHES_IN_FLIGHT", "2"
            ),
            max_body_bytes=int(env.get("WEBPURSE_MERCHANT_MAX_BODY_BYTES", str(1 << 20))),
            redis_url=_secret(env, "WEBPURSE_REDIS_URL") or "",
            redis_prefix=env.get("WEBPURSE_REDIS_PREFIX", "webpurse"),
            node_name=env.get("WEBPURSE_NODE_NAME", "node"),
            takeover_interval=float(env.get("WEBPURSE_MERCHANT_TAKEOVER_INTERVAL", "2.0")),
        )


def _cookie_secret_file(data_dir: Path) -> bytes:
    """A per-installation cookie-signing secret, created once in the data dir (mode 600)."""
    path = data_dir / "merchant-cookie.secret"
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (FileNotFoundError, ValueError):
        data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(value.hex())
        return value


def _at_least_one(env: Mapping[str, str], name: str, default: str) -> int:
    """A whole number of at least 1 from ``env``, refused with a clear error otherwise."""
    text = env.get(name, default)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, not {text!r}")
    return value
