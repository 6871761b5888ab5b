//! The `sandfleet.v1` gRPC contract.
//!
//! This crate owns the wire API and nothing else: the `.proto` file under
//! `proto/sandfleet/v1/` is compiled at build time (never committed) into
//! prost messages plus tonic clients and servers.
//!
//! # Layout
//! - [`v1`]: every message, enum and service of `sandfleet.v1`.

/// Generated code for the `sandfleet.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sandfleet.v1");
}
