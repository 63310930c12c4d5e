"""Build the ``webpurse-agent`` wheel (``agent-dist/build.py``, what ``make agent`` runs) and
install it into an empty virtual environment, as a shopper would.

The dependencies come from PyPI through uv (its cache makes a second install take about a
second); pyscard builds from source on Linux the first time (swig, gcc, libpcsclite-dev).
Without uv (``make venv`` puts it in ``.tools/``) the callers skip, unless CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "bin" / "uv"


def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_build", ROOT / "agent-dist" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need_uv() -> str:
    if UV.exists():
        return str(UV)
    reason = f"uv not found at {UV} (run make venv)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class Installed:
    dist: Path
    wheel: Path
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def agent(self) -> Path:
        return self.venv / "bin" / "webpurse-agent"


def build_and_install(where: Path) -> Installed:
    """``make agent`` into ``where/dist``, then the shopper's two commands into ``where/venv``."""
    uv = need_uv()
    build = build_script()
    dist = where / "dist"
    wheel = build.build(uv, out=dist, where=where / "stage")
    venv = where / "venv"
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], **run)
    python = str(venv / "bin" / "python")
    requirements = str(dist / "webpurse-agent-requirements.txt")
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            python,
            "--require-hashes",
            "-r",
            requirements,
        ],
        **run,
    )
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", python, "--no-deps", str(wheel)], **run
    )
    return Installed(dist, wheel, venv)
