//! The simulated MDE quota: per (tenant, endpoint) sliding windows of `per_minute` admitted
//! requests per `minute` and `per_hour` per `hour`. A refused request is not counted and is
//! told how long until a slot frees (the `Retry-After` value).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Quota {
    per_minute: u32,
    per_hour: u32,
    minute: Duration,
    hour: Duration,
    /// Endpoints with limits of their own (per minute, per hour).
    own_limits: HashMap<&'static str, (u32, u32)>,
    admitted: HashMap<(String, &'static str), VecDeque<Instant>>,
}

impl Quota {
    pub fn new(per_minute: u32, per_hour: u32, minute: Duration, hour: Duration) -> Quota {
        Quota {
            per_minute,
            per_hour,
            minute,
            hour,
            own_limits: HashMap::new(),
            admitted: HashMap::new(),
        }
    }

    /// Gives `endpoint` its own limits over the same windows (getPackageUri: 2/min, 120/h).
    pub fn set_limits(&mut self, endpoint: &'static str, per_minute: u32, per_hour: u32) {
        self.own_limits.insert(endpoint, (per_minute, per_hour));
    }

    /// Admits (and records) a request at `now`, or returns the whole seconds (>= 1, rounded up)
    /// until one would be admitted.
    pub fn admit(&mut self, tenant: &str, endpoint: &'static str, now: Instant) -> Result<(), u64> {
        let window = self
            .admitted
            .entry((tenant.to_string(), endpoint))
            .or_default();
        let longest = self.hour.max(self.minute);
        while window
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= longest)
        {
            window.pop_front();
        }
        let mut wait = Duration::ZERO;
        let (per_minute, per_hour) = self
            .own_limits
            .get(endpoint)
            .copied()
            .unwrap_or((self.per_minute, self.per_hour));
        for (limit, len) in [(per_minute, self.minute), (per_hour, self.hour)] {
            let inside: Vec<&Instant> = window
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < len)
                .collect();
            if inside.len() >= limit as usize {
                // The slot frees when the request `limit` places from the end leaves the window.
                let oldest_blocking = inside[inside.len() - limit as usize];
                let frees = (*oldest_blocking + len).saturating_duration_since(now);
                wait = wait.max(frees);
            }
        }
        if wait.is_zero() {
            window.push_back(now);
            Ok(())
        } else {
            Err(wait.as_secs_f64().ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_window_refuses_then_frees() {
        let mut q = Quota::new(3, 100, Duration::from_secs(10), Duration::from_secs(100));
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(q.admit("t", "link", t0 + Duration::from_secs(i)), Ok(()));
        }
        // The oldest (t0) leaves the window at t0+10 s; at t0+3.5 s that is 6.5 s away -> 7.
        assert_eq!(
            q.admit("t", "link", t0 + Duration::from_millis(3500)),
            Err(7)
        );
        // Other endpoints and tenants have their own buckets.
        assert_eq!(q.admit("t", "get", t0), Ok(()));
        assert_eq!(q.admit("u", "link", t0), Ok(()));
        assert_eq!(q.admit("t", "link", t0 + Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn hour_window_applies_too() {
        let mut q = Quota::new(10, 2, Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(q.admit("t", "list", t0), Ok(()));
        assert_eq!(q.admit("t", "list", t0 + Duration::from_secs(5)), Ok(()));
        assert_eq!(q.admit("t", "list", t0 + Duration::from_secs(6)), Err(54));
        assert_eq!(q.admit("t", "list", t0 + Duration::from_secs(60)), Ok(()));
    }
}
