"""The client side of a purchase, A/B: ``python bench/client_cpu.py SRC_A SRC_B [ROUNDS]``.

What the settlement benchmark's client process spends per purchase (the merchant's
``BatchingSettlementClient`` over httpx, the card emulator, the bench's loop), for two
checkouts of this repository against ONE settlement server (this checkout's), windows
interleaved A B, B A, A B …: each window runs in a process of its own whose ``webpurse``
and ``bench`` come from that checkout (``SRC`` is a checkout's root), and reports
``time.process_time()`` per purchase. The cards' states go from window to window through a
file, so every window continues the cards' real counters. Not in ``make bench``'s list:
an engineer's tool for client-side changes (issue 20).

``--fake SRC_A SRC_B [ROUNDS]``: the same without a server or a network: each window's
shoppers talk to :class:`FakeSettlement` in their own process (its CPU counts too, the
same for both); ``--fake-uvloop-b``: B is A's code on uvloop (what uvicorn runs a shop on).

Environment: ``WEBPURSE_BENCH_SHOPPERS`` (512), ``WEBPURSE_BENCH_CLIENT_SECONDS`` (8),
``WEBPURSE_BENCH_IN_FLIGHT`` (the shop's default); ``--profile FILE`` (one window of
``SRC_A`` under cProfile instead of the A/B).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.servers import SettlementEnvironment, SettlementProcess

SHOPPERS = int(os.environ.get("WEBPURSE_BENCH_SHOPPERS", "512"))
SECONDS = float(os.environ.get("WEBPURSE_BENCH_CLIENT_SECONDS", "8"))
DATABASE = "webpurse_bench_client_cpu"  # not the settlement benchmark's: others may run it


def _child(url: str, api_key: str, cards_file: str, in_flight: int, profile: str) -> None:
    """One measured window, in this process, with the checkout on ``sys.path``."""
    from bench.issue_cards import decode, encode
    from bench.settlement import measure_window
    from webpurse.card import CardApplet, MemoryStore

    class _NoServer:
        def cpu_seconds(self) -> float:
            return 0.0

    import secrets

    states = decode(Path(cards_file).read_text())
    cards = [CardApplet(s, MemoryStore(s), secrets.token_bytes) for s in states]
    window = measure_window(
        url, api_key, cards, SECONDS, _NoServer(), batching=True, database="-", in_flight=in_flight
    )
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, window)
        profiler.dump_stats(profile)
    else:
        result = asyncio.run(window)
    Path(cards_file).write_text(encode([card.state for card in cards]))
    json.dump(
        {
            "purchases": result.purchases,
            "cpu": result.client_cpu_seconds,
            "card": result.card_seconds,
            "batches": result.batches,
            "items": result.batched_items,
            "errors": result.errors[:3],
        },
        sys.stdout,
    )


class FakeSettlement:
    """Settlement's batch API in process, for ``--fake``: answers shaped like the real ones
    (``views.payment_json``), DEBIT APDUs whose MAC1 the card accepts (all bench cards share
    ``bench.cards.DPK``). Its CPU counts in the client's, the same for A and B."""

    def __init__(self) -> None:
        self._payments: dict[str, dict[str, object]] = {}
        self._seq = 0

    def __call__(self, request: object) -> object:
        import httpx

        assert isinstance(request, httpx.Request)
        items = json.loads(request.content)["requests"]
        answers = [{"status": 200, "body": self._item(i["path"], i["body"])} for i in items]
        return httpx.Response(200, content=json.dumps({"responses": answers}).encode())

    def _item(self, path: str, body: dict[str, str]) -> dict[str, object]:
        import datetime as dt

        from bench.cards import DPK
        from webpurse.protocol import commands as cmd
        from webpurse.protocol import host

        parts = path.split("/")
        if len(parts) == 3:  # create
            self._seq += 1
            payment_id = f"pay_{self._seq:024x}"
            now = dt.datetime.now(dt.UTC).isoformat()
            self._payments[payment_id] = {
                "id": payment_id,
                "object": "payment",
                "status": "requires_card",
                "amount": body["amount"],
                "currency": "CNY",
                "description": body["description"],
                "merchant_reference": body["merchant_reference"],
                "metadata": {},
                "terminal_id": "0000000000A1",
                "key_index": 1,
                "card_number": None,
                "decline_code": None,
                "tac": None,
                "amount_refunded": 0,
                "created_at": now,
                "updated_at": now,
                "authorisation": None,
            }
            return self._payments[payment_id]
        payment = self._payments[parts[3]]
        if parts[4] == "authorise":
            init = cmd.InitializeForPurchaseResponse.from_data(
                bytes.fromhex(body["initialize_response"])
            )
            when = dt.datetime(2026, 12, 6, 19, 0, 0)
            self._seq += 1
            mac1 = host.purchase_mac1(
                DPK,
                random=init.random,
                offline_counter=init.offline_counter,
                terminal_seq=self._seq,
                amount=int(str(payment["amount"])),
                terminal_id=bytes.fromhex(str(payment["terminal_id"])),
                date=when.date(),
                time=when.time(),
            )
            debit = cmd.DebitForPurchase(self._seq, when.date(), when.time(), mac1)
            payment["status"] = "authorised"
            payment["card_number"] = "8888000000000000123"
            payment["authorisation"] = {
                "terminal_seq": self._seq,
                "date": "20261206",
                "time": "190000",
                "mac1": mac1.hex().upper(),
                "debit_apdu": debit.to_apdu().to_bytes().hex().upper(),
            }
            return payment
        payment["status"] = "succeeded"
        payment["tac"] = body["debit_response"][:8]
        return self._payments.pop(parts[3])


def _fake_child(in_flight: int) -> None:
    """One window against :class:`FakeSettlement` (no server, no network)."""
    import contextlib
    import secrets
    from collections.abc import AsyncIterator

    import httpx

    import bench.settlement
    from bench.cards import card_state
    from webpurse.card import CardApplet, MemoryStore

    fake = FakeSettlement()

    @contextlib.asynccontextmanager
    async def in_process(url: str, connections: int = 100) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.MockTransport(fake)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url=url) as client:
            yield client

    class _NoServer:
        def cpu_seconds(self) -> float:
            return 0.0

    bench.settlement.http_client = in_process  # type: ignore[attr-defined,unused-ignore]
    states = [card_state(n + 1) for n in range(SHOPPERS)]
    cards = [CardApplet(s, MemoryStore(s), secrets.token_bytes) for s in states]
    window = bench.settlement.measure_window(
        "http://fake",
        "sk",
        cards,
        SECONDS,
        _NoServer(),
        batching=True,
        database="-",
        in_flight=in_flight,
    )
    if os.environ.get("WEBPURSE_BENCH_UVLOOP") == "1":  # the loop uvicorn runs a shop on
        import uvloop

        uvloop.install()
    result = asyncio.run(window)
    json.dump(
        {
            "purchases": result.purchases,
            "cpu": result.client_cpu_seconds,
            "card": result.card_seconds,
            "batches": result.batches,
            "items": result.batched_items,
            "errors": result.errors[:3],
        },
        sys.stdout,
    )


def _window(
    root: Path, url: str, api_key: str, cards_file: Path, in_flight: int, profile: str = ""
) -> dict[str, object]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    done = subprocess.run(
        [sys.executable, __file__, "--child", url, str(cards_file), str(in_flight), profile],
        input=api_key,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"window of {root} failed: {done.stderr[-2000:]}")
    answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


async def _fund(url: str, api_key: str, cards: list[object]) -> None:
    from bench.servers import fund_cards, http_client
    from bench.settlement import FUNDING, FUNDING_GROUP
    from webpurse.merchant.settlement import SettlementClient

    async with http_client(url) as http:
        funder = SettlementClient(http, api_key)
        for start in range(0, len(cards), FUNDING_GROUP):
            await fund_cards(funder, cards[start : start + FUNDING_GROUP], FUNDING)  # type: ignore[arg-type]


def _fake_ab(roots: list[Path], rounds: int, *, uvloop_b: bool = False) -> None:
    from bench.settlement import BATCHES_IN_FLIGHT

    in_flight = int(os.environ.get("WEBPURSE_BENCH_IN_FLIGHT", str(BATCHES_IN_FLIGHT)))
    per: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(roots[which] / "src"), str(roots[which])])
            if uvloop_b:
                env["WEBPURSE_BENCH_UVLOOP"] = "1" if which == 1 else "0"
            done = subprocess.run(
                [sys.executable, __file__, "--fake-child", str(in_flight)],
                cwd=roots[which],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"window of {roots[which]} failed: {done.stderr[-2000:]}")
            answer = json.loads(done.stdout.strip().splitlines()[-1])
            ms = 1000 * answer["cpu"] / max(answer["purchases"], 1)
            per[which].append(ms)
            print(
                f"{time.strftime('%H:%M:%S')} round {r + 1} {'AB'[which]}: "
                f"{answer['purchases'] / SECONDS:7.0f}/s  client+fake CPU {ms:.4f} ms/purchase "
                f"batches {answer['batches']} items {answer['items']} errors {answer['errors']}",
                flush=True,
            )
    for which in (0, 1):
        values = per[which]
        print(
            f"{'AB'[which]} {roots[which]}: median {statistics.median(values):.4f} ms "
            f"(min {min(values):.4f}, max {max(values):.4f}, n={len(values)})"
        )


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.pgbench import PgServer
    from bench.servers import SettlementEnvironment, SettlementProcess
    from bench.settlement import BATCHES_IN_FLIGHT, WORKERS

    if argv and argv[0] in ("--fake", "--fake-uvloop-b"):
        roots = [Path(a).resolve() for a in argv[1:3]]
        rounds = int(argv[3]) if len(argv) > 3 else 6
        _fake_ab(roots, rounds, uvloop_b=argv[0] == "--fake-uvloop-b")
        return
    profile = ""
    if argv and argv[0] == "--profile":
        profile, argv = argv[1], argv[2:]
    roots = [Path(a).resolve() for a in argv[:2]]
    rounds = int(argv[2]) if len(argv) > 2 else 4
    in_flight = int(os.environ.get("WEBPURSE_BENCH_IN_FLIGHT", str(BATCHES_IN_FLIGHT)))
    pg = PgServer.from_env()
    with tempfile.TemporaryDirectory(prefix="webpurse-client-cpu-") as folder:
        environment = SettlementEnvironment(pg, Path(folder), database=DATABASE)
        server = SettlementProcess(environment, workers=WORKERS)
        try:
            _measure(environment, server, roots, rounds, in_flight, profile)
        finally:
            server.stop()
            environment.drop()


def _measure(
    environment: SettlementEnvironment,
    server: SettlementProcess,
    roots: list[Path],
    rounds: int,
    in_flight: int,
    profile: str,
) -> None:
    from bench import lean
    from bench.issue_cards import encode

    pg = environment.pg
    folder = environment.folder
    merchant = environment.initialise()
    cards = environment.issue_cards(SHOPPERS)
    server.start()
    asyncio.run(_fund(server.url, merchant.api_key, cards))  # type: ignore[arg-type]
    lean.analyze(pg, environment.database)
    cards_file = Path(folder) / "cards.json"
    cards_file.write_text(encode([card.state for card in cards]))
    if profile:
        print(_window(roots[0], server.url, merchant.api_key, cards_file, in_flight, profile))
        return
    per: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            started = time.strftime("%H:%M:%S")
            answer = _window(roots[which], server.url, merchant.api_key, cards_file, in_flight)
            purchases = int(answer["purchases"])  # type: ignore[call-overload]
            ms = 1000 * float(answer["cpu"]) / max(purchases, 1)  # type: ignore[arg-type]
            card_ms = 1000 * float(answer["card"]) / max(purchases, 1)  # type: ignore[arg-type]
            per[which].append(ms)
            print(
                f"{started} round {r + 1} {'AB'[which]} {roots[which].name}: "
                f"{purchases / SECONDS:7.0f}/s  client CPU {ms:.4f} ms/purchase  "
                f"card {card_ms:.4f} ms  batches {answer['batches']} "
                f"errors {answer['errors']}",
                flush=True,
            )
    for which in (0, 1):
        values = per[which]
        print(
            f"{'AB'[which]} {roots[which]}: median {statistics.median(values):.4f} ms "
            f"(min {min(values):.4f}, max {max(values):.4f}, n={len(values)})"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fake-child"]:
        sys.path.pop(0)
        _fake_child(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--child"]:
        sys.path.pop(0)  # this folder: ``bench`` and ``webpurse`` come from PYTHONPATH
        _url, _cards, _in_flight, _profile = sys.argv[2:6]
        _child(_url, sys.stdin.read(), _cards, int(_in_flight), _profile)
    else:
        main(sys.argv[1:])
