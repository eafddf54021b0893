//! Best-effort parsing of RunScript transcripts. The service emits JSON that is often not
//! strict (raw newlines, NULs and other control characters inside strings, invalid UTF-8), so
//! we try strict JSON first and then a repaired copy. The payload itself is never changed.

use serde_json::Value;

/// The transcript fields recorded in `retrieval.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Transcript {
    pub script_name: Option<String>,
    pub exit_code: Option<i64>,
}

/// Extracts `script_name` (older spelling `name`) and `exit_code`; `None` when the bytes are not
/// a JSON object even after repair, or when neither field is there. Never panics.
pub fn parse_transcript(bytes: &[u8]) -> Option<Transcript> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let value = match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => value,
        Err(_) => {
            let text = String::from_utf8_lossy(bytes);
            serde_json::from_str::<Value>(&escape_controls_in_strings(&text)).ok()?
        }
    };
    let object = value.as_object()?;
    let script_name = ["script_name", "name"]
        .iter()
        .find_map(|key| object.get(*key).and_then(Value::as_str))
        .map(str::to_string);
    let exit_code = object.get("exit_code").and_then(exit_code_of);
    if script_name.is_none() && exit_code.is_none() {
        return None;
    }
    Some(Transcript {
        script_name,
        exit_code,
    })
}

fn exit_code_of(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f <= i64::MAX as f64)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Rewrites raw control characters inside JSON strings as `\u00XX` escapes; everything outside
/// strings is left alone.
fn escape_controls_in_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if !in_string {
            in_string = c == '"';
            out.push(c);
            continue;
        }
        let is_raw_control = (c as u32) < 0x20;
        if escaped {
            escaped = false;
            if is_raw_control {
                // A backslash followed by a raw control char: the backslash already written
                // plus "u00XX" forms a valid escape for that char.
                out.push_str(&format!("u{:04x}", c as u32));
                continue;
            }
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = false;
        } else if is_raw_control {
            out.push_str(&format!("\\u{:04x}", c as u32));
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(name: Option<&str>, code: Option<i64>) -> Option<Transcript> {
        Some(Transcript {
            script_name: name.map(str::to_string),
            exit_code: code,
        })
    }

    #[test]
    fn strict_json() {
        let bytes = br#"{"script_name":"collect.ps1","exit_code":0,"script_output":"ok\n","script_errors":""}"#;
        assert_eq!(parse_transcript(bytes), t(Some("collect.ps1"), Some(0)));
    }

    #[test]
    fn raw_newline_and_nul_inside_strings() {
        let bytes = b"{\"script_name\":\"dump.ps1\",\"exit_code\":3,\"script_output\":\"line1\nline2\r\n\x00\x01tail\",\"script_errors\":\"\tboom\"}";
        assert!(serde_json::from_slice::<Value>(bytes).is_err());
        assert_eq!(parse_transcript(bytes), t(Some("dump.ps1"), Some(3)));
    }

    #[test]
    fn invalid_utf8_and_backslash_before_raw_newline() {
        let bytes = b"\xEF\xBB\xBF{\"script_name\":\"x\xff.ps1\",\"exit_code\":-1,\"script_output\":\"C:\\\\dir\\\n\"}";
        assert_eq!(parse_transcript(bytes), t(Some("x\u{FFFD}.ps1"), Some(-1)));
    }

    #[test]
    fn older_spellings() {
        let bytes = br#"{"name":"old.ps1","exit_code":1,"script_output":"","script_error":"bad"}"#;
        assert_eq!(parse_transcript(bytes), t(Some("old.ps1"), Some(1)));
        let bytes = br#"{"exit_code":"2","script_error":"x"}"#;
        assert_eq!(parse_transcript(bytes), t(None, Some(2)));
        let bytes = br#"{"script_name":"n","exit_code":2.0}"#;
        assert_eq!(parse_transcript(bytes), t(Some("n"), Some(2)));
        let bytes = br#"{"script_name":"n","exit_code":null}"#;
        assert_eq!(parse_transcript(bytes), t(Some("n"), None));
    }

    #[test]
    fn garbage_is_none() {
        for bytes in [
            &b""[..],
            b"not json",
            b"[1,2,3]",
            b"\"just a string\"",
            b"{\"script_output\":\"only output\"}",
            b"{\"script_name\":\"trunc",
            b"\x00\x00\x00",
            b"\xff\xfe{",
        ] {
            assert_eq!(parse_transcript(bytes), None, "input {bytes:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_transcript(&bytes);
        }

        #[test]
        fn never_panics_on_json_like_bytes(s in "[{}\\[\\]\":,\\\\a-z0-9\u{0}\n\t ]{0,200}") {
            let _ = parse_transcript(s.as_bytes());
        }
    }
}
