"""webpurse.merchant: the merchant web shop, its payment and top-up flows.

The shop never holds a card key: it relays the card's raw answers to settlement and
settlement's APDUs to the card, through the shopper's reader (ARCHITECTURE.md).
"""

from webpurse.merchant.app import app_from_env, create_app
from webpurse.merchant.flows import (
    Outcome,
    Phase,
    Progress,
    first_batch,
    read_first_contact,
    recover,
    recovery_steps,
    run_transaction,
)
from webpurse.merchant.readers import LocalBroker, Pairing, ReaderBroker, RemoteBroker
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import (
    Declined,
    Kind,
    RecoveryHint,
    Settlement,
    SettlementClient,
    SettlementError,
    SettlementObject,
)

__all__ = [
    "Declined",
    "Kind",
    "LocalBroker",
    "MerchantSettings",
    "Outcome",
    "Pairing",
    "Phase",
    "Progress",
    "ReaderBroker",
    "RecoveryHint",
    "RemoteBroker",
    "Settlement",
    "SettlementClient",
    "SettlementError",
    "SettlementObject",
    "app_from_env",
    "create_app",
    "first_batch",
    "read_first_contact",
    "recover",
    "recovery_steps",
    "run_transaction",
]
