"""A SQLite database file for its owner alone: the settlement ledger and the shop's orders.

Both keep their data in SQLite when no PostgreSQL is configured; both files hold what only
their owner may read (the ledger, the shoppers' orders), whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sqlalchemy.engine import make_url


def private_sqlite_file(url: str) -> None:
    """Create a SQLite database file 0600 (owner only) before SQLite does, and tighten one
    that exists: SQLite gives the ``-wal`` and ``-shm`` files the database file's mode, so
    all three are the owner's alone. An in-memory database has no file."""
    path = make_url(url).database
    if not path or path == ":memory:" or "mode=memory" in url:
        return
    db = Path(path)
    if not db.parent.is_dir():
        return  # SQLite will say so when it connects
    os.close(os.open(db, os.O_CREAT | os.O_RDWR, 0o600))
    for file in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_uid == os.getuid() and file.stat().st_mode & 0o077:
                os.chmod(file, 0o600)
