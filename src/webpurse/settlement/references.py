"""Payment references for bank-transfer top-ups: ISO 11649 creditor references (pure).

``RF`` + two check digits + a 16-digit random body. The check digits are ISO 7064
MOD 97-10 (as in IBAN): with ``RF`` and the check digits moved to the end and letters
replaced by numbers (A = 10 … Z = 35), the number mod 97 is 1. Any single wrong character
and any swap of two adjacent characters fails the check, so a mistyped reference is never
another valid one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

BODY_DIGITS = 16
_CANDIDATE = re.compile(r"RF[0-9]{2}[0-9A-Z]{1,21}")
_OURS = re.compile(rf"RF[0-9]{{2}}[0-9]{{{BODY_DIGITS}}}")


def _numeric(text: str) -> int:
    return int("".join(str(int(ch, 36)) for ch in text))


def check_digits(body: str) -> str:
    """The two ISO 7064 MOD 97-10 check digits of ``body`` (0-9, A-Z)."""
    if not body or not body.isalnum() or not body.isascii():
        raise ValueError("a reference body is 1 to 21 ASCII letters or digits")
    return f"{98 - _numeric(body.upper() + 'RF00') % 97:02d}"


def is_valid(reference: str) -> bool:
    """True when ``reference`` (spaces ignored, any case) is an RF reference that checks."""
    ref = normalise(reference)
    if not _CANDIDATE.fullmatch(ref):
        return False
    return _numeric(ref[4:] + ref[:4]) % 97 == 1


def normalise(reference: str) -> str:
    return "".join(reference.split()).upper()


def new_reference(random_digits: Callable[[int], str] | None = None) -> str:
    """A fresh reference: ``RF`` + check digits + 16 random digits."""
    digits = (random_digits or _random_digits)(BODY_DIGITS)
    return f"RF{check_digits(digits)}{digits}"


def _random_digits(count: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(count))


def grouped(reference: str) -> str:
    """``RF17 8023 6447 …``: how a person reads and types it."""
    ref = normalise(reference)
    return " ".join(ref[i : i + 4] for i in range(0, len(ref), 4))


def find_in(text: str) -> tuple[list[str], list[str]]:
    """The references of our shape in remittance ``text``: (valid ones, failing their check).

    Spaces inside a reference are ignored (people type it in groups of four); so are case
    and any text around it. Only our shape (RF + 2 + 16 digits) is looked for.
    """
    compact = normalise(text)
    valid: list[str] = []
    invalid: list[str] = []
    for match in _OURS.finditer(compact):
        ref = match.group(0)
        (valid if is_valid(ref) else invalid).append(ref)
    return valid, invalid
