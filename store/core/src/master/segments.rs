//! Mounted segments (each with its own offset allocator) and the clients that own them.

use std::collections::HashMap;

use crate::allocator::OffsetAllocator;
use crate::types::{ClientId, Segment};

/// One mounted segment.
#[derive(Debug)]
pub(crate) struct SegmentState {
    pub(crate) info: Segment,
    pub(crate) owner: ClientId,
    pub(crate) alloc: OffsetAllocator,
    /// The owner missed pings or was reported unreachable: no placements, replicas not served.
    pub(crate) suspect: bool,
}

/// What the master knows about a client that mounted memory.
#[derive(Debug)]
pub(crate) struct ClientState {
    pub(crate) last_seen: u64,
    /// Another client failed to reach it since its last ping.
    pub(crate) reported_unreachable: bool,
    pub(crate) suspect: bool,
    /// Host of its most recently mounted segment (for same-host placement).
    pub(crate) host: Option<String>,
    pub(crate) segments: Vec<u32>,
}

/// Segments by slot index (stable while mounted; replicas refer to it) and by name.
#[derive(Debug, Default)]
pub(crate) struct SegmentTable {
    slots: Vec<Option<SegmentState>>,
    spare: Vec<u32>,
    by_name: HashMap<String, u32>,
}

impl SegmentTable {
    pub(crate) fn insert(&mut self, segment: SegmentState) -> u32 {
        let name = segment.info.name.clone();
        let idx = match self.spare.pop() {
            Some(idx) => {
                self.slots[idx as usize] = Some(segment);
                idx
            }
            None => {
                self.slots.push(Some(segment));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_name.insert(name, idx);
        idx
    }

    pub(crate) fn remove(&mut self, idx: u32) -> Option<SegmentState> {
        let segment = self.slots.get_mut(idx as usize)?.take()?;
        self.by_name.remove(&segment.info.name);
        self.spare.push(idx);
        Some(segment)
    }

    pub(crate) fn find(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn get(&self, idx: u32) -> Option<&SegmentState> {
        self.slots.get(idx as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, idx: u32) -> Option<&mut SegmentState> {
        self.slots.get_mut(idx as usize)?.as_mut()
    }

    /// Mounted and its owner is not suspect.
    pub(crate) fn is_healthy(&self, idx: u32) -> bool {
        self.get(idx).is_some_and(|s| !s.suspect)
    }

    /// One past the largest slot index.
    pub(crate) fn slot_bound(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Mounted segments in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &SegmentState)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i as u32, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str) -> SegmentState {
        SegmentState {
            info: Segment {
                name: name.into(),
                transport_endpoint: "ep".into(),
                base: 0,
                size: 64,
                host: "h".into(),
                protocol: String::new(),
            },
            owner: ClientId(1),
            alloc: OffsetAllocator::new(64),
            suspect: false,
        }
    }

    #[test]
    fn slots_are_reused_and_names_indexed() {
        let mut t = SegmentTable::default();
        let a = t.insert(state("a"));
        let b = t.insert(state("b"));
        assert_eq!(t.find("b"), Some(b));
        assert!(t.remove(a).is_some());
        assert!(t.remove(a).is_none());
        assert!(t.find("a").is_none() && !t.is_healthy(a));
        assert_eq!(t.insert(state("c")), a);
        assert_eq!(t.len(), 2);
        assert_eq!(t.iter().count(), 2);
    }
}
