"""Personalisation (spec §2), the bureau's view: defined in :mod:`webpurse.protocol.issuance`
(settlement's security module personalises too) and re-exported here for the card tools."""

from webpurse.protocol.issuance import (
    DEFAULT_ALGORITHM_ID,
    DEFAULT_ISSUER_ID,
    DEFAULT_KEY_INDEX,
    DEFAULT_KEY_VERSION,
    MasterKeys,
    parse_serial,
    personalise,
    personalise_with_card_keys,
)

__all__ = [
    "DEFAULT_ALGORITHM_ID",
    "DEFAULT_ISSUER_ID",
    "DEFAULT_KEY_INDEX",
    "DEFAULT_KEY_VERSION",
    "MasterKeys",
    "parse_serial",
    "personalise",
    "personalise_with_card_keys",
]
