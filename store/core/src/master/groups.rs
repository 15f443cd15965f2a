//! Interned group ids: each distinct group name is stored once and objects hold small integers, released when
//! the last object using a name goes away.

use std::collections::HashMap;

/// Reference-counted interner of group names.
#[derive(Debug, Default)]
pub(crate) struct GroupInterner {
    ids: HashMap<Box<str>, u32>,
    /// Name and reference count per id; `None` for free ids.
    names: Vec<Option<(Box<str>, u32)>>,
    spare: Vec<u32>,
}

/// The sorted, de-duplicated group ids of one object (`None` when it has none).
pub(crate) type GroupIds = Option<Box<[u32]>>;

impl GroupInterner {
    /// Interns `names` (one reference per distinct name) and returns their ids.
    pub(crate) fn acquire(&mut self, names: &[String]) -> GroupIds {
        if names.is_empty() {
            return None;
        }
        let mut ids: Vec<u32> = Vec::with_capacity(names.len());
        for name in names {
            let id = match self.ids.get(name.as_str()) {
                Some(&id) => id,
                None => {
                    let id = match self.spare.pop() {
                        Some(id) => id,
                        None => {
                            self.names.push(None);
                            (self.names.len() - 1) as u32
                        }
                    };
                    self.names[id as usize] = Some((name.as_str().into(), 0));
                    self.ids.insert(name.as_str().into(), id);
                    id
                }
            };
            if !ids.contains(&id) {
                ids.push(id);
                if let Some((_, refs)) = &mut self.names[id as usize] {
                    *refs += 1;
                }
            }
        }
        ids.sort_unstable();
        Some(ids.into_boxed_slice())
    }

    /// Drops one reference to each id; names no object uses any more are forgotten.
    pub(crate) fn release(&mut self, ids: &GroupIds) {
        for &id in ids.iter().flatten() {
            let Some(slot) = self.names.get_mut(id as usize) else { continue };
            if let Some((name, refs)) = slot {
                *refs -= 1;
                if *refs == 0 {
                    self.ids.remove(name);
                    *slot = None;
                    self.spare.push(id);
                }
            }
        }
    }

    /// The name of an id (empty for an unknown id).
    pub(crate) fn name(&self, id: u32) -> &str {
        match self.names.get(id as usize) {
            Some(Some((name, _))) => name,
            _ => "",
        }
    }

    /// One past the largest id ever handed out.
    pub(crate) fn id_bound(&self) -> usize {
        self.names.len()
    }

    /// Reference count of every live id, for invariant checks.
    #[cfg(test)]
    pub(crate) fn ref_counts(&self) -> HashMap<u32, u32> {
        self.names.iter().enumerate().filter_map(|(id, s)| s.as_ref().map(|(_, r)| (id as u32, *r))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_counts_and_forgets() {
        let mut g = GroupInterner::default();
        let a = g.acquire(&["x".into(), "y".into(), "x".into()]);
        let b = g.acquire(&["y".into()]);
        assert_eq!(a.as_deref().map(<[u32]>::len), Some(2));
        assert_eq!(g.ref_counts().values().sum::<u32>(), 3);
        assert_eq!(g.acquire(&[]), None);
        g.release(&a);
        assert_eq!(g.ref_counts().len(), 1);
        let y = b.as_deref().unwrap()[0];
        assert_eq!(g.name(y), "y");
        g.release(&b);
        assert!(g.ref_counts().is_empty());
        let c = g.acquire(&["z".into()]);
        assert!(c.as_deref().unwrap()[0] < 2, "ids are reused");
    }
}
