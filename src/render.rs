//! Rendering query results as an aligned table, CSV or JSON (status and audit output). Text
//! from the API (a `requestorComment`, a file name) reaches an auditor's terminal here: in
//! table and CSV output every control character and every bidirectional formatting character
//! is shown escaped (`\u{1b}`), never sent as is, so it cannot move the cursor, recolour,
//! hide or reorder what is printed. JSON escapes control characters itself; bidirectional
//! ones are escaped there too.

use serde_json::Value;

/// How a report is printed (`--format`).
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Column names and rows of a query, each cell a JSON value.
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    /// Runs `sql` on `conn` and collects every column as JSON values.
    pub fn query(
        conn: &rusqlite::Connection,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> rusqlite::Result<Rows> {
        let mut stmt = conn.prepare(sql)?;
        let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let n = columns.len();
        let rows = stmt
            .query_map(params, |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(v) => Value::from(v),
                            rusqlite::types::ValueRef::Real(v) => Value::from(v),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::from(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::from(hex::encode(b)),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<Value>>>()
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Rows { columns, rows })
    }

    pub fn to_json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|r| {
                    Value::Object(
                        self.columns
                            .iter()
                            .cloned()
                            .zip(r.iter().cloned())
                            .collect(),
                    )
                })
                .collect(),
        )
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => json_text(&self.to_json()) + "\n",
            Format::Csv => {
                let mut out = String::new();
                let line = |cells: Vec<String>| {
                    cells
                        .iter()
                        .map(|c| csv_field(c))
                        .collect::<Vec<_>>()
                        .join(",")
                        + "\n"
                };
                out += &line(self.columns.clone());
                for r in &self.rows {
                    out += &line(r.iter().map(|v| escape_text(&cell_text(v))).collect());
                }
                out
            }
            Format::Table => {
                let texts: Vec<Vec<String>> = self
                    .rows
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|v| escape_text(&cell_text(v).replace(['\n', '\r', '\t'], " ")))
                            .collect()
                    })
                    .collect();
                let mut widths: Vec<usize> =
                    self.columns.iter().map(|c| c.chars().count()).collect();
                for r in &texts {
                    for (w, c) in widths.iter_mut().zip(r) {
                        *w = (*w).max(c.chars().count());
                    }
                }
                let fmt_row = |cells: &[String]| {
                    cells
                        .iter()
                        .zip(&widths)
                        .map(|(c, w)| format!("{c:<w$}"))
                        .collect::<Vec<_>>()
                        .join("  ")
                        .trim_end()
                        .to_string()
                        + "\n"
                };
                let mut out = fmt_row(&self.columns);
                out += &fmt_row(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
                for r in &texts {
                    out += &fmt_row(r);
                }
                out
            }
        }
    }
}

fn cell_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Pretty JSON in which nothing a terminal obeys is left raw: serde escapes C0 controls;
/// DEL, C1 controls and bidirectional characters, legal in JSON strings as they are, are
/// written `\uXXXX` too (the same value once parsed).
pub fn json_text(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.chars()
        .map(|c| match is_bidi(c) || (c.is_control() && c != '\n') {
            true => format!("\\u{:04x}", c as u32),
            false => c.to_string(),
        })
        .collect()
}

/// Bidirectional formatting characters: they reorder how the text around them is shown
/// (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069).
fn is_bidi(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character (C0, DEL, C1) and bidirectional formatting character
/// written as `\u{…}`, so a terminal shows it instead of obeying it. A backslash that could
/// be read as the start of such an escape is doubled. CSV keeps its line breaks and tabs
/// (quoted, they are data); the table turned them into spaces before.
fn escape_text(s: &str) -> String {
    if !s.chars().any(|c| c.is_control() || is_bidi(c) || c == '\\') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(c),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() || is_bidi(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_formats() {
        let rows = Rows {
            columns: vec!["a".into(), "bb".into()],
            rows: vec![
                vec![Value::from(1), Value::from("x,\"y\"")],
                vec![Value::Null, Value::from("z")],
            ],
        };
        assert_eq!(
            rows.render(Format::Table),
            "a  bb\n-  -----\n1  x,\"y\"\n   z\n"
        );
        assert_eq!(rows.render(Format::Csv), "a,bb\n1,\"x,\"\"y\"\"\"\n,z\n");
        assert_eq!(
            rows.to_json(),
            serde_json::json!([{"a":1,"bb":"x,\"y\""},{"a":null,"bb":"z"}])
        );
    }

    #[test]
    fn control_and_bidi_characters_are_shown_escaped_never_sent() {
        // A comment that would clear the line and recolour it, one that reorders the text
        // after it (U+202E), an isolate (U+2066), a C1 control (U+009B, CSI) and a backslash.
        let rows = Rows {
            columns: vec!["comment".into()],
            rows: vec![
                vec![Value::from("ok\u{1b}[2K\u{1b}[31mINC-1\u{7}")],
                vec![Value::from("a\u{202e}txt.exe\u{2066}b\u{9b}c\\u{1b}")],
            ],
        };
        assert_eq!(
            rows.render(Format::Table),
            "comment\n---------------------------------------\nok\\u{1b}[2K\\u{1b}[31mINC-1\\u{7}\na\\u{202e}txt.exe\\u{2066}b\\u{9b}c\\\\u{1b}\n"
        );
        assert_eq!(
            rows.render(Format::Csv),
            "comment\nok\\u{1b}[2K\\u{1b}[31mINC-1\\u{7}\na\\u{202e}txt.exe\\u{2066}b\\u{9b}c\\\\u{1b}\n"
        );
        let json = rows.render(Format::Json);
        assert!(
            !json
                .chars()
                .any(|c| (c.is_control() && c != '\n') || is_bidi(c)),
            "{json}"
        );
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rows.to_json(), "JSON escapes keep the value");
    }
}
