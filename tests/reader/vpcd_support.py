"""Test support for the real PC/SC path: pcscd + vsmartcard vpcd + ``webpurse card serve``.

Shared by every test that puts an emulated card into pcscd (readers, agent end to end):
- :func:`require_pcsc` skips with a reason when pyscard or pcscd with vpcd is missing, and
  fails instead when ``CI=true``;
- :func:`vpcd_slot` gives one vpcd slot (port and PC/SC reader name) for exclusive use
  across processes, with an ``flock`` on ``/tmp/webpurse-vpcd-<port>.lock``, because two
  cards served to one slot would fight over it;
- :class:`ServedCard` runs ``webpurse card serve IMAGE --port P`` as a real subprocess.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SLOTS = ((35963, "Virtual PCD 00 00"), (35964, "Virtual PCD 00 01"))
LOCK_DIR = Path(os.environ.get("WEBPURSE_VPCD_LOCK_DIR", "/tmp"))


def unavailable(reason: str) -> None:
    """Skip, or fail under CI, when a real component is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def require_pcsc() -> list[str]:
    """The PC/SC reader names, if pyscard and pcscd with the vpcd driver are there."""
    try:
        import smartcard  # noqa: F401
    except ImportError:
        unavailable("pyscard is not installed (pip install 'webpurse[pcsc]')")
    from webpurse.reader import PcscUnavailable, ReaderError, list_readers

    try:
        names = list_readers()
    except PcscUnavailable as exc:
        unavailable(f"pcscd is not running ({exc}); start it with scripts/services.sh")
    except ReaderError as exc:
        unavailable(f"pcscd does not answer: {exc}")
    missing = [name for _, name in SLOTS if name not in names]
    if missing:
        unavailable(f"pcscd has no vpcd readers {missing} (install vsmartcard-vpcd, restart pcscd)")
    return names


@contextlib.contextmanager
def vpcd_slot(timeout: float = 300) -> Iterator[tuple[int, str]]:
    """Hold one vpcd slot exclusively: yields (port, reader name)."""
    handles = []
    try:
        for port, _ in SLOTS:
            handles.append(open(LOCK_DIR / f"webpurse-vpcd-{port}.lock", "a+b"))  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while True:
            for handle, (port, name) in zip(handles, SLOTS, strict=True):
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield port, name
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                return
            if time.monotonic() > deadline:
                pytest.fail(f"no vpcd slot free within {timeout:g} s")
            time.sleep(0.1)  # bounded polling for another process's lock
    finally:
        for handle in handles:
            handle.close()


def webpurse_command() -> list[str]:
    script = Path(sys.executable).with_name("webpurse")
    if script.exists():
        return [str(script)]
    found = shutil.which("webpurse")
    if found:
        return [found]
    return [sys.executable, "-c", "from webpurse.cli import app; app()"]


class ServedCard:
    """``webpurse card serve IMAGE`` in a subprocess: running = the card is in the reader."""

    def __init__(self, image: Path, port: int, log: Path) -> None:
        self.image = image
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "already serving"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*webpurse_command(), "card", "serve", str(self.image), "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Take the card out: signal the serve process and wait for it to exit."""
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
