//! How the transport reaches a peer's handshake socket (WIRE.md section 3) to exchange queue-pair
//! numbers, behind a small trait so that the connection logic can be driven by a fake.
//!
//! Today's [`TransportContext`](mooncake_core::TransportContext) carries neither the engine's
//! [`PeerRpc`] nor a way to resolve a segment name to its RPC address, so [`PeerRpcChannel`]
//! creates its own client from the registry and addresses a segment by its name, which is the
//! RPC address (`host:port`) in P2P mode. In metadata mode (`rpc_meta` keys) the name need not
//! be an address: the engine must hand transports a resolver (see the crate docs).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{Error, PeerRpc, Result, SegmentDescriptor, join_host_port, split_host_port};
use serde_json::Value;

/// A request/reply channel to peers' handshake sockets.
#[async_trait]
pub trait HandshakeChannel: Send + Sync + 'static {
    /// Sends connection handshake `request` to segment `server` and returns its reply.
    async fn exchange(&self, server: &str, request: &Value) -> Result<Value>;

    /// Fetches segment `server`'s descriptor (for peers whose handshake lacks `local_gid`).
    async fn descriptor(&self, server: &str) -> Result<SegmentDescriptor>;
}

/// [`HandshakeChannel`] over the linked [`PeerRpc`] (`mooncake-metadata-p2p`), addressing a
/// segment by its name.
pub struct PeerRpcChannel {
    rpc: OnceLock<std::result::Result<Arc<dyn PeerRpc>, Error>>,
    timeout: Duration,
}

impl PeerRpcChannel {
    /// A channel whose requests are bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        PeerRpcChannel { rpc: OnceLock::new(), timeout }
    }

    fn rpc(&self) -> Result<Arc<dyn PeerRpc>> {
        self.rpc.get_or_init(mooncake_core::registry::create_peer_rpc).clone()
    }
}

/// The handshake address of segment `server`: its name when that is `host:port`.
pub fn rpc_address(server: &str) -> Result<String> {
    match split_host_port(server) {
        Ok((host, Some(port))) => Ok(join_host_port(&host, port)),
        _ => Err(Error::unavailable(format!(
            "cannot reach the handshake socket of segment {server:?}: its name is not host:port (P2P mode); \
             RDMA in metadata mode needs the engine to resolve rpc_meta for transports"
        ))),
    }
}

#[async_trait]
impl HandshakeChannel for PeerRpcChannel {
    async fn exchange(&self, server: &str, request: &Value) -> Result<Value> {
        let addr = rpc_address(server)?;
        let rpc = self.rpc()?;
        tokio::time::timeout(self.timeout, rpc.connect(&addr, request))
            .await
            .map_err(|_| Error::Timeout(self.timeout))?
    }

    async fn descriptor(&self, server: &str) -> Result<SegmentDescriptor> {
        let addr = rpc_address(server)?;
        let rpc = self.rpc()?;
        let bytes = tokio::time::timeout(self.timeout, rpc.fetch_descriptor(&addr))
            .await
            .map_err(|_| Error::Timeout(self.timeout))??;
        SegmentDescriptor::from_json(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2p_names_are_addresses() {
        assert_eq!(rpc_address("10.0.0.1:15123").unwrap(), "10.0.0.1:15123");
        assert_eq!(rpc_address("[fe80::1]:15000").unwrap(), "[fe80::1]:15000");
        assert!(matches!(rpc_address("prefill-0"), Err(Error::Unavailable { .. })));
    }

    #[test]
    fn without_a_linked_peer_rpc_the_channel_fails_typed() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ch = PeerRpcChannel::new(Duration::from_millis(200));
        // No mooncake-metadata-p2p in this crate's tests: the registry has no PeerRpc.
        let err = rt.block_on(ch.exchange("127.0.0.1:1", &serde_json::json!({}))).unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        let err = rt.block_on(ch.descriptor("not-an-address")).unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    }
}
