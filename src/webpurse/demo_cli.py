"""``webpurse demo``: the command's options only; the harness loads when the demo runs.

The servers' entry point (:mod:`webpurse.cli`) imports this small module, never the demo's
scripted harness (:mod:`webpurse.demo`) or the cluster launcher (:mod:`webpurse.cluster`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from webpurse.cluster_defaults import DEFAULT_POSTGRES, DEFAULT_REDIS


def demo_command(
    data_dir: Annotated[Path, typer.Option(help="data folder (created on first run)")] = Path(
        "data/demo"
    ),
    scripted: Annotated[
        bool,
        typer.Option(
            "--scripted",
            help="run one purchase and one funded top-up headless, print receipts, exit",
        ),
    ] = False,
    port: Annotated[int, typer.Option(help="the shop's port (0: any free port)")] = 8000,
    settlement_port: Annotated[int, typer.Option(help="settlement's port (0: any)")] = 8100,
    agent_port: Annotated[int, typer.Option(help="the agent's loopback port")] = 47800,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="2 shop + 2 settlement processes behind HAProxy (TLS), PostgreSQL, Redis",
        ),
    ] = False,
    database_url: Annotated[
        str,
        typer.Option(
            envvar="WEBPURSE_CLUSTER_DATABASE_URL",
            help="--cluster: settlement's PostgreSQL database (the shop's: NAME_shop)",
        ),
    ] = DEFAULT_POSTGRES,
    redis_url: Annotated[
        str, typer.Option(envvar="WEBPURSE_CLUSTER_REDIS_URL", help="--cluster: Redis")
    ] = DEFAULT_REDIS,
) -> None:
    """Run settlement, the shop, and an agent with an emulated card; Ctrl-C stops them."""
    # The demo's harness (processes, a scripted shopper) is imported only when it runs:
    # ``webpurse serve …`` imports this module, not the harness.
    from webpurse.demo import Ports

    ports = Ports(shop=port, settlement=settlement_port, agent=agent_port)
    if not cluster:
        from webpurse.demo import demo

        demo(data_dir=data_dir, scripted=scripted, ports=ports)
        return
    from webpurse.cluster import cluster_demo

    cluster_demo(
        data_dir if data_dir != Path("data/demo") else Path("data/demo-cluster"),
        scripted=scripted,
        ports=ports,
        database_url=database_url,
        redis_url=redis_url,
    )
