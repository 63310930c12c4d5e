"""The proof table itself: rows recorded per suite, failures recorded as failures, rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.proof import proof_table
from tests.proof.render import BEGIN, END, render


def test_rows_pass_or_fail_with_their_block_and_render_between_the_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proof_table, "ARTIFACTS", tmp_path / "proof")
    monkeypatch.setattr(proof_table, "_started", set())
    with proof_table.proof_row("demo", "a | b", expected="ok") as row:
        row.observed = "ok"
    with pytest.raises(AssertionError), proof_table.proof_row("demo", "broken", expected="ok"):
        raise AssertionError("value created from nothing")
    rows = proof_table.load_rows(tmp_path / "proof")["demo"]
    assert [(r.scenario, r.passed) for r in rows] == [("a | b", True), ("broken", False)]
    assert "value created from nothing" in rows[1].observed

    doc = tmp_path / "proof.md"
    doc.write_text(f"# Proof\n\nprose stays\n\n{BEGIN}\nold\n{END}\n\nmore prose\n")
    text = render(doc, tmp_path / "proof")
    assert "prose stays" in text and "more prose" in text and "old" not in text
    assert "a \\| b" in text and "**FAIL**" in text
    assert "| demo | 2 | 1 | 1 |" in text


def test_a_new_run_replaces_the_rows_of_its_scenarios_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proof_table, "ARTIFACTS", tmp_path)
    monkeypatch.setattr(proof_table, "_started", set())
    proof_table.record(proof_table.Row("s", "one", "x", "old", True))
    proof_table.record(proof_table.Row("s", "two", "x", "x", True))
    monkeypatch.setattr(proof_table, "_started", set())  # as if a new pytest process
    proof_table.record(proof_table.Row("s", "one", "x", "new", False))
    rows = proof_table.load_rows(tmp_path)["s"]
    assert [(r.scenario, r.observed) for r in rows] == [("one", "new"), ("two", "x")]
    monkeypatch.setattr(proof_table, "_started", set())  # the next process compacts the file
    proof_table.record(proof_table.Row("s", "three", "x", "x", True))
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3
