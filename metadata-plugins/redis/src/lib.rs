//! The Redis metadata store: segment descriptors and RPC locations (docs/wire-formats.md section 1) kept in a
//! Redis server named by `redis://host:port`, in the same layout as upstream Mooncake (plain
//! `SET`/`GET`/`DEL` of `mooncake/ram/<segment>` and `mooncake/rpc_meta/<segment>`, raw bytes),
//! so upstream engines and ours can share one Redis.
//!
//! Connection string: `redis://[user[:password]@]host[:port][/db]` (upstream writes
//! `redis://host:port`). What it leaves out comes from the environment, as upstream:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `MC_REDIS_USERNAME` | user name for `AUTH` (Redis 6 ACL) | none |
//! | `MC_REDIS_PASSWORD` | password for `AUTH` | none (no `AUTH`) |
//! | `MC_REDIS_DB_INDEX` | database selected with `SELECT` | 0 |
//! | `MC_METADATA_TIMEOUT_MS` | connect and per-command timeout, milliseconds | 3000 |
//!
//! Values in the connection string win over the environment. `rediss://` (TLS) is rejected:
//! this build carries no TLS stack. See [`RedisMetadataStore`] for leases, `list`, reconnection
//! and why `watch` is not offered.
//!
//! Linking this crate registers the store as `redis` (call [`link`] or write
//! `use mooncake_metadata_redis as _;` in a binary that does not otherwise name it).
//!
//! ```no_run
//! use std::time::Duration;
//! use mooncake_core::MetadataStore;
//! use mooncake_metadata_redis::RedisMetadataStore;
//!
//! # async fn demo() -> mooncake_core::Result<()> {
//! let store = RedisMetadataStore::from_conn("redis://127.0.0.1:6379")?; // does not connect yet
//! store.put("mooncake/rpc_meta/n1", br#"{"ip_or_host_name":"10.0.0.1","rpc_port":15123}"#).await?;
//! // Renewed in the background; gone after `close`, or a TTL after this process dies.
//! store.put_with_lease("mooncake/ram/n1", b"{}", Duration::from_secs(10)).await?;
//! for (key, value) in store.list("mooncake/").await? {
//!     println!("{key}: {} bytes", value.len());
//! }
//! store.close().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod config;
mod connection;
mod store;

use std::sync::Arc;

pub use config::{
    DEFAULT_PORT, DEFAULT_TIMEOUT, ENV_DB_INDEX, ENV_PASSWORD, ENV_TIMEOUT_MS, ENV_USERNAME, RedisConfig, accepts,
};
pub use store::RedisMetadataStore;

use mooncake_core::registry::MetadataFactory;
use mooncake_core::{MetadataStore, Result};

/// Does nothing; call it (or write `use mooncake_metadata_redis as _;`) from a final binary so
/// the linker keeps this crate and its registry entry.
#[inline(never)]
pub fn link() {}

fn create_store(conn: &str) -> Result<Arc<dyn MetadataStore>> {
    Ok(Arc::new(RedisMetadataStore::from_conn(conn)?))
}

mooncake_core::inventory::submit! {
    MetadataFactory {
        name: "redis",
        summary: "redis://host:port: keys in a Redis server (MC_REDIS_USERNAME / MC_REDIS_PASSWORD / MC_REDIS_DB_INDEX)",
        accepts,
        create: create_store,
    }
}
