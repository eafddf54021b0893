-- lrvault schema v2: each tenant's circuit breaker (DESIGN §4), kept for `lrvault status`.
-- A row exists while the breaker is open; the daemon deletes it when the API answers again.
CREATE TABLE tenant_health (
    tenant          TEXT PRIMARY KEY,
    trouble         TEXT NOT NULL CHECK (trouble IN ('outage', 'refused')),
    reason          TEXT NOT NULL,
    since           TEXT NOT NULL,
    next_probe_at   TEXT NOT NULL,
    interval_ms     INTEGER NOT NULL,
    updated_at      TEXT NOT NULL
);
