"""The PBOC 2.0 e-purse card emulator: a sans-I/O applet and its image file."""

from webpurse.card.applet import CardApplet, CardStore, MemoryStore, Selected, StoreError
from webpurse.card.image import CardBusy, ImageFile, open_card
from webpurse.card.personalise import (
    MasterKeys,
    parse_serial,
    personalise,
    personalise_with_card_keys,
)
from webpurse.card.state import CardKey, CardState, KeyKind, Proof

__all__ = [
    "CardApplet",
    "CardBusy",
    "CardKey",
    "CardState",
    "CardStore",
    "ImageFile",
    "KeyKind",
    "MasterKeys",
    "MemoryStore",
    "Proof",
    "Selected",
    "StoreError",
    "open_card",
    "parse_serial",
    "personalise",
    "personalise_with_card_keys",
]
