-- lrvault schema v6 (docs/audit.md §2): result states become data, as custody event kinds did
-- in v5. `result_states` lists every state with its meaning, and results.state references it,
-- so a new state is one INSERT in a later migration: this is the last time results is rebuilt.
-- SQLite cannot swap a CHECK constraint for a foreign key in place, so the rows are copied
-- exactly as they are (through a temporary table) and the indexes and views come back
-- unchanged. evidence references results: foreign keys are deferred to the commit, by which
-- time every evidence row has its result again.
PRAGMA defer_foreign_keys = ON;

CREATE TABLE result_states (
    name     TEXT PRIMARY KEY,
    meaning  TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO result_states (name, meaning) VALUES
    ('pending',     'waiting for its next download attempt (new, or retrying after an error)'),
    ('downloading', 'a process holds it under a lease and is fetching it'),
    ('archived',    'its package is in the evidence store, with its evidence row'),
    ('unavailable', 'the API says the result no longer exists'),
    ('skipped',     'the command has no result to archive'),
    ('failed',      'it ran out of attempts or cannot be fetched');
CREATE TRIGGER result_states_no_update BEFORE UPDATE ON result_states
BEGIN
    SELECT RAISE(ABORT, 'result_states is append-only');
END;
CREATE TRIGGER result_states_no_delete BEFORE DELETE ON result_states
BEGIN
    SELECT RAISE(ABORT, 'result_states is append-only');
END;

CREATE TEMP TABLE results_v5 AS SELECT * FROM main.results;
DROP VIEW v_evidence;
DROP VIEW v_custody;
DROP TABLE results;
CREATE TABLE results (
    tenant           TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    command_index    INTEGER NOT NULL,
    command_type     TEXT,
    command_json     TEXT NOT NULL,
    command_status   TEXT,
    state            TEXT NOT NULL REFERENCES result_states (name),
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
INSERT INTO results (tenant, action_id, command_index, command_type, command_json, command_status,
                     state, attempts, next_attempt_at, last_error, evidence_id, updated_at,
                     lease_owner, lease_until)
SELECT tenant, action_id, command_index, command_type, command_json, command_status,
       state, attempts, next_attempt_at, last_error, evidence_id, updated_at,
       lease_owner, lease_until
FROM temp.results_v5 ORDER BY tenant, action_id, command_index;
DROP TABLE temp.results_v5;

CREATE INDEX results_queue ON results (state, next_attempt_at);
CREATE INDEX results_state ON results (state, tenant);

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

INSERT INTO schema_upgrades (version, custody_seq, applied_at)
SELECT 6, coalesce(max(seq), 0), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM custody_log;
