-- lrvault schema v1. Table and view names and columns are the audit contract (DESIGN.md §5):
-- add columns, never rename or drop them.

CREATE TABLE actions (
    tenant              TEXT NOT NULL,
    action_id           TEXT NOT NULL,
    machine_id          TEXT,
    computer_dns_name   TEXT,
    requestor           TEXT,
    requestor_comment   TEXT,
    status              TEXT,
    created_at          TEXT NOT NULL,
    last_update_at      TEXT,
    raw_json            TEXT NOT NULL,
    discovered_at       TEXT NOT NULL,
    source              TEXT NOT NULL CHECK (source IN ('discover', 'enqueue', 'backfill')),
    PRIMARY KEY (tenant, action_id)
);
CREATE INDEX actions_created ON actions (tenant, created_at);

CREATE TABLE results (
    tenant           TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    command_index    INTEGER NOT NULL,
    command_type     TEXT,
    command_json     TEXT NOT NULL,
    command_status   TEXT,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'downloading', 'archived', 'unavailable', 'skipped', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    last_error       TEXT,
    evidence_id      TEXT,
    updated_at       TEXT NOT NULL,
    -- While downloading: which process holds the result, and until when (renewed while it works).
    lease_owner      TEXT,
    lease_until      TEXT,
    PRIMARY KEY (tenant, action_id, command_index),
    FOREIGN KEY (tenant, action_id) REFERENCES actions (tenant, action_id)
);
CREATE INDEX results_queue ON results (state, next_attempt_at);

CREATE TABLE evidence (
    evidence_id       TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL,
    action_id         TEXT NOT NULL,
    command_index     INTEGER NOT NULL,
    payload_name      TEXT NOT NULL,
    payload_size      INTEGER NOT NULL,
    payload_sha256    TEXT NOT NULL,
    payload_md5       TEXT,
    original_name     TEXT,
    original_size     INTEGER,
    original_sha256   TEXT,
    package_path      TEXT NOT NULL UNIQUE,
    package_size      INTEGER NOT NULL,
    package_sha256    TEXT NOT NULL,
    archived_at       TEXT NOT NULL,
    last_verified_at  TEXT,
    last_verify_ok    INTEGER,
    UNIQUE (tenant, action_id, command_index),
    FOREIGN KEY (tenant, action_id, command_index) REFERENCES results (tenant, action_id, command_index)
);

-- The quota ledger. A row is written before the request is sent (http_status NULL = in flight)
-- and completed with the answer, so concurrent processes see each other's reservations.
CREATE TABLE api_calls (
    id              INTEGER PRIMARY KEY,
    tenant          TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    at_ms           INTEGER NOT NULL,
    http_status     INTEGER,
    pause_until_ms  INTEGER
);
CREATE INDEX api_calls_bucket ON api_calls (tenant, endpoint, at_ms);

CREATE TABLE custody_log (
    seq              INTEGER PRIMARY KEY,
    at               TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    command_index    INTEGER,
    event            TEXT NOT NULL CHECK (event IN ('DISCOVERED', 'QUEUED', 'LINK_ISSUED', 'DOWNLOADED',
                         'ARCHIVED', 'UNAVAILABLE', 'SKIPPED', 'FAILED', 'VERIFIED', 'VERIFY_FAILED')),
    actor            TEXT NOT NULL,
    evidence_sha256  TEXT,
    package_path     TEXT,
    detail           TEXT NOT NULL DEFAULT '{}',
    prev_hash        TEXT NOT NULL,
    row_hash         TEXT NOT NULL
);
CREATE INDEX custody_action ON custody_log (tenant, action_id, command_index);

CREATE TRIGGER custody_log_no_update BEFORE UPDATE ON custody_log
BEGIN
    SELECT RAISE(ABORT, 'custody_log is append-only');
END;
CREATE TRIGGER custody_log_no_delete BEFORE DELETE ON custody_log
BEGIN
    SELECT RAISE(ABORT, 'custody_log is append-only');
END;

-- Last run of each scheduled or manual job, for `status`.
CREATE TABLE job_runs (
    job          TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    ok           INTEGER,
    summary      TEXT,
    PRIMARY KEY (job, tenant)
);

CREATE VIEW v_evidence AS
SELECT e.evidence_id,
       e.tenant,
       e.action_id,
       e.command_index,
       r.command_type,
       a.machine_id,
       a.computer_dns_name,
       a.requestor,
       a.requestor_comment,
       a.created_at AS action_created_at,
       e.archived_at,
       e.payload_name,
       e.payload_size,
       e.payload_sha256,
       e.original_name,
       e.original_sha256,
       e.package_path,
       e.package_sha256,
       e.last_verified_at,
       e.last_verify_ok
FROM evidence e
JOIN results r ON r.tenant = e.tenant AND r.action_id = e.action_id AND r.command_index = e.command_index
JOIN actions a ON a.tenant = e.tenant AND a.action_id = e.action_id;

CREATE VIEW v_custody AS
SELECT c.seq,
       c.at,
       c.tenant,
       c.action_id,
       c.command_index,
       c.event,
       c.actor,
       c.evidence_sha256,
       c.package_path,
       c.detail,
       c.prev_hash,
       c.row_hash,
       a.machine_id,
       a.computer_dns_name,
       a.requestor,
       a.requestor_comment,
       r.command_type
FROM custody_log c
LEFT JOIN actions a ON a.tenant = c.tenant AND a.action_id = c.action_id
LEFT JOIN results r ON r.tenant = c.tenant AND r.action_id = c.action_id AND r.command_index = c.command_index;
