//! [`P2pMetadataStore`]: the `P2PHANDSHAKE` metadata "store", which has no service behind it.

use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;
use mooncake_core::{MetadataCapabilities, MetadataStore, Result, RpcMeta, split_host_port, sync};

use crate::client::HandshakeClient;
use crate::config::HandshakeConfig;

/// The metadata store of `P2PHANDSHAKE` mode.
///
/// What this process puts (its own descriptor and `rpc_meta`) stays in a local map and is what the
/// handshake server hands out. A `get` of another segment's descriptor key
/// (`<prefix>ram/<host:port>`) asks that peer directly with a metadata frame; a `get` of another
/// segment's `rpc_meta` key is derived from its name. Nothing is shared through a service, so
/// [`MetadataCapabilities::shared`] is false.
#[derive(Debug, Default)]
pub struct P2pMetadataStore {
    client: HandshakeClient,
    local: RwLock<BTreeMap<String, Vec<u8>>>,
}

/// What a key names, as far as this store cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum P2pKey {
    /// `<prefix>ram/<host:port>`: a peer's segment descriptor.
    Segment {
        /// The handshake address (`host:port`).
        addr: String,
    },
    /// `<prefix>rpc_meta/<host:port>`: a peer's RPC location.
    RpcMeta {
        /// Host part of the segment name.
        host: String,
        /// Port part of the segment name.
        port: u16,
    },
}

impl P2pKey {
    /// Classifies `key` (prefix `mooncake/` or `mooncake/<cluster_id>/`). `None` for anything that
    /// does not name a `host:port` segment.
    pub fn parse(key: &str) -> Option<P2pKey> {
        let (dir, name) = key.rsplit_once('/')?;
        let dir = dir.strip_prefix("mooncake")?;
        let kind = if dir == "/ram" || (dir.starts_with('/') && dir.ends_with("/ram")) {
            "ram"
        } else if dir == "/rpc_meta" || (dir.starts_with('/') && dir.ends_with("/rpc_meta")) {
            "rpc_meta"
        } else {
            return None;
        };
        // A name with brackets may hold ':' (`[::1]:15123`); rsplit_once above cut at the last '/',
        // which cannot appear in a host:port name.
        let (host, port) = split_host_port(name).ok()?;
        let port = port?;
        Some(match kind {
            "ram" => P2pKey::Segment { addr: mooncake_core::join_host_port(&host, port) },
            _ => P2pKey::RpcMeta { host, port },
        })
    }
}

impl P2pMetadataStore {
    /// A store whose peer requests use the given timeouts.
    pub fn new(config: HandshakeConfig) -> Self {
        P2pMetadataStore { client: HandshakeClient::new(config), local: RwLock::new(BTreeMap::new()) }
    }

    /// A store with `MC_HANDSHAKE_*` environment settings.
    pub fn from_env() -> Self {
        Self::new(HandshakeConfig::from_env())
    }

    fn local_get(&self, key: &str) -> Option<Vec<u8>> {
        sync::read(&self.local).get(key).cloned()
    }
}

#[async_trait]
impl MetadataStore for P2pMetadataStore {
    fn name(&self) -> &str {
        "p2p"
    }

    fn capabilities(&self) -> MetadataCapabilities {
        MetadataCapabilities { shared: false, lease: false, list: true, watch: false }
    }

    /// Local keys first; then a peer's descriptor over the handshake socket, or its `rpc_meta`
    /// derived from its name. A peer that cannot be reached gives
    /// [`mooncake_core::Error::RemoteDisconnected`] (refused, reset) or
    /// [`mooncake_core::Error::Timeout`].
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.local_get(key) {
            return Ok(Some(v));
        }
        match P2pKey::parse(key) {
            Some(P2pKey::Segment { addr }) => self.client.fetch_descriptor(&addr).await.map(Some),
            Some(P2pKey::RpcMeta { host, port }) => {
                Ok(Some(serde_json::to_vec(&RpcMeta { ip_or_host_name: host, rpc_port: port })?))
            }
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        sync::write(&self.local).insert(key.to_string(), value.to_vec());
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        Ok(sync::write(&self.local).remove(key).is_some())
    }

    /// Local keys only (peers are not enumerable).
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let map = sync::read(&self.local);
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_classification() {
        let seg = |a: &str| Some(P2pKey::Segment { addr: a.into() });
        assert_eq!(P2pKey::parse("mooncake/ram/10.0.0.1:15123"), seg("10.0.0.1:15123"));
        assert_eq!(P2pKey::parse("mooncake/prod/ram/10.0.0.1:15123"), seg("10.0.0.1:15123"));
        assert_eq!(P2pKey::parse("mooncake/a/b/ram/h:1"), seg("h:1"));
        assert_eq!(P2pKey::parse("mooncake/ram/[::1]:9"), seg("[::1]:9"));
        assert_eq!(
            P2pKey::parse("mooncake/rpc_meta/node1:15000"),
            Some(P2pKey::RpcMeta { host: "node1".into(), port: 15000 })
        );
        assert_eq!(P2pKey::parse("mooncake/c/rpc_meta/[::1]:7"), Some(P2pKey::RpcMeta { host: "::1".into(), port: 7 }));
        for none in [
            "mooncake/ram/node1",
            "mooncake/nvmeof/x",
            "other/ram/h:1",
            "mooncakeX/ram/h:1",
            "mooncake/xram/h:1",
            "mooncake/ram/h:0",
            "h:1",
            "",
        ] {
            assert_eq!(P2pKey::parse(none), None, "{none}");
        }
    }

    #[tokio::test]
    async fn local_keys() {
        let s = P2pMetadataStore::default();
        s.put("mooncake/ram/me:1", b"{\"a\":1}").await.unwrap();
        s.put("mooncake/rpc_meta/me:1", b"{}").await.unwrap();
        s.put("other", b"x").await.unwrap();
        assert_eq!(s.get("mooncake/ram/me:1").await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(s.get("nothing").await.unwrap(), None);
        let listed: Vec<String> = s.list("mooncake/").await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(listed, ["mooncake/ram/me:1", "mooncake/rpc_meta/me:1"]);
        assert!(s.delete("other").await.unwrap());
        assert!(!s.delete("other").await.unwrap());
        let meta = s.get("mooncake/rpc_meta/10.1.2.3:15001").await.unwrap().unwrap();
        let meta: RpcMeta = serde_json::from_slice(&meta).unwrap();
        assert_eq!(meta, RpcMeta { ip_or_host_name: "10.1.2.3".into(), rpc_port: 15001 });
        assert_eq!(s.capabilities(), MetadataCapabilities { shared: false, lease: false, list: true, watch: false });
    }
}
