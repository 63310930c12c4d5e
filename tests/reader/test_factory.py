"""open_reader: the agent's ``--reader`` spec to a backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.card.support import make_state
from tests.reader.support import HostTerminal
from webpurse.card import ImageFile
from webpurse.reader import ReaderError, ReaderSpecError, SimReader, open_reader


async def test_sim_spec_opens_the_image_with_the_card_in_the_field(tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    reader = open_reader(f"sim:{image}")
    try:
        assert isinstance(reader, SimReader)
        assert reader.present
        await HostTerminal(reader).load(700)
    finally:
        await reader.close()
    assert ImageFile(image).load().balance == 700


def test_a_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no card image"):
        open_reader(f"sim:{tmp_path / 'absent.json'}")


async def test_a_card_in_another_reader_is_a_reader_error(tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    first = open_reader(f"sim:{image}")
    try:
        with pytest.raises(ReaderError, match="in use"):
            open_reader(f"sim:{image}")
    finally:
        await first.close()


@pytest.mark.parametrize("spec", ["", "sim", "sim:", "usb", "nfc:reader"])
def test_unknown_specs_are_refused(spec: str) -> None:
    with pytest.raises(ReaderSpecError):
        open_reader(spec)
