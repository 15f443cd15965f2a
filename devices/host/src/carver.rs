//! [`SlabCarver`]: size-class bookkeeping over address ranges, with no memory behind it.

use std::collections::HashMap;

use mooncake_core::Error;

/// Why the carver refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CarveError {
    /// Zero-length request.
    #[error("managed buffer length must be greater than zero")]
    ZeroLength,
    /// Larger than the largest class; the owner should give it a dedicated mapping.
    #[error("length {len} exceeds the largest size class ({max_class} bytes)")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Largest class.
        max_class: u64,
    },
    /// No free chunk can serve this class; add a slab and retry.
    #[error("no free chunk of {class_size} bytes; a new slab is needed")]
    Exhausted {
        /// Class size that was asked for.
        class_size: u64,
    },
    /// The address was not handed out (or was already freed).
    #[error("address {addr:#x} is not a managed buffer in use (never handed out, or already freed)")]
    NotHandedOut {
        /// Address given to free.
        addr: u64,
    },
    /// The length given to free belongs to another size class than the one handed out.
    #[error("address {addr:#x} was handed out as a {class_size}-byte chunk; length {len} does not match")]
    WrongLength {
        /// Address given to free.
        addr: u64,
        /// Length given to free.
        len: u64,
        /// Class size it was handed out with.
        class_size: u64,
    },
    /// Invalid configuration or slab.
    #[error("invalid slab carver argument: {0}")]
    Invalid(String),
}

impl From<CarveError> for Error {
    fn from(e: CarveError) -> Self {
        match e {
            CarveError::Exhausted { .. } => Error::NoSpace(e.to_string()),
            CarveError::NotHandedOut { .. } => Error::NotFound(e.to_string()),
            CarveError::ZeroLength
            | CarveError::TooLarge { .. }
            | CarveError::WrongLength { .. }
            | CarveError::Invalid(_) => Error::InvalidArgument(e.to_string()),
        }
    }
}

/// Pure size-class allocator over address ranges, with no memory behind it.
///
/// Slabs are cut into power-of-two chunks aligned to their own size (a chunk of 64 KiB starts at a
/// multiple of 64 KiB). A request takes a chunk of the smallest class that holds it; when that
/// class's free list is empty, a larger free chunk is split in halves (buddy style) down to the
/// class. Freed chunks go back to their class's free list (no coalescing, like upstream's
/// `allocateManagedBuffer`). When nothing fits, [`CarveError::Exhausted`] asks the owner for a new
/// slab.
///
/// ```
/// use mooncake_device_host::SlabCarver;
/// let mut c = SlabCarver::new(4096, 1 << 20).unwrap();
/// c.add_slab(0x1000_0000, 4 << 20).unwrap();
/// let a = c.allocate(5000).unwrap(); // an 8 KiB chunk
/// assert_eq!(a % 8192, 0);
/// c.free(a, 5000).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct SlabCarver {
    min_shift: u32,
    max_shift: u32,
    /// Free chunks per class (index = shift - min_shift), used as stacks so recent chunks are reused.
    free: Vec<Vec<u64>>,
    /// Chunks handed out: address -> class index.
    in_use: HashMap<u64, usize>,
    /// Usable part of each slab as (base, len), in the order they were added.
    slabs: Vec<(u64, u64)>,
}

impl SlabCarver {
    /// A carver with classes `min_class, 2*min_class, ..., max_class` (powers of two, `64 <= min <= max`).
    pub fn new(min_class: u64, max_class: u64) -> Result<Self, CarveError> {
        if !min_class.is_power_of_two() || !max_class.is_power_of_two() || min_class < 64 || min_class > max_class {
            return Err(CarveError::Invalid(format!(
                "size classes must be powers of two with 64 <= min <= max (got min {min_class}, max {max_class})"
            )));
        }
        let (min_shift, max_shift) = (min_class.trailing_zeros(), max_class.trailing_zeros());
        let classes = (max_shift - min_shift + 1) as usize;
        Ok(SlabCarver { min_shift, max_shift, free: vec![Vec::new(); classes], in_use: HashMap::new(), slabs: vec![] })
    }

    /// Smallest class size.
    pub fn min_class(&self) -> u64 {
        1 << self.min_shift
    }

    /// Largest class size.
    pub fn max_class(&self) -> u64 {
        1 << self.max_shift
    }

    /// The class size a request of `len` bytes gets, or `None` for 0 or more than [`Self::max_class`].
    pub fn class_size(&self, len: u64) -> Option<u64> {
        self.class_index(len).map(|i| self.size_of(i))
    }

    fn class_index(&self, len: u64) -> Option<usize> {
        if len == 0 || len > self.max_class() {
            return None;
        }
        let shift = len.next_power_of_two().trailing_zeros().max(self.min_shift);
        Some((shift - self.min_shift) as usize)
    }

    fn size_of(&self, index: usize) -> u64 {
        1 << (self.min_shift + index as u32)
    }

    /// Adds the range `[base, base+len)` to carve from; returns how many bytes became usable.
    ///
    /// The range is trimmed to multiples of the smallest class; for no waste, make `base` a multiple
    /// of [`Self::max_class`]. Overlapping an existing slab, or leaving nothing usable, is an error.
    pub fn add_slab(&mut self, base: u64, len: u64) -> Result<u64, CarveError> {
        let end = base.checked_add(len).ok_or_else(|| CarveError::Invalid(format!("slab {base:#x}+{len} wraps")))?;
        if let Some(&(b, l)) = self.slabs.iter().find(|&&(b, l)| base < b + l && b < end) {
            return Err(CarveError::Invalid(format!("slab [{base:#x}, +{len}) overlaps slab [{b:#x}, +{l})")));
        }
        let min = self.min_class();
        let start = base.checked_add(min - 1).map(|v| v & !(min - 1)).unwrap_or(end);
        let stop = end & !(min - 1);
        if start >= stop {
            return Err(CarveError::Invalid(format!("slab [{base:#x}, +{len}) holds no aligned chunk of {min} bytes")));
        }
        let mut at = start;
        while at < stop {
            // Largest class aligned at `at` that still fits before `stop`.
            let mut i = self.free.len() - 1;
            while at % self.size_of(i) != 0 || stop - at < self.size_of(i) {
                i -= 1; // terminates: class 0 (min) always fits since at, stop are min-aligned
            }
            let size = self.size_of(i);
            self.free[i].push(at);
            at += size;
        }
        self.slabs.push((start, stop - start));
        Ok(stop - start)
    }

    /// Hands out a chunk for `len` bytes, aligned to its class size.
    pub fn allocate(&mut self, len: u64) -> Result<u64, CarveError> {
        if len == 0 {
            return Err(CarveError::ZeroLength);
        }
        let class = self.class_index(len).ok_or(CarveError::TooLarge { len, max_class: self.max_class() })?;
        let Some(donor) = (class..self.free.len()).find(|&i| !self.free[i].is_empty()) else {
            return Err(CarveError::Exhausted { class_size: self.size_of(class) });
        };
        let chunk = self.free[donor].pop().ok_or(CarveError::Exhausted { class_size: self.size_of(class) })?;
        // Split down: keep the low half, give the high half back at each level.
        for i in (class..donor).rev() {
            let half = chunk + self.size_of(i);
            self.free[i].push(half);
        }
        self.in_use.insert(chunk, class);
        Ok(chunk)
    }

    /// Takes back a chunk; `len` must map to the class it was handed out with.
    pub fn free(&mut self, addr: u64, len: u64) -> Result<(), CarveError> {
        let Some(&class) = self.in_use.get(&addr) else {
            return Err(CarveError::NotHandedOut { addr });
        };
        if self.class_index(len) != Some(class) {
            return Err(CarveError::WrongLength { addr, len, class_size: self.size_of(class) });
        }
        self.in_use.remove(&addr);
        self.free[class].push(addr);
        Ok(())
    }

    /// The class size of the chunk in use at `addr`.
    pub fn in_use_size(&self, addr: u64) -> Option<u64> {
        self.in_use.get(&addr).map(|&c| self.size_of(c))
    }

    /// Number of chunks handed out and not freed.
    pub fn in_use_count(&self) -> usize {
        self.in_use.len()
    }

    /// Bytes handed out (class sizes, not requested lengths).
    pub fn in_use_bytes(&self) -> u64 {
        self.in_use.values().map(|&c| self.size_of(c)).sum()
    }

    /// Bytes sitting on the free lists.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().enumerate().map(|(i, l)| l.len() as u64 * self.size_of(i)).sum()
    }

    /// Usable part of each slab added so far, as `(base, len)` (trimmed to the smallest class).
    pub fn slabs(&self) -> &[(u64, u64)] {
        &self.slabs
    }

    /// True when `addr` lies inside one of the slabs.
    pub fn contains(&self, addr: u64) -> bool {
        self.slabs.iter().any(|&(b, l)| addr >= b && addr - b < l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// Deterministic xorshift so the stress test needs no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn check_invariants(c: &SlabCarver, live: &[(u64, u64)]) {
        let mut ranges: Vec<(u64, u64)> = live
            .iter()
            .map(|&(a, len)| {
                let size = c.class_size(len).unwrap();
                assert_eq!(c.in_use_size(a), Some(size));
                assert_eq!(a % size, 0, "chunk {a:#x} not aligned to its class {size}");
                assert_eq!(a % 64, 0);
                assert!(c.contains(a) && c.contains(a + size - 1), "chunk outside slabs");
                (a, a + size)
            })
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "overlap {:x?} {:x?}", w[0], w[1]);
        }
        let total: u64 = c.slabs().iter().map(|s| s.1).sum();
        assert_eq!(c.in_use_bytes() + c.free_bytes(), total, "bytes lost or duplicated");
        assert_eq!(c.in_use_count(), live.len());
    }

    #[test]
    fn classes() {
        let c = SlabCarver::new(4 * KIB, 64 * MIB).unwrap();
        assert_eq!(c.class_size(0), None);
        assert_eq!(c.class_size(1), Some(4 * KIB));
        assert_eq!(c.class_size(4 * KIB), Some(4 * KIB));
        assert_eq!(c.class_size(4 * KIB + 1), Some(8 * KIB));
        assert_eq!(c.class_size(3 * MIB), Some(4 * MIB));
        assert_eq!(c.class_size(64 * MIB), Some(64 * MIB));
        assert_eq!(c.class_size(64 * MIB + 1), None);
        assert_eq!(c.class_size(u64::MAX), None);
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(SlabCarver::new(0, 4096).is_err());
        assert!(SlabCarver::new(32, 4096).is_err());
        assert!(SlabCarver::new(4096, 2048).is_err());
        assert!(SlabCarver::new(4096, 3 * 4096).is_err());
        assert!(SlabCarver::new(64, 64).is_ok());
    }

    #[test]
    fn slabs_must_not_overlap_or_be_empty() {
        let mut c = SlabCarver::new(4 * KIB, MIB).unwrap();
        assert_eq!(c.add_slab(0x100000, 4 * MIB), Ok(4 * MIB));
        assert!(c.add_slab(0x100000 + MIB, MIB).is_err());
        assert!(c.add_slab(0, 0x100000 + 1).is_err());
        assert!(c.add_slab(0x10_0000_0000, 100).is_err(), "smaller than one chunk");
        assert!(c.add_slab(u64::MAX - 10, 100).is_err(), "wraps");
        assert_eq!(c.add_slab(0, 0x100000), Ok(0x100000), "adjacent is fine");
    }

    #[test]
    fn unaligned_slab_is_carved_without_waste_beyond_trim() {
        let mut c = SlabCarver::new(4 * KIB, MIB).unwrap();
        // Starts 4 KiB past a 1 MiB boundary and ends mid-page.
        let usable = c.add_slab(MIB + 4 * KIB - 100, 3 * MIB).unwrap();
        assert_eq!(usable, 3 * MIB - 4 * KIB);
        let mut live = Vec::new();
        while let Ok(a) = c.allocate(4 * KIB) {
            live.push((a, 4 * KIB));
        }
        assert_eq!(live.len() as u64, usable / (4 * KIB));
        check_invariants(&c, &live);
        // Now also check a large class gets an aligned chunk after freeing everything.
        for &(a, l) in &live {
            c.free(a, l).unwrap();
        }
        assert_eq!(c.in_use_count(), 0);
    }

    #[test]
    fn split_and_reuse() {
        let mut c = SlabCarver::new(4 * KIB, 64 * KIB).unwrap();
        c.add_slab(0x10000, 64 * KIB).unwrap();
        let a = c.allocate(100).unwrap();
        assert_eq!(a, 0x10000, "lowest chunk first");
        // 64 KiB split into 4 (used) + 4 + 8 + 16 + 32 free.
        assert_eq!(c.free_bytes(), 60 * KIB);
        let b = c.allocate(4 * KIB).unwrap();
        assert_eq!(b, 0x11000);
        c.free(a, 100).unwrap();
        assert_eq!(c.allocate(4000).unwrap(), a, "freed chunk is reused first");
        let big = c.allocate(32 * KIB).unwrap();
        assert_eq!(big, 0x18000);
        assert_eq!(big % (32 * KIB), 0);
        // 16 KiB and 8 KiB chunks left, no 32 KiB one.
        assert_eq!(c.allocate(32 * KIB), Err(CarveError::Exhausted { class_size: 32 * KIB }));
        assert!(c.allocate(16 * KIB).is_ok());
        assert!(c.allocate(8 * KIB).is_ok());
        assert_eq!(c.allocate(1), Err(CarveError::Exhausted { class_size: 4 * KIB }));
        assert_eq!(c.free_bytes(), 0);
    }

    #[test]
    fn exhaustion_asks_for_a_new_slab() {
        let mut c = SlabCarver::new(4 * KIB, MIB).unwrap();
        c.add_slab(16 * MIB, 2 * MIB).unwrap();
        let x = c.allocate(MIB).unwrap();
        let y = c.allocate(MIB).unwrap();
        assert_ne!(x, y);
        let err = c.allocate(MIB).unwrap_err();
        assert_eq!(err, CarveError::Exhausted { class_size: MIB });
        assert!(matches!(Error::from(err), Error::NoSpace(_)));
        c.add_slab(64 * MIB, 2 * MIB).unwrap();
        let z = c.allocate(MIB).unwrap();
        assert!((64 * MIB..66 * MIB).contains(&z));
        assert_eq!(c.slabs().len(), 2);
        check_invariants(&c, &[(x, MIB), (y, MIB), (z, MIB)]);
    }

    #[test]
    fn bad_frees_are_typed_errors() {
        let mut c = SlabCarver::new(4 * KIB, MIB).unwrap();
        c.add_slab(0, 4 * MIB).unwrap();
        let a = c.allocate(10 * KIB).unwrap(); // 16 KiB class
        assert_eq!(c.free(a + 64, 10 * KIB), Err(CarveError::NotHandedOut { addr: a + 64 }));
        assert_eq!(c.free(a, 4 * KIB), Err(CarveError::WrongLength { addr: a, len: 4 * KIB, class_size: 16 * KIB }));
        assert!(matches!(c.free(a, 0), Err(CarveError::WrongLength { .. })));
        assert!(matches!(c.free(a, 2 * MIB), Err(CarveError::WrongLength { .. })));
        // Any length of the same class is accepted (upstream frees by class).
        c.free(a, 16 * KIB).unwrap();
        assert_eq!(c.free(a, 10 * KIB), Err(CarveError::NotHandedOut { addr: a }), "double free");
        assert!(matches!(Error::from(CarveError::NotHandedOut { addr: a }), Error::NotFound(_)));
        assert!(matches!(Error::from(CarveError::ZeroLength), Error::InvalidArgument(_)));
        assert_eq!(c.allocate(0), Err(CarveError::ZeroLength));
        assert_eq!(c.allocate(MIB + 1), Err(CarveError::TooLarge { len: MIB + 1, max_class: MIB }));
    }

    #[test]
    fn many_random_allocs_and_frees() {
        let mut c = SlabCarver::new(4 * KIB, 4 * MIB).unwrap();
        let slab = 16 * MIB;
        let mut next_slab = 1u64 << 40;
        c.add_slab(next_slab, slab).unwrap();
        next_slab += slab;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut peak = 0;
        for step in 0..20_000 {
            let r = rng.next();
            if live.is_empty() || r % 2 == 0 {
                // Mostly small, sometimes up to the max class.
                let len = match r % 7 {
                    0 => 1 + (rng.next() % (4 * MIB)),
                    1 | 2 => 1 + (rng.next() % (256 * KIB)),
                    _ => 1 + (rng.next() % (16 * KIB)),
                };
                let a = match c.allocate(len) {
                    Ok(a) => a,
                    Err(CarveError::Exhausted { .. }) => {
                        c.add_slab(next_slab, slab).unwrap();
                        next_slab += slab;
                        c.allocate(len).unwrap()
                    }
                    Err(e) => panic!("unexpected {e}"),
                };
                live.push((a, len));
            } else {
                let i = (rng.next() % live.len() as u64) as usize;
                let (a, len) = live.swap_remove(i);
                c.free(a, len).unwrap();
                assert_eq!(c.free(a, len), Err(CarveError::NotHandedOut { addr: a }));
            }
            peak = peak.max(c.in_use_bytes());
            if step % 1000 == 0 {
                check_invariants(&c, &live);
            }
        }
        check_invariants(&c, &live);
        for (a, len) in live.drain(..) {
            c.free(a, len).unwrap();
        }
        check_invariants(&c, &live);
        // No coalescing, so some fragmentation is expected, but freed chunks must be reused.
        let total = c.slabs().len() as u64 * slab;
        eprintln!("peak in use {peak}, slabs {} ({total} bytes)", c.slabs().len());
        assert!(total <= 4 * peak + slab, "slabs not reused: peak {peak}, {total} bytes of slabs");
    }

    #[test]
    fn freed_chunks_are_reused_without_new_slabs() {
        let mut c = SlabCarver::new(4 * KIB, MIB).unwrap();
        c.add_slab(0, 8 * MIB).unwrap();
        let sizes = [4 * KIB, 100, 9000, 70 * KIB, MIB, 300 * KIB, 1, 2 * KIB];
        for round in 0..50 {
            let got: Vec<(u64, u64)> = sizes.iter().map(|&l| (c.allocate(l).unwrap(), l)).collect();
            check_invariants(&c, &got);
            for (a, l) in got {
                c.free(a, l).unwrap();
            }
            assert_eq!(c.slabs().len(), 1, "round {round}");
        }
        assert_eq!(c.free_bytes(), 8 * MIB);
    }
}
