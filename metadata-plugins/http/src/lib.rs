//! The HTTP metadata service of Mooncake (docs/wire-formats.md section 5): a client for
//! `http://host:port/metadata` and a server that speaks the same protocol as upstream's
//! `mooncake_http_metadata_server`, so our engines and upstream engines can share one.
//!
//! The server runs three ways: embedded ([`HttpMetadataServer::router`] merges its routes into
//! another axum app, [`HttpMetadataServer::serve`] runs it on the caller's runtime), on a thread
//! of its own ([`HttpMetadataServer::spawn`], for programs and tests), and as the program
//! `mooncake_http_metadata_server --host 0.0.0.0 --port 8080 [--persist PATH]`.
//!
//! Beyond upstream, `--persist PATH` keeps every key across restarts in a crash-safe append log
//! (see [`persist`]); without it keys live in memory only, as upstream.
//!
//! The client ([`HttpMetadataStore`], registered for `http://` connection strings) uses
//! upstream's timeouts: 3 s per request, 1.5 s to connect (`MC_METADATA_TIMEOUT_MS` sets the
//! request timeout; connecting gets half). A server that is down or silent gives
//! [`mooncake_core::Error::Unavailable`] within that time.
//!
//! ```no_run
//! use mooncake_core::MetadataStore;
//! use mooncake_metadata_http::{HttpMetadataServer, HttpMetadataStore, ServerConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = HttpMetadataServer::new(ServerConfig::new("127.0.0.1", 0))?.spawn()?;
//! let client = HttpMetadataStore::new(&server.url())?;
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let value = rt.block_on(async {
//!     client.put("mooncake/ram/node-a", br#"{"name":"node-a"}"#).await?;
//!     client.get("mooncake/ram/node-a").await
//! })?;
//! assert!(value.is_some());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod keyspace;
pub mod persist;
mod server;

use std::sync::Arc;

pub use client::{DEFAULT_TIMEOUT, HttpClientConfig, HttpMetadataStore};
pub use keyspace::{KeySpace, PersistError, PutOutcome};
pub use persist::LoadError;
pub use server::{
    BackgroundServer, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOTAL_BYTES, HttpMetadataServer, RunningServer, ServerConfig,
};

use mooncake_core::registry::MetadataFactory;
use mooncake_core::{MetadataStore, Result};

/// True for `http://` connection strings.
pub fn accepts(conn: &str) -> bool {
    conn.trim().starts_with("http://")
}

/// Does nothing; call it (or write `use mooncake_metadata_http as _;`) from a final binary so the
/// linker keeps this crate's registration.
#[inline(never)]
pub fn link() {}

fn create_store(conn: &str) -> Result<Arc<dyn MetadataStore>> {
    Ok(Arc::new(HttpMetadataStore::new(conn)?))
}

mooncake_core::inventory::submit! {
    MetadataFactory {
        name: "http",
        summary: "HTTP metadata server (http://host:port/metadata), ours or upstream's",
        accepts,
        create: create_store,
    }
}
