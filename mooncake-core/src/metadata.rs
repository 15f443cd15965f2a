//! The `MetadataStore` trait and the key layout of docs/wire-formats.md section 1.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a metadata store supports beyond get/put/delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetadataCapabilities {
    /// Other processes see what this one puts (false for the P2P store, which only serves locally).
    pub shared: bool,
    /// `put_with_lease` works.
    pub lease: bool,
    /// `list` works.
    pub list: bool,
    /// `watch` works.
    pub watch: bool,
}

/// A change seen by [`MetadataStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Key set to value.
    Put(String, Vec<u8>),
    /// Key deleted.
    Delete(String),
}

/// Where segment descriptors and RPC locations live (P2P handshake, HTTP, etcd, Redis).
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Backend name (`p2p`, `http`, `etcd`, `redis`).
    fn name(&self) -> &str;

    /// Optional features.
    fn capabilities(&self) -> MetadataCapabilities;

    /// The value of `key`, `None` when absent. A service that cannot be reached gives
    /// [`Error::Unavailable`] within the store's timeout.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Sets `key`.
    async fn put(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Deletes `key`; `false` when it was absent.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Sets `key` so that it disappears `ttl` after this process stops renewing it.
    async fn put_with_lease(&self, _key: &str, _value: &[u8], _ttl: Duration) -> Result<()> {
        Err(Error::unsupported("put_with_lease", self.name()))
    }

    /// Every key starting with `prefix`, with its value.
    async fn list(&self, _prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Err(Error::unsupported("list", self.name()))
    }

    /// A stream of changes under `prefix`.
    async fn watch(&self, _prefix: &str) -> Result<tokio::sync::mpsc::Receiver<WatchEvent>> {
        Err(Error::unsupported("watch", self.name()))
    }

    /// Stops background work (lease keep-alive, connections).
    async fn close(&self) {}
}

/// The key layout: `mooncake/[<cluster_id>/]ram/<segment>` and `.../rpc_meta/<segment>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataKeys {
    prefix: String,
}

impl MetadataKeys {
    /// Keys for an optional cluster id (`MC_METADATA_CLUSTER_ID`).
    pub fn new(cluster_id: Option<&str>) -> Self {
        let prefix = match cluster_id.map(str::trim).filter(|c| !c.is_empty()) {
            Some(id) => format!("mooncake/{}/", id.trim_matches('/')),
            None => "mooncake/".to_string(),
        };
        MetadataKeys { prefix }
    }

    /// Keys for the cluster id in `MC_METADATA_CLUSTER_ID`, if set.
    pub fn from_env() -> Self {
        Self::new(std::env::var("MC_METADATA_CLUSTER_ID").ok().as_deref())
    }

    /// The common prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Key of a segment descriptor (names with `/` map to `<prefix><name>`).
    pub fn segment(&self, name: &str) -> String {
        if name.contains('/') { format!("{}{name}", self.prefix) } else { format!("{}ram/{name}", self.prefix) }
    }

    /// Key of an RPC location.
    pub fn rpc_meta(&self, name: &str) -> String {
        format!("{}rpc_meta/{name}", self.prefix)
    }

    /// The segment name in a segment key, if it is one.
    pub fn segment_name<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str()).map(|rest| rest.strip_prefix("ram/").unwrap_or(rest))
    }
}

/// Value of an `rpc_meta` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcMeta {
    /// Address peers connect to.
    pub ip_or_host_name: String,
    /// Handshake port.
    pub rpc_port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        let k = MetadataKeys::new(None);
        assert_eq!(k.segment("10.0.0.1:1234"), "mooncake/ram/10.0.0.1:1234");
        assert_eq!(k.segment("nvmeof/x"), "mooncake/nvmeof/x");
        assert_eq!(k.rpc_meta("n"), "mooncake/rpc_meta/n");
        assert_eq!(k.segment_name("mooncake/ram/a:1"), Some("a:1"));
        let c = MetadataKeys::new(Some("prod"));
        assert_eq!(c.segment("a"), "mooncake/prod/ram/a");
        assert_eq!(MetadataKeys::new(Some(" ")).prefix(), "mooncake/");
    }

    #[test]
    fn rpc_meta_json() {
        let m: RpcMeta = serde_json::from_str(r#"{"ip_or_host_name":"10.0.0.1","rpc_port":15123}"#).unwrap();
        assert_eq!(m.rpc_port, 15123);
    }
}
