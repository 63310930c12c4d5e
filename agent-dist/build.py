"""Build the ``webpurse-agent`` distribution: the terminal agent alone (``docs/agent.md``).

``python agent-dist/build.py`` (what ``make agent`` runs) stages the agent's modules into
``build/agent/`` with ``agent-dist/pyproject.toml.in`` filled in, builds the wheel with
``uv build`` into ``dist/``, copies the hash-pinned ``agent-dist/requirements.txt`` beside
it as ``webpurse-agent-requirements.txt``, and writes ``dist/SHA256SUMS`` for both.
``SOURCE_DATE_EPOCH`` is the last commit's time, so the same commit builds the same bytes.

``python agent-dist/build.py --lock`` rewrites ``agent-dist/requirements.txt`` from
``agent-dist/requirements.in`` with every version taken from ``uv.lock`` (run it after
``uv lock`` changed one of them; ``tests/agent/test_dist.py`` checks that they agree).

Standard library only; ``--uv`` names the uv binary (default ``.tools/bin/uv``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "agent-dist"
SRC = ROOT / "src"
STAGE = ROOT / "build" / "agent"
DIST = ROOT / "dist"
REQUIREMENTS = HERE / "requirements.txt"

# What the agent needs and nothing else: no card emulator (webpurse.card, reader.sim), no
# merchant side of the protocol (reader.remote), no shop, no settlement server.
MODULES = (
    "webpurse/__init__.py",
    "webpurse/py.typed",
    "webpurse/agent/*.py",
    "webpurse/reader/__init__.py",
    "webpurse/reader/base.py",
    "webpurse/reader/batch.py",
    "webpurse/reader/factory.py",
    "webpurse/reader/messages.py",
    "webpurse/reader/pcsc.py",
    "webpurse/reader/pn532.py",
    "webpurse/protocol/*.py",
)


def version() -> str:
    text = (SRC / "webpurse" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if found is None:
        raise SystemExit("no __version__ in src/webpurse/__init__.py")
    return found.group(1)


def pins(path: Path = REQUIREMENTS) -> list[str]:
    """The requirement lines of a ``uv pip compile`` file, without hashes or comments."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line[0] in " #":
            continue
        out.append(line.rstrip(" \\").strip())
    return out


def stage(where: Path = STAGE) -> Path:
    shutil.rmtree(where, ignore_errors=True)
    for pattern in MODULES:
        matches = sorted(SRC.glob(pattern))
        if not matches:
            raise SystemExit(f"nothing matches src/{pattern}")
        for source in matches:
            target = where / "src" / source.relative_to(SRC)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    dependencies = "\n".join(f'    "{pin}",' for pin in pins())
    template = (HERE / "pyproject.toml.in").read_text(encoding="utf-8")
    pyproject = template.replace("@VERSION@", version()).replace("@DEPENDENCIES@", dependencies)
    (where / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    shutil.copyfile(HERE / "README.md", where / "README.md")
    return where


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def commit_time() -> str:
    try:
        out = subprocess.run(  # noqa: S603
            ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return out or "315532800"  # 1980-01-01, the earliest time a zip file can hold


def build(uv: str, out: Path = DIST, where: Path = STAGE) -> Path:
    """Build into ``out``; returns the wheel."""
    staged = stage(where)
    name = f"webpurse_agent-{version()}-py3-none-any.whl"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).unlink(missing_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": commit_time()}
    subprocess.run(  # noqa: S603
        [uv, "build", "--wheel", "--quiet", "--out-dir", str(out), str(staged)],
        check=True,
        env=env,
    )
    wheel = out / name
    if not wheel.exists():
        raise SystemExit(f"uv build did not write {wheel}")
    requirements = out / "webpurse-agent-requirements.txt"
    shutil.copyfile(REQUIREMENTS, requirements)
    sums = "".join(f"{sha256(p)}  {p.name}\n" for p in (wheel, requirements))
    (out / "SHA256SUMS").write_text(sums, encoding="utf-8")
    print(sums, end="")
    return wheel


def lock(uv: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "uv.lock.txt"
        export = ["export", "--frozen", "--no-hashes", "--all-extras", "--no-emit-project"]
        subprocess.run(  # noqa: S603
            [uv, *export, "--quiet", "-o", str(constraints)],
            check=True,
            cwd=ROOT,
        )
        compile_ = ["pip", "compile", str(HERE / "requirements.in"), "-c", str(constraints)]
        options = ["--universal", "--generate-hashes", "--python-version", "3.11", "--quiet"]
        subprocess.run(  # noqa: S603
            [uv, *compile_, *options, "--no-header", "-o", str(REQUIREMENTS)],
            check=True,
            cwd=ROOT,
        )
        text = REQUIREMENTS.read_text(encoding="utf-8").replace(str(constraints), "uv.lock")
    header = (
        "# The webpurse-agent's dependencies, every version from uv.lock, with hashes.\n"
        "# Written by `python agent-dist/build.py --lock` from agent-dist/requirements.in.\n"
    )
    REQUIREMENTS.write_text(header + text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", default=str(ROOT / ".tools" / "bin" / "uv"))
    parser.add_argument("--lock", action="store_true", help="rewrite requirements.txt")
    args = parser.parse_args(argv)
    if args.lock:
        lock(args.uv)
    else:
        build(args.uv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
