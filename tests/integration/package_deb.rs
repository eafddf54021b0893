//! Issue 20: the `.deb` an operator installs. `cargo deb` (configured in `Cargo.toml`) builds
//! it from a release build; the test then checks it with the tools a packager would:
//! `dpkg-deb -c` lists the binary, the unit, the sysusers.d and tmpfiles.d entries, the
//! example config and the docs (its debug info goes into a `-dbgsym` package beside it); the
//! binary extracted with `dpkg-deb -x` is stripped and runs
//! `--version`; `systemd-analyze verify` and `systemd-analyze security --offline=yes` accept
//! the unit it holds (exposure at most 2.0); `lintian` reports no error.
//!
//! It is the one release build of the test suite (`cargo deb` builds `target/release`).
//!
//! Every tool is required: `.ci/run` installs cargo-deb (pinned) and lintian; a missing one
//! fails the test with the command that installs it.

use std::path::Path;
use std::process::{Command, Output};

/// The cargo-deb version `.ci/run` installs.
const CARGO_DEB: &str = "3.8.0";

/// What the package must hold.
const HELD: [&str; 12] = [
    "./usr/bin/lrvault",
    "./usr/lib/systemd/system/lrvault.service",
    "./usr/lib/sysusers.d/lrvault.conf",
    "./usr/lib/tmpfiles.d/lrvault.conf",
    "./usr/share/doc/lrvault/config.example.toml",
    "./usr/share/doc/lrvault/README.md",
    "./usr/share/doc/lrvault/operations.md",
    "./usr/share/doc/lrvault/audit.md",
    "./usr/share/doc/lrvault/evidence-format.md",
    "./usr/share/doc/lrvault/architecture.md",
    "./usr/share/doc/lrvault/copyright",
    "./usr/share/doc/lrvault/changelog.Debian.gz",
];

/// Runs `program` with `args`; panics naming the install command when it is missing.
fn run(program: &str, args: &[&str], dir: &Path, install: &str) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} ({install}; .ci/run does)"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts exit 0 and returns stdout.
fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `cargo deb --locked` into `dir`; the path of the `.deb`.
fn build_deb(dir: &Path) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let install = format!("cargo install cargo-deb --locked --version {CARGO_DEB}");
    let version = ok(
        run(env!("CARGO"), &["deb", "--version"], repo, &install),
        &format!("cargo-deb is not installed ({install})"),
    );
    assert!(
        version.contains(CARGO_DEB),
        "cargo-deb {version}: want {CARGO_DEB}"
    );
    let out = Command::new(env!("CARGO"))
        .args(["deb", "--locked", "--output"])
        .arg(dir)
        .current_dir(repo)
        .output()
        .unwrap();
    let stdout = ok(out, "cargo deb");
    // The package, and its debug info in a package of its own.
    let version = env!("CARGO_PKG_VERSION");
    let deb = dir.join(format!("lrvault_{version}-1_amd64.deb"));
    let dbgsym = dir.join(format!("lrvault-dbgsym_{version}-1_amd64.ddeb"));
    let mut made: Vec<&str> = stdout.lines().collect();
    made.sort();
    assert_eq!(
        made,
        [dbgsym.to_str().unwrap(), deb.to_str().unwrap()],
        "{stdout}"
    );
    deb
}

/// The "Overall exposure level" `systemd-analyze security` prints.
fn exposure(report: &str) -> f64 {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for lrvault.service: "))
        .unwrap_or_else(|| panic!("no exposure in:\n{report}"));
    let value = line.split(": ").nth(1).unwrap().split(' ').next().unwrap();
    value.parse().unwrap()
}

#[test]
fn cargo_deb_builds_a_package_that_installs_the_service() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(tmp.path());
    let size = std::fs::metadata(&deb).unwrap().len();
    assert!(size < 15 * 1024 * 1024, "{} is {size} bytes", deb.display());
    let dpkg = "apt-get install dpkg";

    let listing = ok(
        run("dpkg-deb", &["-c", deb.to_str().unwrap()], tmp.path(), dpkg),
        "dpkg-deb -c",
    );
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for path in HELD {
        assert!(files.contains(&path), "{path} missing from:\n{listing}");
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x 0/0 ") && l.ends_with(" ./usr/bin/lrvault")),
        "{listing}"
    );

    let root = tmp.path().join("root");
    ok(
        run(
            "dpkg-deb",
            &["-x", deb.to_str().unwrap(), root.to_str().unwrap()],
            tmp.path(),
            dpkg,
        ),
        "dpkg-deb -x",
    );
    let bin = root.join("usr/bin/lrvault");
    let version = ok(
        run(
            bin.to_str().unwrap(),
            &["--version"],
            tmp.path(),
            "the package",
        ),
        "lrvault --version",
    );
    assert_eq!(version, format!("lrvault {}\n", env!("CARGO_PKG_VERSION")));
    // Stripped: no debug sections (readelf comes with the C toolchain the build needs).
    let sections = ok(
        run(
            "readelf",
            &["-S", "--wide", bin.to_str().unwrap()],
            tmp.path(),
            "apt-get install binutils",
        ),
        "readelf -S",
    );
    for section in [" .debug_info ", " .debug_line ", " .symtab "] {
        assert!(!sections.contains(section), "{section} in:\n{sections}");
    }

    // The unit as installed, beside the binary it starts.
    let unit = root.join("usr/lib/systemd/system/lrvault.service");
    assert_eq!(
        std::fs::read(&unit).unwrap(),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/lrvault.service"))
            .unwrap()
    );
    let analyze = "apt-get install systemd";
    // verify checks that ExecStart= names an executable: this copy names the extracted one
    // (with --root=, verify would want a whole system's units under the root).
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    let exec = "ExecStart=/usr/bin/lrvault ";
    assert_eq!(unit_text.matches(exec).count(), 1, "{unit_text}");
    let check = tmp.path().join("check");
    std::fs::create_dir(&check).unwrap();
    std::fs::write(
        check.join("lrvault.service"),
        unit_text.replace(exec, &format!("ExecStart={} ", bin.display())),
    )
    .unwrap();
    let verify = run(
        "systemd-analyze",
        &["verify", check.join("lrvault.service").to_str().unwrap()],
        tmp.path(),
        analyze,
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        text(&verify.stderr)
    );
    let security = ok(
        run(
            "systemd-analyze",
            &[
                "security",
                "--offline=yes",
                &format!("--root={}", root.display()),
                "/usr/lib/systemd/system/lrvault.service",
            ],
            tmp.path(),
            analyze,
        ),
        "systemd-analyze security",
    );
    let level = exposure(&security);
    assert!(level <= 2.0, "exposure {level}:\n{security}");

    let lintian = run(
        "lintian",
        &["--no-tag-display-limit", deb.to_str().unwrap()],
        tmp.path(),
        "apt-get install lintian",
    );
    let report = text(&lintian.stdout);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(
        errors.is_empty(),
        "lintian:\n{report}{}",
        text(&lintian.stderr)
    );
}
