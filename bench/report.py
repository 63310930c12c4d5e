"""``docs/performance.md`` and its plots, regenerated from ``bench/results.json``.

Each benchmark's section shows its most recent run (date, commit, machine), a table of
every row, and a plot where one helps. Ratios are taken only between rows of one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Measurement, Run, format_value, latest_by_benchmark

REPORT_FILE = ROOT / "docs" / "performance.md"
IMAGE_DIR = ROOT / "docs" / "img"
FINDINGS_FILE = ROOT / "bench" / "findings.md"

TITLES = {
    "micro": "Micro benchmarks: host MACs, card commands, in-process purchase",
    "pgbench": "PostgreSQL reference: pgbench tpcb-like",
    "settlement": "Settlement throughput through the HTTP API, beside pgbench",
    "processes": "Settlement throughput against the number of settlement processes",
    "latency": "End-to-end purchase latency by stage",
    "scale": "Merchant server: idle agent WebSocket connections",
    "pn532": "A purchase over a PN532 serial line: bytes on the wire, 115200 baud, the pty",
    "security": "Security module: software vs PKCS#11 token (SoftHSM2)",
    "rtt": "Purchase latency against the internet's round trip (delaying proxy)",
    "versions": "Settlement code versions side by side (before → after, interleaved)",
}

NOTES = {
    "versions": (
        "`python -m bench versions --rev BEFORE --rev AFTER` (or `WEBPURSE_BENCH_REVS`): "
        "pgbench tpcb-like and the lean purchase SQL at 8 clients once, then each revision's "
        "own settlement (a git worktree of it run with this venv, its own database migrated "
        "by its own Alembic scripts, its cards registered by its code, `webpurse serve "
        "settlement` with 2 workers), 512 batched shoppers per window, the revisions in the "
        "given order in odd rounds and reversed in even ones (A B, B A, …), so the machine's "
        "drift shows as a drift rather than as a difference between versions. `ratio` = "
        "purchases/s ÷ tpcb-like TPS of the same run; CPU per purchase as in the settlement "
        "benchmark (server: its process tree; PostgreSQL: background processes and that "
        "revision's database's backends); `load` = the machine's 1-minute load average at "
        "the end of the window. The 512 shoppers move in step (each batch carries them all), "
        "so purchases/s comes in steps of 512 ÷ the window (34/s at 15 s). Each window starts "
        "with its database `ANALYZE`d: without that (autovacuum off), a run on 2026-12-06 saw "
        "windows collapse to 239–341/s at 2–3.5 ms of PostgreSQL CPU per purchase, for either "
        "revision, as the earlier windows' rows piled up. See `bench/versions.py`."
    ),
    "security": (
        "One Python process; the same master keys in both modules (the token's imported as "
        "by `webpurse settlement migrate-keys-to-token`). `MACs/s`: `purchase_mac1` through "
        "the module, card key cached (software: 3DES session key + DES CBC-MAC in memory; "
        "token: C_DeriveKey + C_Encrypt + C_DestroyObject). `purchases/s`: a card emulator "
        "in process, INITIALIZE, MAC1, DEBIT, MAC2 and TAC verified by the module. See "
        "docs/security-module.md."
    ),
    "micro": (
        "One Python process, one core, no I/O except the card image's write + fsync + rename "
        "per committing command (`image (fsync)`); host rows are the settlement security "
        "module's work per call, card rows are `CardApplet.process` per APDU. The machine is "
        "shared with other engineers' test runs, so fsync-bound rows vary by several times "
        "between runs; compare rows of one run only."
    ),
    "pgbench": (
        "Debian's `pgbench`, built-in tpcb-like transaction (5 statements, 3 updates), "
        "`-M prepared -j 2`, scale 10, on its own database `webpurse_bench` on the same "
        "PostgreSQL server the settlement benchmark uses. This is the ceiling one PostgreSQL "
        "on this machine gives a simple write transaction."
    ),
    "settlement": (
        "Completed purchases per second through the settlement HTTP API as a merchant calls "
        "it (create payment, authorise, capture: three POSTs, each committing to "
        "PostgreSQL), against a real uvicorn process (`webpurse serve settlement`, INFO "
        "logs), with N concurrent clients (the merchant's `SettlementClient` over one "
        "httpx.AsyncClient), each with its own card. The card emulator answers in the "
        "client process between the calls; its time is counted separately (`card emulator "
        "per purchase`). pgbench runs at the same N just before, in the same run: `ratio` = "
        "settlement purchases/s ÷ pgbench TPS. *Batched* rows: N shoppers of one merchant "
        "server whose settlement client (`BatchingSettlementClient`) sends their concurrent "
        "calls as `POST /v1/batch` (group commit: one transaction per batch, hot accounts "
        "locked once per batch); `ratio batched/pgbench best` divides by the best pgbench TPS "
        "of the run (PostgreSQL's own limit here; pgbench cannot open 128 or 512 "
        "connections: max_connections is 100). "
        "`PostgreSQL CPU per purchase` sums, from /proc, the CPU of PostgreSQL's background "
        "processes and of the benchmark database's backends (other databases' connections "
        "— other people's tests on this shared machine — are left out); over a pgbench run, "
        "whose backends exit inside the window, it is sampled every 50 ms. "
        "*Lean purchase SQL*: at the same N, between tpcb-like and the server, pgbench runs "
        "`bench/lean/purchase.pgbench` on `bench/lean/schema.sql` (see `bench/lean.py`): "
        "the SQL of a purchase that keeps every guarantee (double entry with one zero-sum "
        "transfer per purchase, idempotency keys as unique columns of the payment, one "
        "transaction in flight per card, the card's shadow balance and counters, its MACs "
        "kept for the audit, an outbox row), `batch` purchases per script run through "
        "create, authorise and capture with one commit per step and the merchant's payable "
        "updated once per batch, last; purchases/s = TPS × batch. It is the physical limit "
        "of a purchase here, not settlement's schema. Every database is `ANALYZE`d after "
        "loading (pgbench -i vacuums its own), and the `autovacuum` row says whether "
        "PostgreSQL would gather statistics by itself."
    ),
    "processes": (
        "Settlement nodes are stateless: 1, 2 and 4 one-worker `webpurse serve settlement` "
        "processes on one PostgreSQL database, pgbench tpcb-like at the same client count "
        "just before in the same run (`ratio` = settlement purchases/s ÷ pgbench TPS). "
        "*one port*: the processes share one port with `--reuse-port` (each its own "
        "`SO_REUSEPORT` listening socket, the kernel spreading the connections), 32 merchant "
        "clients making one call per request, all in the bench process. *batched, a port "
        "each*: each process on its own port, as behind a load balancer, with one "
        "`BatchingSettlementClient` of 256 ÷ processes shoppers in front of it, each batcher "
        "in a client process of its own, all in one wall-clock window, purchases added up; "
        "once with every batcher for *one merchant* (each batch locks that merchant's "
        "payable account) and once with *a merchant each*. Clients, servers and PostgreSQL "
        "share the same 2 cores, and the machine is shared with other engineers' test runs "
        "while this was measured (see the load average): compare rows of one run only. See "
        "`bench/processes.py`."
    ),
    "latency": (
        "Purchases one at a time through the merchant's flow (`run_transaction`): create "
        "payment, batch 1 (SELECT, READ BINARY, INITIALIZE), authorise, batch 2 (DEBIT), "
        "capture. Settlement is a real uvicorn process on PostgreSQL; the merchant's "
        "`ReaderHub` and the agent talk over a real WebSocket; each payment pairs a new "
        "agent session (`pairing`, not part of the purchase total). Stages, from wrappers "
        "and hooks attached from outside: `card` = the emulator's own processing (SimReader "
        "hooks); `reader` = the reader backend around it (for pcsc: card + pcscd + vpcd); "
        "`relay` = merchant↔agent WebSocket and the agent; `settlement` = HTTP calls to "
        "settlement minus `database` = statement and commit time inside settlement "
        "(SQLAlchemy events in the server process); `merchant` = the rest (flow code, "
        "event loop)."
    ),
    "scale": (
        "Idle agent WebSocket connections held open to one merchant process; memory per "
        "connection = RSS delta ÷ connections."
    ),
    "rtt": (
        "The `latency` rig (settlement a uvicorn process on PostgreSQL, the shop's "
        "`ReaderHub`, a `TerminalAgent` with the card emulator) with a delaying TCP proxy "
        "(`bench/delay_proxy.py`, asyncio, loopback only: the kernel has no `netem`) between "
        "the agent and the shop: each byte is forwarded one-way delay later, each way (RTT = "
        "2 × delay); a new connection's first bytes reach the shop 1.5 RTT after its connect "
        "(the TCP handshake). TLS is not modelled (TLS 1.3 adds one RTT to a new connection). "
        "Settlement stays next to the shop. *batch 1 → capture answer*: on an established "
        "session with the payment created, from the shop sending batch 1 to settlement's "
        "answer to the capture (goal p50 ≤ 2 × RTT + 20 ms). *From the pay click*: from the "
        "agent being asked to pair (the page's pay button, on the shopper's machine) through "
        "its WebSocket to the shop, the payment's creation and the purchase. *Of which*: the "
        "shop's two transmits to the card (relay, agent, emulator: what the RTT multiplies) "
        "and settlement's two calls (authorise, capture on PostgreSQL: the fixed part the "
        "goal's 20 ms must cover). Purchases one at a time; the machine is shared with other "
        "work, so the settlement part varies between runs."
    ),
}

INTRO = """\
# webpurse performance

Generated by `python -m bench` (`make bench`) from `bench/results.json`; do not edit by
hand — rerun `python -m bench --report-only` after changing the generator. Each section
shows the latest run of that benchmark; every ratio compares numbers measured side by side
in one run on one machine. A row without a number says why it was not measured.

Run one benchmark with `python -m bench micro` (names: {names}); `--quick` is a smoke
test that saves nothing. Needs PostgreSQL at 127.0.0.1:5432 (`scripts/services.sh`; set
`WEBPURSE_BENCH_PG_HOST/PORT/USER` otherwise) and Debian's `pgbench`; it creates and drops
its own databases (`webpurse_bench`, `webpurse_bench_settlement`, `webpurse_bench_latency`,
`webpurse_bench_version_*`). `python -m bench versions --rev A --rev B` compares git revisions
of settlement in one run (not part of the default set).
py-spy (dev extra) profiles the settlement server; the PC/SC latency row needs pyscard,
pcscd with vsmartcard-vpcd and a free vpcd slot. A missing part gives a "not measured yet"
row with the reason, never a number.
"""


def _params(row: Measurement) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.params.items())


def table(rows: Sequence[Measurement]) -> str:
    """A Markdown table of ``rows``: metric, conditions, value, and any note."""
    lines = ["| metric | conditions | value | note |", "|---|---|---:|---|"]
    for row in rows:
        value = format_value(row.value, row.unit) if row.measured else "—"
        note = row.note.replace("|", "\\|")
        lines.append(f"| {row.metric} | {_params(row)} | {value} | {note} |")
    return "\n".join(lines)


def _run_line(run: Run) -> str:
    m = run.machine
    dirty = " (with uncommitted changes)" if run.dirty else ""
    return (
        f"Run {run.date}, commit `{run.commit[:10]}`{dirty}; {m.get('cpu', '?')}, "
        f"{m.get('cpus', '?')} CPUs, {m.get('memory_gib', '?')} GiB, Python {m.get('python', '?')}."
        + _load_text(m)
    )


def _load_text(machine: dict[str, object]) -> str:
    start, end = machine.get("load_average"), machine.get("load_average_end")
    if not isinstance(start, list) or not start:
        return ""
    text = f" Load average (1 min) {start[0]} at the start"
    if isinstance(end, list) and end:
        text += f", {end[0]} at the end"
    return text + " of the run (other work shares this machine)."


# --- plots ------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_micro(rows: Sequence[Measurement], path: Path) -> bool:
    measured = [r for r in rows if r.measured]
    if not measured:
        return False
    plt = _pyplot()
    labels = [
        f"{r.metric}" + (f" [{r.params['store']}]" if "store" in r.params else "") for r in measured
    ]
    values = [float(r.value or 0) for r in measured]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(measured) + 1.2))
    bars = ax.barh(range(len(values)), values, color="#4878a8")
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("operations per second (log scale)")
    ax.set_title("Micro benchmarks (one core, in process)")
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            value,
            bar.get_y() + bar.get_height() / 2,
            f" {format_value(value)}",
            va="center",
            fontsize=7,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _series(rows: Sequence[Measurement], metric: str, key: str) -> list[tuple[float, float]]:
    points = [
        (float(r.params[key]), float(r.value))
        for r in rows
        if r.metric == metric and r.value is not None and key in r.params
    ]
    return sorted(points)


def plot_throughput(rows: Sequence[Measurement], path: Path) -> bool:
    series = {
        "pgbench tpcb-like (TPS)": _series(rows, "pgbench tps", "clients"),
        "lean purchase SQL under pgbench (purchases/s)": _series(
            rows, "lean purchase SQL purchases/s", "clients"
        ),
        "settlement purchases/s, one call per request": _series(
            rows, "settlement purchases/s", "clients"
        ),
        "settlement purchases/s, batched (group commit)": _series(
            rows, "settlement purchases/s (batched)", "clients"
        ),
    }
    if not any(series.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for points in series.values() for x, _ in points})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("per second (log scale)")
    ax.set_title("Settlement vs PostgreSQL's own limit (same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_latency(rows: Sequence[Measurement], path: Path) -> bool:
    stages = [r for r in rows if r.metric.startswith("stage ") and r.measured]
    if not stages:
        return False
    plt = _pyplot()
    preferred = ["sim", "sim via agent", "pcsc via agent"]
    found = {str(r.params.get("reader", "")) for r in stages}
    readers = [r for r in preferred if r in found] + sorted(found - set(preferred))
    fig, axes = plt.subplots(
        1, len(readers), figsize=(5.5 * len(readers), 4), squeeze=False, sharey=True
    )
    for ax, reader in zip(axes[0], readers, strict=True):
        mine = [r for r in stages if str(r.params.get("reader", "")) == reader]
        present = {r.metric.removeprefix("stage ") for r in mine}
        order = ["card", "reader", "relay", "merchant", "settlement", "database"]
        names = [n for n in order if n in present] + sorted(present - set(order))
        p50 = {
            r.metric.removeprefix("stage "): r.value for r in mine if r.params.get("stat") == "p50"
        }
        p99 = {
            r.metric.removeprefix("stage "): r.value for r in mine if r.params.get("stat") == "p99"
        }
        xs = range(len(names))
        for offset, values, label in ((-0.2, p50, "p50"), (0.2, p99, "p99")):
            heights = [max(values.get(n) or 0, 0.001) for n in names]
            bars = ax.bar([x + offset for x in xs], heights, 0.4, label=label)
            for bar, height in zip(bars, heights, strict=True):
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    height,
                    format_value(height),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, fontsize=8)
        ax.set_ylabel("ms per purchase (log scale)")
        ax.set_title(f"Purchase latency by stage, reader {reader}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_scale(rows: Sequence[Measurement], path: Path) -> bool:
    points = _series(rows, "merchant RSS", "connections")
    if len(points) < 2:
        return False
    plt = _pyplot()
    xs, ys = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("idle agent WebSocket connections")
    ax.set_ylabel("merchant process RSS (MiB)")
    ax.set_title("Merchant memory vs connections")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_processes(rows: Sequence[Measurement], path: Path) -> bool:
    """Purchases/s against settlement processes, one line per mode; pgbench as a level."""
    modes = sorted({str(r.params.get("mode")) for r in rows if "mode" in r.params})
    series = {
        mode: _series(
            [r for r in rows if r.params.get("mode") == mode], "settlement purchases/s", "processes"
        )
        for mode in modes
    }
    if not any(series.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for mode, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=f"settlement purchases/s, {mode}")
            for x, y in points:
                ax.annotate(
                    f"{y:,.0f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(6, -3),
                    ha="left",
                    fontsize=7,
                )
    tps = [r for r in rows if r.metric == "pgbench tps" and r.value is not None]
    if tps:
        ax.axhline(
            float(tps[0].value or 0),
            linestyle="--",
            color="grey",
            label=f"pgbench tpcb-like, {tps[0].params.get('clients')} clients (TPS)",
        )
    ticks = sorted({x for points in series.values() for x, _ in points})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set_yscale("log")
    ax.set_xlim(0.7, max(ticks) + 0.6)
    ax.set_xlabel("settlement processes (one worker each)")
    ax.set_ylabel("per second (log scale)")
    ax.set_title("Settlement purchases/s against processes (same run as pgbench)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PLOTS = {
    "micro": plot_micro,
    "processes": plot_processes,
    "settlement": plot_throughput,
    "pgbench": plot_throughput,
    "latency": plot_latency,
    "scale": plot_scale,
}


# --- the document -----------------------------------------------------------------------


def render(runs: Sequence[Run], *, plots: bool = True) -> str:
    """The whole Markdown document for ``runs`` (writing plots to ``docs/img`` if asked)."""
    parts = [INTRO.format(names=", ".join(f"`{n}`" for n in TITLES))]
    latest = latest_by_benchmark(runs)
    if not latest:
        parts.append("No benchmark has been run yet.\n")
    for name, title in TITLES.items():
        if name not in latest:
            continue
        run, rows = latest[name]
        parts.append(f"## {title}\n\n{NOTES.get(name, '')}\n\n{_run_line(run)}\n")
        plotter = PLOTS.get(name)
        image = IMAGE_DIR / f"{name}.png"
        if plots and plotter is not None:
            IMAGE_DIR.mkdir(parents=True, exist_ok=True)
            if plotter(rows, image):
                parts.append(f"![{title}](img/{image.name})\n")
        if name == "settlement":
            side = limits_table(rows)
            if side:
                parts.append(side)
        plain = [r for r in rows if not r.metric.startswith("profile")]
        if name == "versions" and any(r.params.get("round") for r in rows):
            parts.append(versions_tables(rows))
            parts.append(f"<details><summary>Every row</summary>\n\n{table(plain)}\n\n</details>\n")
        else:
            parts.append(table(plain) + "\n")
        profile = [r for r in rows if r.metric.startswith("profile")]
        if profile:
            parts.append(profile_tables(profile))
    findings = FINDINGS_FILE.read_text(encoding="utf-8") if FINDINGS_FILE.exists() else ""
    if findings:
        parts.insert(1, findings.rstrip() + "\n")
    if latest:
        parts.insert(1, summary(latest))
    return "\n".join(parts)


# The side-by-side table: (column title, metric) for throughput, then CPU per purchase.
LIMIT_RATES = (
    ("pgbench tpcb-like (TPS)", "pgbench tps"),
    ("lean purchase SQL (purchases/s)", "lean purchase SQL purchases/s"),
    ("settlement HTTP (purchases/s)", "settlement purchases/s"),
    ("settlement HTTP, batched", "settlement purchases/s (batched)"),
)
LIMIT_DATABASE_CPU = (
    "pgbench PostgreSQL CPU per transaction",
    "lean purchase SQL PostgreSQL CPU per purchase",
    "PostgreSQL CPU per purchase",
    "PostgreSQL CPU per purchase (batched)",
)
LIMIT_SERVER_CPU = ("server CPU per purchase", "server CPU per purchase (batched)")


def limits_table(rows: Sequence[Measurement]) -> str:
    """The three numbers side by side per client count: PostgreSQL's limit (tpcb-like),
    the lean purchase's SQL limit, and settlement through its API; with the CPU each costs.
    """
    wanted = {m for _, m in LIMIT_RATES} | set(LIMIT_DATABASE_CPU) | set(LIMIT_SERVER_CPU)
    cell: dict[tuple[str, float], float] = {}
    for row in rows:
        clients = row.params.get("clients")
        if row.metric in wanted and row.value is not None and isinstance(clients, int | float):
            cell[(row.metric, float(clients))] = row.value
    if not any(metric == "lean purchase SQL purchases/s" for metric, _ in cell):
        return ""
    counts = sorted({clients for _, clients in cell})

    def shown(metric: str, clients: float, unit: str = "") -> str:
        value = cell.get((metric, clients))
        return "—" if value is None else format_value(value, unit)

    titles = [title for title, _ in LIMIT_RATES]
    lines = [
        "Side by side, per client count (one run): "
        + ", ".join(titles)
        + "; PostgreSQL CPU ms per transaction or purchase in the same order; the "
        "settlement server's CPU ms per purchase (one call per request · batched).\n",
        "| clients | " + " | ".join(titles) + " | PostgreSQL CPU (ms) | server CPU (ms) |",
        "|---:|" + "---:|" * len(titles) + "---|---|",
    ]
    for clients in counts:
        rates = [shown(metric, clients) for _, metric in LIMIT_RATES]
        database = " · ".join(shown(m, clients) for m in LIMIT_DATABASE_CPU)
        server = " · ".join(shown(m, clients) for m in LIMIT_SERVER_CPU)
        lines.append(f"| {clients:g} | " + " | ".join(rates) + f" | {database} | {server} |")
    return "\n".join(lines) + "\n"


# The versions table: (column title, metric) per window.
VERSION_COLUMNS = (
    ("purchases/s", "settlement purchases/s (batched)"),
    ("ratio to tpcb-like", "ratio batched/pgbench best"),
    ("server CPU ms/purchase", "server CPU per purchase (batched)"),
    ("PostgreSQL CPU ms/purchase", "PostgreSQL CPU per purchase (batched)"),
    ("p50 ms", "purchase latency p50 (batched)"),
    ("load", "load average (1 min)"),
)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def versions_tables(rows: Sequence[Measurement]) -> str:
    """The versions run: the limits once, each window (round, revision) in measuring order,
    then each revision's median over its windows and its change against the first."""

    def value(metric: str, **wanted: object) -> float | None:
        for row in rows:
            if row.metric == metric and all(row.params.get(k) == v for k, v in wanted.items()):
                return row.value
        return None

    tpcb = value("pgbench tps")
    tpcb_cpu = value("pgbench PostgreSQL CPU per transaction")
    lean_rate = value("lean purchase SQL purchases/s")
    lean_ratio = value("ratio lean SQL/pgbench")
    lean_cpu = value("lean purchase SQL PostgreSQL CPU per purchase")
    clients = next((r.params.get("clients") for r in rows if r.metric == "pgbench tps"), "?")
    parts = [
        f"Limits, once at the start ({clients} clients): tpcb-like {format_value(tpcb)} TPS, "
        f"PostgreSQL CPU {format_value(tpcb_cpu)} ms per transaction; lean purchase SQL "
        f"{format_value(lean_rate)} purchases/s ({format_value(lean_ratio)} × tpcb-like), "
        f"PostgreSQL CPU {format_value(lean_cpu)} ms per purchase.\n"
    ]
    legend = [r for r in rows if r.metric == "revision"]
    if legend:
        parts.append(
            "Revisions, in the given order: "
            + "; ".join(
                f"`{r.params.get('rev')}` ({r.params.get('given')}): {r.note}" for r in legend
            )
            + ".\n"
        )

    def flight(row: Measurement) -> object:
        return row.params.get("in flight", 1)

    def label(rev: str, in_flight: object) -> str:
        return f"`{rev}`" + (f", {in_flight} in flight" if in_flight != 1 else "")

    def window_value(metric: str, number: object, rev: str, in_flight: object) -> float | None:
        for row in rows:
            wanted = (metric, number, rev, in_flight)
            if (row.metric, row.params.get("round"), row.params.get("rev"), flight(row)) == wanted:
                return row.value
        return None

    windows = [
        (r.params["round"], str(r.params.get("rev")), flight(r))
        for r in rows
        if r.metric == VERSION_COLUMNS[0][1] and "round" in r.params
    ]
    titles = [title for title, _ in VERSION_COLUMNS]
    lines = [
        "| round | rev | " + " | ".join(titles) + " |",
        "|---:|---|" + "---:|" * len(titles),
    ]
    for number, rev, in_flight in windows:
        cells = [
            format_value(
                window_value(metric, number, rev, in_flight)
                if metric != "load average (1 min)"
                else value(metric, round=number, rev=rev)
            )
            for _, metric in VERSION_COLUMNS
        ]
        lines.append(f"| {number} | {label(rev, in_flight)} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
    kinds = list(dict.fromkeys((rev, in_flight) for _, rev, in_flight in windows))
    medians: dict[tuple[str, object], list[float | None]] = {}
    for kind in kinds:
        medians[kind] = []
        for _, metric in VERSION_COLUMNS[:4]:
            found = [
                r.value
                for r in rows
                if r.metric == metric
                and (r.params.get("rev"), flight(r)) == kind
                and r.value is not None
            ]
            medians[kind].append(_median(found) if found else None)
    first = medians[kinds[0]] if kinds else []
    summary_lines = [
        "Per revision, the median of its windows (change against the first revision):\n",
        "| rev | windows | " + " | ".join(t for t, _ in VERSION_COLUMNS[:4]) + " |",
        "|---|---:|" + "---:|" * 4,
    ]
    for kind in kinds:
        count = sum(1 for _, rev, in_flight in windows if (rev, in_flight) == kind)
        cells = []
        for mine, base in zip(medians[kind], first, strict=True):
            text = format_value(mine)
            if kind != kinds[0] and mine is not None and base:
                text += f" ({100 * (mine - base) / base:+.0f} %)"
            cells.append(text)
        summary_lines.append(f"| {label(*kind)} | {count} | " + " | ".join(cells) + " |")
    parts.append("\n".join(summary_lines) + "\n")
    return "\n".join(parts)


SUMMARY_ROWS: tuple[tuple[str, str, dict[str, str | int | float | bool]], ...] = (
    ("micro", "full purchase (INIT+DEBIT+host MACs)", {"store": "memory"}),
    ("micro", "full purchase (INIT+DEBIT+host MACs)", {"store": "image (fsync)"}),
    ("settlement", "pgbench tps", {"clients": 8}),
    ("settlement", "lean purchase SQL purchases/s", {"clients": 8}),
    ("settlement", "ratio lean SQL/pgbench", {"clients": 8}),
    ("settlement", "lean purchase SQL PostgreSQL CPU per purchase", {"clients": 8}),
    ("settlement", "settlement purchases/s", {"clients": 1}),
    ("settlement", "settlement purchases/s", {"clients": 8}),
    ("settlement", "settlement purchases/s", {"clients": 32}),
    ("settlement", "ratio settlement/pgbench", {"clients": 8}),
    ("settlement", "server CPU per purchase", {"clients": 8}),
    ("settlement", "settlement purchases/s (batched)", {"clients": 8}),
    ("settlement", "settlement purchases/s (batched)", {"clients": 512}),
    ("settlement", "ratio settlement/pgbench (batched)", {"clients": 8}),
    ("settlement", "ratio batched/pgbench best", {"clients": 512}),
    ("settlement", "server CPU per purchase (batched)", {"clients": 512}),
    ("settlement", "PostgreSQL CPU per purchase (batched)", {"clients": 512}),
    (
        "processes",
        "settlement purchases/s",
        {"processes": 1, "mode": "batched, a port and a merchant each"},
    ),
    (
        "processes",
        "settlement purchases/s",
        {"processes": 2, "mode": "batched, a port and a merchant each"},
    ),
    (
        "processes",
        "settlement purchases/s",
        {"processes": 4, "mode": "batched, a port and a merchant each"},
    ),
    (
        "processes",
        "ratio settlement/pgbench",
        {"processes": 4, "mode": "batched, a port and a merchant each"},
    ),
    ("latency", "purchase total", {"reader": "sim via agent", "stat": "p50"}),
    ("latency", "purchase total", {"reader": "sim via agent", "stat": "p99"}),
    ("latency", "purchase total", {"reader": "pcsc via agent", "stat": "p50"}),
    ("latency", "merchant↔reader round trips per purchase", {"reader": "sim via agent"}),
    ("latency", "APDUs per purchase", {"reader": "sim via agent"}),
    ("latency", "database commits per purchase", {"reader": "sim via agent"}),
    ("scale", "memory per idle connection", {}),
)


def summary(latest: dict[str, tuple[Run, list[Measurement]]]) -> str:
    """The headline numbers, each from its benchmark's latest run."""
    lines = [
        "## Summary\n",
        "Headline numbers, each from the latest run of its benchmark (run date in the last "
        "column).\n",
        "| benchmark | metric | conditions | value | run |",
        "|---|---|---|---:|---|",
    ]
    for name, metric, wanted in SUMMARY_ROWS:
        if name not in latest:
            continue
        for row in latest[name][1]:
            if row.metric != metric or any(row.params.get(k) != v for k, v in wanted.items()):
                continue
            shown = format_value(row.value, row.unit) if row.measured else row.note or "—"
            when = latest[name][0].date[:16].replace("T", " ")
            lines.append(f"| {name} | {metric} | {_params(row)} | {shown} | {when} |")
            break
    return "\n".join(lines) + "\n"


def profile_tables(rows: Sequence[Measurement]) -> str:
    """py-spy's view of the server under load: share of samples per function/package."""
    parts = [
        "### Where the settlement server's time goes (py-spy, under batched load)\n",
        "Share of py-spy samples (`--nonblocking`, 200 Hz, one window each, shoppers batched "
        "by `BatchingSettlementClient`). *cpu*: only "
        "the thread holding the GIL (where the server's Python CPU goes); *wall*: every "
        "thread that is not idle (waits on PostgreSQL and locks included). *Own*: the "
        "function at the top of the stack; *package*: that function's package; "
        "*inclusive*: webpurse functions anywhere on the stack. Raw collapsed stacks: "
        "`bench/profile-settlement-{cpu,wall}.txt`.\n",
    ]
    kinds = sorted({r.metric for r in rows}, key=lambda k: (" cpu " not in k, k))
    for kind in kinds:
        mine = [r for r in rows if r.metric == kind]
        if not mine:
            continue
        clients = mine[0].params.get("clients", "?")
        parts.append(f"| {kind}, {clients} clients | share |\n|---|---:|")
        parts.extend(
            f"| `{r.params.get('where', '')}` | {format_value(r.value, r.unit)} |"
            if r.measured
            else f"| {r.note} | — |"
            for r in mine
        )
        parts.append("")
    return "\n".join(parts) + "\n"


def write(runs: Sequence[Run], path: Path = REPORT_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(runs), encoding="utf-8")
