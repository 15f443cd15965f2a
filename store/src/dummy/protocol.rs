//! The messages between dummy clients and the real client (carried by `mooncake-store-rpc`). Byte ranges are
//! `(offset, length)` pairs inside the dummy's pool.

use serde::{Deserialize, Serialize};

use crate::types::{ReplicateConfig, Result};

/// Service name both sides check in the RPC hello.
pub const SERVICE_NAME: &str = "mooncake-store-real-client";

/// Version of these messages; bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The RPC identity of the real client's service.
pub fn service_id() -> mooncake_store_rpc::ServiceId {
    mooncake_store_rpc::ServiceId::new(SERVICE_NAME, PROTOCOL_VERSION)
}

/// A request from a dummy client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DummyRequest {
    /// Map the pool file at `path` (`size` bytes) and register it; answered with [`DummyResponse::Attached`].
    Attach {
        /// The pool file (under `/dev/shm`, named by this module).
        path: String,
        /// Its length.
        size: u64,
    },
    /// Unregister and unmap a pool.
    Detach {
        /// The session `Attach` returned.
        session: u64,
    },
    /// Store (or, with `upsert`, replace) each key from a range of the pool.
    Write {
        /// The session.
        session: u64,
        /// Keys.
        keys: Vec<String>,
        /// One `(offset, length)` per key.
        ranges: Vec<(u64, u64)>,
        /// Replication settings.
        config: ReplicateConfig,
        /// Upsert instead of put.
        upsert: bool,
    },
    /// Read each key into a range of the pool (at most its length); answered with the bytes read.
    Read {
        /// The session.
        session: u64,
        /// Keys.
        keys: Vec<String>,
        /// One `(offset, capacity)` per key.
        ranges: Vec<(u64, u64)>,
    },
    /// Whether keys exist.
    Exist {
        /// Keys.
        keys: Vec<String>,
    },
    /// Object sizes.
    GetSize {
        /// Keys.
        keys: Vec<String>,
    },
    /// Removes keys.
    Remove {
        /// Keys.
        keys: Vec<String>,
        /// Also leased objects.
        force: bool,
    },
    /// Removes every key; answered with a count.
    RemoveAll {
        /// Also leased objects.
        force: bool,
    },
    /// The real client's segment name and health.
    Status,
}

/// The real client's answer; each request kind has one response kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DummyResponse {
    /// To `Attach`: the session id.
    Attached(Result<u64>),
    /// To `Detach`.
    Done(Result<()>),
    /// To `Write`, `Remove`.
    PerKey(Vec<Result<()>>),
    /// To `Read`, `GetSize`.
    Sizes(Vec<Result<u64>>),
    /// To `Exist`.
    Exist(Vec<Result<bool>>),
    /// To `RemoveAll`.
    Count(Result<u64>),
    /// To `Status`: segment name and health (0 ok, 1 closed, 2 master unreachable).
    Status(String, i32),
}
