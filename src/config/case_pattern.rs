//! `case_pattern` (per tenant): the regex that names cases in an action's `requestorComment`
//! (docs/operations.md §17). Every match is a case; its id is the first capture group (or the
//! whole match), trimmed and upper-cased, so `inc-4711` and `INC-4711` are one case.

/// What a tenant uses when it writes no `case_pattern`.
pub const DEFAULT_CASE_PATTERN: &str = r"(?i)\b((?:INC|CASE|IR)[-#: ]?\d+)";

/// The longest case id lrvault accepts (from a comment or by hand).
pub const MAX_CASE_ID: usize = 128;

/// A checked `case_pattern`.
#[derive(Debug, Clone)]
pub struct CasePattern(regex_lite::Regex);

impl Default for CasePattern {
    fn default() -> Self {
        CasePattern::new(DEFAULT_CASE_PATTERN).expect("the default case_pattern compiles")
    }
}

impl CasePattern {
    /// Compiles `text`; `Err` is one line saying what is wrong with it.
    pub fn new(text: &str) -> Result<CasePattern, String> {
        regex_lite::Regex::new(text)
            .map(CasePattern)
            .map_err(|e| format!("case_pattern is not a valid regular expression: {e}"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The distinct case ids `comment` names, in the order they first appear.
    pub fn cases(&self, comment: &str) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for found in self.0.captures_iter(comment) {
            let m = found.get(1).or_else(|| found.get(0));
            if let Some(id) = m.and_then(|m| case_id(m.as_str()))
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }
}

/// A case id as lrvault stores it: surrounding space trimmed, letters upper-cased; `None`
/// for an empty one, one longer than [`MAX_CASE_ID`] or one with a control character.
pub fn case_id(text: &str) -> Option<String> {
    let id = text.trim().to_uppercase();
    let ok = !id.is_empty() && id.len() <= MAX_CASE_ID && !id.chars().any(char::is_control);
    ok.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_names_every_case_once_upper_cased() {
        let p = CasePattern::default();
        assert_eq!(
            p.cases("Sentinel Incident inc-4711, see INC-4711 and IR#12; case 9 ; CASE:77"),
            vec!["INC-4711", "IR#12", "CASE 9", "CASE:77"]
        );
        assert_eq!(p.cases("routine collection"), Vec::<String>::new());
        assert_eq!(p.cases("PRINC-5 is no case"), Vec::<String>::new());
    }

    #[test]
    fn the_whole_match_serves_a_pattern_without_a_group() {
        let p = CasePattern::new(r"\bT-\d+ ").unwrap();
        assert_eq!(p.cases("t-1 T-2 T-3"), vec!["T-2"]);
        let empty = CasePattern::new(r"x*").unwrap();
        assert_eq!(empty.cases("abc"), Vec::<String>::new());
    }

    #[test]
    fn a_bad_pattern_is_one_line() {
        let e = CasePattern::new(r"(INC-\d+").unwrap_err();
        assert_eq!(
            e,
            "case_pattern is not a valid regular expression: found open group without closing ')'"
        );
        // The syntax is the regex crate's without Unicode classes (docs/operations.md §17.1).
        let e = CasePattern::new(r"\p{L}+-\d+").unwrap_err();
        assert!(
            e.starts_with("case_pattern is not a valid regular expression: "),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}
