//! Handle tables: C handles are `(generation << 32) | (index + 1)`, never pointers, so a destroyed or invented
//! handle is detected instead of dereferenced.

use std::sync::{Arc, RwLock};

struct Slot<T> {
    generation: u32,
    value: Option<Arc<T>>,
}

struct Slots<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
}

/// A table of live objects addressed by generation-checked handles.
pub(crate) struct Table<T> {
    inner: RwLock<Slots<T>>,
}

impl<T> Table<T> {
    pub(crate) const fn new() -> Self {
        Table { inner: RwLock::new(Slots { slots: Vec::new(), free: Vec::new() }) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Slots<T>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Slots<T>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `value`; returns its handle (never 0). `None` when the table is full (2^32 - 1 live objects).
    pub(crate) fn insert(&self, value: T) -> Option<u64> {
        let mut s = self.write();
        let index = match s.free.pop() {
            Some(i) => i,
            None => {
                if s.slots.len() >= u32::MAX as usize - 1 {
                    return None;
                }
                s.slots.push(Slot { generation: 1, value: None });
                s.slots.len() - 1
            }
        };
        let slot = &mut s.slots[index];
        slot.value = Some(Arc::new(value));
        Some((u64::from(slot.generation) << 32) | (index as u64 + 1))
    }

    fn locate(handle: u64) -> Option<(usize, u32)> {
        let low = handle & 0xffff_ffff;
        if low == 0 {
            return None;
        }
        Some(((low - 1) as usize, (handle >> 32) as u32))
    }

    /// The live object behind `handle`; `None` for a destroyed, never-issued or null handle.
    pub(crate) fn get(&self, handle: u64) -> Option<Arc<T>> {
        let (index, generation) = Self::locate(handle)?;
        let s = self.read();
        let slot = s.slots.get(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.clone()
    }

    /// Takes the object out; its handle is dead from now on (the slot's generation moves on).
    pub(crate) fn remove(&self, handle: u64) -> Option<Arc<T>> {
        let (index, generation) = Self::locate(handle)?;
        let mut s = self.write();
        let slot = s.slots.get_mut(index)?;
        if slot.generation != generation || slot.value.is_none() {
            return None;
        }
        let value = slot.value.take();
        slot.generation = slot.generation.wrapping_add(1).max(1);
        s.free.push(index);
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_invented_handles_are_refused() {
        let t = Table::new();
        let a = t.insert(1u32).unwrap();
        assert_eq!(*t.get(a).unwrap(), 1);
        assert!(t.get(0).is_none());
        assert!(t.get(a + 1).is_none());
        assert!(t.get(a ^ (1 << 40)).is_none());
        assert_eq!(*t.remove(a).unwrap(), 1);
        assert!(t.get(a).is_none());
        assert!(t.remove(a).is_none());
        let b = t.insert(2u32).unwrap();
        assert_ne!(a, b, "a reused slot gets a new generation");
        assert!(t.get(a).is_none());
        assert_eq!(*t.get(b).unwrap(), 2);
    }
}
