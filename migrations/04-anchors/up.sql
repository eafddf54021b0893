-- lrvault schema v4 (DESIGN.md §5, §6, §7a): evidence rows become immutable, checkpoints are
-- recorded in `anchors`, and indexes keep audits and verify fast on large stores (the custody
-- log learned EXPORTED and BACKED_UP in v3). Existing databases upgrade in place: every row
-- is kept as it is.

-- VERIFIED / EXPORTED / ARCHIVED rows by kind (verify, audits of exports and verify runs).
CREATE INDEX custody_event ON custody_log (event, seq);
-- The full history of one package by its path.
CREATE INDEX custody_package ON custody_log (package_path) WHERE package_path IS NOT NULL;

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
-- to version 4's mark may have been written before retrieval.json carried custody_head.
CREATE TABLE schema_upgrades (
    version      INTEGER PRIMARY KEY,
    custody_seq  INTEGER NOT NULL,
    applied_at   TEXT NOT NULL
);
INSERT INTO schema_upgrades (version, custody_seq, applied_at)
SELECT 4, coalesce(max(seq), 0), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM custody_log;
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
