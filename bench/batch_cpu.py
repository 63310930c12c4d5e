"""CPU per purchase of ``batch.run`` in process, per step, and two revisions side by side.

``python -m bench.batch_cpu [--items 250] [--rounds 3] [--backend sqlite|postgresql]
[--profile FILE]``: one process, one fresh database (the tests' ``make_world``: a SQLite
file, or a schema on ``WEBPURSE_TEST_POSTGRES_URL`` dropped afterwards), ``--items`` funded
cards; each round is three ``POST /v1/batch`` calls (create, authorise, capture of one
purchase per card, each item with its idempotency key). Only ``batch.run`` is timed, with
``time.process_time`` (CPU of this process: the database server's work is not counted,
and neither is the client's nor the card emulator's), and printed as µs per item per step.
``--profile`` writes a cProfile of ``batch.run`` alone (every round) to FILE.

``python -m bench.batch_cpu --compare SRC_A SRC_B [--pairs 3] [...]``: runs the above
alternately (A, B, A, B, …) with ``PYTHONPATH`` leading to each ``src`` folder (e.g. a
``git archive`` of the base revision's ``src``), and prints each step's median µs per item
for both: the two revisions on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = ("create", "authorise", "capture")
ROOT = Path(__file__).resolve().parent.parent


def _measure(items: int, rounds: int, backend: str, profile: str | None) -> dict[str, list[float]]:
    # Imported here: with --compare this process only drives others, whose PYTHONPATH
    # chooses the revision of webpurse they import. The tests' support module by name:
    # the bench does not type-check the test suite.
    support: Any = importlib.import_module("tests.settlement.support")
    from webpurse.settlement import batch

    FakeClock, database_url, make_world, ok = (
        support.FakeClock,
        support.database_url,
        support.make_world,
        support.ok,
    )

    cpu: dict[str, float] = {}
    # CPU time, as the measurement: waiting for the database is not counted.
    profiler = cProfile.Profile() if profile else None
    real: Callable[..., Any] = batch.run

    def timed(*args: Any, **kwargs: Any) -> Any:
        if profiler is not None:
            profiler.enable()
        before = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            cpu["last"] = time.process_time() - before
            if profiler is not None:
                profiler.disable()

    batch.run = timed  # type: ignore[assignment]
    results: dict[str, list[float]] = {step: [] for step in STEPS}
    with (
        tempfile.TemporaryDirectory() as folder,
        database_url(backend, Path(folder)) as url,
        make_world(url, clock=FakeClock(), float_fen=10**12) as world,
    ):
        cards = [world.funded_card(100_000) for _ in range(items)]
        terminal = world.terminal
        for round_ in range(rounds):

            def post(requests: list[dict[str, Any]], step: str) -> list[dict[str, Any]]:
                answer = world.client.post(
                    "/v1/batch",
                    json={"requests": requests},
                    headers=world.auth(world.merchant_key),
                )
                assert answer.status_code == 200, answer.text
                responses: list[dict[str, Any]] = answer.json()["responses"]
                assert all(r["status"] in (200, 201) for r in responses), responses[:2]
                assert not any(r["replayed"] for r in responses)
                results[step].append(cpu["last"] / len(requests) * 1e6)
                return responses

            created = post(
                [
                    {
                        "path": "/v1/payments",
                        "idempotency_key": f"c{round_}-{i}",
                        "body": {"amount": 1, "description": "bench"},
                    }
                    for i in range(items)
                ],
                "create",
            )
            ids = [r["body"]["id"] for r in created]
            requests = []
            for i, (pid, card) in enumerate(zip(ids, cards, strict=True)):
                issuer, init = terminal.purchase_batch1(card, 1)
                requests.append(
                    {
                        "path": f"/v1/payments/{pid}/authorise",
                        "idempotency_key": f"a{round_}-{i}",
                        "body": {
                            "issuer_data": issuer.hex(),
                            "initialize_response": init.hex(),
                            "terminal_id": terminal.terminal_id,
                        },
                    }
                )
            authorised = post(requests, "authorise")
            debits = [
                ok(card, bytes.fromhex(a["body"]["authorisation"]["debit_apdu"]))
                for card, a in zip(cards, authorised, strict=True)
            ]
            post(
                [
                    {
                        "path": f"/v1/payments/{pid}/capture",
                        "idempotency_key": f"k{round_}-{i}",
                        "body": {"debit_response": d.hex()},
                    }
                    for i, (pid, d) in enumerate(zip(ids, debits, strict=True))
                ],
                "capture",
            )
    batch.run = real  # type: ignore[assignment]
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    return results


def _compare(sources: list[str], pairs: int, forwarded: list[str]) -> None:
    runs: dict[str, dict[str, list[float]]] = {s: {step: [] for step in STEPS} for s in sources}
    for _ in range(pairs):
        for source in sources:
            env = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{ROOT}"}
            out = subprocess.run(
                [sys.executable, "-m", "bench.batch_cpu", "--json", *forwarded],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for step, values in json.loads(out.splitlines()[-1]).items():
                runs[source][step] += values
    width = max(len(s) for s in sources) + 8
    print(f"{'µs/item':<{width}}  " + "  ".join(f"{s:>9}" for s in STEPS) + "      sum")
    # The minimum as well as the median: on a shared machine the least disturbed samples
    # are the closest to the code's own cost.
    for name, pick in (("median", statistics.median), ("min", min)):
        for source in sources:
            values = [pick(runs[source][step]) for step in STEPS]
            cells = "  ".join(f"{v:9.1f}" for v in values)
            print(f"{f'{source} {name}':<{width}}  {cells}  {sum(values):7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--profile", help="write a cProfile of batch.run to this file")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    parser.add_argument("--compare", nargs="+", metavar="SRC", help="src folders to compare")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    if args.compare:
        forwarded = ["--items", str(args.items), "--rounds", str(args.rounds)]
        _compare(args.compare, args.pairs, [*forwarded, "--backend", args.backend])
        return
    results = _measure(args.items, args.rounds, args.backend, args.profile)
    if args.json:
        print(json.dumps(results))
        return
    for step in STEPS:
        samples = ", ".join(f"{v:.1f}" for v in results[step])
        print(f"{step:>9}: median {statistics.median(results[step]):7.1f} µs/item ({samples})")
    print(f"      sum: {sum(statistics.median(results[s]) for s in STEPS):7.1f} µs/purchase")


if __name__ == "__main__":
    main()
