//! A slab of in-flight slices addressed by `wr_id`: slot index in the low 32 bits, a generation in
//! the high 32 bits so that a stale or forged completion never matches a reused slot. Slots are
//! reused, so steady-state posting does not allocate.

/// Slab of values keyed by generation-checked ids.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; returns its id.
    pub fn insert(&mut self, value: T) -> u64 {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                let slot = &mut self.slots[i as usize];
                slot.0 = slot.0.wrapping_add(1);
                slot.1 = Some(value);
                (u64::from(slot.0) << 32) | u64::from(i)
            }
            None => {
                let i = self.slots.len() as u32;
                self.slots.push((0, Some(value)));
                u64::from(i)
            }
        }
    }

    /// Takes the value stored under `id` (`None` for unknown, stale or already taken ids).
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let (generation, i) = ((id >> 32) as u32, id as u32);
        let slot = self.slots.get_mut(i as usize)?;
        if slot.0 != generation {
            return None;
        }
        let v = slot.1.take()?;
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes every stored value.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(v) = slot.1.take() {
                out.push(v);
                self.free.push(i as u32);
            }
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_generation_checked_and_slots_reused() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "taken twice");
        let c = s.insert("c");
        assert_eq!(c as u32, a as u32, "slot reused");
        assert_ne!(c, a, "new generation");
        assert_eq!(s.remove(a), None, "stale id does not match the reused slot");
        assert_eq!(s.remove(u64::MAX), None);
        assert_eq!(s.drain(), vec!["c", "b"], "in slot order");
        assert!(s.is_empty());
        assert_eq!(s.remove(b), None);
        let d = s.insert("d");
        assert_eq!(s.remove(d), Some("d"));
    }
}
