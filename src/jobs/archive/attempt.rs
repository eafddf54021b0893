//! One attempt at one claimed result, as a sequence of named steps:
//!
//! 1. [`download`]: mint a link ([`mint_link`]: quota, allowlist, LINK_ISSUED) and stream the
//!    blob into the package writer ([`stream_link`]), resuming cut transfers with `Range` and
//!    minting a fresh link when the blob host refuses an old one;
//! 2. [`check_download`]: the server's length and MD5 claims against what arrived, and the
//!    DOWNLOADED custody row;
//! 3. [`finish_package`]: `retrieval.json`, tag files, re-check, move into place (the store
//!    root for `fs`, the spool for object stores);
//! 4. [`publish::record`](super::publish::record): the package into the store, then the
//!    evidence row, the result `archived` and the ARCHIVED custody row, then the spool copy
//!    removed.
//!
//! Any step's failure ends the attempt with a [`Failure`] that says who pays.

use std::path::PathBuf;

use serde_json::json;

use super::Outcome;
use crate::custody::{self, Event, EventKind};
use crate::db::DbError;
use crate::fetch::{self, FetchError, Transfer};
use crate::jobs::failure::{Failure, ProcessFailure};
use crate::jobs::{Context, Tenant};
use crate::mde::RawAction;
use crate::package::{self, BagInfo, PackageSink, PackageSpec, StreamedPackage};
use crate::queue::{self, Claimed, EvidenceRecord};

/// Mid-body interruptions resumed with Range on the same link before the attempt fails.
const MAX_RESUMES_PER_LINK: u32 = 3;

/// A claimed result with what the download needs to know about it.
pub(super) struct Plan<'a> {
    pub claimed: &'a Claimed,
    pub action: RawAction,
    /// The command's parameters (GetFile `Path`, RunScript `ScriptName`, ...).
    pub params: Vec<(String, String)>,
    /// The package's path relative to the store root (its key in an object store).
    pub rel_path: PathBuf,
}

impl<'a> Plan<'a> {
    pub(super) fn new(claimed: &'a Claimed) -> Plan<'a> {
        let action = RawAction::parse(claimed.action_json.clone()).unwrap_or_else(|e| RawAction {
            raw: String::new(),
            value: json!({ "unreadable": e }),
        });
        let params = RawAction::command_params(&claimed.command_json);
        let k = &claimed.key;
        let rel_path = package::package_rel_path(
            &k.tenant,
            claimed.created,
            &k.action_id,
            k.index,
            &claimed.command_type,
        );
        Plan {
            claimed,
            action,
            params,
            rel_path,
        }
    }

    fn key(&self) -> &queue::Key {
        &self.claimed.key
    }

    /// An investigation package (getPackageUri), not a live-response result.
    fn is_package(&self) -> bool {
        self.claimed.command_type == crate::mde::PACKAGE_COMMAND
    }

    pub fn rel_str(&self) -> String {
        self.rel_path.to_string_lossy().into_owned()
    }

    /// Everything the package writer needs before the first byte, for a payload of
    /// `expected_size` bytes (when the server announced it).
    /// `compute_md5`: the server sent an MD5 claim to check against.
    fn spec(&self, ctx: &Context, expected_size: Option<u64>, compute_md5: bool) -> PackageSpec {
        let k = self.key();
        let base_name = if self.is_package() {
            package::investigation_package_name(&k.action_id)
        } else {
            package::payload_base_name(&self.claimed.command_type, &self.params).0
        };
        PackageSpec {
            store_root: ctx.store.staging_root().to_path_buf(),
            rel_path: self.rel_path.clone(),
            bag_name: format!("{}-{:03}", package::path_component(&k.action_id), k.index),
            payload_base_name: base_name,
            gz_suffix_if_gzip: self.claimed.command_type == "GetFile",
            machine_action_json: self.action.raw.as_bytes().to_vec(),
            bag_info: self.bag_info(),
            compression: ctx.cfg.store.compression,
            expected_size,
            compute_md5,
            threads: ctx.package_threads.clone(),
        }
    }

    /// What the payload is, for bag-info's External-Description.
    fn what(&self) -> String {
        if self.is_package() {
            return "MDE investigation package".into();
        }
        let k = self.key();
        format!(
            "MDE live response {} result, command {}",
            self.claimed.command_type, k.index
        )
    }

    fn bag_info(&self) -> BagInfo {
        let k = self.key();
        BagInfo {
            source_organization: format!("lrvault tenant {}", k.tenant),
            external_identifier: format!("{}/{}/{}", k.tenant, k.action_id, k.index),
            bagging_date: crate::time::now().format("%Y-%m-%d").to_string(),
            contact_name: self.action.requestor().map(str::to_string),
            external_description: format!(
                "{} of action {} on {}{}",
                self.what(),
                k.action_id,
                self.action
                    .computer_dns_name()
                    .unwrap_or("an unknown device"),
                self.action
                    .requestor_comment()
                    .map(|c| format!("; comment: {c}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// A download in progress, across links and resumes.
struct Download {
    started_at: String,
    transfer: Transfer,
    /// Created on the first answered request, when the size is known.
    sink: Option<PackageSink>,
    link_issues: u32,
    /// Host and path of the last link (never its query).
    link: (String, String),
}

/// Runs the steps; see the module docs.
pub(super) async fn attempt(
    ctx: &Context,
    tenant: &Tenant,
    claimed: &Claimed,
) -> Result<Outcome, Failure> {
    let plan = Plan::new(claimed);
    // A package already in place or in the store (a crash after the rename or the upload,
    // before the DB commit) is adopted once it re-verifies; nothing is downloaded twice.
    if let Some(outcome) = super::adopt::leftover(ctx, &tenant.actor, &plan).await? {
        return Ok(outcome);
    }
    let mut dl = Download {
        started_at: crate::time::now_str(),
        transfer: Transfer::default(),
        sink: None,
        link_issues: 0,
        link: Default::default(),
    };
    // Every way out that is not a finished body removes the partial package.
    let downloaded = download(ctx, tenant, &plan, &mut dl).await;
    let sink = dl.sink.take();
    let streamed = match (downloaded, sink) {
        (Ok(()), Some(sink)) => sink.close().await.map_err(|e| Failure::from_package(&e))?,
        (Ok(()), None) => return Err(Failure::retry("no download happened")),
        (Err(failure), sink) => {
            if let Some(sink) = sink {
                sink.abort().await;
            }
            return Err(failure);
        }
    };
    // The MD5 is computed only when the first response carried a claim.
    let md5_check = match dl.transfer.check_complete(streamed.digests.md5.as_ref()) {
        Ok(check) => check,
        Err(e) => {
            streamed.abort().await;
            return Err(Failure::retry(e.to_string()));
        }
    };
    let head = record_downloaded(ctx, tenant, &plan, &dl, &streamed, md5_check).await?;
    let record = finish_package(ctx, tenant, &plan, &dl, streamed, md5_check, head).await?;
    super::publish::record(ctx, &tenant.actor, plan.key(), record).await
}

/// Mints links and streams the blob until the body is complete.
async fn download(
    ctx: &Context,
    tenant: &Tenant,
    plan: &Plan<'_>,
    dl: &mut Download,
) -> Result<(), Failure> {
    let k = plan.key();
    loop {
        if ctx.cancel.is_cancelled() {
            return Err(Failure::Process(ProcessFailure::Stopping));
        }
        let url = mint_link(ctx, tenant, plan, dl).await?;
        let Some(rejected) = stream_link(ctx, plan, dl, &url).await? else {
            return Ok(());
        };
        let max = ctx.cfg.download.max_link_reissues;
        // Out of re-issues: this result's links keep failing; a later attempt may do better.
        if dl.link_issues > max {
            return Err(Failure::retry(format!("{rejected} after {max} re-issues")));
        }
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, reason = %rejected, "minting a new download link");
    }
}

/// Asks the API for a link (a quota call: GetLiveResponseResultDownloadLink, or getPackageUri
/// for an investigation package), records LINK_ISSUED with its host and path, and checks it
/// against the allowlist before any connection.
async fn mint_link(
    ctx: &Context,
    tenant: &Tenant,
    plan: &Plan<'_>,
    dl: &mut Download,
) -> Result<url::Url, Failure> {
    let k = plan.key();
    let link = if plan.is_package() {
        let last_update = plan.action.last_update().or_else(|| plan.action.created());
        tenant
            .client
            .package_link(&k.action_id)
            .await
            .map_err(|e| Failure::from_package_link(e, last_update, crate::time::now()))?
    } else {
        tenant
            .client
            .result_link(&k.action_id, k.index)
            .await
            .map_err(Failure::from_link)?
    };
    dl.link_issues += 1;
    let checked = tenant.allow.check(&link);
    dl.link = match &checked {
        Ok(url) => fetch::link_host_path(url),
        Err(_) => url::Url::parse(&link)
            .map(|u| fetch::link_host_path(&u))
            .unwrap_or_default(),
    };
    let detail = json!({ "link_host": dl.link.0, "link_path": dl.link.1, "issue": dl.link_issues });
    let event = Event::new(
        &k.tenant,
        &k.action_id,
        Some(k.index),
        EventKind::LinkIssued,
        &tenant.actor,
    )
    .detail(detail);
    custody::record(&ctx.db, event)
        .await
        .map_err(Failure::database)?;
    checked.map_err(|refused| Failure::refused(refused.to_string()))
}

/// Streams the blob behind `url` into the package, resuming cut transfers with `Range`.
/// `Ok(None)` when the body is complete; `Ok(Some(reason))` when the link must be re-issued.
async fn stream_link(
    ctx: &Context,
    plan: &Plan<'_>,
    dl: &mut Download,
    url: &url::Url,
) -> Result<Option<String>, Failure> {
    let k = plan.key();
    let mut resumes = 0;
    loop {
        let failed = match open_and_stream(ctx, plan, dl, url).await? {
            Ok(()) => return Ok(None),
            Err(e) => e,
        };
        match failed {
            FetchError::LinkRejected { code } => {
                return Ok(Some(format!(
                    "download link refused (403{})",
                    crate::http::code_suffix(&code)
                )));
            }
            FetchError::LinkExpired { expiry } => {
                return Ok(Some(format!(
                    "download link expired at {expiry} before use"
                )));
            }
            FetchError::Interrupted {
                received, message, ..
            } if resumes < MAX_RESUMES_PER_LINK && received > 0 => {
                resumes += 1;
                tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, received, error = %message, "transfer interrupted; resuming with Range");
            }
            FetchError::Sink => return Err(writer_failure(dl.sink.take()).await),
            e => return Err(Failure::from_blob(e)),
        }
    }
}

/// Opens the blob (status and headers checked), creates the package writer on the first
/// response — when the size is known, so zip64 is used only for payloads that need it — and
/// streams the body into it. The outer error is a writer that could not be created.
async fn open_and_stream(
    ctx: &Context,
    plan: &Plan<'_>,
    dl: &mut Download,
    url: &url::Url,
) -> Result<Result<(), FetchError>, Failure> {
    let opened = match fetch::open(&ctx.blob, &ctx.clock, url, &mut dl.transfer).await {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    if dl.sink.is_none() {
        let spec = plan.spec(ctx, dl.transfer.total, dl.transfer.server_md5.is_some());
        let capture = plan.claimed.command_type == "RunScript";
        let sink = PackageSink::create(spec, capture)
            .await
            .map_err(|e| Failure::from_package(&e))?;
        dl.sink = Some(sink);
    }
    let Some(sink) = dl.sink.as_ref() else {
        return Ok(Err(FetchError::Sink));
    };
    Ok(fetch::stream(opened, &mut dl.transfer, sink.sender()).await)
}

/// The writer's own error after it stopped consuming (e.g. disk full). The writer removed
/// its partial when it dropped out with the error.
async fn writer_failure(sink: Option<PackageSink>) -> Failure {
    let Some(sink) = sink else {
        return Failure::retry("package writer stopped");
    };
    match sink.close().await {
        Err(e) => Failure::from_package(&e),
        Ok(streamed) => {
            streamed.abort().await;
            Failure::retry("package writer stopped")
        }
    }
}

/// Appends the DOWNLOADED row; it is the newest committed row when the package is finished,
/// so the package pins the chain up to it (docs/evidence-format.md §9).
async fn record_downloaded(
    ctx: &Context,
    tenant: &Tenant,
    plan: &Plan<'_>,
    dl: &Download,
    streamed: &StreamedPackage,
    md5_check: &str,
) -> Result<custody::Head, Failure> {
    let k = plan.key();
    let d = &streamed.digests;
    let detail = json!({
        "bytes": d.size,
        "md5_check": md5_check,
        "http_status": dl.transfer.http_status,
        "link_host": dl.link.0,
        "link_path": dl.link.1,
        "link_issues": dl.link_issues,
        "ranges": dl.transfer.ranges,
    });
    let event = Event {
        evidence_sha256: Some(&d.sha256),
        ..Event::new(
            &k.tenant,
            &k.action_id,
            Some(k.index),
            EventKind::Downloaded,
            &tenant.actor,
        )
        .detail(detail)
    };
    custody::record(&ctx.db, event)
        .await
        .map_err(Failure::database)
}

/// Writes `retrieval.json` and the tag files, re-checks the package, records the publishing
/// intent and only then moves it into place.
async fn finish_package(
    ctx: &Context,
    tenant: &Tenant,
    plan: &Plan<'_>,
    dl: &Download,
    streamed: StreamedPackage,
    md5_check: &str,
    custody_head: custody::Head,
) -> Result<EvidenceRecord, Failure> {
    let (_, original_name) = package::payload_base_name(&plan.claimed.command_type, &plan.params);
    let d = streamed.digests.clone();
    let transcript = streamed
        .head
        .as_deref()
        .and_then(package::parse_transcript)
        .map(|t| json!({ "script_name": t.script_name, "exit_code": t.exit_code }));
    let retrieval = json!({
        "custody_head": custody_head,
        "link_host": dl.link.0,
        "link_path": dl.link.1,
        "http_status": dl.transfer.http_status,
        "headers": dl.transfer.headers,
        "started_at": dl.started_at,
        "finished_at": crate::time::now_str(),
        "bytes": d.size,
        "sha256": d.sha256,
        "md5_check": md5_check,
        "compression": d.compression,
        "entry": d.compression.entry,
        "encoding": d.encoding,
        "original_name": original_name,
        "original_size": d.original_size,
        "original_sha256": d.original_sha256,
        "transcript": transcript,
        "link_issues": dl.link_issues,
        "attempts": plan.claimed.attempts + 1,
        "ranges": dl.transfer.ranges,
        "lrvault_version": env!("CARGO_PKG_VERSION"),
        "host": custody::hostname(),
    });
    let bytes = serde_json::to_vec_pretty(&retrieval).unwrap_or_default();
    let sealed = streamed
        .seal(bytes)
        .await
        .map_err(|e| Failure::from_package(&e))?;
    // Committed before the package is placed: crash recovery adopts only what this
    // database itself was writing (docs/evidence-format.md §9). A failure here drops the sealed
    // package, which removes it.
    record_publishing(ctx, tenant, plan, &d.sha256, &sealed.info).await?;
    let info = sealed
        .place()
        .await
        .map_err(|e| Failure::from_package(&e))?;
    Ok(EvidenceRecord {
        payload_name: d.payload_name,
        payload_size: d.size,
        payload_sha256: d.sha256,
        payload_md5: d.md5.filter(|_| md5_check == "match").map(hex::encode),
        original_name,
        original_size: d.original_size,
        original_sha256: d.original_sha256,
        package_path: plan.rel_str(),
        package_size: info.package_size,
        package_sha256: info.package_sha256,
        adopted: false,
        extra: Default::default(),
    })
}

/// Appends the PUBLISHING row: the package `info` describes is about to be placed at its
/// path (and, on an object store, uploaded from there).
async fn record_publishing(
    ctx: &Context,
    tenant: &Tenant,
    plan: &Plan<'_>,
    payload_sha256: &str,
    info: &package::PackageInfo,
) -> Result<(), Failure> {
    let k = plan.key();
    let rel = plan.rel_str();
    let detail =
        json!({ "package_sha256": info.package_sha256, "package_size": info.package_size });
    let event = Event {
        evidence_sha256: Some(payload_sha256),
        package_path: Some(&rel),
        ..Event::new(
            &k.tenant,
            &k.action_id,
            Some(k.index),
            EventKind::Publishing,
            &tenant.actor,
        )
        .detail(detail)
    };
    custody::record(&ctx.db, event)
        .await
        .map(|_| ())
        .map_err(Failure::database)
}

/// Outcome of the final commit. A lost lease means another process recovered the result
/// while this one was still working: the package stays where it is and that process adopts
/// it, so nothing is recorded twice.
pub(super) fn archived_or_lost(committed: Result<bool, DbError>) -> Result<Outcome, Failure> {
    match committed {
        Ok(true) => Ok(Outcome::Archived),
        Ok(false) => Ok(Outcome::ClaimedElsewhere),
        Err(e) => Err(Failure::database(e)),
    }
}
