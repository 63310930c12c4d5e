"""The merchant process of the scale benchmark: ``python -m bench.scale_server --port P``.

The real merchant shop (``webpurse.merchant.app.create_app``) with its ``ReaderHub`` at
``/reader``, plus one bench-only route, ``POST /bench/pairings/{binding}``, that issues a
pairing token the way the payment page does (``hub.issue``) without an order: opening
1,000 orders would need 1,000 settlement payments and measure settlement, not the
WebSocket side. The file-descriptor limit is raised to its hard maximum.
"""

from __future__ import annotations

import argparse
import resource
import secrets
import tempfile
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from webpurse.merchant.app import create_app
from webpurse.merchant.settings import MerchantSettings
from webpurse.reader.remote import ReaderHub


def raise_fd_limit(wanted: int = 65_536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build(data_dir: Path) -> FastAPI:
    hub = ReaderHub()
    settings = MerchantSettings(
        data_dir=data_dir,
        settlement_url="http://127.0.0.1:9",  # never called: nobody pays in this benchmark
        settlement_api_key="sk_mer_unused",
        cookie_secret=secrets.token_bytes(32),
    )
    app = create_app(settings, hub=hub)

    @app.post("/bench/pairings/{binding}")
    async def pair(binding: str) -> dict[str, str]:
        return {"token": hub.issue(binding, display="bench").token}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="webpurse-bench-merchant-") as folder:
        uvicorn.run(build(Path(folder)), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
