//! Events off the host (docs/operations.md §16): every custody row of a kind in
//! `[events] kinds` (ANCHORED as CHECKPOINT) and every opening and closing of a tenant's
//! breaker goes to each configured sink — a signed webhook ([`webhook`]), a syslog receiver
//! ([`syslog`]) — from one outbox table ([`outbox`]), at least once and in order.
//!
//! The outbox rows are written in the transaction that writes what they mirror, so a kill -9
//! loses none. Each sink has its own task: it reads the next events through a read-only
//! connection, sends them one at a time and removes each once the sink took it. A sink that
//! fails opens a [`Breaker`] (the tenants' breaker: one probe per interval, doubling from
//! `retry_base` to `retry_max`); archiving never waits for a sink.

pub mod outbox;
pub mod syslog;
pub mod webhook;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::Db;
use crate::jobs::breaker::{Admission, Breaker, Trip};
use crate::jobs::failure::{TenantFailure, TenantTrouble};

pub use outbox::{Pending, SinkState};

/// Events read from the outbox at a time.
const BATCH: i64 = 64;
/// How often an idle sink looks for new events.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// A configured sink.
pub enum Sink {
    Webhook(webhook::WebhookSink),
    Syslog(syslog::SyslogSink),
}

impl Sink {
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Webhook(_) => "webhook",
            Sink::Syslog(_) => "syslog",
        }
    }

    async fn send(&mut self, event: &Pending) -> Result<(), String> {
        match self {
            Sink::Webhook(w) => w.send(event.body()).await,
            Sink::Syslog(s) => s.send(&event.kind, &event.at, &event.body()).await,
        }
    }
}

/// The sinks `cfg` configures, ready to send; a webhook key that cannot be read is an error
/// now (one line), not at the first event.
pub fn sinks(cfg: &Config) -> anyhow::Result<Vec<Sink>> {
    let mut sinks = Vec::new();
    if let Some(w) = &cfg.events.webhook {
        let sink = webhook::WebhookSink::new(w.clone())?;
        sink.key().map_err(crate::error::UserError::new)?;
        sinks.push(Sink::Webhook(sink));
    }
    if let Some(target) = &cfg.events.syslog {
        sinks.push(Sink::Syslog(syslog::SyslogSink::new(target.clone())));
    }
    Ok(sinks)
}

/// Records `cfg`'s sinks and kinds (the outbox triggers read them) and starts one delivery
/// task per sink on `tracker`, until `cancel`.
pub async fn start(
    cfg: &Config,
    db: &Db,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let sinks = sinks(cfg)?;
    let dropped = outbox::configure(db, &cfg.events).await?;
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "events waiting for a sink that is no longer configured were dropped"
        );
    }
    for sink in sinks {
        tracing::info!(sink = sink.name(), kinds = %cfg.events.kinds.join(" "), "sending events");
        let breaker = Breaker::new(cfg.download.retry_base, cfg.download.retry_max);
        let deliver = deliver(sink, db.clone(), breaker, cancel.clone());
        tracker.spawn(deliver);
    }
    Ok(())
}

/// Sends `sink`'s events in outbox order until `cancel`: each one removed once taken; on a
/// failure the breaker opens and the same event is tried again at its next probe.
pub async fn deliver(mut sink: Sink, db: Db, breaker: Breaker, cancel: CancellationToken) {
    let name = sink.name();
    loop {
        let pause = match breaker.admit() {
            Admission::Wait { left, .. } => Some(left),
            Admission::Go | Admission::Probe => None,
        };
        if let Some(left) = pause {
            tokio::select! {
                _ = tokio::time::sleep(left) => continue,
                _ = cancel.cancelled() => return,
            }
        }
        let batch = db.read(move |c| outbox::next(c, name, BATCH)).await;
        let batch = match batch {
            Ok(b) if !b.is_empty() => b,
            other => {
                if let Err(e) = other {
                    tracing::warn!(sink = name, error = %e, "cannot read the event outbox");
                }
                breaker.release_probe();
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_POLL) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        for event in batch {
            if cancel.is_cancelled() {
                return;
            }
            let sent = tokio::select! {
                sent = sink.send(&event) => sent,
                _ = cancel.cancelled() => return,
            };
            match sent {
                Ok(()) => {
                    if let Err(e) = outbox::delivered(&db, name, event.id).await {
                        tracing::warn!(sink = name, error = %e, "event sent but not removed from the outbox; it will be sent again");
                    }
                    if breaker.close() {
                        tracing::info!(sink = name, "the event sink takes events again");
                    }
                }
                Err(reason) => {
                    failed(&db, name, &breaker, reason).await;
                    break;
                }
            }
        }
    }
}

/// Opens (or keeps open) the sink's breaker, says so once and records the error for `status`.
async fn failed(db: &Db, name: &'static str, breaker: &Breaker, reason: String) {
    let failure = TenantFailure {
        kind: TenantTrouble::Outage,
        reason: reason.clone(),
    };
    let (open, trip) = breaker.trip(&failure);
    if trip == Trip::Opened {
        tracing::error!(sink = name, reason = %reason, next_try_at = %open.next_probe_at,
            "event sink failed; its events wait in the outbox and are tried again");
    } else {
        tracing::warn!(sink = name, reason = %reason, next_try_at = %open.next_probe_at, "event sink still failing");
    }
    if let Err(e) = outbox::failed(db, name, reason).await {
        tracing::warn!(sink = name, error = %e, "cannot record the event sink's error");
    }
}
