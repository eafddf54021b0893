//! Progress of long work: an indicatif bar with rate and a note (the ETA from the quota) on
//! a terminal, plain log lines (at most every few seconds) otherwise — never a bar in the
//! daemon's log stream.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: AtomicU64,
    note: Mutex<String>,
    /// Results done and when the last log line was written.
    state: Mutex<(u64, Instant)>,
    started: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// A bar when stderr is a terminal, log lines otherwise.
    pub fn new(label: &str, total: u64) -> Progress {
        Progress::with_unit(label, total, "results")
    }

    /// Like [`new`](Self::new), counting `unit` (e.g. "packages", "rows").
    pub fn with_unit(label: &str, total: u64, unit: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
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
            bar
        });
        Progress {
            bar,
            label: label.into(),
            total: AtomicU64::new(total),
            note: Mutex::new(String::new()),
            state: Mutex::new((0, Instant::now())),
            started: Instant::now(),
        }
    }

    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// A short note shown beside the bar and in the log lines (e.g. the ETA from the quota).
    pub fn set_note(&self, note: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(note.clone());
        }
        *self.note.lock().unwrap_or_else(|p| p.into_inner()) = note;
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        let total = self.total.load(Ordering::Relaxed);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        if st.1.elapsed() >= LOG_EVERY || st.0 == total {
            st.1 = Instant::now();
            let rate = st.0 as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            let note = self.note.lock().unwrap_or_else(|p| p.into_inner()).clone();
            tracing::info!(
                done = st.0,
                total,
                rate_per_min = (rate * 60.0).round(),
                "{} {note}",
                self.label
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
