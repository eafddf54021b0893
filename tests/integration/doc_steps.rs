//! Runs the steps a document tells a person to run, literally: the fenced code blocks are
//! extracted from the Markdown itself, so the documentation cannot drift from what works.

use std::path::Path;

/// The bodies of the fenced blocks tagged `lang` (```sh, ```sql, ...), in order.
pub fn fenced(markdown: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == format!("```{lang}") => current = Some(String::new()),
            Some(_) if line.trim_start() == "```" => blocks.push(current.take().unwrap()),
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// Runs `script` with `bash -euo pipefail` in `dir`; returns (exit code, stdout, stderr).
pub fn run_sh(dir: &Path, script: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
