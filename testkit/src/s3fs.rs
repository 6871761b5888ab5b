//! [`PrefixFs`]: the test S3 server's storage, s3s-fs with two fixes that
//! matter under the chaos runner's churn (thousands of session prefixes
//! created and deleted per hour).
//!
//! s3s-fs 0.14 answers every `ListObjectsV2` by walking the *whole bucket*
//! and filtering by prefix afterwards, and it never removes the directories a
//! deleted key leaves behind. Together the cost of one prefix list grows with
//! every session the bucket ever held: in a 30-minute chaos run a single list
//! took over 120 s and starved the restores running beside it. Real S3 lists
//! by prefix in time proportional to the answer, so this wrapper makes the
//! test server behave like that:
//! - a list without a delimiter walks only the directory its prefix names;
//! - a delete removes the parent directories it leaves empty, up to the bucket.
//!
//! Every other operation (and a list with a delimiter) is s3s-fs's own.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use s3s_fs::FileSystem;
use tokio::sync::RwLock;

/// s3s-fs plus prefix-scoped listing and empty-directory pruning.
pub struct PrefixFs {
    inner: FileSystem,
    root: PathBuf,
    /// Writers hold it shared; pruning holds it exclusively, so a directory is
    /// never removed between a writer creating it and renaming a file into it.
    prune: Arc<RwLock<()>>,
}

impl std::fmt::Debug for PrefixFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixFs").field("root", &self.root).finish()
    }
}

/// One listed object.
struct Listed {
    key: String,
    size: u64,
    modified: std::time::SystemTime,
}

/// Keys are plain relative paths: no `..`, no root, no `.` segments.
fn relative(s: &str) -> Option<PathBuf> {
    let p = Path::new(s);
    p.components().all(|c| matches!(c, Component::Normal(_))).then(|| p.to_path_buf())
}

/// Walks `dir` (inside `bucket_root`) and returns the files whose key starts with `prefix`.
fn walk(bucket_root: &Path, dir: &Path, prefix: &str) -> std::io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut queue = vec![dir.to_path_buf()];
    while let Some(d) = queue.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            // Removed by a concurrent delete: nothing to list there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let ft = entry.file_type()?;
            let path = entry.path();
            if ft.is_dir() {
                queue.push(path);
                continue;
            }
            let Ok(rel) = path.strip_prefix(bucket_root) else { continue };
            let Some(key) = rel.to_str().map(str::to_string) else { continue };
            if !key.starts_with(prefix) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            out.push(Listed { key, size: meta.len(), modified: meta.modified()? });
        }
    }
    Ok(out)
}

impl PrefixFs {
    /// Serves the buckets under `root`.
    pub fn new(root: &Path) -> Result<Self, String> {
        let inner = FileSystem::new(root).map_err(|e| format!("{e:?}"))?;
        let root = std::fs::canonicalize(root).map_err(|e| e.to_string())?;
        Ok(Self { inner, root, prune: Arc::new(RwLock::new(())) })
    }

    fn bucket_root(&self, bucket: &str) -> S3Result<PathBuf> {
        let rel =
            relative(bucket).filter(|p| p.components().count() == 1).ok_or_else(|| s3_error!(InvalidBucketName))?;
        let path = self.root.join(rel);
        if !path.is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        Ok(path)
    }

    /// Removes the now-empty parent directories of deleted keys, deepest first, up to the bucket.
    async fn prune_parents(&self, bucket: &str, keys: Vec<String>) {
        let Ok(bucket_root) = self.bucket_root(bucket) else { return };
        let _excl = self.prune.write().await;
        let _ = tokio::task::spawn_blocking(move || {
            for key in keys {
                let Some(rel) = relative(&key) else { continue };
                let mut dir = bucket_root.join(rel);
                while dir.pop() && dir.starts_with(&bucket_root) && dir != bucket_root {
                    // Fails (and stops) at the first directory that still holds something.
                    if std::fs::remove_dir(&dir).is_err() {
                        break;
                    }
                }
            }
        })
        .await;
    }
}

#[async_trait::async_trait]
impl S3 for PrefixFs {
    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        if req.input.delimiter.is_some() {
            return self.inner.list_objects_v2(req).await;
        }
        let input = req.input;
        let bucket_root = self.bucket_root(&input.bucket)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        // The deepest directory the prefix names: "a/b/c" -> "a/b", "a/b/" -> "a/b".
        let dir_part = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
        let dir = if dir_part.is_empty() {
            bucket_root.clone()
        } else {
            bucket_root.join(relative(dir_part).ok_or_else(|| s3_error!(InvalidArgument, "bad prefix"))?)
        };
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000);
        let (root2, prefix2) = (bucket_root.clone(), prefix.clone());
        let mut objects = tokio::task::spawn_blocking(move || walk(&root2, &dir, &prefix2))
            .await
            .map_err(|e| s3_error!(InternalError, "list task: {e}"))?
            .map_err(|e| s3_error!(InternalError, "list: {e}"))?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        let after = match (input.continuation_token.as_deref(), input.start_after.as_deref()) {
            (Some(t), Some(s)) => Some(t.max(s).to_string()),
            (Some(x), None) | (None, Some(x)) => Some(x.to_string()),
            (None, None) => None,
        };
        if let Some(after) = &after {
            objects.retain(|o| o.key.as_str() > after.as_str());
        }
        let take = usize::try_from(max_keys).unwrap_or(0);
        let is_truncated = objects.len() > take;
        objects.truncate(take);
        let next = if is_truncated { objects.last().map(|o| o.key.clone()) } else { None };
        let contents: Vec<Object> = objects
            .into_iter()
            .map(|o| Object {
                key: Some(o.key),
                size: Some(i64::try_from(o.size).unwrap_or(i64::MAX)),
                last_modified: Some(Timestamp::from(o.modified)),
                ..Default::default()
            })
            .collect();
        let output = ListObjectsV2Output {
            key_count: Some(i32::try_from(contents.len()).unwrap_or(i32::MAX)),
            max_keys: Some(max_keys),
            is_truncated: Some(is_truncated),
            contents: (!contents.is_empty()).then_some(contents),
            continuation_token: input.continuation_token,
            next_continuation_token: next,
            encoding_type: input.encoding_type,
            name: Some(input.bucket),
            prefix: input.prefix,
            start_after: input.start_after,
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.inner.delete_object(req).await?;
        self.prune_parents(&bucket, vec![key]).await;
        Ok(out)
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let bucket = req.input.bucket.clone();
        let keys = req.input.delete.objects.iter().map(|o| o.key.clone()).collect();
        let out = self.inner.delete_objects(req).await?;
        self.prune_parents(&bucket, keys).await;
        Ok(out)
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let _shared = self.prune.read().await;
        self.inner.put_object(req).await
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        let _shared = self.prune.read().await;
        self.inner.copy_object(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let _shared = self.prune.read().await;
        self.inner.complete_multipart_upload(req).await
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.inner.delete_bucket(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.inner.get_bucket_location(req).await
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        self.inner.get_object(req).await
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.inner.head_object(req).await
    }

    async fn list_buckets(&self, req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        self.inner.list_objects(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.inner.create_multipart_upload(req).await
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.inner.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let _shared = self.prune.read().await;
        self.inner.upload_part_copy(req).await
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        self.inner.list_parts(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.inner.abort_multipart_upload(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_plain_relative_paths() {
        assert!(relative("workspaces/s1/blobs/ab").is_some());
        assert!(relative("../etc/passwd").is_none());
        assert!(relative("a/../../b").is_none());
        assert!(relative("/abs").is_none());
    }

    #[test]
    fn walk_lists_only_under_the_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let b = tmp.path().join("bucket");
        for k in ["w/s1/manifest.json", "w/s1/blobs/aa", "w/s10/blobs/bb", "w/s2/blobs/cc"] {
            let p = b.join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, k).unwrap();
        }
        let mut keys: Vec<String> = walk(&b, &b.join("w/s1"), "w/s1/").unwrap().into_iter().map(|l| l.key).collect();
        keys.sort();
        assert_eq!(keys, ["w/s1/blobs/aa", "w/s1/manifest.json"]);
        // A prefix that is not a whole directory name still filters by string.
        let mut keys: Vec<String> = walk(&b, &b.join("w"), "w/s1").unwrap().into_iter().map(|l| l.key).collect();
        keys.sort();
        assert_eq!(keys, ["w/s1/blobs/aa", "w/s1/manifest.json", "w/s10/blobs/bb"]);
    }
}
