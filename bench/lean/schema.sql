-- The lean purchase's schema (issue 20, /work/shared/design/purchase-cost.md): the physical
-- limit of a purchase that keeps every guarantee settlement gives, measured by pgbench with
-- purchase.pgbench. Not settlement's schema: the SQL it would need to run, at its smallest.
-- bench/lean.py runs it, then loads the cards (one per client and batch slot) and ANALYZEs.
DROP TABLE IF EXISTS lean_cards, lean_payments, lean_transfers, lean_outbox, lean_accounts;
DROP SEQUENCE IF EXISTS lean_batches, lean_terminal_seq;

-- a batch number per script run: payment ids and keys derive from it
CREATE SEQUENCE lean_batches;
-- terminal sequence numbers from a SEQUENCE, not a counter row every batch locks
CREATE SEQUENCE lean_terminal_seq;

-- the card: shadow balance and counters, its ledger balance (no separate account row),
-- the one transaction in flight; fillfactor leaves room for HOT updates
CREATE TABLE lean_cards (
    id integer PRIMARY KEY,
    card_number text NOT NULL,
    shadow_balance bigint NOT NULL,
    ledger_balance bigint NOT NULL,
    online_counter integer NOT NULL,
    offline_counter integer NOT NULL,
    open_payment bigint,
    updated_at timestamptz NOT NULL
) WITH (fillfactor = 80);

-- the payment carries its three idempotency keys (create's unique per merchant; authorise
-- and capture are checked on the row the path names) and the card's MACs for the audit;
-- no index on status, which every step changes
CREATE TABLE lean_payments (
    id bigint PRIMARY KEY,
    merchant_id text NOT NULL,
    create_key text NOT NULL,
    authorise_key text,
    capture_key text,
    amount bigint NOT NULL,
    status text NOT NULL,
    card_id integer,
    terminal_seq bigint,
    mac1 bytea,
    tac bytea,
    mac2 bytea,
    created_at timestamptz NOT NULL,
    authorised_at timestamptz,
    captured_at timestamptz,
    UNIQUE (merchant_id, create_key)
) WITH (fillfactor = 80);

-- double entry: one zero-sum transfer per captured purchase, both legs in one row
CREATE TABLE lean_transfers (
    payment_id bigint PRIMARY KEY,
    debit_account text NOT NULL,
    credit_account text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    created_at timestamptz NOT NULL
);

-- the outbox: a small row naming the payment (the webhook body is rendered on delivery)
CREATE TABLE lean_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id bigint NOT NULL,
    kind text NOT NULL,
    created_at timestamptz NOT NULL
);

-- hot accounts only (the merchant's payable): updated once per batch, last before commit
CREATE TABLE lean_accounts (
    id text PRIMARY KEY,
    balance bigint NOT NULL,
    version bigint NOT NULL
);
