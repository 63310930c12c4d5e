"""Request and response bodies of the settlement API (pydantic; the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Hex12 = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{12}$")]
Hex20 = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{20}$")]
HexBytes = Annotated[str, StringConstraints(pattern=r"^([0-9A-Fa-f]{2})*$", max_length=512)]
Fen = Annotated[int, Field(gt=0, le=0xFFFFFFFF, strict=True)]


def _holds_nul(value: Any) -> bool:
    """Whether a string anywhere in a request body (keys included) holds U+0000, which no
    PostgreSQL text can store: refused as invalid input, never left to fail the write."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        # A body is mostly a flat object of strings: those are looked at here, in one
        # loop, and only other values (nested objects, lists) recursively.
        for key, member in value.items():
            if type(key) is str:
                if "\x00" in key:
                    return True
            elif _holds_nul(key):
                return True
            if type(member) is str:
                if "\x00" in member:
                    return True
            elif _holds_nul(member):
                return True
        return False
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


class RequestBody(BaseModel):
    """Every request body: no unknown member, no string holding U+0000 (422)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        try:
            holds = _holds_nul(data)
        except RecursionError:  # lists in lists past the stack (JSON lets ~1000 levels in)
            raise ValueError("the body is nested too deeply") from None
        if holds:
            raise ValueError("text must not contain the character U+0000")
        return data


_In = RequestBody


class PaymentCreate(_In):
    amount: Fen
    currency: Literal["CNY"] = "CNY"
    description: Annotated[str, Field(max_length=1000)] = ""
    merchant_reference: Annotated[str, Field(max_length=200)] = ""
    metadata: dict[Annotated[str, Field(max_length=40)], Annotated[str, Field(max_length=500)]] = (
        Field(default_factory=dict, max_length=50)
    )


class PurchaseAuthorise(_In):
    issuer_data: HexBytes = Field(description="hex of READ BINARY EF 0x15, 30 bytes")
    initialize_response: HexBytes = Field(
        description="hex of INITIALIZE FOR PURCHASE response data, 15 bytes, no SW"
    )
    terminal_id: Hex12
    amount: Fen | None = Field(
        default=None, description="the amount put in INITIALIZE, if the caller wants it checked"
    )


class PurchaseCapture(_In):
    debit_response: HexBytes = Field(description="hex of DEBIT FOR PURCHASE data: TAC 4 ‖ MAC2 4")


class Empty(_In):
    pass


class CardCheckAnswer(_In):
    initialize_response: HexBytes = Field(
        description="hex of the card's INITIALIZE FOR LOAD response data to the check's APDU,"
        " 16 bytes, no SW"
    )


class Cancel(_In):
    """Why the card never got a debit/credit: what it answered batch 1 with (optional)."""

    issuer_data: HexBytes | None = Field(
        default=None, description="hex of READ BINARY EF 0x15, 30 bytes, if the card answered it"
    )
    card_status_word: str | None = Field(
        default=None,
        pattern=r"^[0-9A-Fa-f]{4}$",
        description="the status word the card answered INITIALIZE with (9303: it locked itself)",
    )


class Resolve(_In):
    initialize_response: HexBytes = Field(
        description="hex of a fresh INITIALIZE (amount 0) response data on the same card"
    )
    prove_response: HexBytes | None = Field(
        default=None, description="hex of GET TRANSACTION PROVE data: MAC2 4 ‖ TAC 4"
    )
    issuer_data: HexBytes | None = Field(
        default=None, description="optional EF 0x15 to check it is the same card"
    )


class MerchantFloatFunding(_In):
    """Cash the merchant took at its till: drawn from its prepaid float at settlement."""

    method: Literal["merchant_float"]
    reference: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="the merchant's own reference (till receipt, order id)"
    )


class BankTransferFunding(_In):
    """The cardholder's own bank transfer: settlement issues the payment reference."""

    method: Literal["bank_transfer"]


Funding = Annotated[MerchantFloatFunding | BankTransferFunding, Field(discriminator="method")]


class CardHeal(_In):
    """The card's proof of the transaction at the counter settlement is missing (holds.py)."""

    issuer_data: HexBytes = Field(description="hex of READ BINARY EF 0x15, 30 bytes")
    transaction_type: Literal["06", "02"] = Field(
        description="recover.transaction_type: 06 purchase (offline counter), 02 load (online)"
    )
    prove_response: HexBytes = Field(
        description="hex of GET TRANSACTION PROVE (type, recover.counter + 1): MAC2 4 ‖ TAC 4"
    )


class HoldRelease(_In):
    """Why an operator releases a merchant's open payment or load (audited)."""

    reason: str = Field(min_length=3, max_length=500)


class LoadCreate(_In):
    amount: Fen
    currency: Literal["CNY"] = "CNY"
    card_number: Hex20 | None = Field(
        default=None, description="bind the load to this card (required for bank_transfer)"
    )
    funding: Funding

    @model_validator(mode="after")
    def _bank_transfer_names_its_card(self) -> LoadCreate:
        if self.funding.method == "bank_transfer" and self.card_number is None:
            raise ValueError("a bank_transfer load is bound to one card: card_number is required")
        return self


class FloatDepositCreate(_In):
    amount: Fen
    currency: Literal["CNY"] = "CNY"
    bank_reference: Annotated[
        str, StringConstraints(min_length=1, max_length=100, pattern=r"^[\x21-\x7e]+$")
    ] = Field(description="the bank's reference of the credit; a deposit's identity")


class StatementImport(_In):
    format: Literal["mt940", "csv"]
    statement: Annotated[str, Field(min_length=1, max_length=2_000_000)] = Field(
        description="the statement file's text"
    )


class ExceptionReturn(_In):
    return_reference: Annotated[str, Field(min_length=1, max_length=100)] = Field(
        description="the bank reference of the transfer that paid the money back"
    )


class LoadAuthorise(_In):
    issuer_data: HexBytes
    initialize_response: HexBytes = Field(
        description="hex of INITIALIZE FOR LOAD response data, 16 bytes, no SW"
    )
    terminal_id: Hex12


class LoadComplete(_In):
    credit_response: HexBytes = Field(description="hex of CREDIT FOR LOAD data: TAC 4")


class RefundCreate(_In):
    payment: Annotated[str, Field(pattern=r"^pay_[0-9a-f]+$")]
    amount: Fen | None = None


class MerchantCreate(_In):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    terminal_id: Hex12 | None = None


class CardStatusChange(_In):
    status: Literal["active", "blocked", "lost", "expired"]
    reason: Annotated[str, Field(max_length=500)] = ""


# --- responses (documentation; the routes return these shapes) --------------------


class PurchaseAuthorisation(BaseModel):
    terminal_seq: int
    date: str
    time: str
    mac1: str
    debit_apdu: str


class PaymentOut(BaseModel):
    id: str
    object: Literal["payment"]
    status: str
    amount: int
    currency: str
    description: str
    merchant_reference: str
    metadata: dict[str, str]
    terminal_id: str
    key_index: int
    card_number: str | None
    decline_code: str | None
    tac: str | None
    amount_refunded: int
    created_at: str
    updated_at: str
    authorisation: PurchaseAuthorisation | None


class LoadAuthorisation(BaseModel):
    date: str
    time: str
    mac2: str
    credit_apdu: str


class LoadOut(BaseModel):
    id: str
    object: Literal["load"]
    status: str = Field(
        description="requires_funding (bank_transfer, unpaid), requires_card, authorised,"
        " uncertain, succeeded, declined, canceled or expired"
    )
    amount: int
    currency: str
    funding: dict[str, str | None]
    expires_at: str | None = Field(
        default=None, description="requires_funding: when the unpaid order expires"
    )
    refund: str | None
    terminal_id: str
    key_index: int
    card_number: str | None
    decline_code: str | None
    tac: str | None
    created_at: str
    updated_at: str
    authorisation: LoadAuthorisation | None


class RefundOut(BaseModel):
    id: str
    object: Literal["refund"]
    status: str
    payment: str
    amount: int
    currency: str
    load: str | None
    created_at: str
    updated_at: str


class ListOut(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    has_more: bool


class _Envelope(BaseModel):
    """A batch and its items: each item's body is checked by its own request's model
    (a U+0000 refuses that item alone, as its key's does: ``batch.parse_item``)."""

    model_config = ConfigDict(extra="forbid")


class BatchItemIn(_Envelope):
    """One request of a batch: what would be POSTed to ``path`` on its own."""

    path: Annotated[str, Field(max_length=200)] = Field(
        description="/v1/payments or /v1/payments/{id}/authorise|capture|uncertain|resolve|cancel"
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        default=None, description="as the Idempotency-Key header of the single request"
    )
    body: dict[str, Any] | None = Field(default=None, description="the single request's body")


class BatchIn(_Envelope):
    requests: list[BatchItemIn] = Field(min_length=1, max_length=1000)


class BatchAnswer(BaseModel):
    status: int = Field(description="the HTTP status the single request would have had")
    body: dict[str, Any] = Field(description="its body: a payment, or a problem (RFC 9457)")
    replayed: bool = Field(description="answered from the idempotency key's stored response")


class BatchOut(BaseModel):
    object: Literal["batch"] = "batch"
    responses: list[BatchAnswer]
