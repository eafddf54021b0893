-- lrvault schema v3: three more custody events, EXPORTED (an examiner's handover kit),
-- BACKED_UP (an online copy of this database) and RESTORED (this database was put back
-- from a backup: the rows after the backup's head live on in the replaced file only). SQLite cannot change a CHECK constraint in
-- place, so custody_log is rebuilt with its rows, index, append-only triggers and view intact
-- (DROP TABLE fires no DELETE trigger; every row is copied as it is, hashes included).
CREATE TABLE custody_log_v3 (
    seq              INTEGER PRIMARY KEY,
    at               TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    command_index    INTEGER,
    event            TEXT NOT NULL CHECK (event IN ('DISCOVERED', 'QUEUED', 'LINK_ISSUED', 'DOWNLOADED',
                         'ARCHIVED', 'UNAVAILABLE', 'SKIPPED', 'FAILED', 'VERIFIED', 'VERIFY_FAILED',
                         'EXPORTED', 'BACKED_UP', 'RESTORED')),
    actor            TEXT NOT NULL,
    evidence_sha256  TEXT,
    package_path     TEXT,
    detail           TEXT NOT NULL DEFAULT '{}',
    prev_hash        TEXT NOT NULL,
    row_hash         TEXT NOT NULL
);
INSERT INTO custody_log_v3 (seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                            package_path, detail, prev_hash, row_hash)
SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
       package_path, detail, prev_hash, row_hash
FROM custody_log ORDER BY seq;
DROP VIEW v_custody;
DROP TABLE custody_log;
ALTER TABLE custody_log_v3 RENAME TO custody_log;
CREATE INDEX custody_action ON custody_log (tenant, action_id, command_index);

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
