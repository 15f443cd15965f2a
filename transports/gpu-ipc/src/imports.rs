//! Peers' buffers mapped into this process: imported once per (segment, buffer, handle), kept until the peer's
//! descriptor changes or the transport shuts down, unmapped when the last transfer using them is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mooncake_core::{Allocation, BufferDesc, Error, MemoryDevice, Result, SharingHandle, sync};

use crate::flavor::Flavor;
use crate::section::{IpcBuffer, decode_fd_handle};
use crate::sys;

/// A peer's allocation mapped into this process.
pub(crate) struct Mapping {
    device: Arc<dyn MemoryDevice>,
    /// Where the exported allocation appears here.
    pub(crate) allocation: Allocation,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Err(e) = self.device.free(&self.allocation) {
            tracing::warn!(device = self.device.name(), error = %e, "unmapping a peer's GPU buffer failed");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    segment: String,
    buffer_addr: u64,
    handle: Vec<u8>,
}

/// Imported mappings by peer buffer.
#[derive(Default)]
pub(crate) struct Imports {
    map: Mutex<HashMap<Key, Arc<Mapping>>>,
}

impl Imports {
    /// The mapping of `buffer` of `segment`, importing its handle on first use. Two threads may import the
    /// same handle at once; the second mapping is dropped (unmapped) again.
    pub(crate) fn get(
        &self,
        flavor: &Flavor,
        device: &Arc<dyn MemoryDevice>,
        segment: &str,
        buffer: &BufferDesc,
        ipc: &IpcBuffer,
    ) -> Result<Arc<Mapping>> {
        let key = Key { segment: segment.to_string(), buffer_addr: buffer.addr, handle: ipc.handle.clone() };
        if let Some(m) = sync::lock(&self.map).get(&key) {
            return Ok(m.clone());
        }
        let mapping = Arc::new(import(flavor, device, segment, buffer, ipc)?);
        Ok(sync::lock(&self.map).entry(key).or_insert(mapping).clone())
    }

    /// Drops every mapping of `segment` (its descriptor changed or it went away).
    pub(crate) fn forget(&self, segment: &str) {
        sync::lock(&self.map).retain(|k, _| k.segment != segment);
    }

    /// Drops every mapping.
    pub(crate) fn clear(&self) {
        sync::lock(&self.map).clear();
    }

    /// Number of mappings held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        sync::lock(&self.map).len()
    }
}

fn import(
    flavor: &Flavor,
    device: &Arc<dyn MemoryDevice>,
    segment: &str,
    buffer: &BufferDesc,
    ipc: &IpcBuffer,
) -> Result<Mapping> {
    let context = |why: String| {
        Error::InvalidArgument(format!(
            "{} buffer {:#x} (+{}) of segment {segment:?}: {why}",
            flavor.protocol, buffer.addr, buffer.length
        ))
    };
    let kind = flavor.handle_kind(ipc.kind.as_deref(), ipc.handle.len()).map_err(context)?;
    let needed = ipc.offset.checked_add(buffer.length).ok_or_else(|| context("offset + length overflows".into()))?;
    let len = ipc.alloc_length.unwrap_or(needed);
    if len < needed {
        return Err(context(format!("the exported allocation ({len} bytes) ends before the buffer ({needed})")));
    }
    let handle = if Some(kind) == flavor.fd_handle {
        let (fd, pid) = decode_fd_handle(&ipc.handle)
            .ok_or_else(|| context(format!("a {kind} handle has 8 bytes, not {}", ipc.handle.len())))?;
        SharingHandle { kind: kind.to_string(), data: Vec::new(), fd: Some(Arc::new(sys::fetch_fd(pid, fd)?)), len }
    } else {
        SharingHandle { kind: kind.to_string(), data: ipc.handle.clone(), fd: None, len }
    };
    let allocation = device.import_handle(&handle)?;
    let mapping = Mapping { device: device.clone(), allocation };
    if mapping.allocation.len < needed {
        return Err(context(format!(
            "the imported mapping has {} bytes, the buffer needs {needed}",
            mapping.allocation.len
        )));
    }
    Ok(mapping)
}
