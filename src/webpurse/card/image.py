"""The card image file: the card's EEPROM on disk, replaced all or nothing.

A commit writes the whole state to a temporary file in the same folder, fsyncs it,
renames it over the image (atomic on POSIX) and fsyncs the folder. Killing the process
at any instant leaves the old image or the new one, never a mix.

A card is in one reader at a time: :func:`open_card` takes an exclusive lock on
``IMAGE.lock`` for as long as the card is "powered"; reading an image (``card show``)
needs no lock, because the image is never half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from webpurse.card.applet import CardApplet, StoreError
from webpurse.card.state import CardState


class CardBusy(Exception):
    """Another process holds the card (it is "in another reader")."""


class ImageFile:
    """A :class:`~webpurse.card.applet.CardStore` over one card image file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> CardState:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"no card image at {self.path}") from None
        try:
            return CardState.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path} is not a card image: {exc}") from exc

    def save(self, state: CardState) -> None:
        data = state.to_json().encode("utf-8")
        folder = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write card image {self.path}: {exc}") from exc

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files left by writes that were killed before their rename."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def create(self, state: CardState) -> None:
        """Write a new image; refuse to overwrite an existing card."""
        if self.path.exists():
            raise FileExistsError(f"{self.path} already holds a card image")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save(state)


@contextlib.contextmanager
def open_card(path: str | os.PathLike[str]) -> Iterator[CardApplet]:
    """Power up the card in ``path`` for exclusive use; random numbers from the OS."""
    image = ImageFile(path)
    lock_path = image.path.with_name(image.path.name + ".lock")
    with open(lock_path, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CardBusy(f"card {image.path} is in use by another process") from None
        try:
            image.remove_stale_temporaries()
            yield CardApplet(image.load(), image, secrets.token_bytes)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
