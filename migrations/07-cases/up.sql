-- lrvault schema v7 (docs/audit.md §8): cases. Case membership is derived from the chain:
-- every CASE_TAGGED / CASE_UNTAGGED custody row (detail {case, note, by}) marks one target, a
-- whole action (command_index NULL) or one package (its result's command_index), and the
-- latest row for a (case, target) decides. `case_marks` keeps that latest row per target, in
-- the same transaction as the row itself, so the views below need no scan of the log; verify
-- recomputes it from the chain (`v_case_marks_chain`), and a mark the chain does not hold is
-- a forgery like any other. Legal holds are read from the chain alone (`v_case_holds`).

CREATE TABLE case_marks (
    case_id        TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    action_id      TEXT NOT NULL,
    command_index  INTEGER,
    tagged         INTEGER NOT NULL CHECK (tagged IN (0, 1)),
    seq            INTEGER NOT NULL REFERENCES custody_log (seq)
);
CREATE UNIQUE INDEX case_marks_target ON case_marks (case_id, tenant, action_id, coalesce(command_index, -1));
CREATE INDEX case_marks_action ON case_marks (tenant, action_id);

-- The latest CASE_* row of every (case, target), straight from the chain.
CREATE VIEW v_case_marks_chain AS
SELECT case_id, tenant, action_id, command_index, tagged, seq
FROM (SELECT json_extract(c.detail, '$.case') AS case_id,
             c.tenant, c.action_id, c.command_index,
             CASE c.event WHEN 'CASE_TAGGED' THEN 1 ELSE 0 END AS tagged,
             c.seq,
             row_number() OVER (PARTITION BY json_extract(c.detail, '$.case'), c.tenant, c.action_id,
                                             coalesce(c.command_index, -1)
                                ORDER BY c.seq DESC) AS latest
      FROM custody_log c
      WHERE c.event IN ('CASE_TAGGED', 'CASE_UNTAGGED'))
WHERE latest = 1;

INSERT INTO case_marks (case_id, tenant, action_id, command_index, tagged, seq)
SELECT case_id, tenant, action_id, command_index, tagged, seq FROM v_case_marks_chain;

-- Every package in a case: tagged itself, or part of a tagged action that has no mark of its
-- own for the package (a package's own mark, tag or untag, outranks its action's).
CREATE VIEW v_case_evidence AS
SELECT m.case_id,
       e.evidence_id,
       e.tenant,
       e.action_id,
       e.command_index,
       CASE WHEN m.command_index IS NULL THEN 'action' ELSE 'package' END AS tagged_as,
       m.seq AS tag_seq,
       e.package_path,
       e.package_size,
       e.package_sha256,
       e.archived_at,
       a.machine_id,
       a.computer_dns_name,
       a.created_at AS action_created_at,
       e.last_verified_at,
       e.last_verify_ok
FROM case_marks m
JOIN evidence e ON e.tenant = m.tenant AND e.action_id = m.action_id
               AND (m.command_index IS NULL OR e.command_index = m.command_index)
LEFT JOIN actions a ON a.tenant = e.tenant AND a.action_id = e.action_id
WHERE m.tagged = 1
  AND (m.command_index IS NOT NULL
       OR NOT EXISTS (SELECT 1 FROM case_marks p
                      WHERE p.case_id = m.case_id AND p.tenant = m.tenant AND p.action_id = m.action_id
                        AND p.command_index = e.command_index));

-- The latest LEGAL_HOLD_* row of every case (one per `case hold` / `case release`).
CREATE VIEW v_case_holds AS
SELECT case_id, held, seq, at, enforced
FROM (SELECT json_extract(c.detail, '$.case') AS case_id,
             CASE c.event WHEN 'LEGAL_HOLD_SET' THEN 1 ELSE 0 END AS held,
             c.seq, c.at,
             json_extract(c.detail, '$.enforced') AS enforced,
             row_number() OVER (PARTITION BY json_extract(c.detail, '$.case') ORDER BY c.seq DESC) AS latest
      FROM custody_log c
      WHERE c.event IN ('LEGAL_HOLD_SET', 'LEGAL_HOLD_RELEASED') AND c.command_index IS NULL)
WHERE latest = 1;

-- One row per case ever named: its packages, bytes, devices, the span of its actions, its
-- hold and the last verify of its packages.
CREATE VIEW v_cases AS
WITH names AS (SELECT DISTINCT case_id FROM case_marks)
SELECT n.case_id,
       (SELECT count(DISTINCT k.action_id) FROM case_marks k
         WHERE k.case_id = n.case_id AND k.tagged = 1) AS actions,
       count(DISTINCT v.evidence_id) AS packages,
       coalesce(sum(v.package_size), 0) AS bytes,
       count(DISTINCT v.machine_id) AS devices,
       min(v.action_created_at) AS first_action_at,
       max(v.action_created_at) AS last_action_at,
       coalesce(h.held, 0) AS legal_hold,
       max(v.last_verified_at) AS last_verified_at,
       CASE WHEN count(v.evidence_id) = 0 THEN NULL
            WHEN sum(CASE WHEN v.last_verify_ok = 0 THEN 1 ELSE 0 END) > 0 THEN 0
            WHEN sum(CASE WHEN v.last_verify_ok IS NULL THEN 1 ELSE 0 END) > 0 THEN NULL
            ELSE 1 END AS all_verified_ok
FROM names n
LEFT JOIN v_case_evidence v ON v.case_id = n.case_id
LEFT JOIN v_case_holds h ON h.case_id = n.case_id
GROUP BY n.case_id;

INSERT INTO schema_upgrades (version, custody_seq, applied_at)
SELECT 7, coalesce(max(seq), 0), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM custody_log;
