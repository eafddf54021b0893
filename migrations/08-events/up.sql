-- lrvault schema v8 (docs/operations.md §16): events sent off the host, and what the
-- metrics count. Nothing here assumes v7.
--
-- `event_sinks` is the daemon's `[events]` section as data: which kinds each configured sink
-- receives. The daemon rewrites it at every start; with no sink configured it is empty and
-- no outbox row is ever written.
CREATE TABLE event_sinks (
    sink  TEXT NOT NULL CHECK (sink IN ('webhook', 'syslog')),
    kind  TEXT NOT NULL,
    PRIMARY KEY (sink, kind)
) WITHOUT ROWID;

-- The outbox: one row per event and sink, deleted once the sink took it. `id` is the
-- delivery order. A custody event names its custody row (`custody_seq`) and is read from it
-- at delivery, so the event is the row; a breaker event has no custody row and carries its
-- own `detail`. The rows are written by the triggers below, inside the transaction that
-- writes the custody row or the breaker's state, so a kill -9 can lose neither one alone.
CREATE TABLE event_outbox (
    id           INTEGER PRIMARY KEY,
    sink         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    custody_seq  INTEGER,
    at           TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX event_outbox_by_sink ON event_outbox (sink, id);

-- Each sink's last delivery and last error, for `status`.
CREATE TABLE event_sink_state (
    sink           TEXT PRIMARY KEY,
    delivered_at   TEXT,
    last_error     TEXT,
    last_error_at  TEXT,
    failures       INTEGER NOT NULL DEFAULT 0
);

-- A custody row of a subscribed kind (ANCHORED is sent as CHECKPOINT).
CREATE TRIGGER custody_log_to_outbox AFTER INSERT ON custody_log
BEGIN
    INSERT INTO event_outbox (sink, kind, custody_seq, at, tenant)
    SELECT s.sink, s.kind, NEW.seq, NEW.at, NEW.tenant FROM event_sinks s
    WHERE s.kind = CASE NEW.event WHEN 'ANCHORED' THEN 'CHECKPOINT' ELSE NEW.event END;
END;

-- A tenant's breaker opens (its tenant_health row appears) or closes (the row goes).
CREATE TRIGGER tenant_health_opened_to_outbox AFTER INSERT ON tenant_health
BEGIN
    INSERT INTO event_outbox (sink, kind, at, tenant, detail)
    SELECT s.sink, s.kind, NEW.since, NEW.tenant,
           json_object('scope', 'tenant', 'reason', NEW.reason, 'next_probe_at', NEW.next_probe_at)
    FROM event_sinks s WHERE s.kind = 'BREAKER_OPEN';
END;
CREATE TRIGGER tenant_health_closed_to_outbox AFTER DELETE ON tenant_health
BEGIN
    INSERT INTO event_outbox (sink, kind, at, tenant, detail)
    SELECT s.sink, s.kind, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), OLD.tenant,
           json_object('scope', 'tenant', 'reason', OLD.reason, 'next_probe_at', NULL)
    FROM event_sinks s WHERE s.kind = 'BREAKER_CLOSED';
END;

-- API calls per tenant, endpoint and answer since this migration, for the metrics: the
-- ledger (`api_calls`) forgets calls older than its windows, a counter must not.
CREATE TABLE api_call_totals (
    tenant    TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    status    INTEGER NOT NULL,
    calls     INTEGER NOT NULL,
    PRIMARY KEY (tenant, endpoint, status)
) WITHOUT ROWID;
CREATE TRIGGER api_calls_answered AFTER UPDATE OF http_status ON api_calls
WHEN OLD.http_status IS NULL AND NEW.http_status IS NOT NULL
BEGIN
    INSERT INTO api_call_totals (tenant, endpoint, status, calls)
    VALUES (NEW.tenant, NEW.endpoint, NEW.http_status, 1)
    ON CONFLICT (tenant, endpoint, status) DO UPDATE SET calls = calls + 1;
END;

-- The last successful run of each job per tenant (`job_runs` keeps only the last run).
CREATE TABLE job_successes (
    job     TEXT NOT NULL,
    tenant  TEXT NOT NULL,
    at      TEXT NOT NULL,
    PRIMARY KEY (job, tenant)
) WITHOUT ROWID;
INSERT INTO job_successes (job, tenant, at)
    SELECT job, tenant, finished_at FROM job_runs WHERE ok = 1 AND finished_at IS NOT NULL;
CREATE TRIGGER job_runs_ok_inserted AFTER INSERT ON job_runs
WHEN NEW.ok = 1 AND NEW.finished_at IS NOT NULL
BEGIN
    INSERT INTO job_successes (job, tenant, at) VALUES (NEW.job, NEW.tenant, NEW.finished_at)
    ON CONFLICT (job, tenant) DO UPDATE SET at = excluded.at;
END;
CREATE TRIGGER job_runs_ok_updated AFTER UPDATE ON job_runs
WHEN NEW.ok = 1 AND NEW.finished_at IS NOT NULL
BEGIN
    INSERT INTO job_successes (job, tenant, at) VALUES (NEW.job, NEW.tenant, NEW.finished_at)
    ON CONFLICT (job, tenant) DO UPDATE SET at = excluded.at;
END;
