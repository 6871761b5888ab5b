//! Defaults and hard limits. Every limit here is enforced by the server that
//! receives the request, and named in the error when it is exceeded.

use std::time::Duration;

/// Default CPU limit for a session, in millicores.
pub const DEFAULT_CPU_MILLIS: u32 = 1000;
/// Default CPU a session reserves on its node for placement, in millicores,
/// when it gives neither a CPU limit nor a request. Sandboxes are mostly idle,
/// so a default session reserves a tenth of a core and may burst to its limit
/// (as Kubernetes separates requests from limits). A session that sets only
/// `cpu_millis` reserves all of it.
pub const DEFAULT_CPU_REQUEST_MILLIS: u32 = 100;
/// Default memory for a session, in bytes (512 MiB).
pub const DEFAULT_MEMORY_BYTES: u64 = 512 * 1024 * 1024;
/// Default pids limit for a session.
pub const DEFAULT_PIDS_LIMIT: u32 = 128;
/// Default session time to live.
pub const DEFAULT_TTL_SECONDS: u64 = 3600;

/// Default disk quota of a session, in bytes (1 GiB).
pub const DEFAULT_DISK_BYTES: u64 = 1024 * 1024 * 1024;
/// Smallest disk quota (64 MiB).
pub const MIN_DISK_BYTES: u64 = 64 * 1024 * 1024;
/// Largest disk quota (1 TiB).
pub const MAX_DISK_BYTES: u64 = 1024 * 1024 * 1024 * 1024;
/// Without `disk_inodes`, a session may have one inode per this many bytes of
/// its disk quota (65,536 for the default 1 GiB).
pub const DEFAULT_DISK_BYTES_PER_INODE: u64 = 16 * 1024;
/// A session may ask for at most one inode per this many bytes of disk quota
/// (the inode table is 256 bytes an inode, taken from the quota).
pub const MIN_DISK_BYTES_PER_INODE: u64 = 4096;
/// Fewest inodes a session may have.
pub const MIN_DISK_INODES: u64 = 1024;
/// Most inodes a session may have.
pub const MAX_DISK_INODES: u64 = 4 * 1024 * 1024;

/// Smallest memory a session may ask for (16 MiB): less cannot start an interpreter.
pub const MIN_MEMORY_BYTES: u64 = 16 * 1024 * 1024;
/// Largest memory a session may ask for (16 TiB). Below this, a size no node can hold is
/// RESOURCE_EXHAUSTED at create; above it the request is OUT_OF_RANGE.
pub const MAX_MEMORY_BYTES: u64 = 16 * 1024 * 1024 * 1024 * 1024;
/// Smallest CPU a session may ask for, in millicores.
pub const MIN_CPU_MILLIS: u32 = 10;
/// Largest CPU a session may ask for, in millicores.
pub const MAX_CPU_MILLIS: u32 = 1_024_000;
/// Smallest pids limit.
pub const MIN_PIDS_LIMIT: u32 = 8;
/// Largest pids limit.
pub const MAX_PIDS_LIMIT: u32 = 32_768;
/// Longest session time to live (7 days).
pub const MAX_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// Longest `restart_policy.lost_after_ms` (one hour).
pub const MAX_LOST_AFTER_MS: u64 = 3_600_000;
/// Most restart attempts a session may ask for.
pub const MAX_RESTART_ATTEMPTS: u32 = 1000;
/// Longest restart backoff, however many losses (also the cap of its doubling).
pub const MAX_RESTART_BACKOFF_MS: u64 = 60_000;
/// Most env entries in a spec or an exec.
pub const MAX_ENV_ENTRIES: usize = 128;
/// Longest env value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Most labels on a session or a node.
pub const MAX_LABELS: usize = 64;
/// Longest reason of a node's hold (why its agent cordons or drains it), in bytes.
pub const MAX_HOLD_REASON_BYTES: usize = 256;
/// Longest OCI image reference a template or an agent may name, in bytes.
pub const MAX_IMAGE_REF_BYTES: usize = 512;
/// Most images one agent may advertise.
pub const MAX_NODE_IMAGES: usize = 4096;
/// Most cluster templates (besides the built-in ones).
pub const MAX_TEMPLATES: usize = 1000;

/// Most sessions in one batch (CreateSessions).
pub const MAX_BATCH_REPLICAS: u32 = 10_000;
/// Most bytes of keys and values in all the patches of one batch (1 MiB), so
/// the batch's Raft entry stays well under a gRPC message.
pub const MAX_BATCH_PATCH_BYTES: usize = 1024 * 1024;

/// Largest page of ListSessions.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the client gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// Default exec timeout.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest exec timeout.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest `code` in an exec, in bytes.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Most argv entries in an exec.
pub const MAX_ARGV: usize = 1024;
/// Most argv bytes in all.
pub const MAX_ARGV_BYTES: usize = 256 * 1024;
/// Largest stdin of an exec.
pub const MAX_STDIN_BYTES: usize = 1024 * 1024;
/// Output cap per exec (stdout and stderr together). Past it the command is killed.
pub const DEFAULT_OUTPUT_CAP_BYTES: u64 = 16 * 1024 * 1024;
/// Largest output chunk the agent sends.
pub const OUTPUT_CHUNK_BYTES: usize = 64 * 1024;

/// Largest chunk of a WriteFile stream.
pub const MAX_WRITE_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest file accepted by WriteFile.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024 * 1024;
/// Chunk size of ReadFile.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Longest workspace path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// Largest gRPC message any Sandfleet server decodes (a 1 MiB chunk plus headroom).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
