-- lrvault schema v5 (DESIGN.md §6): custody event kinds become data. `custody_events` lists
-- every kind, and custody_log.event references it, so a new kind is one INSERT in a later
-- migration: this is the last time custody_log is rebuilt. SQLite cannot add a foreign key to
-- a table in place, so the rows are copied exactly as they are (hashes included; DROP TABLE
-- fires no DELETE trigger) and the index, triggers and view come back unchanged.

CREATE TABLE custody_events (
    name           TEXT PRIMARY KEY,
    since_version  INTEGER NOT NULL,
    meaning        TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO custody_events (name, since_version, meaning) VALUES
    ('DISCOVERED',          1, 'a machine action was found and recorded'),
    ('QUEUED',              1, 'a command result was queued (or re-queued) for download'),
    ('LINK_ISSUED',         1, 'the API issued a download link for a result'),
    ('DOWNLOADED',          1, 'a result''s bytes were received and hashed'),
    ('ARCHIVED',            1, 'a result''s package was placed in the evidence store'),
    ('UNAVAILABLE',         1, 'the API says the result no longer exists'),
    ('SKIPPED',             1, 'a command has no result to archive'),
    ('FAILED',              1, 'a result ran out of attempts or cannot be fetched'),
    ('VERIFIED',            1, 'a verify run ended; its scope and counts'),
    ('VERIFY_FAILED',       1, 'a verify run found a defect'),
    ('EXPORTED',            3, 'a package was handed over in an examiner''s kit'),
    ('BACKED_UP',           3, 'an online copy of the database was taken'),
    ('RESTORED',            3, 'the database was put back from a backup'),
    ('ATTEMPT_FAILED',      5, 'an attempt failed and will be retried: its scope and reason'),
    ('ANCHORED',            5, 'a checkpoint received its RFC 3161 token'),
    ('PUBLISHING',          5, 'a package is about to be placed in the store: its SHA-256'),
    ('QUARANTINED',         5, 'a file found at a result''s path was set aside, not adopted'),
    ('CASE_TAGGED',         5, 'an action or package was added to a case'),
    ('CASE_UNTAGGED',       5, 'an action or package was removed from a case'),
    ('LEGAL_HOLD_SET',      5, 'a legal hold was put on a case''s objects'),
    ('LEGAL_HOLD_RELEASED', 5, 'a legal hold was lifted from a case''s objects');
CREATE TRIGGER custody_events_no_update BEFORE UPDATE ON custody_events
BEGIN
    SELECT RAISE(ABORT, 'custody_events is append-only');
END;
CREATE TRIGGER custody_events_no_delete BEFORE DELETE ON custody_events
BEGIN
    SELECT RAISE(ABORT, 'custody_events is append-only');
END;

CREATE TABLE custody_log_v5 (
    seq              INTEGER PRIMARY KEY,
    at               TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    command_index    INTEGER,
    event            TEXT NOT NULL REFERENCES custody_events (name),
    actor            TEXT NOT NULL,
    evidence_sha256  TEXT,
    package_path     TEXT,
    detail           TEXT NOT NULL DEFAULT '{}',
    prev_hash        TEXT NOT NULL,
    row_hash         TEXT NOT NULL
);
INSERT INTO custody_log_v5 (seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                            package_path, detail, prev_hash, row_hash)
SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
       package_path, detail, prev_hash, row_hash
FROM custody_log ORDER BY seq;
DROP VIEW v_custody;
DROP TABLE custody_log;
ALTER TABLE custody_log_v5 RENAME TO custody_log;

CREATE INDEX custody_action ON custody_log (tenant, action_id, command_index);
CREATE INDEX custody_event ON custody_log (event, seq);
CREATE INDEX custody_package ON custody_log (package_path) WHERE package_path IS NOT NULL;

CREATE TRIGGER custody_log_no_update BEFORE UPDATE ON custody_log
BEGIN
    SELECT RAISE(ABORT, 'custody_log is append-only');
END;
CREATE TRIGGER custody_log_no_delete BEFORE DELETE ON custody_log
BEGIN
    SELECT RAISE(ABORT, 'custody_log is append-only');
END;

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
SELECT 5, coalesce(max(seq), 0), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM custody_log;
