//! The HTTP metadata server's key space: docs/wire-formats.md section 5 semantics without the HTTP layer,
//! with an optional persist log behind it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, mpsc};

use bytes::Bytes;
use mooncake_core::sync;

use crate::persist::{self, LoadError, Record, WriteRequest};

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored (and on disk, when persisting).
    Stored,
    /// An `rpc_meta` key already holds a different value (upstream answers 400).
    DuplicateRpcMeta,
    /// Storing it would take the key space past its byte limit.
    Full,
}

/// Why a change could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Writing or syncing the log failed for this change.
    #[error("persisting the change failed: {0}")]
    Write(std::io::Error),
    /// An earlier write failed; the server refuses changes until it is restarted.
    #[error("the persist file could not be written earlier; the server serves reads only until restarted")]
    Broken,
}

struct Entries {
    map: HashMap<String, Bytes>,
    bytes: u64,
}

/// Keys and values, with the rules of upstream's HTTP metadata server.
pub struct KeySpace {
    entries: RwLock<Entries>,
    max_total_bytes: u64,
    writer: Option<mpsc::Sender<WriteRequest>>,
    broken: AtomicBool,
}

fn entry_cost(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl KeySpace {
    /// An in-memory key space holding at most `max_total_bytes` of keys and values.
    pub fn in_memory(max_total_bytes: u64) -> Self {
        KeySpace {
            entries: RwLock::new(Entries { map: HashMap::new(), bytes: 0 }),
            max_total_bytes,
            writer: None,
            broken: AtomicBool::new(false),
        }
    }

    /// A key space loaded from (and persisted to) `path`; starts the writer thread.
    pub fn persistent(path: PathBuf, max_total_bytes: u64) -> Result<Self, LoadError> {
        let (replay, file) = persist::open(&path)?;
        let bytes = replay.entries.iter().map(|(k, v)| entry_cost(k, v)).sum();
        tracing::info!(path = %path.display(), keys = replay.entries.len(), bytes, "metadata loaded from the persist file");
        let (tx, rx) = mpsc::channel();
        let writer = persist::LogWriter::new(path, file, replay.entries.clone());
        std::thread::Builder::new()
            .name("mc-metadata-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| LoadError::Io { path: PathBuf::from("<writer thread>"), source })?;
        Ok(KeySpace {
            entries: RwLock::new(Entries { map: replay.entries, bytes }),
            max_total_bytes,
            writer: Some(tx),
            broken: AtomicBool::new(false),
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        sync::read(&self.entries).map.len()
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        sync::read(&self.entries).map.get(key).cloned()
    }

    /// Sets `key`; an existing `rpc_meta` key may only be re-put with the same value.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<PutOutcome, PersistError> {
        let pending = {
            let mut e = sync::write(&self.entries);
            let old = e.map.get(key);
            if key.contains("rpc_meta") && old.is_some_and(|o| *o != value) {
                return Ok(PutOutcome::DuplicateRpcMeta);
            }
            if old == Some(&value) {
                return Ok(PutOutcome::Stored);
            }
            let freed = old.map_or(0, |o| entry_cost(key, o));
            let bytes = e.bytes - freed + entry_cost(key, &value);
            if bytes > self.max_total_bytes && bytes > e.bytes {
                return Ok(PutOutcome::Full);
            }
            // Log order must equal map order: enqueue while holding the lock.
            let pending = self.enqueue(Record::Put(key.to_string(), value.clone()))?;
            e.map.insert(key.to_string(), value);
            e.bytes = bytes;
            pending
        };
        self.await_durable(pending).await.map(|()| PutOutcome::Stored)
    }

    /// Removes `key`; `false` when it was absent.
    pub async fn delete(&self, key: &str) -> Result<bool, PersistError> {
        let pending = {
            let mut e = sync::write(&self.entries);
            let Some(old_len) = e.map.get(key).map(|v| entry_cost(key, v)) else { return Ok(false) };
            let pending = self.enqueue(Record::Delete(key.to_string()))?;
            e.map.remove(key);
            e.bytes -= old_len;
            pending
        };
        self.await_durable(pending).await.map(|()| true)
    }

    fn enqueue(
        &self,
        record: Record,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>, PersistError> {
        let Some(writer) = &self.writer else { return Ok(None) };
        if self.broken.load(Ordering::Acquire) {
            return Err(PersistError::Broken);
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = writer.send(WriteRequest { records: vec![record], done });
        if sent.is_err() {
            self.broken.store(true, Ordering::Release);
            return Err(PersistError::Broken);
        }
        Ok(Some(wait))
    }

    async fn await_durable(
        &self,
        pending: Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
    ) -> Result<(), PersistError> {
        let Some(wait) = pending else { return Ok(()) };
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken.store(true, Ordering::Release);
                Err(PersistError::Write(e))
            }
            Err(_) => {
                self.broken.store(true, Ordering::Release);
                Err(PersistError::Broken)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn upstream_put_rules() {
        let ks = KeySpace::in_memory(1 << 20);
        run(async {
            assert_eq!(ks.put("mooncake/rpc_meta/a", Bytes::from_static(b"1")).await.unwrap(), PutOutcome::Stored);
            assert_eq!(ks.put("mooncake/rpc_meta/a", Bytes::from_static(b"1")).await.unwrap(), PutOutcome::Stored);
            assert_eq!(
                ks.put("mooncake/rpc_meta/a", Bytes::from_static(b"2")).await.unwrap(),
                PutOutcome::DuplicateRpcMeta
            );
            assert_eq!(ks.get("mooncake/rpc_meta/a").unwrap(), Bytes::from_static(b"1"));
            assert_eq!(ks.put("mooncake/ram/a", Bytes::from_static(b"1")).await.unwrap(), PutOutcome::Stored);
            assert_eq!(ks.put("mooncake/ram/a", Bytes::from_static(b"2")).await.unwrap(), PutOutcome::Stored);
            assert!(ks.delete("mooncake/rpc_meta/a").await.unwrap());
            assert!(!ks.delete("mooncake/rpc_meta/a").await.unwrap());
            assert_eq!(ks.put("mooncake/rpc_meta/a", Bytes::from_static(b"3")).await.unwrap(), PutOutcome::Stored);
        });
    }

    #[test]
    fn byte_limit_refuses_growth_but_allows_shrinking() {
        let ks = KeySpace::in_memory(100);
        run(async {
            assert_eq!(ks.put("a", vec![0; 90].into()).await.unwrap(), PutOutcome::Stored);
            assert_eq!(ks.put("b", vec![0; 20].into()).await.unwrap(), PutOutcome::Full);
            assert_eq!(ks.put("a", vec![0; 10].into()).await.unwrap(), PutOutcome::Stored);
            assert_eq!(ks.put("b", vec![0; 20].into()).await.unwrap(), PutOutcome::Stored);
            assert!(ks.delete("a").await.unwrap());
            assert_eq!(ks.put("c", vec![0; 70].into()).await.unwrap(), PutOutcome::Stored);
        });
    }

    #[test]
    fn persistent_space_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        {
            let ks = KeySpace::persistent(path.clone(), 1 << 20).unwrap();
            run(async {
                ks.put("k1", Bytes::from_static(b"v1")).await.unwrap();
                ks.put("k2", Bytes::from_static(b"v2")).await.unwrap();
                ks.delete("k1").await.unwrap();
                ks.put("mooncake/rpc_meta/x", Bytes::from_static(b"{}")).await.unwrap();
            });
        }
        let ks = KeySpace::persistent(path, 1 << 20).unwrap();
        assert_eq!(ks.len(), 2);
        assert_eq!(ks.get("k2").unwrap(), Bytes::from_static(b"v2"));
        assert!(ks.get("k1").is_none());
        // Still guarded after the restart.
        let r = run(ks.put("mooncake/rpc_meta/x", Bytes::from_static(b"other"))).unwrap();
        assert_eq!(r, PutOutcome::DuplicateRpcMeta);
    }
}
