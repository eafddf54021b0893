//! Rendering query results as an aligned table, CSV or JSON (status and audit output).

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
            Format::Json => {
                serde_json::to_string_pretty(&self.to_json()).unwrap_or_default() + "\n"
            }
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
                    out += &line(r.iter().map(cell_text).collect());
                }
                out
            }
            Format::Table => {
                let texts: Vec<Vec<String>> = self
                    .rows
                    .iter()
                    .map(|r| {
                        r.iter()
                            .map(|v| cell_text(v).replace(['\n', '\r', '\t'], " "))
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
}
