//! Deterministic synthetic tenants: machine actions with their commands and result blobs,
//! derived only from the seed, the tenant index and the configuration, so every run (and every
//! test) sees the same ids, names, sizes and hashes.

use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{Value, json};

use super::blob::{Blob, Content};
use super::fault::FaultPlan;
use super::{SimConfig, SimTenant};

/// SplitMix64 finaliser: a good 64-bit mixer, stable across platforms and crate versions.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 generator (own code so the data never changes with a `rand` upgrade).
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.next_u64() % span,
            None => self.next_u64(),
        }
    }

    pub fn percent(&mut self, pct: u64) -> bool {
        self.next_u64() % 100 < pct
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }

    pub fn hex(&mut self, chars: usize) -> String {
        let mut s = String::with_capacity(chars + 16);
        while s.len() < chars {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(chars);
        s
    }

    /// A version-4-shaped GUID.
    pub fn guid(&mut self) -> String {
        let h = self.hex(32);
        let variant = ["8", "9", "a", "b"][(self.next_u64() % 4) as usize];
        format!(
            "{}-{}-4{}-{}{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            variant,
            &h[17..20],
            &h[20..32]
        )
    }
}

/// How the link endpoint answers for a result-bearing command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkKind {
    Blob,
    Gone,
    ForeignHost,
    HttpLink,
}

#[derive(Debug)]
pub(crate) struct Command {
    pub index: u32,
    pub command_type: &'static str,
    pub status: &'static str,
    pub original_name: Option<String>,
    /// Present for every Completed RunScript/GetFile command (also when `gone`).
    pub blob: Option<Arc<Blob>>,
    pub link: LinkKind,
}

#[derive(Debug)]
pub(crate) struct Action {
    pub id: String,
    pub kind: &'static str,
    pub status: &'static str,
    pub machine_id: String,
    pub requestor: String,
    pub created: DateTime<Utc>,
    /// The entity as Get serves it (without `@odata.context`).
    pub entity: Value,
    /// The entity as List serves it (some use `lastUpdateTimeUtc`).
    pub list_entity: Value,
    pub commands: Vec<Command>,
}

#[derive(Debug)]
pub(crate) struct TenantData {
    pub tenant: SimTenant,
    /// Sorted by creation time, oldest first.
    pub actions: Vec<Action>,
}

/// Action statuses cycle through this pattern so small runs still see every kind.
const STATUS_PATTERN: [&str; 20] = [
    "Succeeded",
    "Succeeded",
    "Failed",
    "Succeeded",
    "TimeOut",
    "Succeeded",
    "Succeeded",
    "Cancelled",
    "Succeeded",
    "Pending",
    "Succeeded",
    "Failed",
    "Succeeded",
    "Succeeded",
    "InProgress",
    "Succeeded",
    "TimeOut",
    "Succeeded",
    "Failed",
    "Succeeded",
];
const REQUESTORS: [&str; 5] = [
    "alice.ir@contoso.com",
    "bob.soc@contoso.com",
    "M365DLiveResponse",
    "lr-automation-app",
    "carol.dfir@contoso.com",
];
const HOSTS: [&str; 5] = ["ws-fin-", "ws-hr-", "srv-dc-", "lt-eng-", "srv-sql-"];
const SCRIPTS: [&str; 5] = [
    "Collect-Autoruns.ps1",
    "Get-ProcessList.ps1",
    "Export-EventLogs.ps1",
    "Get-NetConnections.ps1",
    "minidump.ps1",
];
const PUT_FILES: [&str; 3] = [
    "Collect-Autoruns.ps1",
    "procdump64.exe",
    "winpmem_mini_x64.exe",
];
const PATHS: [&str; 8] = [
    r"C:\Windows\Temp\ir\autoruns.csv",
    r"C:\Users\bob\AppData\Local\Temp\sysmon-export.evtx",
    r"C:\Windows\System32\winevt\Logs\Security.evtx",
    r"C:\ProgramData\Microsoft\Windows Defender\Support\MPLog-20250310-081403.log",
    r"C:\Windows\Temp\ir\netstat.txt",
    r"C:\Users\alice\Downloads\invoice_2291.pdf.exe",
    r"C:\Windows\Prefetch\CMD.EXE-0BD30981.pf",
    r"D:\Logs\IIS\W3SVC1\u_ex250310.log",
];
const OTHER_TYPES: [(&str, Option<&str>); 4] = [
    ("Isolate", Some("Full")),
    ("RunAntiVirusScan", Some("Quick")),
    ("Unisolate", None),
    ("StopAndQuarantineFile", None),
];

/// GetFile paths under the `hostile-names` fault.
fn hostile_paths() -> Vec<String> {
    vec![
        r"..\..\Windows\System32\config\SAM".to_string(),
        r"C:\temp\CON".to_string(),
        "aux.txt".to_string(),
        "C:\\temp\\evil\u{1}\u{7}name\u{1b}[31m.txt".to_string(),
        format!(r"C:\temp\{}.log", "A".repeat(296)),
        "/etc/passwd".to_string(),
        r"C:\temp/mixed\..//sep\file.txt".to_string(),
        r"C:\temp\..".to_string(),
        "C:\\temp\\\u{FFFD}\u{FFFD}bad\u{FFFD}.bin".to_string(),
    ]
}

/// Formats a timestamp the way MDE does: 7 fractional digits, or up to 2 with trailing zeros
/// trimmed (both occur in real payloads).
fn ts(dt: DateTime<Utc>, seven: bool) -> String {
    let base = dt.format("%Y-%m-%dT%H:%M:%S");
    let nanos = dt.timestamp_subsec_nanos();
    if seven {
        return format!("{base}.{:07}Z", nanos / 100);
    }
    match nanos / 10_000_000 {
        0 => format!("{base}Z"),
        c if c % 10 == 0 => format!("{base}.{}Z", c / 10),
        c => format!("{base}.{c:02}Z"),
    }
}

/// Truncates to the precision `ts` prints, so the parsed string equals the stored value.
fn trunc(dt: DateTime<Utc>, seven: bool) -> DateTime<Utc> {
    let step = if seven { 100 } else { 10_000_000 };
    dt - ChronoDuration::nanoseconds(i64::from(dt.timestamp_subsec_nanos() % step))
}

struct CommandDraft {
    command_type: &'static str,
    params: Vec<(&'static str, String)>,
    status: &'static str,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    errors: Vec<String>,
    content: Option<Content>,
}

/// Per-tenant counters that make the variety deterministic (every transcript shape, empty
/// files, hostile names cycle through in order).
struct Counters {
    scripts: u64,
    files: u64,
}

struct Generator<'a> {
    cfg: &'a SimConfig,
    plan: &'a FaultPlan,
    rng: Rng,
    counters: Counters,
    hostile: Vec<String>,
}

/// Generates one tenant's actions.
pub(crate) fn generate_tenant(
    cfg: &SimConfig,
    plan: &FaultPlan,
    index: usize,
    tenant: &SimTenant,
) -> TenantData {
    let mut g = Generator {
        cfg,
        plan,
        rng: Rng::new(mix(cfg.seed ^ mix(index as u64 + 1))),
        counters: Counters {
            scripts: 0,
            files: 0,
        },
        hostile: hostile_paths(),
    };
    let mut actions = Vec::new();
    for i in 0..cfg.actions {
        let created = g.creation_time();
        let mut action = g.live_response(
            &tenant.tenant_id,
            i,
            created,
            STATUS_PATTERN[i % STATUS_PATTERN.len()],
        );
        if !cfg.comments.is_empty() {
            let comment = json!(cfg.comments[i % cfg.comments.len()]);
            action.entity["requestorComment"] = comment.clone();
            action.list_entity["requestorComment"] = comment;
        }
        actions.push(action);
    }
    for i in 0..2 + cfg.actions / 10 {
        let created = g.creation_time();
        actions.push(g.other_action(i, created));
    }
    if let (0, Some(size)) = (index, cfg.big_getfile) {
        let created = cfg.now - ChronoDuration::minutes(2);
        let content = Content::GetFile {
            seed: g.rng.next_u64(),
            size,
        };
        let path = r"D:\Evidence\memory\host-full.raw".to_string();
        actions.push(g.getfile_action(&tenant.tenant_id, created, path, content));
    }
    if index == 0 {
        // Oldest of all, so they are archived first and the others queue behind them.
        let oldest = cfg.now - ChronoDuration::from_std(cfg.spread).unwrap_or_default();
        for (i, payload) in cfg.payloads.iter().enumerate() {
            let created = oldest + ChronoDuration::seconds(i as i64);
            let content = Content::Raw {
                seed: g.rng.next_u64(),
                payload: *payload,
            };
            actions.push(g.getfile_action(&tenant.tenant_id, created, payload.path(), content));
        }
    }
    for i in 0..cfg.packages {
        let created = g.creation_time();
        actions.push(g.package_action(&tenant.tenant_id, i, created));
    }
    actions.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    assign_link_kinds(&mut actions, plan);
    TenantData {
        tenant: tenant.clone(),
        actions,
    }
}

/// Result-bearing commands in (creation, index) order get their fault-driven link behaviour.
fn assign_link_kinds(actions: &mut [Action], plan: &FaultPlan) {
    let bearing = actions
        .iter_mut()
        .flat_map(|a| a.commands.iter_mut())
        .filter(|c| c.blob.is_some());
    for (j, cmd) in bearing.enumerate() {
        cmd.link = if j < plan.gone {
            LinkKind::Gone
        } else if j < plan.foreign_host {
            LinkKind::ForeignHost
        } else if j < plan.foreign_host + plan.http_link {
            LinkKind::HttpLink
        } else {
            LinkKind::Blob
        };
    }
}

impl Generator<'_> {
    /// Spread over `[now - spread, now - 1 min]`, with sub-millisecond noise.
    fn creation_time(&mut self) -> DateTime<Utc> {
        let spread_ms = self.cfg.spread.as_millis().min(i64::MAX as u128) as i64;
        let span = (spread_ms - 60_000).max(1) as u64;
        let offset = self.rng.range(0, span - 1) as i64;
        self.cfg.now - ChronoDuration::milliseconds(spread_ms)
            + ChronoDuration::milliseconds(offset)
            + ChronoDuration::nanoseconds(self.rng.range(0, 999_999) as i64)
    }

    fn secs(&mut self, lo_ms: u64, hi_ms: u64) -> ChronoDuration {
        ChronoDuration::milliseconds(self.rng.range(lo_ms, hi_ms) as i64)
            + ChronoDuration::nanoseconds(self.rng.range(0, 999_999) as i64)
    }

    fn live_response(
        &mut self,
        tenant_id: &str,
        i: usize,
        created: DateTime<Utc>,
        status: &'static str,
    ) -> Action {
        let seven = self.rng.percent(50);
        let created = trunc(created, seven);
        let n = self.rng.range(1, 4) as usize;
        let mut types: Vec<&'static str> = (0..n)
            .map(|_| match self.rng.range(0, 99) {
                0..15 => "PutFile",
                15..55 => "RunScript",
                _ => "GetFile",
            })
            .collect();
        types.sort_by_key(|t| match *t {
            "PutFile" => 0,
            "RunScript" => 1,
            _ => 2,
        });
        // Commands before `stop` run; the one at `stop` fails for a Failed action; the rest stay
        // Created with null times (MDE never runs commands after a failure or a cancellation).
        let stop = match status {
            "Succeeded" => n,
            "Pending" => 0,
            _ => self.rng.range(0, n as u64 - 1) as usize,
        };
        let mut cursor = created + self.secs(1_000, 10_000);
        let mut commands = Vec::with_capacity(n);
        for (k, ty) in types.into_iter().enumerate() {
            let params = self.params(ty);
            let (cmd_status, start, end, errors) = if k < stop || (k == stop && status == "Failed")
            {
                let start = trunc(cursor, seven);
                let end = trunc(start + self.secs(1_000, 10_000), seven);
                cursor = end + self.secs(100, 1_000);
                if k < stop {
                    ("Completed", Some(start), Some(end), Vec::new())
                } else {
                    let error = match ty {
                        "GetFile" => "The system cannot find the file specified",
                        "RunScript" => "Script execution failed: access denied",
                        _ => "The file was not found in the library",
                    };
                    ("Failed", Some(start), Some(end), vec![error.to_string()])
                }
            } else {
                ("Created", None, None, Vec::new())
            };
            let content = match (cmd_status, ty) {
                ("Completed", "RunScript") => Some(self.transcript(&params[0].1)),
                ("Completed", "GetFile") => Some(self.getfile_content()),
                _ => None,
            };
            commands.push(CommandDraft {
                command_type: ty,
                params,
                status: cmd_status,
                start,
                end,
                errors,
                content,
            });
        }
        let last_update = trunc(cursor, seven);
        self.action(
            tenant_id,
            i,
            created,
            last_update,
            status,
            seven,
            None,
            commands,
        )
    }

    fn params(&mut self, ty: &str) -> Vec<(&'static str, String)> {
        match ty {
            "PutFile" => vec![("FileName", self.rng.pick(&PUT_FILES).to_string())],
            "RunScript" => {
                let mut p = vec![("ScriptName", self.rng.pick(&SCRIPTS).to_string())];
                if self.rng.percent(50) {
                    p.push(("Args", r"-OutDir C:\Windows\Temp\ir".to_string()));
                }
                p
            }
            _ => {
                let g = self.counters.files;
                let path = if self.plan.hostile_names {
                    self.hostile[g as usize % self.hostile.len()].clone()
                } else {
                    self.rng.pick(&PATHS).to_string()
                };
                vec![("Path", path)]
            }
        }
    }

    /// Sizes: every sixth file is empty, the rest log-uniform up to `max_getfile_size`.
    fn getfile_content(&mut self) -> Content {
        let g = self.counters.files;
        self.counters.files += 1;
        let max = self.cfg.max_getfile_size;
        let size = if g.is_multiple_of(6) || max == 0 {
            0
        } else {
            let bits = self.rng.range(0, u64::from(64 - max.leading_zeros()));
            self.rng.range(1, max.min(1u64 << bits.min(63)))
        };
        Content::GetFile {
            seed: self.rng.next_u64(),
            size,
        }
    }

    /// RunScript transcripts in four shapes, in turn: the vendor example's non-strict JSON (raw
    /// newline, raw NUL and a `\u0000` escape), strict current names, and the two older
    /// spellings (`script_error`, `name`).
    fn transcript(&mut self, script: &str) -> Content {
        let r = self.counters.scripts;
        self.counters.scripts += 1;
        let exit_code = if self.rng.percent(80) { 0 } else { 1 };
        let lines = self.rng.range(3, 40);
        let mut output = format!(
            "Transcript started, output file is C:\\ProgramData\\Microsoft\\Windows Defender \
             Advanced Threat Protection\\Temp\\PSScriptOutputs\\PSScript_Transcript_{}.txt\n",
            self.rng.guid()
        );
        for _ in 0..lines {
            output.push_str(&format!(
                "{:<16} {:>6} {:>10}\n",
                self.rng
                    .pick(&["svchost", "lsass", "explorer", "powershell", "MsMpEng"]),
                self.rng.range(4, 65_000),
                self.rng.range(1_000, 900_000),
            ));
        }
        let errors = if exit_code == 0 {
            String::new()
        } else {
            "Access is denied.\n".to_string()
        };
        let bytes = match r % 4 {
            0 => {
                let mut b = Vec::new();
                b.extend_from_slice(b"{\"script_name\":");
                b.extend_from_slice(json!(script).to_string().as_bytes());
                b.extend_from_slice(
                    format!(",\"exit_code\":{exit_code},\"script_output\":").as_bytes(),
                );
                let quoted = json!(output).to_string();
                b.extend_from_slice(&quoted.as_bytes()[..quoted.len() - 1]);
                // Not strict JSON, exactly like the vendor's example transcript.
                b.extend_from_slice(b"\nTranscript ended\\u0000\0\"");
                b.extend_from_slice(b",\"script_errors\":");
                b.extend_from_slice(json!(errors).to_string().as_bytes());
                b.push(b'}');
                b
            }
            1 => json!({"script_name": script, "exit_code": exit_code,
                        "script_output": output, "script_errors": errors})
            .to_string()
            .into_bytes(),
            2 => json!({"script_name": script, "exit_code": exit_code,
                        "script_output": output, "script_error": errors})
            .to_string()
            .into_bytes(),
            _ => json!({"name": script, "exit_code": exit_code,
                        "script_output": output, "script_error": errors})
            .to_string()
            .into_bytes(),
        };
        Content::Transcript(Arc::from(bytes))
    }

    fn other_action(&mut self, i: usize, created: DateTime<Utc>) -> Action {
        let seven = self.rng.percent(50);
        let created = trunc(created, seven);
        let (kind, scope) = OTHER_TYPES[i % OTHER_TYPES.len()];
        let last_update = trunc(created + self.secs(5_000, 50_000), seven);
        let mut a = self.action(
            "",
            i,
            created,
            last_update,
            "Succeeded",
            seven,
            scope,
            Vec::new(),
        );
        a.kind = kind;
        a.entity["type"] = json!(kind);
        a.list_entity["type"] = json!(kind);
        a
    }

    /// A succeeded investigation package collection (no `commands` in the entity) whose
    /// package, of `package_size` bytes of files, getPackageUri links to.
    fn package_action(&mut self, tenant_id: &str, i: usize, created: DateTime<Utc>) -> Action {
        let seven = self.rng.percent(50);
        let created = trunc(created, seven);
        let last_update = trunc(created + self.secs(60_000, 600_000), seven);
        let mut a = self.action(
            tenant_id,
            i,
            created,
            last_update,
            "Succeeded",
            seven,
            None,
            Vec::new(),
        );
        a.kind = "CollectInvestigationPackage";
        for entity in [&mut a.entity, &mut a.list_entity] {
            entity["type"] = json!(a.kind);
            entity["requestorComment"] =
                json!(format!("Investigation package, case IR-{}", 4000 + i));
        }
        let layout = super::package::Layout::new(self.rng.next_u64(), self.cfg.package_size);
        let blob = Blob::new(
            tenant_id.to_string(),
            a.id.clone(),
            self.rng.hex(32),
            Content::Package(Box::new(layout)),
            last_update,
        );
        a.commands.push(Command {
            index: 0,
            command_type: "InvestigationPackage",
            status: "Completed",
            original_name: None,
            blob: Some(Arc::new(blob)),
            link: LinkKind::Blob,
        });
        a
    }

    /// An action with one completed GetFile of `path` whose result is `content`.
    fn getfile_action(
        &mut self,
        tenant_id: &str,
        created: DateTime<Utc>,
        path: String,
        content: Content,
    ) -> Action {
        let created = trunc(created, true);
        let start = trunc(created + self.secs(1_000, 5_000), true);
        let end = trunc(start + self.secs(5_000, 20_000), true);
        let command = CommandDraft {
            command_type: "GetFile",
            params: vec![("Path", path)],
            status: "Completed",
            start: Some(start),
            end: Some(end),
            errors: Vec::new(),
            content: Some(content),
        };
        self.action(
            tenant_id,
            1,
            created,
            end,
            "Succeeded",
            true,
            None,
            vec![command],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn action(
        &mut self,
        tenant_id: &str,
        i: usize,
        created: DateTime<Utc>,
        last_update: DateTime<Utc>,
        status: &'static str,
        seven: bool,
        scope: Option<&str>,
        drafts: Vec<CommandDraft>,
    ) -> Action {
        let id = self.rng.guid();
        let machine_id = self.rng.hex(40);
        let requestor = self.rng.pick(&REQUESTORS).to_string();
        let case = self.rng.range(1000, 9999);
        let host = format!(
            "{}{:03}.contoso.com",
            self.rng.pick(&HOSTS),
            self.rng.range(1, 250)
        );
        let comment = match self.rng.range(0, 3) {
            0 => format!("IR-{case} triage collection"),
            1 => "Autoruns sweep".to_string(),
            2 => format!("Collect event logs for case {case}"),
            _ => "Scheduled evidence pull".to_string(),
        };
        let external_id = self.rng.percent(60).then(|| format!("IR-{case}"));
        let cancelled = status == "Cancelled";
        let cancel_at = cancelled.then(|| trunc(last_update, seven));
        let mut commands_json = Vec::with_capacity(drafts.len());
        let mut commands = Vec::with_capacity(drafts.len());
        for (k, d) in drafts.into_iter().enumerate() {
            commands_json.push(json!({
                "index": k,
                "startTime": d.start.map(|t| ts(t, seven)),
                "endTime": d.end.map(|t| ts(t, seven)),
                "commandStatus": d.status,
                "errors": d.errors,
                "command": {
                    "type": d.command_type,
                    "params": d.params.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
                },
            }));
            let original_name = match d.command_type {
                "PutFile" => None,
                _ => Some(d.params[0].1.clone()),
            };
            let blob = d.content.map(|content| {
                Arc::new(Blob::new(
                    tenant_id.to_string(),
                    id.clone(),
                    self.rng.hex(32),
                    content,
                    d.end.unwrap_or(last_update),
                ))
            });
            commands.push(Command {
                index: k as u32,
                command_type: d.command_type,
                status: d.status,
                original_name,
                blob,
                link: LinkKind::Blob,
            });
        }
        let entity = json!({
            "id": id,
            "type": "LiveResponse",
            "scope": scope,
            "title": null,
            "requestor": requestor,
            "requestorComment": comment,
            "status": status,
            "machineId": machine_id,
            "computerDnsName": host,
            "creationDateTimeUtc": ts(created, seven),
            "lastUpdateDateTimeUtc": ts(last_update, seven),
            "cancellationRequestor": cancelled.then_some("carol.dfir@contoso.com"),
            "cancellationComment": cancelled.then_some("Cancelled by analyst"),
            "cancellationDateTimeUtc": cancel_at.map(|t| ts(t, seven)),
            "errorHResult": 0,
            "externalId": external_id,
            "requestSource": "PublicApi",
            "relatedFileInfo": null,
            "commands": commands_json,
            "troubleshootInfo": null,
        });
        // The List examples in the docs print `lastUpdateTimeUtc`; serve that on some items.
        let mut list_entity = entity.clone();
        if i % 3 == 1
            && let Some(obj) = list_entity.as_object_mut()
            && let Some(v) = obj.remove("lastUpdateDateTimeUtc")
        {
            obj.insert("lastUpdateTimeUtc".to_string(), v);
        }
        Action {
            id,
            kind: "LiveResponse",
            status,
            machine_id,
            requestor,
            created,
            entity,
            list_entity,
            commands,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(actions: usize) -> SimConfig {
        SimConfig {
            actions,
            now: DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            ..SimConfig::default()
        }
    }

    #[test]
    fn timestamps_use_seven_or_trimmed_two_digits() {
        let t = DateTime::parse_from_rfc3339("2025-03-10T08:14:03.551234678Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ts(trunc(t, true), true), "2025-03-10T08:14:03.5512346Z");
        assert_eq!(ts(trunc(t, false), false), "2025-03-10T08:14:03.55Z");
        let t2 = DateTime::parse_from_rfc3339("2025-03-10T08:14:03.901Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ts(trunc(t2, false), false), "2025-03-10T08:14:03.9Z");
    }

    #[test]
    fn generation_is_deterministic_and_sorted() {
        let c = cfg(30);
        let plan = FaultPlan::default();
        let t = SimTenant::default_for(0);
        let a = generate_tenant(&c, &plan, 0, &t);
        let b = generate_tenant(&c, &plan, 0, &t);
        assert_eq!(a.actions.len(), 30 + 2 + 3);
        for (x, y) in a.actions.iter().zip(&b.actions) {
            assert_eq!(x.entity, y.entity);
        }
        assert!(a.actions.windows(2).all(|w| w[0].created <= w[1].created));
        let lo = c.now - ChronoDuration::days(2);
        let hi = c.now - ChronoDuration::minutes(1);
        assert!(a.actions.iter().all(|x| x.created >= lo && x.created <= hi));
        // A different tenant index gives different ids.
        let other = generate_tenant(&c, &plan, 1, &t);
        assert_ne!(a.actions[0].id, other.actions[0].id);
    }

    #[test]
    fn failed_actions_leave_later_commands_created() {
        let c = cfg(60);
        let data = generate_tenant(&c, &FaultPlan::default(), 0, &SimTenant::default_for(0));
        let failed: Vec<_> = data
            .actions
            .iter()
            .filter(|a| a.status == "Failed")
            .collect();
        assert_eq!(failed.len(), 9);
        for a in failed {
            let k = a
                .commands
                .iter()
                .position(|c| c.status == "Failed")
                .unwrap();
            assert!(a.commands[..k].iter().all(|c| c.status == "Completed"));
            assert!(a.commands[k + 1..].iter().all(|c| c.status == "Created"));
            let cmds = a.entity["commands"].as_array().unwrap();
            assert_eq!(cmds[k]["errors"].as_array().unwrap().len(), 1);
            for c in &cmds[k + 1..] {
                assert_eq!(c["startTime"], Value::Null);
                assert_eq!(c["endTime"], Value::Null);
            }
        }
        let others = data
            .actions
            .iter()
            .filter(|a| a.kind != "LiveResponse")
            .count();
        assert_eq!(others, 8);
    }

    #[test]
    fn rng_guid_has_v4_shape() {
        let g = Rng::new(1).guid();
        assert_eq!(g.len(), 36);
        assert_eq!(&g[14..15], "4");
        assert_eq!(g.matches('-').count(), 4);
    }

    #[test]
    fn spread_shorter_than_a_minute_still_works() {
        let c = SimConfig {
            spread: Duration::from_secs(1),
            ..cfg(3)
        };
        let data = generate_tenant(&c, &FaultPlan::default(), 0, &SimTenant::default_for(0));
        assert_eq!(data.actions.len(), 5);
    }
}
