//! [`S3Store`]: workspaces in an S3-compatible object store, through aws-sdk-s3.
//!
//! Credentials come from the standard AWS chain (environment variables,
//! shared profile files, web identity, container and instance metadata) and
//! never from a flag. The sandbox never sees them: they live in the agent's
//! process only, and sessions run with a cleared environment.
//!
//! Large blobs go up as multipart uploads: parts are read in order (so the
//! SHA-256 of what was read can be checked against the blob's name before
//! the upload is completed) and sent a few at a time. A failed or changed
//! upload is aborted, so no partial object is ever left under a blob name.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt as _};
use sha2::{Digest as _, Sha256};

use super::{normalize_prefix, validate_hash, validate_session, BlobBody, StoreError, WorkspaceStore, PART_BYTES};

/// Where the S3 store is and how to reach it.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Endpoint URL (`http://127.0.0.1:9000`); `None` uses the AWS endpoint of the region.
    pub endpoint: Option<String>,
    /// Region name.
    pub region: String,
    /// Bucket (must exist).
    pub bucket: String,
    /// Key prefix; sessions live under `<prefix>/<session id>/`.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
    /// Parts of one multipart upload in flight at once.
    pub part_concurrency: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: false,
            part_concurrency: 4,
        }
    }
}

/// An S3 bucket of workspaces.
#[derive(Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    part_concurrency: usize,
}

fn unavailable<E, R>(what: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    StoreError::Unavailable(format!("{what}: {}", DisplayErrorContext(&e)))
}

fn join_part(
    r: Option<Result<Result<CompletedPart, StoreError>, tokio::task::JoinError>>,
) -> Result<CompletedPart, StoreError> {
    match r {
        Some(Ok(part)) => part,
        Some(Err(e)) => Err(StoreError::Io(std::io::Error::other(e.to_string()))),
        None => Err(StoreError::Io(std::io::Error::other("no upload in flight"))),
    }
}

impl S3Store {
    /// Builds a client; credentials come from the standard AWS chain.
    pub async fn new(config: S3Config) -> Result<Self, StoreError> {
        if config.bucket.is_empty() {
            return Err(StoreError::Unsupported("--s3-bucket is required with --workspace-store s3".into()));
        }
        let prefix = normalize_prefix(&config.prefix).map_err(StoreError::Unsupported)?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            )
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .load()
            .await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style)
            // We check SHA-256 of every blob ourselves; skip the SDK's extra CRC pass.
            .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
        if let Some(e) = &config.endpoint {
            b = b.endpoint_url(e);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: config.bucket,
            prefix,
            endpoint: config.endpoint.unwrap_or_else(|| format!("AWS {}", config.region)),
            part_concurrency: config.part_concurrency.max(1),
        })
    }

    /// Deletes keys with DeleteObjects, 1,000 (the S3 limit) per request.
    async fn delete_keys(&self, keys: Vec<String>, what: &str) -> Result<(), StoreError> {
        for chunk in keys.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build().map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| unavailable(what, e))?;
        }
        Ok(())
    }

    fn session_prefix(&self, session: &str) -> Result<String, StoreError> {
        validate_session(session)?;
        Ok(if self.prefix.is_empty() { format!("{session}/") } else { format!("{}/{session}/", self.prefix) })
    }

    fn blob_key(&self, session: &str, hash: &str) -> Result<String, StoreError> {
        validate_hash(hash)?;
        Ok(format!("{}blobs/{hash}", self.session_prefix(session)?))
    }

    async fn put_multipart(
        &self,
        key: &str,
        hash: &str,
        file: Arc<std::fs::File>,
        size: u64,
        path: &str,
    ) -> Result<(), StoreError> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| unavailable("start multipart upload", e))?;
        let upload_id = upload
            .upload_id()
            .ok_or_else(|| StoreError::Unavailable("no upload id in CreateMultipartUpload".into()))?
            .to_string();
        let result = self.upload_parts(key, &upload_id, hash, file, size, path).await;
        match result {
            Ok(parts) => {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                    .send()
                    .await
                    .map_err(|e| unavailable("complete multipart upload", e))?;
                Ok(())
            }
            Err(e) => {
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        hash: &str,
        file: Arc<std::fs::File>,
        size: u64,
        path: &str,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let count = size.div_ceil(PART_BYTES).max(1);
        let mut hasher = Sha256::new();
        let mut parts: Vec<CompletedPart> = Vec::with_capacity(count as usize);
        let mut inflight: tokio::task::JoinSet<Result<CompletedPart, StoreError>> = tokio::task::JoinSet::new();
        // Parts are read strictly in order (the hash needs them in order) and uploaded a few at a time.
        for i in 0..count {
            let offset = i * PART_BYTES;
            let len = PART_BYTES.min(size - offset) as usize;
            let f = file.clone();
            let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let mut buf = vec![0u8; len];
                std::os::unix::fs::FileExt::read_exact_at(&*f, &mut buf, offset)?;
                Ok(buf)
            })
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    StoreError::Changed(path.to_string())
                } else {
                    e.into()
                }
            })?;
            hasher.update(&data);
            while inflight.len() >= self.part_concurrency {
                parts.push(join_part(inflight.join_next().await)?);
            }
            let (client, bucket, key, upload_id) =
                (self.client.clone(), self.bucket.clone(), key.to_string(), upload_id.to_string());
            let number = i as i32 + 1;
            inflight.spawn(async move {
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(Bytes::from(data)))
                    .send()
                    .await
                    .map_err(|e| unavailable("upload part", e))?;
                Ok(CompletedPart::builder().part_number(number).set_e_tag(out.e_tag().map(str::to_string)).build())
            });
        }
        while !inflight.is_empty() {
            parts.push(join_part(inflight.join_next().await)?);
        }
        // Anything appended past the hashed size also counts as a change.
        let grew = file.metadata().map(|m| m.len() != size).unwrap_or(true);
        let got = hex::encode(hasher.finalize());
        if grew || got != hash {
            return Err(StoreError::Changed(path.to_string()));
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

#[async_trait::async_trait]
impl WorkspaceStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    async fn get_manifest(&self, session: &str) -> Result<Option<Bytes>, StoreError> {
        let key = format!("{}manifest.json", self.session_prefix(session)?);
        match self.client.get_object().bucket(&self.bucket).key(&key).send().await {
            Ok(out) => {
                let body =
                    out.body.collect().await.map_err(|e| StoreError::Unavailable(format!("read manifest: {e}")))?;
                Ok(Some(body.into_bytes()))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(unavailable("get manifest", e)),
        }
    }

    async fn put_manifest(&self, session: &str, body: Bytes) -> Result<(), StoreError> {
        let key = format!("{}manifest.json", self.session_prefix(session)?);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| unavailable("put manifest", e))?;
        Ok(())
    }

    async fn put_blob(&self, session: &str, hash: &str, body: BlobBody) -> Result<(), StoreError> {
        let key = self.blob_key(session, hash)?;
        match body {
            BlobBody::Bytes(b) => {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .body(ByteStream::from(b))
                    .send()
                    .await
                    .map_err(|e| unavailable("put blob", e))?;
                Ok(())
            }
            BlobBody::File { file, size, path } => self.put_multipart(&key, hash, file, size, &path).await,
        }
    }

    async fn get_blob(
        &self,
        session: &str,
        hash: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let key = self.blob_key(session, hash)?;
        let out = match self.client.get_object().bucket(&self.bucket).key(&key).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(StoreError::NotFound(format!("blob {hash} of {session}")))
            }
            Err(e) => return Err(unavailable("get blob", e)),
        };
        let body = out.body;
        Ok(futures::stream::unfold(body, |mut body| async move {
            match body.next().await {
                Some(Ok(b)) => Some((Ok(b), body)),
                Some(Err(e)) => Some((Err(StoreError::Unavailable(format!("read blob: {e}"))), body)),
                None => None,
            }
        })
        .boxed())
    }

    async fn delete_blobs(&self, session: &str, hashes: &[String]) -> Result<(), StoreError> {
        let keys = hashes.iter().map(|h| self.blob_key(session, h)).collect::<Result<Vec<_>, _>>()?;
        self.delete_keys(keys, "delete blobs").await
    }

    async fn delete_session(&self, session: &str) -> Result<(), StoreError> {
        let prefix = self.session_prefix(session)?;
        // The manifest goes first, so a half-finished delete never looks like a workspace.
        let manifest = format!("{prefix}manifest.json");
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&manifest)
            .send()
            .await
            .map_err(|e| unavailable("delete manifest", e))?;
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(&prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| unavailable("list session objects", e))?;
            let keys: Vec<String> = page
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .filter(|k| k.starts_with(&prefix))
                .map(str::to_string)
                .collect();
            self.delete_keys(keys, "delete session objects").await?;
        }
        Ok(())
    }

    async fn presign_blob(
        &self,
        session: &str,
        hash: &str,
        filename: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        let key = self.blob_key(session, hash)?;
        let cfg = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl)
            .map_err(|e| StoreError::Unsupported(e.to_string()))?;
        // Quote-safe file name for Content-Disposition.
        let name: String = filename.chars().filter(|c| !c.is_control() && *c != '"' && *c != '\\').collect();
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .response_content_disposition(format!("attachment; filename=\"{name}\""))
            .presigned(cfg)
            .await
            .map_err(|e| unavailable("presign", e))?;
        Ok(req.uri().to_string())
    }
}
