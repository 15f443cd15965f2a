//! The etcd metadata store: segment descriptors and RPC locations kept in an etcd cluster, for
//! the connection strings `etcd://h1:2379,h2:2379` and bare `h1:2379[,h2:2379...]`.
//!
//! Keys and values are stored byte for byte as the engine gives them (`mooncake/ram/<segment>`,
//! `mooncake/rpc_meta/<segment>`, see docs/wire-formats.md section 1), so upstream Mooncake engines and ours
//! can share one etcd. Beyond get/put/delete the store offers:
//!
//! - **leases**: [`put_with_lease`](mooncake_core::MetadataStore::put_with_lease) keys are
//!   renewed in the background while the store lives, put again on a new lease if etcd loses
//!   theirs (a wiped or replaced server), and revoked on [`close`](mooncake_core::MetadataStore::close);
//! - **list** of a prefix and **watch** of a prefix, the watch following etcd across restarts;
//! - **failover** between the endpoints of the connection string, and reconnection after etcd
//!   comes back.
//!
//! Creating a store does no I/O. Every request gives up within the timeout with
//! [`Error::Unavailable`](mooncake_core::Error::Unavailable) naming the endpoints (a silent
//! endpoint gets a share of it before the next one is tried). Malformed connection strings give
//! [`Error::InvalidArgument`](mooncake_core::Error::InvalidArgument).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `MC_METADATA_TIMEOUT_MS` | connect timeout and per-request timeout, milliseconds (a positive integer) | 3000 |
//!
//! [`EtcdConfig`] sets the same from code.
//!
//! Linking this crate registers the backend as `etcd` (call [`link`] or write
//! `use mooncake_metadata_etcd as _;` in a binary that does not otherwise name it).
//!
//! ```no_run
//! use std::time::Duration;
//! use mooncake_core::MetadataStore;
//! use mooncake_metadata_etcd::EtcdMetadataStore;
//!
//! # async fn demo() -> mooncake_core::Result<()> {
//! let store = EtcdMetadataStore::new("etcd://127.0.0.1:2379")?;
//! store.put("mooncake/rpc_meta/node-a", br#"{"ip_or_host_name":"10.0.0.1","rpc_port":15123}"#).await?;
//! store.put_with_lease("mooncake/ram/node-a", b"{}", Duration::from_secs(10)).await?;
//! for (key, value) in store.list("mooncake/").await? {
//!     println!("{key}: {} bytes", value.len());
//! }
//! let mut changes = store.watch("mooncake/ram/").await?;
//! store.delete("mooncake/ram/node-a").await?;
//! println!("{:?}", changes.recv().await);
//! store.close().await; // stops renewals and revokes the leases
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod config;
mod conn;
mod lease;
mod store;
mod watch;

use std::sync::Arc;

pub use config::{DEFAULT_TIMEOUT, EtcdConfig, TIMEOUT_ENV};
pub use store::EtcdMetadataStore;

use mooncake_core::registry::MetadataFactory;
use mooncake_core::{MetadataStore, Result};

/// True for connection strings this backend handles: `etcd://...` (any case; a malformed one is
/// then rejected by creation with a message saying why) and bare `host:port[,host:port...]`.
/// False for `P2PHANDSHAKE`, `http://`, `https://`, `redis://`, other schemes and blank strings.
pub fn accepts(conn: &str) -> bool {
    config::accepts(conn)
}

/// Does nothing; call it (or write `use mooncake_metadata_etcd as _;`) from a final binary so
/// the linker keeps this crate and its registry entry.
#[inline(never)]
pub fn link() {}

fn create_store(conn: &str) -> Result<Arc<dyn MetadataStore>> {
    Ok(Arc::new(EtcdMetadataStore::new(conn)?))
}

mooncake_core::inventory::submit! {
    MetadataFactory {
        name: "etcd",
        summary: "etcd cluster (etcd://h1:2379,h2:2379): shared keys, leases with keep-alive, list, watch",
        accepts,
        create: create_store,
    }
}
