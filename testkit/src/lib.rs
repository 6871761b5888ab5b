//! The Sandfleet test harness: owns starting real Sandfleet processes for the
//! end-to-end tests, the benchmarks and the chaos runner.
//!
//! Everything here drives the *built binaries* (`sandfleet-coordinator`,
//! `sandfleet-agent`, `sandfleet`) as separate processes, exactly as an
//! operator would run them, and talks to them over gRPC through the SDK.
//! Nothing links the coordinator or the agent in-process, so a test sees the
//! same startup, shutdown and crash behaviour production does.
//!
//! # Layout
//! - [`bins`]: where the binaries are ([`bin_path`]).
//! - [`process`]: [`Proc`], one supervised process: start it, wait for its
//!   typed ready line ([`ReadyLine`], from `sandfleet-common`), signal, kill,
//!   terminate and restart it, keep its log.
//! - [`cluster`]: [`ClusterBuilder`] / [`Cluster`]: start coordinators and
//!   agents as [`Proc`]s, wait until the cluster is ready, partition it, and
//!   print the logs when a test fails.
//! - [`containerd`]: [`containerd::Containerd`], a real containerd with its CRI plugin
//!   on its own socket and state, with the pause and sandbox images imported offline.
//! - [`facilities`]: [`require_sandbox_facilities`], the skip-or-fail gate for
//!   machines without root, bubblewrap or writable cgroups.
//! - [`host`]: looking at the host from the outside: processes in `/proc`,
//!   session cgroups under `/sys/fs/cgroup`, unique markers.
//! - [`netns`]: a network namespace per process on a per-cluster bridge, so
//!   that [`Cluster::partition`] can cut links (loopback where that is impossible).
//! - [`s3`]: [`s3::S3Server`], a real S3-compatible server (s3s-fs) in its own
//!   process, for workspace-store tests, the chaos runner and the benchmarks;
//!   [`s3fs`] is its storage (s3s-fs that lists by prefix and prunes empty directories).
//! - [`otlp`]: [`otlp::OtlpReceiver`], a test OTLP receiver (TraceService/Export) that
//!   keeps the spans the processes export, with their service names.
//! - [`tls`]: [`TestPki`], a CA per cluster and a certificate per process: every
//!   cluster runs mutual TLS unless built with `.tls(false)` (plaintext on loopback).
//! - [`health`]: asking a daemon's `grpc.health.v1` service (Check, Watch), as a probe does.
//! - [`prometheus`]: [`prometheus::Prometheus`], a real Prometheus server scraping
//!   the cluster's `--metrics-listen` listeners, asked through its HTTP API;
//!   [`require_prometheus`] is its skip-or-fail gate.
//! - [`helpers`]: small async helpers for tests and tools (create a session and
//!   wait for it, run a command, assert a gRPC code, retry until true).
//!
//! # Running
//! Build every binary first (`cargo build --workspace --bins`), then run the
//! tests (`cargo nextest run -p sandfleet-chaos -p sandfleet-testkit`). `scripts/test` does both.
//! Each test starts its own cluster in a fresh temporary directory; the
//! processes' stderr goes to `<tmp>/<name>.log`, and when a test panics the
//! tail of every log is printed and the directory is kept.
//!
//! # Environment
//! - `SANDFLEET_BIN_DIR`: directory of the binaries (default: next to the
//!   running test executable, i.e. `<target>/debug/`).
//! - `SANDFLEET_REQUIRE_FACILITIES=1`: fail instead of skipping when root,
//!   bubblewrap or writable cgroups are missing (CI sets it).
//! - `SANDFLEET_CHILD_LOG`: `RUST_LOG` for the started processes (default:
//!   `RUST_LOG` if set, else `info`).
//! - `SANDFLEET_KEEP_TMP=1`: keep every cluster directory, not only failed ones.
//! - `SANDFLEET_TEST_TMPDIR`: where cluster directories are created (default: the
//!   system temporary directory).
//! - `SANDFLEET_PROMETHEUS_BIN`: the Prometheus server [`prometheus::Prometheus`]
//!   runs (default: `prometheus` on the `PATH`, Debian's package).
//! - `SANDFLEET_NETWORK=loopback|netns`: force the network of every cluster
//!   (default: namespaces where possible, else loopback with a warning; see [`netns`]).

pub mod bins;
pub mod cluster;
pub mod containerd;
pub mod facilities;
pub mod health;
pub mod helpers;
pub mod host;
pub mod linearizability;
pub mod netns;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod s3;
pub mod s3fs;
pub mod tls;

pub use bins::bin_path;
pub use cluster::{Cluster, ClusterBuilder, Target};
pub use facilities::{missing_facilities, require_docker, require_prometheus, require_sandbox_facilities};
pub use netns::{NetworkChoice, NetworkMode, PartitionsUnavailable};
pub use process::{Proc, Role};
pub use sandfleet_common::ready::{ReadyLine, DEV_READY_PREFIX};
pub use tls::{TestPki, TlsPaths};
