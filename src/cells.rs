//! Typed reads of one SQLite row that never fail: a cell whose type is not the one the schema
//! declares (an integer where text belongs, text that is not UTF-8) becomes a problem string.
//! `verify` reports such a row as a defect instead of stopping with an error.

use rusqlite::types::ValueRef;

/// The cells of one row, and the problems found reading them so far.
pub struct Cells<'r> {
    row: &'r rusqlite::Row<'r>,
    pub problems: Vec<String>,
}

impl<'r> Cells<'r> {
    pub fn new(row: &'r rusqlite::Row<'r>) -> Self {
        Cells {
            row,
            problems: Vec::new(),
        }
    }

    /// A NOT NULL TEXT cell.
    pub fn text(&mut self, i: usize, name: &str) -> Option<&'r str> {
        let value = self.opt_text(i, name)?;
        if value.is_none() {
            self.problems.push(format!("{name} is NULL"));
        }
        value
    }

    /// A nullable TEXT cell: `Some(None)` for NULL, `None` when the value is not text.
    pub fn opt_text(&mut self, i: usize, name: &str) -> Option<Option<&'r str>> {
        match self.row.get_ref(i) {
            Ok(ValueRef::Null) => Some(None),
            Ok(ValueRef::Text(bytes)) => match std::str::from_utf8(bytes) {
                Ok(text) => Some(Some(text)),
                Err(_) => {
                    self.problems.push(format!("{name} is not valid UTF-8"));
                    None
                }
            },
            Ok(other) => {
                self.problems
                    .push(format!("{name} holds {}, expected TEXT", other.data_type()));
                None
            }
            Err(e) => {
                self.problems.push(format!("{name} cannot be read: {e}"));
                None
            }
        }
    }

    /// A NOT NULL INTEGER cell.
    pub fn int(&mut self, i: usize, name: &str) -> Option<i64> {
        let value = self.opt_int(i, name)?;
        if value.is_none() {
            self.problems.push(format!("{name} is NULL"));
        }
        value
    }

    /// A nullable INTEGER cell: `Some(None)` for NULL, `None` when the value is not an integer.
    pub fn opt_int(&mut self, i: usize, name: &str) -> Option<Option<i64>> {
        match self.row.get_ref(i) {
            Ok(ValueRef::Null) => Some(None),
            Ok(ValueRef::Integer(n)) => Some(Some(n)),
            Ok(other) => {
                self.problems.push(format!(
                    "{name} holds {}, expected INTEGER",
                    other.data_type()
                ));
                None
            }
            Err(e) => {
                self.problems.push(format!("{name} cannot be read: {e}"));
                None
            }
        }
    }
}

/// A cell as text for naming things in messages, whatever its type.
pub fn shown(row: &rusqlite::Row<'_>, i: usize) -> String {
    match row.get_ref(i) {
        Ok(ValueRef::Null) => "NULL".into(),
        Ok(ValueRef::Integer(n)) => n.to_string(),
        Ok(ValueRef::Real(f)) => f.to_string(),
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        Ok(ValueRef::Blob(b)) => format!("x'{}'", hex::encode(b)),
        Err(e) => format!("<unreadable: {e}>"),
    }
}
