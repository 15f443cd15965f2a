//! The checkpoint catalogue in etcd, in upstream's layout: one key per checkpoint,
//! `mooncake/checkpoint/<name>`, whose value is the JSON of a [`Payload`]. Updates are compare-and-swap on the
//! key's mod revision; a payload with no holder left is deleted rather than written.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// Key prefix of every checkpoint (upstream's `METADATA_KEY_PREFIX`).
pub const KEY_PREFIX: &str = "mooncake/checkpoint/";

/// Where one copy of a shard lives: a segment (the engine's `host:port` name) and the address in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Segment name of the holder's engine.
    pub segment_name: String,
    /// Address of the shard's first byte in the holder's memory.
    pub offset: u64,
}

/// One shard: its length, the original holder(s) (`gold`) and the readers that hold a copy (`replica_list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Bytes in the shard.
    pub size: u64,
    /// Locations of the registering process (Go writes `null` for none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub gold: Vec<Location>,
    /// Locations of replicas made by `get_replica`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub replica_list: Vec<Location>,
}

impl Shard {
    /// Number of locations holding the shard.
    pub fn holders(&self) -> usize {
        self.gold.len() + self.replica_list.len()
    }
}

/// A checkpoint's catalogue entry (upstream's `Payload`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Checkpoint name (the key without the prefix).
    pub name: String,
    /// Total bytes over all buffers.
    pub size: u64,
    /// Length of each registered buffer, in order.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub size_list: Vec<u64>,
    /// Largest shard; each buffer is cut into shards of this size (the last one shorter).
    pub max_shard_size: u64,
    /// Shards of all buffers, buffer by buffer.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub shards: Vec<Shard>,
}

impl Payload {
    /// True when no shard has any holder (upstream deletes the key then).
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.holders() == 0)
    }
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// Cuts buffers of `sizes` into shards of at most `max_shard_size` bytes: `(buffer index, offset, length)`.
pub fn shard_layout(sizes: &[u64], max_shard_size: u64) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let mut off = 0;
        while off < size {
            let len = max_shard_size.min(size - off);
            out.push((i, off, len));
            off += len;
        }
    }
    out
}

/// The etcd side of the store.
#[derive(Clone)]
pub struct Catalogue {
    client: Client,
    prefix: String,
}

impl Catalogue {
    /// Connects to etcd at `endpoints` (`host:port`, with or without `http://`).
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let eps: Vec<String> =
            endpoints.iter().map(|e| if e.contains("://") { e.clone() } else { format!("http://{e}") }).collect();
        let opts =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(10));
        let client = Client::connect(eps, Some(opts)).await.map_err(|e| Error::Etcd(e.to_string()))?;
        Ok(Catalogue { client, prefix: KEY_PREFIX.to_string() })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The payload of `name` and the key's mod revision, or `None`.
    pub async fn get(&self, name: &str) -> Result<Option<(Payload, i64)>> {
        let resp = self.client.clone().get(self.key(name), None).await.map_err(etcd)?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(kv.value())?, kv.mod_revision()))),
        }
    }

    /// Creates `name` only if the key does not exist; `false` when it does.
    pub async fn create(&self, payload: &Payload) -> Result<bool> {
        let key = self.key(&payload.name);
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            encode(payload)?,
            None,
        )]);
        Ok(self.client.clone().txn(txn).await.map_err(etcd)?.succeeded())
    }

    /// Writes `name` whatever is there (upstream's forced register).
    pub async fn put(&self, payload: &Payload) -> Result<()> {
        self.client.clone().put(self.key(&payload.name), encode(payload)?, None).await.map_err(etcd)?;
        Ok(())
    }

    /// Replaces the payload if the key's mod revision is still `revision` (deletes it when it has no holder);
    /// `false` when another writer got there first.
    pub async fn update(&self, payload: &Payload, revision: i64) -> Result<bool> {
        let key = self.key(&payload.name);
        let op = if payload.is_empty() {
            TxnOp::delete(key.clone(), None)
        } else {
            TxnOp::put(key.clone(), encode(payload)?, None)
        };
        let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, revision)]).and_then([op]);
        Ok(self.client.clone().txn(txn).await.map_err(etcd)?.succeeded())
    }

    /// Every payload whose name starts with `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Payload>> {
        let start = self.key(prefix);
        let mut end = start.clone().into_bytes();
        end.push(0xff);
        let resp =
            self.client.clone().get(start.into_bytes(), Some(GetOptions::new().with_range(end))).await.map_err(etcd)?;
        resp.kvs().iter().map(|kv| decode(kv.value())).collect()
    }
}

fn etcd(e: etcd_client::Error) -> Error {
    Error::Etcd(e.to_string())
}

fn encode(p: &Payload) -> Result<Vec<u8>> {
    serde_json::to_vec(p).map_err(|e| Error::Catalogue(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<Payload> {
    serde_json::from_slice(bytes).map_err(|e| Error::Catalogue(format!("bad checkpoint JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_json_with_nulls() {
        let go = r#"{"name":"ck","size":10,"size_list":[10],"max_shard_size":8,
            "shards":[{"size":8,"gold":[{"segment_name":"h:1","offset":4096}],"replica_list":null},
                      {"size":2,"gold":null,"replica_list":[{"segment_name":"h:2","offset":8}]}]}"#;
        let p: Payload = serde_json::from_str(go).unwrap();
        assert_eq!(p.shards[0].replica_list, vec![]);
        assert_eq!(p.shards[1].gold, vec![]);
        assert_eq!(p.shards[1].replica_list[0].segment_name, "h:2");
        assert!(!p.is_empty());
        let back = serde_json::to_value(&p).unwrap();
        for field in ["name", "size", "size_list", "max_shard_size", "shards"] {
            assert!(back.get(field).is_some(), "{field}");
        }
        assert!(back["shards"][0].get("replica_list").is_some());
    }

    #[test]
    fn layout_cuts_each_buffer() {
        assert_eq!(shard_layout(&[10, 4], 4), vec![(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 4)]);
    }
}
