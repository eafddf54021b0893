//! Safe names for the store: package paths built from API ids, and payload file names built
//! from hostile device paths (GetFile) or script names (RunScript).

use std::path::PathBuf;

use chrono::{DateTime, Datelike, Utc};

/// Longest payload file name we produce, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 200;
/// Used when nothing usable is left of a name.
pub(crate) const FALLBACK_NAME: &str = "result.bin";
/// An extension (dot included) at most this long survives shortening of a long name.
const MAX_KEPT_EXTENSION: usize = 16;
/// Longest path component built from an API id.
const MAX_COMPONENT_BYTES: usize = 200;

const TRANSCRIPT_SUFFIX: &str = ".transcript.json";

/// `"{tenant}/{YYYY}/{MM}/{DD}/{action_id}/{index:03}-{command_type}.zip"`, the date being the
/// action's creation time truncated to the UTC day. Every API-supplied part is reduced to
/// `[A-Za-z0-9._-]` and can never be `.` or `..`.
pub fn package_rel_path(
    tenant: &str,
    created: DateTime<Utc>,
    action_id: &str,
    index: u32,
    command_type: &str,
) -> PathBuf {
    let mut path = PathBuf::from(path_component(tenant));
    path.push(format!("{:04}", created.year()));
    path.push(format!("{:02}", created.month()));
    path.push(format!("{:02}", created.day()));
    path.push(path_component(action_id));
    path.push(format!("{index:03}-{}.zip", path_component(command_type)));
    path
}

/// Maps one API-supplied string to a single safe path component.
pub fn path_component(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_COMPONENT_BYTES)
        .collect();
    // "", "." and ".." (or any all-dots name) would address the wrong directory.
    if out.chars().all(|c| c == '.') {
        out = out.replace('.', "_");
        if out.is_empty() {
            out.push('_');
        }
    }
    out
}

/// The payload's file name (sanitised) and the unsanitised original it came from.
///
/// RunScript: `"{ScriptName}.transcript.json"`, original = ScriptName. GetFile: the base name of
/// the `Path` parameter (Windows or POSIX separators), original = the raw Path. Anything else,
/// or a missing/empty parameter: `"result.bin"` and no original.
pub fn payload_base_name(
    command_type: &str,
    params: &[(String, String)],
) -> (String, Option<String>) {
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.trim().is_empty())
    };
    if command_type.eq_ignore_ascii_case("RunScript") {
        if let Some(script) = param("ScriptName") {
            let stem = sanitize_with_limit(script, MAX_NAME_BYTES - TRANSCRIPT_SUFFIX.len());
            return (
                format!("{stem}{TRANSCRIPT_SUFFIX}"),
                Some(script.to_string()),
            );
        }
    } else if command_type.eq_ignore_ascii_case("GetFile")
        && let Some(path) = param("Path")
    {
        let base = path
            .split(['/', '\\'])
            .rev()
            .find(|part| !part.trim().is_empty())
            .unwrap_or("");
        return (sanitize_file_name(base), Some(path.to_string()));
    }
    (FALLBACK_NAME.to_string(), None)
}

/// The payload name of an investigation package (design.md §4): the zip as delivered, named
/// after its action, `{action_id}-investigation-package.zip`.
pub fn investigation_package_name(action_id: &str) -> String {
    format!("{}-investigation-package.zip", path_component(action_id))
}

/// A file name that is safe on POSIX and Windows and inside a zip: no `..`, no separators, no
/// control or bidi-override characters, no `:` (drive letters, alternate data streams) or other
/// characters Windows refuses, no reserved device names, no leading/trailing dots or spaces, at
/// most 200 bytes. Falls back to `"result.bin"`. Deterministic and idempotent.
pub fn sanitize_file_name(raw: &str) -> String {
    sanitize_with_limit(raw, MAX_NAME_BYTES)
}

/// [`sanitize_file_name`] with a custom byte limit, so a suffix can be appended afterwards
/// without breaking the 200-byte rule. `limit` must be at least `FALLBACK_NAME.len()`.
pub(crate) fn sanitize_with_limit(raw: &str, limit: usize) -> String {
    let mut name = String::with_capacity(raw.len().min(limit * 2));
    for c in raw.chars() {
        let c = if is_unsafe_char(c) { '_' } else { c };
        // Collapsing dot runs removes every ".." while keeping "archive..tar" readable.
        if c == '.' && name.ends_with('.') {
            continue;
        }
        name.push(c);
    }
    let mut name = trim_dots_spaces(&name).to_string();
    if name.len() > limit {
        name = shorten(&name, limit);
    }
    if is_reserved_device_name(&name) {
        name.insert(0, '_');
        if name.len() > limit {
            name = trim_dots_spaces(cut_at_char_boundary(&name, limit)).to_string();
        }
    }
    if name.is_empty() {
        return FALLBACK_NAME.to_string();
    }
    name
}

fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '/' | '\\' | ':' | '<' | '>' | '"' | '|' | '?' | '*')
        // Bidi overrides make "evil\u{202E}txt.exe" display as a harmless name.
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn trim_dots_spaces(s: &str) -> &str {
    s.trim_matches(['.', ' '])
}

fn cut_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Cuts `name` to `limit` bytes, keeping a short extension.
fn shorten(name: &str, limit: usize) -> String {
    if let Some(dot) = name.rfind('.') {
        let ext = &name[dot..];
        if dot > 0 && ext.len() <= MAX_KEPT_EXTENSION {
            let stem = trim_dots_spaces(cut_at_char_boundary(&name[..dot], limit - ext.len()));
            if !stem.is_empty() {
                return format!("{stem}{ext}");
            }
        }
    }
    trim_dots_spaces(cut_at_char_boundary(name, limit)).to_string()
}

/// Windows device names, reserved with any extension and in any case ("aux.txt", "Com1").
fn is_reserved_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or("").trim_end_matches(' ');
    let upper = stem.to_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$" => true,
        _ => {
            let mut chars = upper.chars();
            let prefix: String = chars.by_ref().take(3).collect();
            let rest: Vec<char> = chars.collect();
            (prefix == "COM" || prefix == "LPT")
                && rest.len() == 1
                && matches!(rest[0], '1'..='9' | '¹' | '²' | '³')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rel_path_truncates_to_the_utc_day() {
        let created = Utc
            .with_ymd_and_hms(2026, 11, 27, 23, 59, 59)
            .unwrap()
            .checked_add_signed(chrono::Duration::milliseconds(999))
            .unwrap();
        assert_eq!(
            package_rel_path("contoso", created, "a1b2-c3", 7, "RunScript"),
            PathBuf::from("contoso/2026/11/27/a1b2-c3/007-RunScript.zip")
        );
    }

    #[test]
    fn rel_path_neutralises_hostile_ids() {
        let created = Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap();
        assert_eq!(
            package_rel_path("contoso", created, "../../etc", 12, "Get/File"),
            PathBuf::from("contoso/2026/01/02/.._.._etc/012-Get_File.zip")
        );
        assert_eq!(
            package_rel_path("contoso", created, "..", 1000, ""),
            PathBuf::from("contoso/2026/01/02/__/1000-_.zip")
        );
        assert_eq!(
            package_rel_path("contoso", created, ".", 0, "Run Script"),
            PathBuf::from("contoso/2026/01/02/_/000-Run_Script.zip")
        );
        assert_eq!(
            package_rel_path("contoso", created, "", 0, "x"),
            PathBuf::from("contoso/2026/01/02/_/000-x.zip")
        );
        assert_eq!(
            package_rel_path("contoso", created, "é\u{0}", 0, "x"),
            PathBuf::from("contoso/2026/01/02/__/000-x.zip")
        );
    }

    #[test]
    fn payload_names_per_command_type() {
        assert_eq!(
            payload_base_name("RunScript", &params(&[("ScriptName", "collect.ps1")])),
            (
                "collect.ps1.transcript.json".to_string(),
                Some("collect.ps1".to_string())
            )
        );
        assert_eq!(
            payload_base_name("RunScript", &params(&[("ScriptName", "..\\..\\x.ps1")])),
            (
                "_._x.ps1.transcript.json".to_string(),
                Some("..\\..\\x.ps1".to_string())
            )
        );
        assert_eq!(
            payload_base_name(
                "GetFile",
                &params(&[("Path", "C:\\Windows\\Temp\\evil.exe")])
            ),
            (
                "evil.exe".to_string(),
                Some("C:\\Windows\\Temp\\evil.exe".to_string())
            )
        );
        assert_eq!(
            payload_base_name("GetFile", &params(&[("Path", "/var/log/syslog")])),
            ("syslog".to_string(), Some("/var/log/syslog".to_string()))
        );
        assert_eq!(
            payload_base_name("GetFile", &params(&[("Path", "C:\\dir\\sub\\")])),
            ("sub".to_string(), Some("C:\\dir\\sub\\".to_string()))
        );
        assert_eq!(
            payload_base_name("GetFile", &params(&[("Path", "C:\\x\\a.txt:secret")])),
            (
                "a.txt_secret".to_string(),
                Some("C:\\x\\a.txt:secret".to_string())
            )
        );
        assert_eq!(
            payload_base_name("GetFile", &params(&[("Path", "C:\\x\\..")])),
            ("result.bin".to_string(), Some("C:\\x\\..".to_string()))
        );
        assert_eq!(
            payload_base_name("GetFile", &params(&[("Path", "D:\\aux.log")])),
            ("_aux.log".to_string(), Some("D:\\aux.log".to_string()))
        );
        assert_eq!(
            payload_base_name("GetFile", &[]),
            ("result.bin".to_string(), None)
        );
        assert_eq!(
            payload_base_name("RunScript", &params(&[("Args", "x")])),
            ("result.bin".to_string(), None)
        );
        assert_eq!(
            payload_base_name("PutFile", &params(&[("FileName", "x.ps1")])),
            ("result.bin".to_string(), None)
        );
        assert_eq!(
            payload_base_name("Unknown", &[]),
            ("result.bin".to_string(), None)
        );
    }

    #[test]
    fn long_script_name_keeps_the_transcript_suffix_within_200_bytes() {
        let script = "s".repeat(300);
        let (name, original) = payload_base_name("RunScript", &params(&[("ScriptName", &script)]));
        assert_eq!(name, format!("{}.transcript.json", "s".repeat(184)));
        assert_eq!(name.len(), 200);
        assert_eq!(original, Some(script));
    }

    #[test]
    fn sanitize_table() {
        let long_ascii = format!("{}.txt", "a".repeat(296));
        let long_multibyte = format!("{}.log", "é".repeat(150)); // 300 + 4 bytes
        let long_ext = format!("{}.{}", "b".repeat(150), "c".repeat(150));
        let cases: Vec<(&str, String)> = vec![
            ("report.pdf", "report.pdf".into()),
            ("..", "result.bin".into()),
            ("../../etc/passwd", "_._etc_passwd".into()),
            ("..\\..\\boot.ini", "_._boot.ini".into()),
            ("a/b\\c", "a_b_c".into()),
            ("C:\\Windows\\win.ini", "C__Windows_win.ini".into()),
            ("C:", "C_".into()),
            (
                "file.txt:Zone.Identifier",
                "file.txt_Zone.Identifier".into(),
            ),
            ("CON", "_CON".into()),
            ("con", "_con".into()),
            ("aux.txt", "_aux.txt".into()),
            ("LPT9", "_LPT9".into()),
            ("lpt9.tar.gz", "_lpt9.tar.gz".into()),
            ("COM1 .txt", "_COM1 .txt".into()),
            ("COM10", "COM10".into()),
            ("console", "console".into()),
            ("nul.", "_nul".into()),
            ("a\u{0}b\nc\r\td\u{7f}", "a_b_c__d_".into()),
            ("evil\u{202E}gpj.exe", "evil_gpj.exe".into()),
            ("", "result.bin".into()),
            (".", "result.bin".into()),
            ("...", "result.bin".into()),
            ("   ", "result.bin".into()),
            ("name...", "name".into()),
            ("name. . .", "name".into()),
            (".bashrc", "bashrc".into()),
            ("archive..tar", "archive.tar".into()),
            (" spaced name ", "spaced name".into()),
            ("a<b>c|d?e*f\"g", "a_b_c_d_e_f_g".into()),
            (&long_ascii, format!("{}.txt", "a".repeat(196))),
            (&long_multibyte, format!("{}.log", "é".repeat(98))),
            (&long_ext, "b".repeat(150) + "." + &"c".repeat(49)),
        ];
        for (raw, expected) in cases {
            let got = sanitize_file_name(raw);
            assert_eq!(got, expected, "input {raw:?}");
            assert!(got.len() <= MAX_NAME_BYTES, "input {raw:?}");
            assert_eq!(sanitize_file_name(&got), got, "not idempotent for {raw:?}");
        }
    }

    #[test]
    fn reserved_name_prefix_respects_the_limit() {
        // A reserved stem with a long extension: the '_' prefix must not push it past 200 bytes.
        let raw = format!("CON.{}", "x".repeat(196));
        let got = sanitize_file_name(&raw);
        assert_eq!(got, format!("_CON.{}", "x".repeat(195)));
        assert_eq!(got.len(), 200);
        assert_eq!(sanitize_file_name(&got), got);
    }

    proptest! {
        #[test]
        fn sanitize_properties(raw in any::<String>()) {
            let out = sanitize_file_name(&raw);
            prop_assert!(!out.is_empty());
            prop_assert!(out.len() <= MAX_NAME_BYTES);
            prop_assert!(!out.contains(['/', '\\', ':']));
            prop_assert!(!out.chars().any(char::is_control));
            prop_assert!(!out.contains(".."));
            prop_assert!(!out.starts_with(['.', ' ']) && !out.ends_with(['.', ' ']));
            prop_assert!(!is_reserved_device_name(&out));
            prop_assert_eq!(sanitize_file_name(&out), out.clone());
        }

        #[test]
        fn sanitize_properties_on_path_like_input(
            raw in "[a-zA-Z0-9 ./\\\\:é\u{0}\n]{0,400}"
        ) {
            let out = sanitize_file_name(&raw);
            prop_assert!(!out.is_empty() && out.len() <= MAX_NAME_BYTES);
            prop_assert!(!out.contains("..") && !out.contains(['/', '\\', ':']));
            prop_assert_eq!(sanitize_file_name(&out), out.clone());
        }
    }
}
