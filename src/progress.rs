//! Progress of long work: an indicatif bar with rate and a note (the ETA from the quota) on
//! a terminal, plain log lines otherwise — never a bar in the daemon's log stream. Without a
//! terminal a line goes out when results finish (at most every [`LOG_EVERY`]) and, while
//! nothing finishes (one large download), a heartbeat line every [`LOG_EVERY`] with the blob
//! bytes received so far, so a log never falls silent for minutes. Time is tokio's clock, so
//! tests drive it.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

/// Longest silence between two progress lines without a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    lines: Option<Arc<Lines>>,
    total: AtomicU64,
    note: Mutex<String>,
}

/// The log-line side of a [`Progress`], shared with its heartbeat task.
struct Lines {
    label: String,
    unit: String,
    total: AtomicU64,
    note: Mutex<String>,
    /// Results done and when the last line was written.
    state: Mutex<(u64, Instant)>,
    started: Instant,
    /// The bytes-received counter the lines report ([`crate::fetch::RECEIVED`]; a test's own
    /// in tests, where other tests download in the same process) and its value at the start.
    received: &'static AtomicU64,
    bytes_at_start: u64,
    /// The last line written and how many, for tests.
    last: Mutex<(String, u64)>,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Progress {
    /// A bar when stderr is a terminal, log lines otherwise.
    pub fn new(label: &str, total: u64) -> Progress {
        Progress::with_unit(label, total, "results")
    }

    /// Like [`new`](Self::new), counting `unit` (e.g. "packages", "rows").
    pub fn with_unit(label: &str, total: u64, unit: &str) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress::log_lines(label, total, unit);
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress {
            bar: Some(bar),
            lines: None,
            total: AtomicU64::new(total),
            note: Mutex::new(String::new()),
        }
    }

    /// Log lines whatever stderr is, with a heartbeat every [`LOG_EVERY`] (when a tokio
    /// runtime is at hand) until [`finish`](Self::finish) or drop.
    pub fn log_lines(label: &str, total: u64, unit: &str) -> Progress {
        Progress::log_lines_counting(label, total, unit, &crate::fetch::RECEIVED)
    }

    /// [`log_lines`](Self::log_lines) reporting the bytes counted by `received`.
    fn log_lines_counting(
        label: &str,
        total: u64,
        unit: &str,
        received: &'static AtomicU64,
    ) -> Progress {
        let lines = Arc::new(Lines {
            label: label.into(),
            unit: unit.into(),
            total: AtomicU64::new(total),
            note: Mutex::new(String::new()),
            state: Mutex::new((0, Instant::now())),
            started: Instant::now(),
            received,
            bytes_at_start: received.load(Ordering::Relaxed),
            last: Mutex::new((String::new(), 0)),
            heartbeat: Mutex::new(None),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let beat = Arc::downgrade(&lines);
            let task = rt.spawn(async move {
                let mut tick = tokio::time::interval_at(Instant::now() + LOG_EVERY, LOG_EVERY);
                loop {
                    tick.tick().await;
                    let Some(lines) = beat.upgrade() else { return };
                    lines.heartbeat();
                }
            });
            *lock(&lines.heartbeat) = Some(task);
        }
        Progress {
            bar: None,
            lines: Some(lines),
            total: AtomicU64::new(total),
            note: Mutex::new(String::new()),
        }
    }

    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
        if let Some(lines) = &self.lines {
            lines.total.store(total, Ordering::Relaxed);
        }
    }

    /// A short note shown beside the bar and in the log lines (e.g. the ETA from the quota).
    pub fn set_note(&self, note: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(note.clone());
        }
        if let Some(lines) = &self.lines {
            *lock(&lines.note) = note.clone();
        }
        *lock(&self.note) = note;
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        match (&self.bar, &self.lines) {
            (_, Some(lines)) => lock(&lines.state).0,
            (Some(bar), None) => bar.position(),
            (None, None) => 0,
        }
    }

    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if let Some(lines) = &self.lines {
            lines.inc_by(n);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        if let Some(lines) = &self.lines
            && let Some(task) = lock(&lines.heartbeat).take()
        {
            task.abort();
        }
    }

    /// The last log line written and how many were (log-line mode), for tests.
    pub fn last_line(&self) -> Option<(String, u64)> {
        self.lines.as_ref().map(|l| lock(&l.last).clone())
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Lines {
    fn inc_by(&self, n: u64) {
        let mut st = lock(&self.state);
        st.0 += n;
        let total = self.total.load(Ordering::Relaxed);
        if st.1.elapsed() >= LOG_EVERY || st.0 == total {
            st.1 = Instant::now();
            self.log(st.0);
        }
    }

    /// The heartbeat: a line when none went out for [`LOG_EVERY`].
    fn heartbeat(&self) {
        let mut st = lock(&self.state);
        if st.1.elapsed() >= LOG_EVERY {
            st.1 = Instant::now();
            self.log(st.0);
        }
    }

    fn log(&self, done: u64) {
        let total = self.total.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate_per_min = (done as f64 / elapsed * 60.0).round();
        let bytes = self
            .received
            .load(Ordering::Relaxed)
            .saturating_sub(self.bytes_at_start);
        let note = lock(&self.note).clone();
        let line = format!(
            "{}: {done}/{total} {}, {} downloaded in {}s{}",
            self.label,
            self.unit,
            human_bytes(bytes),
            elapsed.round(),
            if note.is_empty() {
                String::new()
            } else {
                format!("; {note}")
            }
        );
        tracing::info!(done, total, rate_per_min, bytes_received = bytes, "{line}");
        let mut last = lock(&self.last);
        last.0 = line;
        last.1 += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `812 B`, `3.4 MiB`, `1.20 GiB`.
pub fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    match n {
        n if n < 1024 * 1024 => format!("{n} B"),
        n if n < 1024 * 1024 * 1024 => format!("{:.1} MiB", n as f64 / MIB),
        n => format!("{:.2} GiB", n as f64 / (MIB * 1024.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One large download and no result finishing: a line every 10 s all the same, with the
    /// bytes received; a finished result is a line at once only after 10 s of quiet.
    #[tokio::test(start_paused = true)]
    async fn without_a_terminal_a_line_goes_out_every_ten_seconds() {
        static RECEIVED: AtomicU64 = AtomicU64::new(5);
        let p = Progress::log_lines_counting("backfill contoso", 2, "results", &RECEIVED);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(p.last_line().unwrap().1, 0);
        RECEIVED.fetch_add(3 * 1024 * 1024, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (line, n) = p.last_line().unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            line,
            "backfill contoso: 0/2 results, 3.0 MiB downloaded in 10s"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(p.last_line().unwrap().1, 4, "10 s, 20 s, 30 s, 40 s");
        p.set_note("ETA 2 min".into());
        p.inc();
        // The heartbeat went out less than 10 s ago: no line for this result.
        assert_eq!(p.last_line().unwrap().1, 4);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (line, n) = p.last_line().unwrap();
        assert_eq!(n, 5);
        assert_eq!(
            line,
            "backfill contoso: 1/2 results, 3.0 MiB downloaded in 50s; ETA 2 min"
        );
        // The last result is a line at once.
        p.inc();
        let (line, n) = p.last_line().unwrap();
        assert_eq!(n, 6);
        assert!(
            line.starts_with("backfill contoso: 2/2 results, 3.0 MiB downloaded in "),
            "{line}"
        );
        p.finish();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(p.last_line().unwrap().1, 6, "no heartbeat after finish");
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
        assert_eq!(human_bytes(1288490189), "1.20 GiB");
    }
}
