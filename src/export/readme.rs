//! The kit's README: what each file is, how the pieces hold each other, and the checks an
//! examiner runs with standard tools (`sha256sum`, `openssl ts`, `python3`, `sqlite3`,
//! `unzip`, `gzip`). Every command is in a fenced `sh` block, run literally by the test suite.
//! Values from the database never reach a command: the commands read them from `custody.db`.

use super::Coverage;
use super::kit::{Meta, kit_anchor};
use crate::anchor::TokenInfo;

/// One line, with no control character (so nothing given on the command line can open a
/// code block in the README).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(super) fn readme(meta: &Meta, coverage: &Coverage, token: Option<&TokenInfo>) -> String {
    let seq = coverage.checkpoint.seq;
    let json = kit_anchor(&crate::anchor::checkpoint_file_name(seq));
    let tsr = kit_anchor(&crate::anchor::token_file_name(seq));
    let mut text = format!(
        include_str!("README.head.md"),
        export_id = meta.export_id,
        actor = one_line(&meta.actor),
        recipient = one_line(meta.recipient.as_deref().unwrap_or("(not given)")),
        selection = one_line(&meta.selection),
        case_line = match &meta.case {
            Some(case) => format!(
                "\n\nThis kit was made for case `{}`: it holds every package the archive's chain of custody \
                 had in that case when the kit was made (tagged from the responder's comment or by an operator; \
                 lrvault's docs/audit.md section 8); the `export` table of `custody.db` names the case too.",
                one_line(case)
            ),
            None => String::new(),
        },
        packages = coverage.packages,
        first = coverage.first_seq,
        last = coverage.last_concerned_seq,
        seq = seq,
        row_hash = coverage.checkpoint.row_hash,
        json = json,
    );
    let check = match token {
        Some(info) => {
            text += &format!(
                include_str!("README.token.md"),
                json = json,
                tsr = tsr,
                gen_time = info.gen_time,
                gen_time_unix = info.gen_time_unix,
                signer = one_line(&info.signer),
            );
            format!(
                "python3 check_custody.py --gen-time \"$(openssl ts -reply -in {tsr} -text | sed -n 's/^Time stamp: //p')\""
            )
        }
        None => {
            text += &format!(
                "## 2. Trusted time\n\nNo RFC 3161 token was available for `{json}` when this kit was made (no \
                 timestamp authority configured, or it had not answered yet). The checkpoint is then anchored \
                 only by the copies held outside this kit (the archive's store, and a witness where one is \
                 configured): ask for the token of checkpoint {seq}, which lrvault fetches on a later run, and \
                 check it as lrvault's docs/evidence-format.md section 9 shows.\n\n"
            );
            "python3 check_custody.py".to_string()
        }
    };
    text += &format!(include_str!("README.chain.md"), check = check);
    text += include_str!("README.package.md");
    text
}
