-- API keys, usage records and budget windows (PostgreSQL).

CREATE TABLE api_keys (
    id              text PRIMARY KEY,                 -- the public part of mm-<id>-<secret>
    secret_hash     text NOT NULL UNIQUE,             -- SHA-256 hex of the whole key; the secret is never stored
    name            text NOT NULL,
    owner           text NOT NULL DEFAULT '',
    kind            text NOT NULL CHECK (kind IN ('inference', 'management')),
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    revoked_at      timestamptz,
    allowed_models  text[],                           -- NULL: every model
    budget_micros   bigint CHECK (budget_micros > 0),
    budget_period   text CHECK (budget_period IN ('day', 'month', 'total')),
    rpm             integer CHECK (rpm > 0),
    tpm             integer CHECK (tpm > 0),
    max_concurrent  integer CHECK (max_concurrent > 0),
    CHECK ((budget_micros IS NULL) = (budget_period IS NULL))
);
CREATE INDEX api_keys_owner ON api_keys (owner);

-- No foreign key to api_keys: one record naming an unknown key must not make its whole batch fail.
CREATE TABLE usage_records (
    request_id         text PRIMARY KEY,              -- a retried batch inserts nothing twice
    key_id             text NOT NULL,
    model              text NOT NULL,
    deployment         text NOT NULL,
    provider           text NOT NULL,
    started_at         timestamptz NOT NULL,
    prompt_tokens      bigint NOT NULL,
    cached_tokens      bigint NOT NULL,
    completion_tokens  bigint NOT NULL,
    reasoning_tokens   bigint NOT NULL,
    cost_micros        bigint,                        -- NULL: unpriced model (never 0)
    status             text NOT NULL,
    stream             boolean NOT NULL,
    cancelled          boolean NOT NULL,
    estimated          boolean NOT NULL,
    duration_s         double precision NOT NULL,
    first_token_s      double precision
);
CREATE INDEX usage_records_key_started ON usage_records (key_id, started_at);
CREATE INDEX usage_records_started ON usage_records (started_at);

-- One row per key and budget period: the row every reservation for that window locks, and its settled spend.
CREATE TABLE budget_windows (
    key_id        text NOT NULL,
    period_start  timestamptz NOT NULL,
    spent_micros  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period_start)
);

-- Budget held by in-flight requests; settle deletes the row. One left by a dead replica lapses at expires_at.
CREATE TABLE budget_reservations (
    id             text PRIMARY KEY,
    key_id         text NOT NULL,
    period_start   timestamptz NOT NULL,
    amount_micros  bigint NOT NULL CHECK (amount_micros >= 0),
    expires_at     timestamptz NOT NULL,
    FOREIGN KEY (key_id, period_start) REFERENCES budget_windows (key_id, period_start)
);
CREATE INDEX budget_reservations_window ON budget_reservations (key_id, period_start, expires_at);
