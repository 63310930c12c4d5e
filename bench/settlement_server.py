"""The settlement server with database timers: ``python -m bench.settlement_server --port P``.

What ``webpurse serve settlement`` runs (``create_app(Settings.from_env())`` under
uvicorn, INFO logs), plus SQLAlchemy timers attached to its engine from outside
(``bench.timing.time_database``) and one bench-only route, ``GET /bench/database``, that
reports the cumulative database seconds and statement/commit counts. The latency
benchmark reads it between purchases, outside the timed window. (Hosting settlement inside
the benchmark's own process instead made each purchase 3-4 times slower: its worker
threads then compete for the GIL with the client and the agent.)
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from bench.timing import StageClock, time_database
from webpurse.settlement.app import create_app
from webpurse.settlement.logs import configure_logging
from webpurse.settlement.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    configure_logging(logging.INFO)
    app = create_app(Settings.from_env())
    clock = StageClock()
    time_database(app.state.settlement.engine, clock)

    @app.get("/bench/database", include_in_schema=False)
    def database() -> dict[str, object]:
        return {"seconds": clock.seconds.get("database", 0.0), "counts": dict(clock.counts)}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
