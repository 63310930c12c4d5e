"""``webpurse settlement clearing``: run the daily clearing on the settlement database.

Local admin command (it touches the ledger directly, like ``webpurse settlement init``);
settings come from the environment (``WEBPURSE_DATABASE_URL``, ``WEBPURSE_DATA_DIR``,
``WEBPURSE_CLEARING_TZ``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from webpurse.settlement.clearing import (
    ClearingError,
    MerchantFailure,
    last_closed_day,
    parse_timezone,
    run_batch,
    run_day,
    timezone_from_env,
)
from webpurse.settlement.db import make_engine, make_session_factory
from webpurse.settlement.settings import Settings

app = typer.Typer(help="Clearing: per-merchant daily batches, reports and payouts.")


@app.callback()
def _clearing() -> None:
    """Clearing: per-merchant daily batches, reports and payouts."""


@app.command("run")
def run(
    day: Annotated[
        str | None,
        typer.Option("--day", help="business day YYYY-MM-DD (default: the last one that ended)"),
    ] = None,
    merchant: Annotated[
        str | None, typer.Option("--merchant", help="one merchant id (default: every merchant)")
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option("--tz", help="time zone, e.g. Asia/Shanghai or +08:00 (default UTC+8)"),
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option("--report-dir", help="also write each batch's CSV report here")
    ] = None,
) -> None:
    """Clear a business day: one batch per merchant, its CSV report and its payout.

    Running a day again prints the stored batches and pays nothing more.
    """
    settings = Settings.from_env()
    try:
        zone = parse_timezone(tz) if tz else (settings.clearing_timezone or timezone_from_env())
        now = settings.clock()
        business_day = dt.date.fromisoformat(day) if day else last_closed_day(now, zone)
    except (ClearingError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        factory = make_session_factory(engine)
        failures: list[MerchantFailure] = []
        if merchant is not None:
            with factory() as session, session.begin():
                results = [run_batch(session, merchant, business_day, now, zone)]
        else:
            cleared = run_day(factory, business_day, now, zone)
            results, failures = cleared.batches, cleared.failures
    except ClearingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    if not results:
        typer.echo(f"no merchants to clear for {business_day.isoformat()}")
    for result in results:
        batch = result.batch
        typer.echo(
            f"{batch.id}  payments {batch.payment_count} = {batch.payment_total} fen  "
            f"refunds {batch.refund_count} = {batch.refund_total} fen  "
            f"payout {batch.payout} fen  carried {batch.carried_out} fen  "
            f"({'created' if result.created else 'existed'})"
        )
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            (report_dir / f"{batch.id}.csv").write_text(batch.report_csv, encoding="utf-8")
    for failure in failures:
        typer.echo(f"error: {failure.merchant_id}: {failure.code}: {failure.detail}", err=True)
    if failures:
        raise typer.Exit(1)
