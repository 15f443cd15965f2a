//! Where other engines are: a segment name resolved to its handshake socket and descriptor, in
//! P2P mode (the name is the address) and metadata mode (`rpc_meta` and `ram` keys). The engine
//! uses it for notifications and probes, and hands it to transports as their [`PeerHandshake`].

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::config::{join_host_port, split_host_port};
use crate::descriptor::SegmentDescriptor;
use crate::error::{Error, Result};
use crate::metadata::{MetadataKeys, MetadataStore, RpcMeta};
use crate::rpc::PeerRpc;
use crate::transport::PeerHandshake;

/// Resolves segment names through the engine's metadata store and reaches peers through its
/// peer RPC client.
pub(super) struct PeerDirectory {
    pub(super) p2p: bool,
    pub(super) metadata: Arc<dyn MetadataStore>,
    pub(super) keys: MetadataKeys,
    pub(super) rpc: Arc<dyn PeerRpc>,
}

impl PeerDirectory {
    /// The segment's published descriptor.
    pub(super) async fn fetch_descriptor(&self, name: &str) -> Result<SegmentDescriptor> {
        let key = self.keys.segment(name);
        let bytes = self
            .metadata
            .get(&key)
            .await?
            .ok_or_else(|| Error::NotFound(format!("segment {name:?} is not published (key {key})")))?;
        SegmentDescriptor::from_json(&bytes)
    }

    /// Host serving a segment's data ports: the rpc_meta address, else the name's host part.
    pub(super) async fn data_host(&self, name: &str) -> Result<String> {
        if !self.p2p {
            if let Ok(Some(bytes)) = self.metadata.get(&self.keys.rpc_meta(name)).await {
                if let Ok(meta) = serde_json::from_slice::<RpcMeta>(&bytes) {
                    return Ok(meta.ip_or_host_name);
                }
            }
        }
        Ok(split_host_port(name)?.0)
    }

    /// `host:port` of a segment's handshake socket.
    pub(super) async fn rpc_addr(&self, name: &str) -> Result<String> {
        if self.p2p {
            let (host, port) = split_host_port(name)?;
            let port =
                port.ok_or_else(|| Error::InvalidArgument(format!("P2P segment name {name:?} must be host:port")))?;
            return Ok(join_host_port(&host, port));
        }
        let bytes = self
            .metadata
            .get(&self.keys.rpc_meta(name))
            .await?
            .ok_or_else(|| Error::NotFound(format!("no rpc_meta for segment {name:?}")))?;
        let meta: RpcMeta = serde_json::from_slice(&bytes)?;
        Ok(join_host_port(&meta.ip_or_host_name, meta.rpc_port))
    }
}

#[async_trait]
impl PeerHandshake for PeerDirectory {
    async fn connect(&self, segment: &str, request: &Value) -> Result<Value> {
        let addr = self.rpc_addr(segment).await?;
        self.rpc.connect(&addr, request).await
    }

    async fn descriptor(&self, segment: &str) -> Result<SegmentDescriptor> {
        self.fetch_descriptor(segment).await
    }
}
