-- API keys, usage records and budget windows (SQLite). Times are UTC text, YYYY-MM-DDTHH:MM:SS.ffffffZ: fixed width,
-- so text order is time order and the day is substr(t, 1, 10).

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,                 -- the public part of mm-<id>-<secret>
    secret_hash     TEXT NOT NULL UNIQUE,             -- SHA-256 hex of the whole key; the secret is never stored
    name            TEXT NOT NULL,
    owner           TEXT NOT NULL DEFAULT '',
    kind            TEXT NOT NULL CHECK (kind IN ('inference', 'management')),
    created_at      TEXT NOT NULL,
    expires_at      TEXT,
    revoked_at      TEXT,
    allowed_models  TEXT,                             -- a JSON array of model names; NULL: every model
    budget_micros   INTEGER CHECK (budget_micros > 0),
    budget_period   TEXT CHECK (budget_period IN ('day', 'month', 'total')),
    rpm             INTEGER CHECK (rpm > 0),
    tpm             INTEGER CHECK (tpm > 0),
    max_concurrent  INTEGER CHECK (max_concurrent > 0),
    CHECK ((budget_micros IS NULL) = (budget_period IS NULL))
) STRICT;
CREATE INDEX api_keys_owner ON api_keys (owner);

-- No foreign key to api_keys: one record naming an unknown key must not make its whole batch fail.
CREATE TABLE usage_records (
    request_id         TEXT PRIMARY KEY,              -- a retried batch inserts nothing twice
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    deployment         TEXT NOT NULL,
    provider           TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    cost_micros        INTEGER,                       -- NULL: unpriced model (never 0)
    status             TEXT NOT NULL,
    stream             INTEGER NOT NULL,
    cancelled          INTEGER NOT NULL,
    estimated          INTEGER NOT NULL,
    duration_s         REAL NOT NULL,
    first_token_s      REAL
) STRICT;
CREATE INDEX usage_records_key_started ON usage_records (key_id, started_at);
CREATE INDEX usage_records_started ON usage_records (started_at);

-- One row per key and budget period, with its settled spend. SQLite locks the whole database for a write
-- transaction (BEGIN IMMEDIATE), which is what serialises reservations here.
CREATE TABLE budget_windows (
    key_id        TEXT NOT NULL,
    period_start  TEXT NOT NULL,
    spent_micros  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period_start)
) STRICT;

-- Budget held by in-flight requests; settle deletes the row. One left by a dead process lapses at expires_at.
CREATE TABLE budget_reservations (
    id             TEXT PRIMARY KEY,
    key_id         TEXT NOT NULL,
    period_start   TEXT NOT NULL,
    amount_micros  INTEGER NOT NULL CHECK (amount_micros >= 0),
    expires_at     TEXT NOT NULL,
    FOREIGN KEY (key_id, period_start) REFERENCES budget_windows (key_id, period_start)
) STRICT;
CREATE INDEX budget_reservations_window ON budget_reservations (key_id, period_start, expires_at);
