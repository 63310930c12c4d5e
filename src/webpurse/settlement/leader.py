"""Leadership of a background job: one settlement process at a time runs it.

Settlement nodes are stateless: any number of ``webpurse serve settlement`` processes (and
their ``--workers``) share one PostgreSQL. Work that must not run in several of them at once
— the periodic expiry sweep (``expiry.sweeper_lifespan``) — asks :class:`Leadership` each
tick whether this process leads that job, and skips the tick when it does not.

The leader holds a PostgreSQL *session* advisory lock (``pg_try_advisory_lock``) on a
connection of its own, kept open for as long as it leads. Nobody else can take the lock
while that session lives; when the process dies (SIGKILL included) its connection closes,
PostgreSQL ends the session and frees the lock, and the next process whose tick asks takes
it over: a job stops for at most one tick when its leader dies. The connection's
``application_name`` says which process leads (``webpurse-leader:<job>:<pid>``), so
``pg_stat_activity`` shows it. The lock's key is derived from the job and the database
schema (:func:`job_key`), so deployments sharing one database in separate schemas each
have their own leader.

Row work inside a job stays safe on its own (rows are claimed with ``FOR UPDATE SKIP
LOCKED``); leadership is what makes a job run once per tick across processes instead of once
per process. Webhook delivery needs no leader: every process's worker claims due outbox
messages with ``SKIP LOCKED`` and a lease (``webhooks.delivery``), so they share the queue
and no message is sent by two of them.

On SQLite (one process by design) every process leads.
"""

from __future__ import annotations

import hashlib
import os

import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = structlog.get_logger(__name__)

SWEEP_JOB = "expiry-sweep"
"""The periodic expiry sweep and its housekeeping."""


def job_key(job: str, schema: str = "public") -> int:
    """The job's advisory lock key: a signed 64-bit number from its name and the schema.

    Advisory locks are per database; the schema is in the key so that deployments (or
    tests) sharing one database in separate schemas each elect their own leader.
    """
    digest = hashlib.sha256(f"webpurse-leader:{schema}:{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """Whether this process leads ``job``: a PostgreSQL session advisory lock it holds.

    :meth:`lead` is blocking (database I/O): call it from a worker thread. Not thread-safe:
    one scheduling loop owns it.
    """

    def __init__(self, engine: Engine, job: str) -> None:
        self.job = job
        self.key: int | None = None  # known once connected: it depends on the schema
        self.backend_pid: int | None = None  # the PostgreSQL backend of the connection
        self._engine = engine
        self._shared = engine.dialect.name == "postgresql"
        self._connection: Connection | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this process led the job at the last :meth:`lead`."""
        return self._held or not self._shared

    def lead(self) -> bool:
        """True when this process leads the job now: it holds the lock, or just took it.

        A leader checks its session is still alive (the lock lives exactly as long as the
        session); a connection error means the lock is gone: it stops leading and retries
        on a fresh connection at the next call.
        """
        if not self._shared:
            return True
        try:
            if self._connection is None:
                connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._connection = connection
                name = f"webpurse-leader:{self.job}:{os.getpid()}"[:63]
                connection.execute(
                    text("SELECT set_config('application_name', :n, false)"), {"n": name}
                )
                schema, backend = connection.execute(
                    text("SELECT current_schema(), pg_backend_pid()")
                ).one()
                self.key = job_key(self.job, str(schema))
                self.backend_pid = int(backend)
            if self._held:
                self._connection.execute(text("SELECT 1"))
                return True
            taken = self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
            ).scalar_one()
        except SQLAlchemyError as exc:
            if self._held:
                log.warning("leader.lost", job=self.job, error=type(exc).__name__)
            self._close()
            return False
        if taken:
            self._held = True
            log.info("leader.acquired", job=self.job, pid=os.getpid(), backend_pid=self.backend_pid)
        return self._held

    def release(self) -> None:
        """Give the job up (at shutdown): another process takes it at its next tick."""
        if self._connection is not None and self._held:
            try:
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                log.info("leader.released", job=self.job, pid=os.getpid())
            except SQLAlchemyError:
                pass  # the session is gone, and the lock with it
        self._close()

    def _close(self) -> None:
        self._held = False
        self.backend_pid = None
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()  # never back to the pool: its session held the lock
                connection.close()
            except SQLAlchemyError:
                pass
