//! Time formats: every timestamp lrvault stores is RFC 3339 UTC with milliseconds
//! (`2026-11-27T13:05:00.123Z`); user-given dates accept a day, RFC 3339 or a relative age.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

use crate::error::UserError;

/// Current time as a `DateTime<Utc>`.
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// `2026-11-27T13:05:00.123Z`
pub fn fmt(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn now_str() -> String {
    fmt(now())
}

/// Milliseconds since the Unix epoch (the quota ledger's clock).
pub fn now_ms() -> i64 {
    now().timestamp_millis()
}

/// Parses API timestamps: RFC 3339 with 0–7 fractional digits, `Z` or an offset.
pub fn parse_api(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            // Some payloads omit the zone; the API documents UTC.
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|n| n.and_utc())
        })
}

/// Parses a user-given DATE: `YYYY-MM-DD` (UTC midnight), RFC 3339, or relative (`30d`, `12h`).
pub fn parse_user_date(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, UserError> {
    let s = s.trim();
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map(|n| n.and_utc()).unwrap_or(now));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(age) = humantime::parse_duration(s) {
        let age = chrono::Duration::from_std(age)
            .map_err(|_| UserError::new(format!("date '{s}' is too far in the past")))?;
        return now
            .checked_sub_signed(age)
            .ok_or_else(|| UserError::new(format!("date '{s}' is too far in the past")));
    }
    Err(UserError::new(format!(
        "invalid date '{s}': use YYYY-MM-DD, RFC 3339 (2026-11-01T00:00:00Z) or an age like 30d / 12h"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_millis_and_z() {
        let t = parse_api("2021-02-04T15:36:52.7788848Z").unwrap();
        assert_eq!(fmt(t), "2021-02-04T15:36:52.778Z");
        let t = parse_api("2023-03-18T21:04:01.92Z").unwrap();
        assert_eq!(fmt(t), "2023-03-18T21:04:01.920Z");
        assert_eq!(
            fmt(parse_api("2023-03-18T21:04:01").unwrap()),
            "2023-03-18T21:04:01.000Z"
        );
    }

    #[test]
    fn user_dates() {
        let now = parse_api("2026-11-27T12:00:00Z").unwrap();
        assert_eq!(
            fmt(parse_user_date("2026-11-01", now).unwrap()),
            "2026-11-01T00:00:00.000Z"
        );
        assert_eq!(
            fmt(parse_user_date("30d", now).unwrap()),
            "2026-10-28T12:00:00.000Z"
        );
        assert_eq!(
            fmt(parse_user_date("12h", now).unwrap()),
            "2026-11-27T00:00:00.000Z"
        );
        assert_eq!(
            fmt(parse_user_date("2026-11-02T03:04:05+01:00", now).unwrap()),
            "2026-11-02T02:04:05.000Z"
        );
        let err = parse_user_date("last tuesday", now).unwrap_err();
        assert!(err.to_string().contains("invalid date 'last tuesday'"));
    }
}
