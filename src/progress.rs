//! Progress of long work: an indicatif bar with rate and ETA on a terminal, plain log lines
//! (at most every few seconds) otherwise — never a bar in the daemon's log stream.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    state: Mutex<(u64, Instant)>,
    started: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// A bar when stderr is a terminal and `interactive`, log lines otherwise.
    pub fn new(label: &str, total: u64, interactive: bool) -> Progress {
        let bar = (interactive && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} results  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            bar,
            label: label.into(),
            total,
            state: Mutex::new((0, Instant::now())),
            started: Instant::now(),
        }
    }

    pub fn inc(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += 1;
        if st.1.elapsed() >= LOG_EVERY || st.0 == self.total {
            st.1 = Instant::now();
            let rate = st.0 as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            let eta = if rate > 0.0 {
                (self.total.saturating_sub(st.0)) as f64 / rate
            } else {
                0.0
            };
            tracing::info!(
                done = st.0,
                total = self.total,
                rate_per_min = (rate * 60.0).round(),
                eta_s = eta.round(),
                "{}",
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
