//! The peer RPC channel of docs/wire-formats.md section 3 (metadata, notify, probe and connection frames).
//!
//! The engine always runs one: it answers metadata requests in P2P mode, receives notifications,
//! answers probes and routes transport handshakes (RDMA queue-pair exchange) in every mode.
//! `mooncake-metadata-p2p` implements it; the engine finds it through the registry.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::error::Result;
use crate::types::Notification;

/// What the engine does with incoming peer requests.
#[async_trait]
pub trait RpcHandler: Send + Sync + 'static {
    /// The current local segment descriptor JSON.
    fn local_descriptor(&self) -> String;
    /// A notification arrived.
    fn on_notify(&self, notification: Notification);
    /// A transport handshake (type 0 / legacy frame); returns the reply JSON.
    async fn on_connection(&self, request: Value) -> Value;
}

/// Client and server of the handshake socket.
#[async_trait]
pub trait PeerRpc: Send + Sync + 'static {
    /// Binds `bind_host:port` (port 0 = first free one in `port_range`) and serves `handler`.
    /// Returns the bound port.
    async fn serve(
        &self,
        bind_host: &str,
        port: u16,
        port_range: (u16, u16),
        handler: Arc<dyn RpcHandler>,
    ) -> Result<u16>;
    /// Asks peer `addr` (`host:port`) for its segment descriptor JSON.
    async fn fetch_descriptor(&self, addr: &str) -> Result<Vec<u8>>;
    /// Delivers a notification to peer `addr`.
    async fn notify(&self, addr: &str, notification: &Notification) -> Result<()>;
    /// Checks that peer `addr` answers.
    async fn probe(&self, addr: &str) -> Result<()>;
    /// Sends a transport handshake to peer `addr` and returns its reply.
    async fn connect(&self, addr: &str, request: &Value) -> Result<Value>;
    /// Stops serving.
    async fn shutdown(&self);
}
