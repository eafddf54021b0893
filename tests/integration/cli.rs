//! The binary as a new user meets it: every --help works, and each mistake a user can make
//! is one clear line on stderr with exit code 2.

use std::process::Command;

pub fn lrvault() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lrvault"));
    // Tests may run as root, a CI container's only user: the daemon's override for that.
    c.env_remove("LRVAULT_CONFIG")
        .env_remove("RUST_LOG")
        .env("LRVAULT_ALLOW_ROOT", "1");
    c
}

pub fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec![],
        vec!["run"],
        vec!["discover"],
        vec!["archive"],
        vec!["enqueue"],
        vec!["verify"],
        vec!["audit"],
        vec!["audit", "evidence"],
        vec!["audit", "custody"],
        vec!["audit", "quota"],
        vec!["status"],
        vec!["migrate"],
        vec!["backup"],
        vec!["restore"],
        vec!["simulate"],
        vec!["demo"],
    ] {
        let (code, out, _) = run(lrvault().args(&cmd).arg("--help"));
        assert_eq!(code, 0, "{cmd:?}");
        assert!(out.contains("Usage: lrvault"), "{cmd:?}: {out}");
        assert!(out.contains("--config"), "global flags shown for {cmd:?}");
    }
}

pub fn one_line_error(c: &mut Command) -> String {
    let (code, _, err) = run(c);
    assert_eq!(code, 2, "exit code 2 for a user error: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
    lines[0].to_string()
}

#[test]
fn wrong_config_path_is_one_clear_line() {
    let line = one_line_error(lrvault().args(["--config", "/nonexistent/lrvault.toml", "status"]));
    assert!(
        line.starts_with("lrvault: cannot read config file /nonexistent/lrvault.toml"),
        "{line}"
    );
    // The env var works the same way.
    let line = one_line_error(
        lrvault()
            .env("LRVAULT_CONFIG", "/nope.toml")
            .arg("discover"),
    );
    assert!(line.contains("/nope.toml"), "{line}");
}

pub fn config_with(dir: &std::path::Path, tenant_block: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\npath = \"{}/db.sqlite\"\n[store]\nroot = \"{}/ev\"\n{tenant_block}",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn bad_tenant_name_and_missing_secret_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(
        dir.path(),
        "[[tenant]]\nname = \"Contoso Ltd\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"X\"\n",
    );
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("discover"));
    assert!(
        line.contains("tenant name 'Contoso Ltd' must match [a-z0-9-]+"),
        "{line}"
    );

    let cfg = config_with(
        dir.path(),
        "[[tenant]]\nname = \"contoso\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"/nonexistent/secret\"\n",
    );
    // The reporting commands never create a database; they say where it should be.
    for cmd in [vec!["status"], vec!["audit", "quota"]] {
        let line = one_line_error(lrvault().arg("--config").arg(&cfg).args(&cmd));
        assert!(
            line.contains("db.sqlite does not exist yet: start the service"),
            "{line}"
        );
    }
    // The first start creates it; the other commands only open it.
    let (code, _, err) = run(lrvault().arg("--config").arg(&cfg).arg("migrate"));
    assert_eq!(code, 0, "{err}");
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("discover"));
    assert!(
        line.contains("tenant 'contoso': cannot read client_secret_file /nonexistent/secret"),
        "{line}"
    );

    let cfg = config_with(
        dir.path(),
        "[[tenant]]\nname = \"contoso\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"LRVAULT_TEST_UNSET_SECRET\"\n",
    );
    let line = one_line_error(
        lrvault()
            .arg("--config")
            .arg(&cfg)
            .env_remove("LRVAULT_TEST_UNSET_SECRET")
            .arg("archive"),
    );
    assert!(
        line.contains("environment variable LRVAULT_TEST_UNSET_SECRET"),
        "{line}"
    );

    let line = one_line_error(
        lrvault()
            .arg("--config")
            .arg(&cfg)
            .args(["discover", "--tenant", "fabrikam"]),
    );
    assert!(
        line.contains("unknown tenant 'fabrikam' (configured: contoso)"),
        "{line}"
    );

    let cfg = config_with(
        dir.path(),
        "[[tenant]]\nname = \"contoso\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"hunter2\"\n",
    );
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("status"));
    assert!(
        line.contains("client_secret must not be written in the config file"),
        "{line}"
    );
    assert!(!line.contains("hunter2"));

    let line = one_line_error(lrvault().arg("--config").arg(&cfg).args([
        "verify",
        "--since",
        "yesterday-ish",
    ]));
    assert!(
        line.contains("client_secret must not be written") || line.contains("invalid date"),
        "{line}"
    );
}

#[test]
fn example_config_loads_through_the_binary() {
    // `migrate` on the shipped example (with the DB moved to a temp dir) succeeds.
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let text = example
        .replace(
            "/var/lib/lrvault/lrvault.db",
            &format!("{}/l.db", dir.path().display()),
        )
        .replace(
            "/var/lib/lrvault/evidence",
            &format!("{}/ev", dir.path().display()),
        );
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = run(lrvault().arg("--config").arg(&cfg).arg("migrate"));
    assert_eq!(code, 0, "{err}");
    // The schema version is the highest migration number (`NN-name`).
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .map(|d| {
            let name = d.unwrap().file_name().into_string().unwrap();
            name.split('-').next().unwrap().parse::<usize>().unwrap()
        })
        .max()
        .unwrap();
    assert!(
        out.contains(&format!("schema version {migrations}")),
        "{out}"
    );
    let (code, out, err) = run(lrvault()
        .arg("--config")
        .arg(&cfg)
        .args(["status", "--format", "json"]));
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["custody_head"]["seq"], 0);
    assert_eq!(
        status["quota"].as_array().unwrap().len(),
        5,
        "one row per endpoint of the one tenant"
    );
    // status has no CSV form.
    let (code, _, err) = run(lrvault()
        .arg("--config")
        .arg(&cfg)
        .args(["status", "--format", "csv"]));
    assert_eq!(code, 2, "{err}");
    // A reader that stops early (`| head -1`) ends lrvault quietly, without a panic.
    let mut child = lrvault()
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// The log as operations §7 describes it: `--log-format json` is one JSON object per line with
/// `timestamp`, `level`, `fields` and `target` (the unit uses it), `-v` adds lrvault's debug
/// lines, `-q` leaves only warnings, and `RUST_LOG` replaces the flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_follow_the_format_and_the_level_asked_for() {
    let e = crate::common::env(lrvault_sim::SimConfig::default(), "").await;
    let stderr = |args: &[&str], rust_log: Option<&str>| {
        let mut c = e.lrvault();
        if let Some(v) = rust_log {
            c.env("RUST_LOG", v);
        }
        let (code, out, err) = run(c.args(args));
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
        err
    };
    let json = stderr(&["--log-format", "json", "-v", "discover"], None);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        for key in ["timestamp", "level", "fields", "target"] {
            assert!(l.get(key).is_some(), "no {key}: {l}");
        }
        // -v: lrvault's debug lines, and nothing below warnings from other crates.
        let ours = l["target"].as_str().unwrap().starts_with("lrvault");
        assert!(
            ours || matches!(l["level"].as_str(), Some("WARN" | "ERROR")),
            "{l}"
        );
    }
    let level = |l: &serde_json::Value| l["level"].as_str().unwrap().to_string();
    assert!(lines.iter().any(|l| level(l) == "DEBUG"), "{json}");
    // Text, -q: warnings and errors only (this run has none).
    let quiet = stderr(&["-q", "discover"], None);
    assert!(
        !quiet.contains(" INFO ") && !quiet.contains(" DEBUG "),
        "{quiet}"
    );
    // RUST_LOG replaces the flags, for lrvault and the crates beneath it.
    let every = stderr(&["-q", "discover"], Some("debug"));
    assert!(every.contains(" DEBUG lrvault"), "{every}");
    crate::common::assert_debug_from_every_crate(&every);
}
