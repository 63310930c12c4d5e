"""The card image file: all-or-nothing commits, even when the process is killed mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.card.support import make_state
from webpurse.card import CardBusy, ImageFile, open_card
from webpurse.card.applet import StoreError

CHILD = r"""
import sys
from tests.card.support import Terminal
from webpurse.card import open_card

with open_card(sys.argv[1]) as card:
    t = Terminal(card)
    print("ready", flush=True)
    while True:
        assert t.load(1).ok
        print(card.state.balance, flush=True)
"""


def test_round_trip_and_refuse_overwrite(tmp_path: Path) -> None:
    image = ImageFile(tmp_path / "card.json")
    state = make_state()
    image.create(state)
    assert image.load() == state
    assert (tmp_path / "card.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        image.create(state)


def test_a_corrupt_image_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text('{"format": 1, "ef15": "00"')
    with pytest.raises(ValueError, match="not a card image"):
        ImageFile(path).load()


def test_write_failure_is_a_store_error(tmp_path: Path) -> None:
    image = ImageFile(tmp_path / "missing-dir" / "card.json")
    with pytest.raises(StoreError):
        image.save(make_state())


def test_a_card_is_in_one_reader_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    ImageFile(path).create(make_state())
    with open_card(path), pytest.raises(CardBusy), open_card(path):
        pass
    with open_card(path) as card:  # released
        assert card.state.balance == 0


@pytest.mark.slow
def test_killed_during_commit_leaves_old_or_new_state(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    ImageFile(path).create(make_state())
    rng = random.Random(20261127)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    outcomes: set[str] = set()
    for _ in range(40):
        before = ImageFile(path).load().balance
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.04))  # fault timing, not synchronisation
        child.send_signal(signal.SIGKILL)
        reported = [int(line) for line in child.stdout.read().split() if line.isdigit()]
        child.wait()
        last_acknowledged = reported[-1] if reported else before
        state = ImageFile(path).load()  # parses: never a torn image
        # the old state (last acknowledged) or the new one (its commit landed, answer lost)
        assert state.balance in (last_acknowledged, last_acknowledged + 1)
        assert state.online_counter == state.balance  # one load of 1 fen per commit
        assert len(state.log) == min(state.balance, 10)
        outcomes.add("new" if state.balance == last_acknowledged + 1 else "old")
        json.loads(path.read_text())
    assert outcomes  # the children really were killed mid-run
    with open_card(path) as card:  # the next power-up sweeps killed writes' temporaries
        assert card.state.balance > 0
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
