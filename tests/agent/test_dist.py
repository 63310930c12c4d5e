"""The agent ships alone: it imports nothing of the card, the shop or settlement, and its own
distribution (``make agent``) installs into an empty virtual environment and runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.agent.dist_support import ROOT, Installed, build_and_install, build_script

# The whole of what `import webpurse.agent` loads from webpurse: the agent, the reader
# interface and local backends (PC/SC; the sim backend only on demand), the protocol.
AGENT_MODULES = {
    "webpurse",
    "webpurse.agent",
    "webpurse.agent.consent",
    "webpurse.agent.display",
    "webpurse.agent.guard",
    "webpurse.agent.pairing",
    "webpurse.agent.session",
    "webpurse.agent.terminal",
    "webpurse.protocol",
    "webpurse.protocol.apdu",
    "webpurse.protocol.cipher",
    "webpurse.protocol.commands",
    "webpurse.protocol.crypto",
    "webpurse.protocol.errors",
    "webpurse.protocol.host",
    "webpurse.protocol.records",
    "webpurse.protocol.status",
    "webpurse.reader",
    "webpurse.reader.base",
    "webpurse.reader.batch",
    "webpurse.reader.factory",
    "webpurse.reader.messages",
    "webpurse.reader.pcsc",
}
# Server-side packages the agent must not pull in (its footprint, docs/agent.md).
SERVER_PACKAGES = {
    "alembic",
    "fastapi",
    "httptools",
    "httpx",
    "jinja2",
    "orjson",
    "prometheus-client",
    "psycopg",
    "psycopg-binary",
    "python-multipart",
    "sqlalchemy",
    "structlog",
    "uvloop",
    "watchfiles",
}


def loaded_by(python: str | Path, statement: str) -> set[str]:
    code = (
        f"import sys, json\n{statement}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'webpurse')))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_importing_the_agent_loads_no_card_shop_or_settlement_module() -> None:
    loaded = loaded_by(sys.executable, "import webpurse.agent")
    assert loaded == AGENT_MODULES
    for forbidden in ("webpurse.card", "webpurse.settlement", "webpurse.merchant"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in loaded)


def test_the_command_line_adds_only_the_dialog_and_the_cli() -> None:
    loaded = loaded_by(sys.executable, "import webpurse.agent.cli")
    assert loaded == AGENT_MODULES | {"webpurse.agent.cli", "webpurse.agent.dialog"}


def test_the_sim_reader_is_loaded_only_when_asked_for() -> None:
    loaded = loaded_by(sys.executable, "import webpurse.reader; webpurse.reader.SimReader")
    assert "webpurse.reader.sim" in loaded and "webpurse.card.applet" in loaded


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    return {p["name"]: p["version"] for p in lock["package"]}


def test_the_agents_pins_are_the_locks_versions_and_no_server_package() -> None:
    pins = build_script().pins()
    locked = locked_versions()
    pinned = {}
    for pin in pins:
        name, _, rest = pin.partition("==")
        pinned[name] = rest.split(";")[0].strip()
    assert pinned and all(locked[name] == version for name, version in pinned.items())
    direct = {
        line.strip()
        for line in (ROOT / "agent-dist" / "requirements.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert direct <= set(pinned)
    assert not SERVER_PACKAGES & set(pinned)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return build_and_install(tmp_path_factory.mktemp("agent-dist"))


def test_the_wheel_is_published_with_its_sha256(installed: Installed) -> None:
    sums = dict(
        reversed(line.split("  "))
        for line in (installed.dist / "SHA256SUMS").read_text().splitlines()
    )
    assert sums[installed.wheel.name] == hashlib.sha256(installed.wheel.read_bytes()).hexdigest()
    requirements = installed.dist / "webpurse-agent-requirements.txt"
    assert sums[requirements.name] == hashlib.sha256(requirements.read_bytes()).hexdigest()


def test_the_built_agent_runs_alone_in_an_empty_virtual_environment(installed: Installed) -> None:
    help_text = subprocess.run(
        [str(installed.agent), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--consent" in help_text and "--allow-origin" in help_text
    loaded = loaded_by(installed.python, "import webpurse.agent.cli")
    assert loaded == AGENT_MODULES | {"webpurse.agent.cli", "webpurse.agent.dialog"}
    site = subprocess.run(
        [
            str(installed.python),
            "-c",
            "import webpurse, os; print(os.path.dirname(webpurse.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert sorted(p.name for p in Path(site).iterdir() if p.name != "__pycache__") == [
        "__init__.py",
        "agent",
        "protocol",
        "py.typed",
        "reader",
    ]
    names = (
        "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))"
    )
    freeze = {
        name.lower()
        for name in subprocess.run(
            [str(installed.python), "-c", names], capture_output=True, text=True, check=True
        ).stdout.split()
    }
    assert "webpurse-agent" in freeze and "webpurse" not in freeze
    assert not SERVER_PACKAGES & set(freeze)
    sim = subprocess.run(
        [str(installed.agent), "--reader", "sim:card.json", "--allow-origin", "http://shop.test"],
        capture_output=True,
        text=True,
    )
    assert sim.returncode == 2 and "needs the card emulator" in sim.stdout + sim.stderr
