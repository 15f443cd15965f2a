//! Cache of opened remote segments: name <-> handle, current descriptor, staleness.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::sync;
use crate::transport::RemoteSegment;
use crate::types::SegmentHandle;

struct Entry {
    name: String,
    current: Option<Arc<RemoteSegment>>,
    stale: AtomicBool,
}

/// Handles are stable for the engine's life; descriptors are replaced on refresh.
#[derive(Default)]
pub(super) struct SegmentCache {
    by_name: RwLock<HashMap<String, SegmentHandle>>,
    entries: RwLock<HashMap<SegmentHandle, Entry>>,
    next: AtomicU64,
}

impl SegmentCache {
    /// The handle for `name`, creating an empty entry when new.
    pub(super) fn handle_for(&self, name: &str) -> SegmentHandle {
        if let Some(h) = sync::read(&self.by_name).get(name) {
            return *h;
        }
        let mut by_name = sync::write(&self.by_name);
        if let Some(h) = by_name.get(name) {
            return *h;
        }
        let h = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        by_name.insert(name.to_string(), h);
        sync::write(&self.entries)
            .insert(h, Entry { name: name.to_string(), current: None, stale: AtomicBool::new(false) });
        h
    }

    /// The cached descriptor of `name` when present and not stale.
    pub(super) fn cached_fresh(&self, name: &str) -> Option<Arc<RemoteSegment>> {
        let h = *sync::read(&self.by_name).get(name)?;
        let (seg, fresh) = self.get_with_freshness(h).ok()?;
        fresh.then_some(seg)
    }

    /// The segment name of a handle.
    pub(super) fn name_of(&self, h: SegmentHandle) -> Result<String> {
        let entries = sync::read(&self.entries);
        entries.get(&h).map(|e| e.name.clone()).ok_or_else(|| unknown(h))
    }

    /// The cached descriptor and whether it is fresh.
    pub(super) fn get_with_freshness(&self, h: SegmentHandle) -> Result<(Arc<RemoteSegment>, bool)> {
        let entries = sync::read(&self.entries);
        let e = entries.get(&h).ok_or_else(|| unknown(h))?;
        let seg = e.current.clone().ok_or_else(|| unknown(h))?;
        Ok((seg, !e.stale.load(Ordering::Acquire)))
    }

    /// The cached descriptor.
    pub(super) fn get(&self, h: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        self.get_with_freshness(h).map(|(s, _)| s)
    }

    /// Stores a freshly read descriptor; returns true when its host or segment-level fields differ
    /// from the previous one (a new timestamp or buffer list alone does not count).
    pub(super) fn store(&self, seg: Arc<RemoteSegment>) -> bool {
        let mut entries = sync::write(&self.entries);
        let Some(e) = entries.get_mut(&seg.handle) else { return false };
        let changed = e
            .current
            .as_ref()
            .is_some_and(|old| old.host != seg.host || old.descriptor.segment_fields_differ(&seg.descriptor));
        e.current = Some(seg);
        e.stale.store(false, Ordering::Release);
        changed
    }

    /// Marks `name` for re-reading before its next use.
    pub(super) fn mark_stale(&self, name: &str) {
        let Some(h) = sync::read(&self.by_name).get(name).copied() else { return };
        if let Some(e) = sync::read(&self.entries).get(&h) {
            e.stale.store(true, Ordering::Release);
        }
    }
}

fn unknown(h: SegmentHandle) -> Error {
    Error::InvalidArgument(format!("segment handle {h} was never opened successfully"))
}
