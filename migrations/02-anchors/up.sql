-- lrvault schema v2 (DESIGN.md §5, §6, §7a): evidence rows become immutable, the custody log
-- accepts EXPORTED and BACKED_UP, checkpoints are recorded in `anchors`, and indexes keep
-- audits and verify fast on large stores. Existing databases upgrade in place: every row is
-- kept as it is (same seq, same hashes).

-- SQLite cannot change a CHECK constraint in place: custody_log is rebuilt. The view and the
-- triggers that name it are dropped first and recreated unchanged afterwards (a view naming a
-- missing table would make the RENAME fail).
DROP VIEW v_custody;
DROP TRIGGER custody_log_no_update;
DROP TRIGGER custody_log_no_delete;

CREATE TABLE custody_log_v2 (
    seq              INTEGER PRIMARY KEY,
    at               TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    command_index    INTEGER,
    event            TEXT NOT NULL CHECK (event IN ('DISCOVERED', 'QUEUED', 'LINK_ISSUED', 'DOWNLOADED',
                         'ARCHIVED', 'UNAVAILABLE', 'SKIPPED', 'FAILED', 'VERIFIED', 'VERIFY_FAILED',
                         'EXPORTED', 'BACKED_UP')),
    actor            TEXT NOT NULL,
    evidence_sha256  TEXT,
    package_path     TEXT,
    detail           TEXT NOT NULL DEFAULT '{}',
    prev_hash        TEXT NOT NULL,
    row_hash         TEXT NOT NULL
);
INSERT INTO custody_log_v2 (seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                            package_path, detail, prev_hash, row_hash)
SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
       package_path, detail, prev_hash, row_hash
FROM custody_log ORDER BY seq;
DROP TABLE custody_log;
ALTER TABLE custody_log_v2 RENAME TO custody_log;

CREATE INDEX custody_action ON custody_log (tenant, action_id, command_index);
-- VERIFIED / EXPORTED / ARCHIVED rows by kind (verify, audits of exports and verify runs).
CREATE INDEX custody_event ON custody_log (event, seq);
-- The full history of one package by its path.
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

-- Evidence rows are immutable like custody rows; verify alone records its outcome.
CREATE TRIGGER evidence_no_delete BEFORE DELETE ON evidence
BEGIN
    SELECT RAISE(ABORT, 'evidence rows are immutable');
END;
CREATE TRIGGER evidence_no_update BEFORE UPDATE ON evidence
WHEN NEW.evidence_id IS NOT OLD.evidence_id
  OR NEW.tenant IS NOT OLD.tenant
  OR NEW.action_id IS NOT OLD.action_id
  OR NEW.command_index IS NOT OLD.command_index
  OR NEW.payload_name IS NOT OLD.payload_name
  OR NEW.payload_size IS NOT OLD.payload_size
  OR NEW.payload_sha256 IS NOT OLD.payload_sha256
  OR NEW.payload_md5 IS NOT OLD.payload_md5
  OR NEW.original_name IS NOT OLD.original_name
  OR NEW.original_size IS NOT OLD.original_size
  OR NEW.original_sha256 IS NOT OLD.original_sha256
  OR NEW.package_path IS NOT OLD.package_path
  OR NEW.package_size IS NOT OLD.package_size
  OR NEW.package_sha256 IS NOT OLD.package_sha256
  OR NEW.archived_at IS NOT OLD.archived_at
BEGIN
    SELECT RAISE(ABORT, 'evidence rows are immutable (only last_verified_at and last_verify_ok change)');
END;

-- One row per checkpoint file (DESIGN §7a): the custody row it pins and, once the timestamp
-- authority has answered, its RFC 3161 token. Paths are relative to store.root.
CREATE TABLE anchors (
    seq              INTEGER PRIMARY KEY,
    row_hash         TEXT NOT NULL,
    checkpoint_path  TEXT NOT NULL UNIQUE,
    tsa_url          TEXT,
    tsr_path         TEXT,
    gen_time         TEXT,
    created_at       TEXT NOT NULL
);
CREATE TRIGGER anchors_no_delete BEFORE DELETE ON anchors
BEGIN
    SELECT RAISE(ABORT, 'anchors are append-only');
END;
-- A token is added once, to a checkpoint that has none; nothing else changes.
CREATE TRIGGER anchors_no_update BEFORE UPDATE ON anchors
WHEN OLD.tsr_path IS NOT NULL
  OR NEW.seq IS NOT OLD.seq
  OR NEW.row_hash IS NOT OLD.row_hash
  OR NEW.checkpoint_path IS NOT OLD.checkpoint_path
  OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'anchors are append-only (a token is added once)');
END;

-- Where the custody head stood when each schema version was applied. Packages archived up
-- to version 2's mark were written before retrieval.json carried custody_head.
CREATE TABLE schema_upgrades (
    version      INTEGER PRIMARY KEY,
    custody_seq  INTEGER NOT NULL,
    applied_at   TEXT NOT NULL
);
INSERT INTO schema_upgrades (version, custody_seq, applied_at)
SELECT 2, coalesce(max(seq), 0), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM custody_log;
CREATE TRIGGER schema_upgrades_no_update BEFORE UPDATE ON schema_upgrades
BEGIN
    SELECT RAISE(ABORT, 'schema_upgrades is append-only');
END;
CREATE TRIGGER schema_upgrades_no_delete BEFORE DELETE ON schema_upgrades
BEGIN
    SELECT RAISE(ABORT, 'schema_upgrades is append-only');
END;

-- Audit filters (`audit evidence --machine/--requestor --since`) and verify's scans.
CREATE INDEX actions_machine ON actions (machine_id, created_at);
CREATE INDEX actions_dns_name ON actions (computer_dns_name, created_at);
CREATE INDEX actions_requestor ON actions (requestor, created_at);
CREATE INDEX evidence_archived ON evidence (archived_at);
CREATE INDEX results_state ON results (state, tenant);
