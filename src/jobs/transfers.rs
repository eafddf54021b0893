//! The process-wide transfer budget (`[download] concurrency` and `per_tenant`, see
//! config.example.toml): at most `concurrency` downloads in flight for the whole process, at
//! most `per_tenant` of them for one tenant, whatever the number of tenants. Memory and
//! threads follow the budget, not the tenants.
//!
//! Turns are fair: a free slot goes to the waiting tenant that has started the fewest
//! transfers so far (first come, first served among equals). A tenant with 10,000 queued
//! results therefore never delays another tenant's first result by more than one slot's
//! turnover, even when it asked first. Each tenant's archive loop asks for one slot at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The budget; one per process (in the jobs' `Context`).
pub struct Transfers {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    free: usize,
    /// 0: no cap beyond the total.
    per_tenant: usize,
    /// Waiting requests by (transfers the tenant started before, arrival): the first one a
    /// tenant under its cap can take gets the next free slot.
    waiting: BTreeMap<(u64, u64), Waiter>,
    arrivals: u64,
    tenants: HashMap<String, Counts>,
}

struct Waiter {
    tenant: String,
    grant: oneshot::Sender<TransferPermit>,
}

#[derive(Default)]
struct Counts {
    started: u64,
    in_flight: usize,
}

/// One transfer's slot; given back when dropped.
pub struct TransferPermit {
    inner: Arc<Mutex<Inner>>,
    tenant: String,
    /// False only for a permit that came back unreceived, whose slot was already given back.
    armed: bool,
}

impl Drop for TransferPermit {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.release(&self.tenant);
            inner.dispatch(&self.inner);
        }
    }
}

impl Transfers {
    /// `concurrency` slots in all (at least one), at most `per_tenant` for one tenant (0: no cap).
    pub fn new(concurrency: usize, per_tenant: usize) -> Transfers {
        Transfers {
            inner: Arc::new(Mutex::new(Inner {
                free: concurrency.max(1),
                per_tenant,
                waiting: BTreeMap::new(),
                arrivals: 0,
                tenants: HashMap::new(),
            })),
        }
    }

    /// Waits for a slot for one of `tenant`'s transfers. Cancel-safe: a request dropped
    /// before its slot came gives nothing up, and a slot granted to it goes to the next.
    pub async fn acquire(&self, tenant: &str) -> TransferPermit {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let started = inner.tenants.entry(tenant.to_string()).or_default().started;
            let arrival = inner.arrivals;
            inner.arrivals += 1;
            inner.waiting.insert(
                (started, arrival),
                Waiter {
                    tenant: tenant.to_string(),
                    grant: tx,
                },
            );
            inner.dispatch(&self.inner);
        }
        // The sender lives in `waiting` until it is used; the budget outlives its requests. A
        // permit sent to a request dropped before it was received is dropped with the channel
        // and gives its slot back then.
        rx.await
            .expect("the transfer budget dropped a waiting request")
    }

    /// Transfers in flight now (status and tests).
    pub fn in_flight(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tenants.values().map(|c| c.in_flight).sum()
    }
}

impl Inner {
    fn release(&mut self, tenant: &str) {
        self.free += 1;
        if let Some(c) = self.tenants.get_mut(tenant) {
            c.in_flight -= 1;
        }
    }

    /// Hands free slots to waiting requests, in turn order, skipping tenants at their cap.
    fn dispatch(&mut self, this: &Arc<Mutex<Inner>>) {
        while self.free > 0 {
            let per_tenant = self.per_tenant;
            let tenants = &self.tenants;
            let next = self
                .waiting
                .iter()
                .find(|(_, w)| {
                    per_tenant == 0
                        || tenants
                            .get(&w.tenant)
                            .is_none_or(|c| c.in_flight < per_tenant)
                })
                .map(|(k, _)| *k);
            let Some(key) = next else { return };
            let waiter = self.waiting.remove(&key).expect("just found");
            self.free -= 1;
            let counts = self.tenants.entry(waiter.tenant.clone()).or_default();
            counts.started += 1;
            counts.in_flight += 1;
            let permit = TransferPermit {
                inner: this.clone(),
                tenant: waiter.tenant,
                armed: true,
            };
            // A request dropped while it waited: its slot goes to the next one.
            if let Err(mut unreceived) = waiter.grant.send(permit) {
                unreceived.armed = false;
                self.release(&unreceived.tenant);
                if let Some(c) = self.tenants.get_mut(&unreceived.tenant) {
                    c.started -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs each tenant's loop (one slot at a time, as the archive loop does) with transfers
    /// of one (virtual) second; returns the order in which transfers started and the most
    /// that were ever in flight.
    async fn run(transfers: Arc<Transfers>, queues: &[(&str, usize)]) -> (Vec<String>, usize) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let peak = Arc::new(Mutex::new(0usize));
        let mut loops = tokio::task::JoinSet::new();
        for &(tenant, n) in queues {
            let (transfers, order, peak) = (transfers.clone(), order.clone(), peak.clone());
            let tenant = tenant.to_string();
            loops.spawn(async move {
                let mut running = tokio::task::JoinSet::new();
                for _ in 0..n {
                    let permit = transfers.acquire(&tenant).await;
                    order.lock().unwrap().push(tenant.clone());
                    let now = transfers.in_flight();
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(now);
                    drop(p);
                    running.spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        drop(permit);
                    });
                }
                while running.join_next().await.is_some() {}
            });
        }
        while loops.join_next().await.is_some() {}
        let order = order.lock().unwrap().clone();
        let peak = *peak.lock().unwrap();
        (order, peak)
    }

    #[tokio::test(start_paused = true)]
    async fn a_deep_backlog_never_delays_another_tenants_first_result_past_one_turnover() {
        let transfers = Arc::new(Transfers::new(2, 0));
        // The big tenant asks first and takes both free slots; every small tenant then starts
        // before the big tenant's second round.
        let mut queues = vec![("big", 20)];
        let small: Vec<String> = (0..6).map(|i| format!("small{i}")).collect();
        queues.extend(small.iter().map(|s| (s.as_str(), 1)));
        let (order, peak) = run(transfers.clone(), &queues).await;
        assert_eq!(order.len(), 26);
        assert_eq!(peak, 2, "never more than the budget in flight");
        let big_third = order
            .iter()
            .enumerate()
            .filter(|(_, t)| *t == "big")
            .nth(2)
            .unwrap()
            .0;
        for s in &small {
            let at = order.iter().position(|t| t == s).unwrap();
            assert!(
                at < big_third,
                "{s} started at {at}, after big's second round: {order:?}"
            );
        }
        assert_eq!(transfers.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn per_tenant_caps_one_tenant_and_leaves_the_rest_to_others() {
        let transfers = Arc::new(Transfers::new(4, 1));
        let (order, peak) = run(transfers.clone(), &[("a", 3), ("b", 3)]).await;
        assert_eq!(order.len(), 6);
        assert_eq!(
            peak, 2,
            "one each: the cap holds although two slots stay free"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_while_waiting_gives_its_slot_to_the_next() {
        let transfers = Arc::new(Transfers::new(1, 0));
        let held = transfers.acquire("a").await;
        let waiting = {
            let t = transfers.clone();
            tokio::spawn(async move { t.acquire("b").await })
        };
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        let next = tokio::time::timeout(Duration::from_secs(1), transfers.acquire("c")).await;
        assert!(next.is_ok(), "the slot came back");
        assert_eq!(transfers.in_flight(), 1);
    }
}
