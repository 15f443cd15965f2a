//! The P2P handshake socket of docs/wire-formats.md section 3 and the `P2PHANDSHAKE` metadata store.
//!
//! Every engine runs a handshake socket: peers ask it for the segment descriptor (metadata
//! frame), deliver notifications, probe it, and exchange transport handshakes (RDMA queue pairs).
//! [`HandshakeRpc`] is that socket, wire-compatible with upstream Mooncake, and is registered as
//! the `handshake` [`mooncake_core::PeerRpc`]. [`P2pMetadataStore`] is the metadata backend for
//! the connection string `P2PHANDSHAKE`: it keeps this process's keys locally and fetches a
//! peer's descriptor from the peer itself.
//!
//! Linking this crate is enough for the engine to find both (call [`link`] or write
//! `use mooncake_metadata_p2p as _;` in a binary that does not otherwise name it).
//!
//! ```no_run
//! use std::sync::Arc;
//! use mooncake_core::{Notification, PeerRpc, RpcHandler};
//! use mooncake_metadata_p2p::{HandshakeConfig, HandshakeRpc};
//!
//! struct Me;
//! #[async_trait::async_trait]
//! impl RpcHandler for Me {
//!     fn local_descriptor(&self) -> String {
//!         r#"{"name":"127.0.0.1:15123","protocol":"tcp","buffers":[]}"#.into()
//!     }
//!     fn on_notify(&self, n: Notification) {
//!         println!("{}: {}", n.name, n.message);
//!     }
//!     async fn on_connection(&self, _request: serde_json::Value) -> serde_json::Value {
//!         serde_json::json!({ "reply_msg": "no RDMA here" })
//!     }
//! }
//!
//! # async fn demo() -> mooncake_core::Result<()> {
//! let rpc = HandshakeRpc::new(HandshakeConfig::default());
//! let port = rpc.serve("127.0.0.1", 0, (15000, 17000), Arc::new(Me)).await?;
//! let peer = format!("127.0.0.1:{port}");
//! rpc.probe(&peer).await?;
//! let descriptor = rpc.fetch_descriptor(&peer).await?; // the JSON bytes of its descriptor
//! # let _ = descriptor;
//! rpc.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod config;
pub mod frame;
mod server;
mod store;

use std::sync::Arc;

pub use client::HandshakeClient;
pub use config::HandshakeConfig;
pub use frame::{DEFAULT_MAX_FRAME_LENGTH, Frame, FrameType};
pub use server::{HandshakeRpc, NOTIFY_REPLY, PROBE_REPLY};
pub use store::{P2pKey, P2pMetadataStore};

use mooncake_core::registry::{MetadataFactory, PeerRpcFactory};
use mooncake_core::{MetadataStore, PeerRpc, Result};

/// True for the connection string of P2P mode (`P2PHANDSHAKE`, any case, surrounding blanks ignored).
pub fn accepts(conn: &str) -> bool {
    conn.trim().eq_ignore_ascii_case("P2PHANDSHAKE")
}

/// Does nothing; call it (or write `use mooncake_metadata_p2p as _;`) from a final binary so the
/// linker keeps this crate and its registry entries.
#[inline(never)]
pub fn link() {}

fn create_store(_conn: &str) -> Result<Arc<dyn MetadataStore>> {
    Ok(Arc::new(P2pMetadataStore::from_env()))
}

fn create_rpc() -> Arc<dyn PeerRpc> {
    Arc::new(HandshakeRpc::default())
}

mooncake_core::inventory::submit! {
    MetadataFactory {
        name: "p2p",
        summary: "P2PHANDSHAKE: no metadata service; descriptors are fetched from the peers themselves",
        accepts,
        create: create_store,
    }
}

mooncake_core::inventory::submit! {
    PeerRpcFactory { name: "handshake", create: create_rpc }
}
