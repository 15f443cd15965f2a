//! Publication of this engine's segment descriptor and `rpc_meta`, and the keeper that puts them back when the
//! metadata service loses them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::timestamp::timestamp_now;
use super::{Inner, join_host_port};
use crate::descriptor::SegmentDescriptor;
use crate::error::{Error, Result};
use crate::metadata::RpcMeta;
use crate::sync;

impl Inner {
    pub(super) fn build_descriptor(&self) -> SegmentDescriptor {
        let mut desc = SegmentDescriptor {
            name: self.local_name.clone(),
            protocol: self.transports.first().map(|t| t.name().to_string()).unwrap_or_default(),
            timestamp: timestamp_now(),
            buffers: sync::lock(&self.buffers).values().cloned().collect(),
            ..Default::default()
        };
        if self.transports.len() > 1 {
            let names: Vec<Value> = self.transports.iter().map(|t| Value::from(t.name())).collect();
            desc.fields.insert(crate::descriptor::FIELD_PROTOCOLS, Value::Array(names));
        }
        for t in &self.transports {
            t.describe(&mut desc);
        }
        if desc.addressing() == crate::descriptor::Addressing::RegionOffset {
            // Peers name the shared region's bytes by offset (upstream's cxl): a buffer its transport published
            // with an offset is addressed by it; buffers without one are not in the region.
            desc.buffers.retain_mut(|b| match b.fields.get(crate::descriptor::FIELD_OFFSET).and_then(Value::as_u64) {
                Some(offset) => {
                    b.addr = offset;
                    true
                }
                None => false,
            });
        }
        desc
    }

    pub(super) async fn publish(&self) -> Result<()> {
        let _g = self.publish_lock.lock().await;
        let json = self.build_descriptor().to_json();
        *sync::write(&self.shared.descriptor_json) = Arc::from(json.as_str());
        let r = self.metadata.put(&self.keys.segment(&self.local_name), json.as_bytes()).await;
        self.publish_pending.store(r.is_err(), std::sync::atomic::Ordering::Release);
        r
    }

    /// Publishes after a local change. While the metadata service is unreachable the change
    /// still takes effect here (P2P peers and cached peers see it); the keeper publishes it once
    /// the service is back.
    pub(super) async fn publish_after_change(&self) -> Result<()> {
        match self.publish().await {
            Err(Error::Unavailable { reason }) if self.config.republish_interval > Duration::ZERO => {
                tracing::warn!(%reason, "metadata service unreachable; the descriptor will be published when it is back");
                Ok(())
            }
            r => r,
        }
    }

    fn rpc_meta_json(&self) -> Result<String> {
        let meta = RpcMeta { ip_or_host_name: self.rpc_host.clone(), rpc_port: self.rpc_port };
        Ok(serde_json::to_string(&meta)?)
    }

    /// Puts this engine's `rpc_meta`. A server that refuses to replace an existing one (upstream's
    /// HTTP server) gets it deleted first when the engine it names no longer answers.
    pub(super) async fn claim_rpc_meta(&self) -> Result<()> {
        let key = self.keys.rpc_meta(&self.local_name);
        let json = self.rpc_meta_json()?;
        match self.metadata.put(&key, json.as_bytes()).await {
            Err(Error::AlreadyExists(why)) => {
                let old = self.metadata.get(&key).await?.unwrap_or_default();
                let old_addr = serde_json::from_slice::<RpcMeta>(&old)
                    .map(|m| join_host_port(&m.ip_or_host_name, m.rpc_port))
                    .unwrap_or_default();
                let alive = !old_addr.is_empty()
                    && tokio::time::timeout(Duration::from_secs(3), self.rpc.probe(&old_addr))
                        .await
                        .is_ok_and(|r| r.is_ok());
                if alive {
                    return Err(Error::AlreadyExists(format!(
                        "segment name {:?} is in use by a live engine at {old_addr} ({why})",
                        self.local_name
                    )));
                }
                tracing::warn!(segment = %self.local_name, stale = %old_addr, "replacing the rpc_meta of an engine that no longer answers");
                self.metadata.delete(&key).await?;
                self.metadata.put(&key, json.as_bytes()).await
            }
            r => r,
        }
    }

    /// One round of the keeper: puts back keys the metadata service lost (it restarted empty)
    /// and publications that failed while it was down.
    async fn keep_published(&self) -> Result<()> {
        let key = self.keys.rpc_meta(&self.local_name);
        let want = self.rpc_meta_json()?;
        let present = self.metadata.get(&key).await?;
        let lost = present.as_deref() != Some(want.as_bytes());
        if lost {
            tracing::info!(segment = %self.local_name, "metadata service lost this engine's keys; publishing them again");
            self.claim_rpc_meta().await?;
        }
        if lost || self.publish_pending.load(std::sync::atomic::Ordering::Acquire) {
            self.publish().await?;
        }
        Ok(())
    }
}

/// Keeps a metadata-mode engine's keys published until the engine is gone.
pub(super) async fn keeper(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        if sync::lock(&inner.runtime).is_none() {
            return;
        }
        match inner.keep_published().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(segment = %inner.local_name, "metadata service reachable again; keys are published");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(segment = %inner.local_name, error = %e, "checking this engine's metadata keys failed; retrying");
            }
            Err(_) => {}
        }
        if Arc::strong_count(&inner) == 1 {
            // The engine was dropped during this round: shut it down off the runtime it owns.
            std::thread::spawn(move || drop(inner));
            return;
        }
    }
}
