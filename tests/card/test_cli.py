"""`webpurse card issue | show | apdu`, run as a person or a script would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from webpurse.card import ImageFile, MasterKeys
from webpurse.protocol.crypto import diversify

MASTER = {
    "dpk": "11223344556677888877665544332211",
    "dlk": "0123456789ABCDEFFEDCBA9876543210",
    "dtk": "00112233445566778899AABBCCDDEEFF",
}
SERIAL = "01020304050607080910"


def webpurse(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webpurse", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def card(tmp_path: Path) -> Path:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(MASTER))
    image = tmp_path / "card.json"
    result = webpurse("card", "issue", str(image), "--serial", SERIAL, "--keys", str(keys))
    assert result.returncode == 0, result.stderr
    return image


def test_issue_diversifies_the_master_keys(card: Path) -> None:
    state = ImageFile(card).load()
    master = MasterKeys.from_json(json.dumps(MASTER))
    serial = bytes.fromhex(SERIAL)
    assert state.serial == serial
    assert state.key("dpk", 1).value == diversify(master.dpk, serial)  # type: ignore[union-attr]
    assert state.key("dlk", 1).value == diversify(master.dlk, serial)  # type: ignore[union-attr]
    assert state.tac_key().value == diversify(master.dtk, serial)


def test_issue_refuses_bad_input(tmp_path: Path, card: Path) -> None:
    keys = tmp_path / "keys.json"
    short = webpurse(
        "card", "issue", str(tmp_path / "x.json"), "--serial", "0102", "--keys", str(keys)
    )
    assert short.returncode == 2 and "10 bytes" in short.stderr
    again = webpurse("card", "issue", str(card), "--serial", SERIAL, "--keys", str(keys))
    assert again.returncode == 2 and "already holds a card" in again.stderr
    bad_keys = tmp_path / "bad.json"
    bad_keys.write_text('{"dpk": "00"}')
    bad = webpurse(
        "card", "issue", str(tmp_path / "y.json"), "--serial", SERIAL, "--keys", str(bad_keys)
    )
    assert bad.returncode == 2 and "master key" in bad.stderr


def test_apdu_shell_answers_line_by_line_and_keeps_power(card: Path) -> None:
    script = "\n".join(
        [
            "00A4040009A00000000386980701 00",
            "805C000204",
            "not hex at all",
            "805001020B01000000640000000000010F",  # 9401: balance 0 < 1.00
            "",
            "# a comment",
            "805000020B010000006400000000000110",
            "805A000202000108",
        ]
    )
    result = webpurse("card", "apdu", str(card), "--explain", stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("9000 success") and lines[0].startswith("6F")
    assert lines[1] == "00000000 9000 success"  # the EP stayed selected: power kept
    assert lines[2].startswith("error:")
    assert lines[3] == "9401 insufficient funds"
    data, status = lines[4].split()[:2]
    assert status == "9000" and len(data) == 32
    assert lines[5] == "9406 MAC/TAC not available"
    assert len(lines) == 6


def test_apdu_shell_without_explain_prints_data_and_sw(card: Path) -> None:
    result = webpurse("card", "apdu", str(card), stdin="00A4000002100100\n805C000204\n")
    assert result.stdout.splitlines()[1] == "00000000 9000"


def test_show_prints_balance_and_counters(card: Path) -> None:
    result = webpurse("card", "show", str(card))
    assert result.returncode == 0
    assert SERIAL in result.stdout and "0 fen" in result.stdout
    missing = webpurse("card", "show", str(card) + ".nope")
    assert missing.returncode == 2 and "no card image" in missing.stderr
