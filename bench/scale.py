"""Merchant server scale: idle agent WebSocket connections held by one merchant process.

The merchant process is ``bench.scale_server`` (the real shop app and its ``ReaderHub``);
this process runs the agents (``TerminalAgent`` with an emulated card each), pairs them in
steps and reads the merchant's resident memory (``VmRSS``) after each step.
Memory per connection = RSS delta ÷ connections, measured from a warmed-up baseline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.cards import memory_card
from bench.harness import ROOT, Context, Measurement, not_measured
from bench.scale_server import raise_fd_limit
from bench.servers import SetupError, free_port, stop_process

NAME = "scale"
CONNECTIONS = 1000
WARMUP = 10
STEPS = 4
PARALLEL = 50
START_TIMEOUT = 60.0


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SetupError(f"no VmRSS for process {pid}")


def per_connection_kib(baseline_mib: float, loaded_mib: float, connections: int) -> float:
    """Memory per connection in KiB from two RSS readings ``connections`` apart."""
    if connections <= 0:
        raise ValueError("need at least one connection more than the baseline")
    return (loaded_mib - baseline_mib) * 1024 / connections


class MerchantProcess:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "merchant.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.scale_server", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SetupError(f"merchant exited: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling interval of a bounded wait
        raise SetupError("merchant not healthy in time")

    def stop(self) -> None:
        stop_process(self.process, timeout=20)


async def _connect(http: httpx.AsyncClient, url: str, index: int, agents: list[Any]) -> None:
    from webpurse.agent.terminal import TerminalAgent
    from webpurse.reader.sim import SimReader

    async def consent(_: object) -> bool:
        return True

    binding = f"idle-{index}"
    response = await http.post(f"/bench/pairings/{binding}")
    response.raise_for_status()
    agent = TerminalAgent(
        SimReader(memory_card(index + 1)),
        consent=consent,
        show=lambda _: None,
        idle_timeout=3600,
    )
    await agent.pair(f"{url}/reader", token=response.json()["token"], origin=url)
    agents.append(agent)


async def _connect_many(
    http: httpx.AsyncClient, url: str, start: int, stop: int, agents: list[Any]
) -> None:
    for first in range(start, stop, PARALLEL):
        last = min(stop, first + PARALLEL)
        await asyncio.gather(*(_connect(http, url, i, agents) for i in range(first, last)))


async def _run(ctx: Context, merchant: MerchantProcess, total: int) -> list[Measurement]:
    agents: list[Any] = []
    rows: list[Measurement] = []
    rss_points: list[tuple[int, float]] = []
    try:
        async with httpx.AsyncClient(base_url=merchant.url, timeout=30.0) as http:
            await _connect_many(http, merchant.url, 0, WARMUP, agents)
            baseline = rss_mib(merchant.pid)
            rss_points.append((len(agents), baseline))
            started = time.perf_counter()
            with ctx.task("scale: idle agent connections", total=total) as advance:
                advance(WARMUP)
                step = max(1, (total - WARMUP) // STEPS)
                done = WARMUP
                while done < total:
                    target = min(total, done + step)
                    await _connect_many(http, merchant.url, done, target, agents)
                    advance(target - done)
                    done = target
                    rss_points.append((done, rss_mib(merchant.pid)))
            connect_seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
    connected = rss_points[-1][0]
    for connections, rss in rss_points:
        rows.append(Measurement(NAME, "merchant RSS", rss, "MiB", {"connections": connections}))
    rows.append(
        Measurement(
            NAME,
            "memory per idle connection",
            per_connection_kib(baseline, rss_points[-1][1], connected - WARMUP),
            "KiB",
            {"connections": connected},
        )
    )
    rows.append(
        Measurement(
            NAME,
            "pairings per second (connect + hello)",
            (connected - WARMUP) / connect_seconds,
            "1/s",
            {"parallel": PARALLEL},
        )
    )
    return rows


def run(ctx: Context) -> list[Measurement]:
    total = CONNECTIONS if not ctx.quick else 100
    limit = raise_fd_limit()
    if limit < total + 200:
        reason = f"file-descriptor limit {limit} too low for {total} connections"
        return [not_measured(NAME, "memory per idle connection", "KiB", reason)]
    with tempfile.TemporaryDirectory(prefix="webpurse-bench-scale-") as folder:
        merchant = MerchantProcess(Path(folder))
        try:
            merchant.start()
            return asyncio.run(_run(ctx, merchant, total))
        except SetupError as exc:
            return [not_measured(NAME, "memory per idle connection", "KiB", str(exc))]
        finally:
            merchant.stop()
