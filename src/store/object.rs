//! The `s3` and `azure` backends: create-only uploads with service-checked checksums,
//! multipart in bounded memory for large packages, HEAD + hash recovery, version-exact reads.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::azure::MicrosoftAzure;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, PutMode, PutMultipartOptions, PutOptions,
    PutPayload, WriteMultipart,
};
use sha2::Digest;
use tokio::io::AsyncReadExt;

use super::{
    ByteStream, Expected, Listed, ObjectVersion, StoreError, Stored, WormStatus, hash_stream,
};
use crate::config::StoreBackend;

/// Packages up to this size go up in one create-only PUT (held in memory once).
pub const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// Multipart part size; S3 needs at least 5 MiB per part and allows 10,000 parts, so larger
/// packages get larger parts ([`part_size`]).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploading at once. Memory of an upload ≈ part size × (parts in flight + 2).
pub const PARTS_IN_FLIGHT: usize = 4;
/// S3's limit is 10,000 parts; leave room.
const MAX_PARTS: u64 = 9_000;

/// The client of one bucket or container.
#[derive(Debug, Clone)]
pub(super) enum Client {
    S3(Arc<AmazonS3>),
    Azure {
        store: Arc<MicrosoftAzure>,
        account: String,
        /// The blob service URL (`https://{account}.blob.core.windows.net`, or the endpoint).
        service: url::Url,
    },
}

#[derive(Debug)]
pub(super) struct ObjectBackend {
    client: Client,
    bucket: String,
    /// `store.prefix` without surrounding slashes; may be empty.
    prefix: String,
    region: String,
    endpoint: Option<String>,
}

impl ObjectBackend {
    pub(super) fn new(
        client: Client,
        bucket: String,
        prefix: String,
        region: String,
        endpoint: Option<String>,
    ) -> Self {
        ObjectBackend {
            client,
            bucket,
            prefix,
            region,
            endpoint,
        }
    }

    fn store(&self) -> &dyn ObjectStore {
        match &self.client {
            Client::S3(s) => s.as_ref(),
            Client::Azure { store, .. } => store.as_ref(),
        }
    }

    fn backend(&self) -> StoreBackend {
        match self.client {
            Client::S3(_) => StoreBackend::S3,
            Client::Azure { .. } => StoreBackend::Azure,
        }
    }

    /// The full object key: `prefix/key`.
    fn full_key(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => format!("{}/", self.prefix),
            (false, false) => format!("{}/{key}", self.prefix),
        }
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        ObjectPath::parse(self.full_key(key)).map_err(|e| StoreError::InvalidKey {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    pub(super) fn location(&self, key: &str) -> String {
        match &self.client {
            Client::S3(_) => format!("s3://{}/{}", self.bucket, self.full_key(key)),
            Client::Azure { account, .. } => {
                format!("azure://{account}/{}/{}", self.bucket, self.full_key(key))
            }
        }
    }

    fn object_error(
        &self,
        op: &'static str,
        key: &str,
    ) -> impl FnOnce(object_store::Error) -> StoreError {
        let location = self.location(key);
        move |source| StoreError::Object {
            op,
            location,
            source,
        }
    }

    fn stored(
        &self,
        key: &str,
        version_id: Option<String>,
        etag: Option<String>,
        size: u64,
    ) -> Stored {
        Stored {
            backend: self.backend(),
            location: self.location(key),
            version_id,
            etag,
            size,
        }
    }

    /// HEAD of `key` (exactly `version_id` when given); `None` when there is no such object.
    pub(super) async fn head(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<ObjectVersion>, StoreError> {
        let options = GetOptions {
            head: true,
            version: version_id.map(str::to_string),
            ..Default::default()
        };
        match self.store().get_opts(&self.path(key)?, options).await {
            Ok(r) => Ok(Some(ObjectVersion {
                version_id: r.meta.version,
                etag: r.meta.e_tag,
                size: r.meta.size,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.object_error("looking up", key)(e)),
        }
    }

    pub(super) async fn find(
        &self,
        key: &str,
        expected: &Expected,
    ) -> Result<Option<Stored>, StoreError> {
        let Some(current) = self.head(key, None).await? else {
            return Ok(None);
        };
        let conflict = |reason: String| StoreError::Conflict {
            location: self.location(key),
            reason,
        };
        if current.size != expected.size {
            return Err(conflict(format!(
                "{} bytes, the package has {}",
                current.size, expected.size
            )));
        }
        // Hash exactly the version the HEAD saw, so a concurrent writer cannot slip in between.
        let (sha256, _) = hash_stream(self.read(key, current.version_id.as_deref()).await?).await?;
        if sha256 != expected.sha256 {
            return Err(conflict(format!(
                "SHA-256 {sha256}, the package has {}",
                expected.sha256
            )));
        }
        Ok(Some(self.stored(
            key,
            current.version_id,
            current.etag,
            current.size,
        )))
    }

    /// After a create-only write was refused: the object there, if it holds `expected`.
    async fn adopt_existing(&self, key: &str, expected: &Expected) -> Result<Stored, StoreError> {
        self.find(key, expected)
            .await?
            .ok_or_else(|| StoreError::Conflict {
                location: self.location(key),
                reason: "the store refused the create-only write but shows no object".into(),
            })
    }

    pub(super) async fn publish(
        &self,
        key: &str,
        local: &Path,
        expected: &Expected,
    ) -> Result<Stored, StoreError> {
        if let Some(found) = self.find(key, expected).await? {
            tracing::info!(location = %found.location, "package already in the store (a crash before its commit); not uploading it again");
            return Ok(found);
        }
        let uploaded = match self.upload(key, local, expected, None).await {
            // Someone else's object appeared between the HEAD and the create-only PUT.
            Err(StoreError::Object {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => return self.adopt_existing(key, expected).await,
            other => other?,
        };
        self.read_back_azure(key, expected, uploaded).await
    }

    /// object_store sends Azure no transfer checksum (Azure offers MD5/CRC64, not SHA-256),
    /// so an upload there is proven by reading the version back.
    async fn read_back_azure(
        &self,
        key: &str,
        expected: &Expected,
        uploaded: Stored,
    ) -> Result<Stored, StoreError> {
        if let Client::Azure { .. } = self.client {
            let (sha256, size) =
                hash_stream(self.read(key, uploaded.version_id.as_deref()).await?).await?;
            if sha256 != expected.sha256 || size != expected.size {
                return Err(StoreError::Conflict {
                    location: uploaded.location,
                    reason: format!("read back SHA-256 {sha256} ({size} bytes) after the upload"),
                });
            }
        }
        Ok(uploaded)
    }

    /// See [`Store::publish_over`](super::Store::publish_over).
    pub(super) async fn publish_over(
        &self,
        key: &str,
        local: &Path,
        expected: &Expected,
        over: &ObjectVersion,
    ) -> Result<Stored, StoreError> {
        if expected.size > SINGLE_PUT_MAX || over.etag.is_none() {
            return Err(StoreError::Conflict {
                location: self.location(key),
                reason: "holds a quarantined object that a package too large for one conditional PUT (or one without an ETag) cannot go over".into(),
            });
        }
        let uploaded = match self.upload(key, local, expected, Some(over)).await {
            Err(StoreError::Object {
                source: object_store::Error::Precondition { .. },
                ..
            }) => {
                return Err(StoreError::Conflict {
                    location: self.location(key),
                    reason: "changed after its object was quarantined".into(),
                });
            }
            other => other?,
        };
        self.read_back_azure(key, expected, uploaded).await
    }

    /// Uploads `local`, checking on the way that its bytes still are `expected`: create-only,
    /// or (a single PUT only) conditional on the key still serving `over`.
    async fn upload(
        &self,
        key: &str,
        local: &Path,
        expected: &Expected,
        over: Option<&ObjectVersion>,
    ) -> Result<Stored, StoreError> {
        let io = |op: &'static str| {
            let path = local.to_path_buf();
            move |source| StoreError::Io { path, op, source }
        };
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(io("opening spooled package"))?;
        let len = file
            .metadata()
            .await
            .map_err(io("reading size of spooled package"))?
            .len();
        if len != expected.size {
            return Err(StoreError::Changed {
                path: local.to_path_buf(),
                reason: format!("{len} bytes, {} were checked", expected.size),
            });
        }
        let path = self.path(key)?;
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, "application/zip".into());
        attributes.insert(
            Attribute::Metadata("sha256".into()),
            expected.sha256.clone().into(),
        );
        let mut hasher = sha2::Sha256::new();
        let result = if len <= SINGLE_PUT_MAX {
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf)
                .await
                .map_err(io("reading spooled package"))?;
            hasher.update(&buf);
            check_digest(local, hasher, expected)?;
            let mode = match over {
                Some(o) => PutMode::Update(object_store::UpdateVersion {
                    e_tag: o.etag.clone(),
                    version: None,
                }),
                None => PutMode::Create,
            };
            let options = PutOptions {
                mode,
                attributes,
                ..Default::default()
            };
            self.store()
                .put_opts(&path, PutPayload::from(buf), options)
                .await
                .map_err(self.object_error("uploading", key))?
        } else {
            let options = PutMultipartOptions {
                attributes,
                ..Default::default()
            };
            let upload = self
                .store()
                .put_multipart_opts(&path, options)
                .await
                .map_err(self.object_error("starting multipart upload of", key))?;
            let part = part_size(len);
            let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
            let streamed = async {
                let mut remaining = len;
                while remaining > 0 {
                    let want = remaining.min(part as u64) as usize;
                    let mut buf = BytesMut::zeroed(want);
                    file.read_exact(&mut buf)
                        .await
                        .map_err(io("reading spooled package"))?;
                    hasher.update(&buf);
                    remaining -= want as u64;
                    writer
                        .wait_for_capacity(PARTS_IN_FLIGHT)
                        .await
                        .map_err(self.object_error("uploading a part of", key))?;
                    writer.put(buf.freeze());
                }
                check_digest(local, hasher, expected)
            }
            .await;
            match streamed {
                Ok(()) => writer
                    .finish()
                    .await
                    .map_err(self.object_error("completing multipart upload of", key))?,
                Err(e) => {
                    if let Err(abort) = writer.abort().await {
                        tracing::warn!(location = %self.location(key), error = %abort, "could not abort a failed multipart upload (a lifecycle rule removes it)");
                    }
                    return Err(e);
                }
            }
        };
        tracing::info!(location = %self.location(key), version_id = ?result.version, bytes = len, "package uploaded");
        Ok(self.stored(key, result.version, result.e_tag, len))
    }

    pub(super) async fn read(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<ByteStream, StoreError> {
        let options = GetOptions {
            version: version_id.map(str::to_string),
            ..Default::default()
        };
        let result = self
            .store()
            .get_opts(&self.path(key)?, options)
            .await
            .map_err(self.object_error("reading", key))?;
        let location = self.location(key);
        Ok(result
            .into_stream()
            .map_err(move |source| StoreError::Object {
                op: "reading",
                location: location.clone(),
                source,
            })
            .boxed())
    }

    pub(super) fn list(
        &self,
        prefix: &str,
    ) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Listed, StoreError>> + Send + '_>>
    {
        let below = match prefix.trim_end_matches('/') {
            "" => (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str())),
            p => Some(ObjectPath::from(self.full_key(p))),
        };
        let location = self.location(prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        self.store()
            .list(below.as_ref())
            .map(move |item| match item {
                Ok(meta) => Ok(Listed {
                    key: meta
                        .location
                        .as_ref()
                        .strip_prefix(&strip)
                        .unwrap_or(meta.location.as_ref())
                        .to_string(),
                    size: meta.size,
                }),
                Err(source) => Err(StoreError::Object {
                    op: "listing",
                    location: location.clone(),
                    source,
                }),
            })
            .boxed()
    }

    pub(super) async fn put_small(&self, key: &str, bytes: Bytes) -> Result<Stored, StoreError> {
        let expected = Expected::of(&bytes);
        let size = expected.size;
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store()
            .put_opts(&self.path(key)?, PutPayload::from(bytes), options)
            .await
        {
            Ok(r) => Ok(self.stored(key, r.version, r.e_tag, size)),
            // A retry after a crash: the same bytes are already there.
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.adopt_existing(key, &expected).await
            }
            Err(e) => Err(self.object_error("writing", key)(e)),
        }
    }

    /// [`super::Store::legal_hold`]: S3 only (an Azure container's holds are not lrvault's).
    pub(super) async fn legal_hold(&self, key: &str, on: bool) -> Result<Vec<String>, StoreError> {
        let Client::S3(s3) = &self.client else {
            return Ok(Vec::new());
        };
        let credential = s3
            .credentials()
            .get_credential()
            .await
            .map_err(|e| StoreError::Hold {
                location: self.location(key),
                message: format!("cannot get a credential: {e}"),
            })?;
        let target = super::hold::S3Target {
            credential: &credential,
            bucket: &self.bucket,
            region: &self.region,
            endpoint: self.endpoint.as_deref(),
        };
        super::hold::set_legal_hold(&target, &self.full_key(key), on).await
    }

    pub(super) async fn check_worm(&self) -> Result<WormStatus, StoreError> {
        match &self.client {
            Client::S3(s3) => {
                super::worm::check_s3(
                    s3.credentials().clone(),
                    &self.bucket,
                    &self.region,
                    self.endpoint.as_deref(),
                )
                .await
            }
            Client::Azure { store, service, .. } => {
                super::worm::check_azure(store.credentials(), service, &self.bucket).await
            }
        }
    }
}

/// The part size for a package of `len` bytes: [`PART_SIZE`], or larger (whole MiB) when the
/// package would need more than 9,000 parts.
pub fn part_size(len: u64) -> usize {
    const MIB: u64 = 1024 * 1024;
    let needed = len.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(PART_SIZE as u64) as usize
}

fn check_digest(local: &Path, hasher: sha2::Sha256, expected: &Expected) -> Result<(), StoreError> {
    let sha256 = hex::encode(hasher.finalize());
    if sha256 == expected.sha256 {
        Ok(())
    } else {
        Err(StoreError::Changed {
            path: local.to_path_buf(),
            reason: format!("SHA-256 {sha256}, {} was checked", expected.sha256),
        })
    }
}
