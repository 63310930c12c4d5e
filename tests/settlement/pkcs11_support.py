"""A real SoftHSM2 token for the tests: one SOFTHSM2_CONF (temp token dir) per test run,
a fresh token per test (initialised in-process through PyKCS11).

Outside CI the PKCS#11 tests skip when SoftHSM2 (``apt-get install softhsm2``) or PyKCS11
is missing; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
from pathlib import Path

import pytest

from webpurse.settlement.pkcs11 import (
    DEFAULT_MODULE,
    TokenConfig,
    initialise_token,
    softhsm2_config,
)

SO_PIN = "so-" + secrets.token_hex(4)
_lock = threading.Lock()
_conf_dir: Path | None = None


def require_softhsm() -> None:
    problem = None
    if not DEFAULT_MODULE.exists():
        problem = f"SoftHSM2 is not installed ({DEFAULT_MODULE}; apt-get install softhsm2)"
    else:
        try:
            import PyKCS11  # noqa: F401
        except ImportError:
            problem = "PyKCS11 is not installed (the pkcs11 extra)"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}: required in CI")
    pytest.skip(problem)


def _configure() -> None:
    """Point SoftHSM2 at a temp token dir, once per process, before it is first loaded."""
    global _conf_dir
    if _conf_dir is not None:
        return
    folder = Path(tempfile.mkdtemp(prefix="webpurse-softhsm-"))
    os.environ["SOFTHSM2_CONF"] = str(softhsm2_config(folder))
    _conf_dir = folder


def new_token(folder: Path, label: str | None = None) -> TokenConfig:
    """Initialise a fresh token (its own label, a random user PIN in a 0600 file)."""
    require_softhsm()
    with _lock:
        _configure()
        label = label or "wp-" + secrets.token_hex(6)
        pin = secrets.token_hex(8)
        initialise_token(DEFAULT_MODULE, label, so_pin=SO_PIN, pin=pin)
    pin_file = folder / f"{label}.pin"
    pin_file.write_text(pin + "\n", encoding="ascii")
    pin_file.chmod(0o600)
    return TokenConfig(module=DEFAULT_MODULE, pin=pin, label=label)
