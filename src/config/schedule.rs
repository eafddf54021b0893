//! `[schedule]`: when the daemon runs its discover, archive and verify jobs. Each cron
//! expression (seconds first, UTC) is parsed once, here, into the [`Schedule`] the daemon's
//! scheduler runs; a bad one is one line naming its key.

use serde::Deserialize;

use super::ConfigError;

/// The fields of a schedule, in order.
const CRON_FIELDS: &str = "sec min hour day-of-month month day-of-week";

/// `[schedule]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSchedule {
    discover: String,
    archive: String,
    verify: String,
}

impl Default for RawSchedule {
    fn default() -> Self {
        RawSchedule {
            discover: "0 */5 * * * *".into(),
            archive: "30 * * * * *".into(),
            verify: "0 17 3 * * *".into(),
        }
    }
}

impl RawSchedule {
    pub(super) fn check(self) -> Result<ScheduleConfig, ConfigError> {
        Ok(ScheduleConfig {
            discover: Schedule::parse("schedule.discover", self.discover)?,
            archive: Schedule::parse("schedule.archive", self.archive)?,
            verify: Schedule::parse("schedule.verify", self.verify)?,
        })
    }
}

/// `[schedule]`, parsed.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub discover: Schedule,
    pub archive: Schedule,
    pub verify: Schedule,
}

/// One cron expression with a seconds field, checked with the parser and settings
/// tokio-cron-scheduler uses (croner; seconds required, day-of-month and day-of-week both
/// required to match). The scheduler takes text only, so the value is the text this parse
/// accepted: a `Schedule` is one the scheduler cannot refuse.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
}

impl Schedule {
    /// Parses `text`, the value of `key`; croner's message says what is wrong.
    pub fn parse(key: &'static str, text: String) -> Result<Schedule, ConfigError> {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build();
        // croner would also take a seventh field (a year) and its message says so; lrvault's
        // schedules are exactly six, so that is what a wrong count is told.
        let fields = text.split_whitespace().count();
        let message = if fields != 6 {
            format!(
                "it has {fields} fields; lrvault takes exactly 6, seconds first ({CRON_FIELDS}), in UTC"
            )
        } else {
            match parser.parse(&text) {
                Ok(_) => return Ok(Schedule { text }),
                Err(e) => format!("{e} (6 fields, seconds first: {CRON_FIELDS})"),
            }
        };
        Err(ConfigError::Schedule { key, text, message })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}
