//! The OData subset that List MachineActions accepts: `$filter` clauses joined by `and` over
//! `type`, `status`, `machineId`, `requestor`, `id` (eq, quoted) and `creationDateTimeUtc`
//! (eq/ge/gt/le/lt, unquoted RFC 3339), plus `$top` and `$skip`. Anything else is rejected the
//! way the real service rejects it.

use chrono::{DateTime, Utc};

use super::data::Action;

/// Largest `$top` the service accepts.
pub(crate) const MAX_TOP: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum QueryError {
    #[error("unsupported query option `{0}`")]
    UnknownOption(String),
    #[error("`{option}` value `{value}` is not a non-negative integer")]
    BadNumber { option: &'static str, value: String },
    #[error("the limit of '{MAX_TOP}' for Top query has been exceeded: {0}")]
    TopTooLarge(usize),
    #[error("could not find a property named '{0}'")]
    UnknownField(String),
    #[error("operator `{op}` is not supported for `{field}`")]
    BadOperator { field: String, op: String },
    #[error("`{field}` needs a quoted string literal, got `{value}`")]
    NeedsString { field: String, value: String },
    #[error("`{0}` is not an unquoted RFC 3339 date-time")]
    BadDate(String),
    #[error("syntax error in $filter near `{0}`")]
    Syntax(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ge,
    Gt,
    Le,
    Lt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Clause {
    Type(String),
    Status(String),
    MachineId(String),
    Requestor(String),
    Id(String),
    Created(Cmp, DateTime<Utc>),
}

impl Clause {
    pub fn matches(&self, a: &Action) -> bool {
        match self {
            Clause::Type(v) => a.kind == v,
            Clause::Status(v) => a.status == v,
            Clause::MachineId(v) => &a.machine_id == v,
            Clause::Requestor(v) => &a.requestor == v,
            Clause::Id(v) => &a.id == v,
            Clause::Created(cmp, t) => match cmp {
                Cmp::Eq => a.created == *t,
                Cmp::Ge => a.created >= *t,
                Cmp::Gt => a.created > *t,
                Cmp::Le => a.created <= *t,
                Cmp::Lt => a.created < *t,
            },
        }
    }
}

/// A parsed List query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListQuery {
    pub filter: Vec<Clause>,
    pub top: usize,
    pub skip: usize,
}

/// Parses the raw query string (form-encoded, `+` or `%20` for spaces).
pub(crate) fn parse_query(raw: Option<&str>) -> Result<ListQuery, QueryError> {
    let mut q = ListQuery {
        filter: Vec::new(),
        top: MAX_TOP,
        skip: 0,
    };
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "$filter" => q.filter = parse_filter(&value)?,
            "$top" => {
                q.top = number("$top", &value)?;
                if q.top > MAX_TOP {
                    return Err(QueryError::TopTooLarge(q.top));
                }
            }
            "$skip" => q.skip = number("$skip", &value)?,
            other if other.starts_with('$') => {
                return Err(QueryError::UnknownOption(other.to_string()));
            }
            _ => {}
        }
    }
    Ok(q)
}

fn number(option: &'static str, value: &str) -> Result<usize, QueryError> {
    value.trim().parse().map_err(|_| QueryError::BadNumber {
        option,
        value: value.to_string(),
    })
}

/// Splits into words, keeping `'quoted ''strings'''` together (with the quotes).
fn tokens(s: &str) -> Result<Vec<String>, QueryError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut tok = String::new();
        if c == '\'' {
            tok.push(chars.next().unwrap_or('\''));
            loop {
                match chars.next() {
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                        tok.push_str("''");
                    }
                    Some('\'') => {
                        tok.push('\'');
                        break;
                    }
                    Some(ch) => tok.push(ch),
                    None => return Err(QueryError::Syntax(tok)),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                tok.push(ch);
                chars.next();
            }
        }
        out.push(tok);
    }
    Ok(out)
}

fn string_literal(field: &str, value: &str) -> Result<String, QueryError> {
    match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(inner) if value.len() >= 2 => Ok(inner.replace("''", "'")),
        _ => Err(QueryError::NeedsString {
            field: field.to_string(),
            value: value.to_string(),
        }),
    }
}

pub(crate) fn parse_filter(s: &str) -> Result<Vec<Clause>, QueryError> {
    let toks = tokens(s)?;
    let mut clauses = Vec::new();
    let mut i = 0;
    loop {
        let [field, op, value] = match toks.get(i..i + 3) {
            Some([f, o, v]) => [f, o, v],
            _ => return Err(QueryError::Syntax(toks[i.min(toks.len())..].join(" "))),
        };
        let bad_op = || QueryError::BadOperator {
            field: field.clone(),
            op: op.clone(),
        };
        let clause = if field.eq_ignore_ascii_case("creationDateTimeUtc") {
            let cmp = match op.as_str() {
                "eq" => Cmp::Eq,
                "ge" => Cmp::Ge,
                "gt" => Cmp::Gt,
                "le" => Cmp::Le,
                "lt" => Cmp::Lt,
                _ => return Err(bad_op()),
            };
            let t = DateTime::parse_from_rfc3339(value)
                .map_err(|_| QueryError::BadDate(value.clone()))?;
            Clause::Created(cmp, t.with_timezone(&Utc))
        } else {
            let make: fn(String) -> Clause = match field.to_ascii_lowercase().as_str() {
                "type" => Clause::Type,
                "status" => Clause::Status,
                "machineid" => Clause::MachineId,
                "requestor" => Clause::Requestor,
                "id" => Clause::Id,
                _ => return Err(QueryError::UnknownField(field.clone())),
            };
            if op != "eq" {
                return Err(bad_op());
            }
            make(string_literal(field, value)?)
        };
        clauses.push(clause);
        i += 3;
        match toks.get(i) {
            None => return Ok(clauses),
            Some(t) if t == "and" => i += 1,
            Some(t) => return Err(QueryError::Syntax(t.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_the_archiver_query() {
        let q = parse_query(Some(
            "$filter=type+eq+%27LiveResponse%27+and+creationDateTimeUtc+ge+2025-03-01T00:00:00Z&$top=50&$skip=100",
        ))
        .unwrap();
        assert_eq!(
            q,
            ListQuery {
                filter: vec![
                    Clause::Type("LiveResponse".into()),
                    Clause::Created(Cmp::Ge, t("2025-03-01T00:00:00Z")),
                ],
                top: 50,
                skip: 100,
            }
        );
    }

    #[test]
    fn quoted_values_may_contain_spaces_and_quotes() {
        let f = parse_filter("requestor eq 'Tom and O''Brien' and status eq 'Failed'").unwrap();
        assert_eq!(
            f,
            vec![
                Clause::Requestor("Tom and O'Brien".into()),
                Clause::Status("Failed".into())
            ]
        );
    }

    #[test]
    fn rejects_what_the_service_rejects() {
        assert_eq!(
            parse_query(Some("$stop=10")),
            Err(QueryError::UnknownOption("$stop".into()))
        );
        assert_eq!(
            parse_query(Some("$top=10001")),
            Err(QueryError::TopTooLarge(10_001))
        );
        assert_eq!(
            parse_filter("computerDnsName eq 'x'"),
            Err(QueryError::UnknownField("computerDnsName".into()))
        );
        assert_eq!(
            parse_filter("type ge 'x'"),
            Err(QueryError::BadOperator {
                field: "type".into(),
                op: "ge".into()
            })
        );
        assert_eq!(
            parse_filter("creationDateTimeUtc ge '2025-03-01T00:00:00Z'"),
            Err(QueryError::BadDate("'2025-03-01T00:00:00Z'".into()))
        );
        assert_eq!(
            parse_filter("type eq 'LiveResponse' or status eq 'x'"),
            Err(QueryError::Syntax("or".into()))
        );
        assert_eq!(
            parse_filter("type eq"),
            Err(QueryError::Syntax("type eq".into()))
        );
        assert_eq!(
            parse_filter("status eq Failed"),
            Err(QueryError::NeedsString {
                field: "status".into(),
                value: "Failed".into()
            })
        );
    }
}
