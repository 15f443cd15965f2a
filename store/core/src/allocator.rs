//! Offset allocator for one segment: hands out contiguous, 8-byte aligned ranges of `[0, size)`.
//!
//! Design (two-level segregated fit, in the spirit of TLSF and Sebastian Aaltonen's OffsetAllocator):
//! - Sizes are counted in 8-byte units and mapped to one of 512 bins by a tiny float: 3 mantissa bits and an
//!   exponent, so bins are at most 12.5% wide at every scale, from 1 unit to 2^61 units.
//! - Each bin keeps a doubly linked list of free blocks; a 64-bit top bitmap and 64 8-bit leaf bitmaps say which
//!   bins are non-empty, so finding a block is two bit scans: O(1).
//! - `allocate` first looks for a fitting block in the bin the size rounds *down* to (first fit among at most
//!   [`FALLBACK_SCAN_LIMIT`] blocks), which reuses holes of the same size class instead of splitting bigger
//!   blocks and lets an allocation of nearly the whole segment succeed. Otherwise it rounds the size *up* to a bin
//!   and takes the head of the first non-empty bin at or above it (any block there is big enough): two bit scans.
//!   The block is split exactly; the tail goes back to a free list, so there is no internal fragmentation beyond
//!   the 8-byte rounding.
//! - Blocks are also kept in address order (neighbour links); `free` merges a block with free neighbours at once,
//!   so freeing everything always leaves one block covering the segment.
//!
//! Metadata is a `Vec` of 40-byte nodes (one per block) plus 2 KiB of bin heads per segment.

use crate::types::{ErrorCode, Result};

/// Every offset and reserved length is a multiple of this.
pub const ALIGNMENT: u64 = 8;
const ALIGN_SHIFT: u32 = ALIGNMENT.trailing_zeros();
const MANTISSA_BITS: u32 = 3;
const LEAF_BINS: usize = 1 << MANTISSA_BITS;
const TOP_BINS: usize = 64;
const BIN_COUNT: usize = TOP_BINS * LEAF_BINS;
const NONE: u32 = u32::MAX;
/// How many blocks of the round-down bin `allocate` examines before it takes a block from a bigger bin.
pub const FALLBACK_SCAN_LIMIT: usize = 64;

/// One allocated range; hand it back to [`OffsetAllocator::free`] to release it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Allocation {
    offset: u64,
    len: u64,
    node: u32,
}

impl Allocation {
    /// Start of the range, in bytes from the segment's base (a multiple of [`ALIGNMENT`]).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length requested by the caller, in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: allocations are at least one byte long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes actually reserved: the length rounded up to [`ALIGNMENT`].
    pub fn reserved(&self) -> u64 {
        self.len.div_ceil(ALIGNMENT) * ALIGNMENT
    }
}

/// One block, free or used, in address order.
#[derive(Debug, Clone)]
struct Node {
    /// Start, in units.
    offset: u64,
    /// Length, in units.
    size: u64,
    bin_prev: u32,
    bin_next: u32,
    prev: u32,
    next: u32,
    used: bool,
}

/// Allocator of offsets within one segment. See the module docs for the design.
#[derive(Debug, Clone)]
pub struct OffsetAllocator {
    total_units: u64,
    free_units: u64,
    nodes: Vec<Node>,
    /// Indices of `nodes` slots that hold no block.
    spare_nodes: Vec<u32>,
    bin_heads: Box<[u32; BIN_COUNT]>,
    top_bitmap: u64,
    leaf_bitmaps: [u8; TOP_BINS],
    allocations: usize,
}

/// The bin whose blocks are all at least as big as its lower bound, rounding the size down.
fn bin_round_down(units: u64) -> usize {
    if units < LEAF_BINS as u64 {
        return units as usize;
    }
    let high = 63 - units.leading_zeros();
    let shift = high - MANTISSA_BITS;
    let mantissa = (units >> shift) as usize & (LEAF_BINS - 1);
    (((shift + 1) as usize) << MANTISSA_BITS) | mantissa
}

/// Smallest size (in units) that falls in `bin`.
fn bin_size(bin: usize) -> u64 {
    if bin < LEAF_BINS {
        return bin as u64;
    }
    let exp = (bin >> MANTISSA_BITS) as u32;
    let mantissa = (bin & (LEAF_BINS - 1)) as u64;
    (LEAF_BINS as u64 + mantissa) << (exp - 1)
}

/// The first bin all of whose blocks hold `units`.
fn bin_round_up(units: u64) -> usize {
    let down = bin_round_down(units);
    if bin_size(down) < units { down + 1 } else { down }
}

impl OffsetAllocator {
    /// An allocator for a segment of `size` bytes (a tail shorter than [`ALIGNMENT`] is not used).
    pub fn new(size: u64) -> Self {
        let total_units = size >> ALIGN_SHIFT;
        let mut this = OffsetAllocator {
            total_units,
            free_units: 0,
            nodes: Vec::new(),
            spare_nodes: Vec::new(),
            bin_heads: Box::new([NONE; BIN_COUNT]),
            top_bitmap: 0,
            leaf_bitmaps: [0; TOP_BINS],
            allocations: 0,
        };
        if total_units > 0 {
            this.nodes.push(Node {
                offset: 0,
                size: total_units,
                bin_prev: NONE,
                bin_next: NONE,
                prev: NONE,
                next: NONE,
                used: false,
            });
            this.insert_free(0);
            this.free_units = total_units;
        }
        this
    }

    /// Reserves `len` contiguous bytes; `None` when `len` is 0 or no free block is big enough.
    pub fn allocate(&mut self, len: u64) -> Option<Allocation> {
        if len == 0 {
            return None;
        }
        let units = len.div_ceil(ALIGNMENT);
        if units > self.free_units || (self.spare_nodes.is_empty() && self.nodes.len() >= NONE as usize) {
            return None;
        }
        let (down, up) = (bin_round_down(units), bin_round_up(units));
        let fit_in_own_bin = if down == up { None } else { self.scan_bin(down, units) };
        let idx = match fit_in_own_bin {
            Some(idx) => idx,
            None => self.bin_heads[self.first_bin_at_least(up)?],
        };
        self.remove_free(idx);
        let node = &self.nodes[idx as usize];
        let (offset, size, next) = (node.offset, node.size, node.next);
        if size > units {
            let rest = self.new_node(Node {
                offset: offset + units,
                size: size - units,
                bin_prev: NONE,
                bin_next: NONE,
                prev: idx,
                next,
                used: false,
            });
            if next != NONE {
                self.nodes[next as usize].prev = rest;
            }
            self.nodes[idx as usize].next = rest;
            self.nodes[idx as usize].size = units;
            self.insert_free(rest);
        }
        self.nodes[idx as usize].used = true;
        self.free_units -= units;
        self.allocations += 1;
        Some(Allocation { offset: offset << ALIGN_SHIFT, len, node: idx })
    }

    /// Releases an allocation and merges it with free neighbours. A handle this allocator did not hand out, or
    /// one already freed, gives [`ErrorCode::InvalidParams`] and changes nothing.
    pub fn free(&mut self, allocation: Allocation) -> Result<()> {
        let idx = allocation.node;
        let valid = self.nodes.get(idx as usize).is_some_and(|n| {
            n.used && n.offset << ALIGN_SHIFT == allocation.offset && n.size == allocation.len.div_ceil(ALIGNMENT)
        });
        if !valid {
            return Err(ErrorCode::InvalidParams);
        }
        let node = &mut self.nodes[idx as usize];
        node.used = false;
        self.free_units += node.size;
        self.allocations -= 1;
        let prev = node.prev;
        if prev != NONE && !self.nodes[prev as usize].used {
            self.remove_free(prev);
            let p = self.nodes[prev as usize].clone();
            let node = &mut self.nodes[idx as usize];
            node.offset = p.offset;
            node.size += p.size;
            node.prev = p.prev;
            if p.prev != NONE {
                self.nodes[p.prev as usize].next = idx;
            }
            self.spare_nodes.push(prev);
        }
        let next = self.nodes[idx as usize].next;
        if next != NONE && !self.nodes[next as usize].used {
            self.remove_free(next);
            let n = self.nodes[next as usize].clone();
            let node = &mut self.nodes[idx as usize];
            node.size += n.size;
            node.next = n.next;
            if n.next != NONE {
                self.nodes[n.next as usize].prev = idx;
            }
            self.spare_nodes.push(next);
        }
        self.insert_free(idx);
        Ok(())
    }

    /// Bytes this allocator manages (the segment size rounded down to [`ALIGNMENT`]).
    pub fn capacity(&self) -> u64 {
        self.total_units << ALIGN_SHIFT
    }

    /// Bytes not reserved.
    pub fn free_bytes(&self) -> u64 {
        self.free_units << ALIGN_SHIFT
    }

    /// Bytes reserved by live allocations (lengths rounded up to [`ALIGNMENT`]).
    pub fn used_bytes(&self) -> u64 {
        (self.total_units - self.free_units) << ALIGN_SHIFT
    }

    /// Size of the largest free block in bytes (an allocation of this size succeeds).
    pub fn largest_free(&self) -> u64 {
        if self.top_bitmap == 0 {
            return 0;
        }
        let top = 63 - self.top_bitmap.leading_zeros() as usize;
        let leaf = 7 - self.leaf_bitmaps[top].leading_zeros() as usize;
        let mut idx = self.bin_heads[top * LEAF_BINS + leaf];
        let mut largest = 0;
        while idx != NONE {
            let node = &self.nodes[idx as usize];
            largest = largest.max(node.size);
            idx = node.bin_next;
        }
        largest << ALIGN_SHIFT
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocations
    }

    fn first_bin_at_least(&self, bin: usize) -> Option<usize> {
        let top = bin / LEAF_BINS;
        if top >= TOP_BINS {
            return None;
        }
        let leaf_mask = self.leaf_bitmaps[top] & (0xffu8 << (bin % LEAF_BINS));
        if leaf_mask != 0 {
            return Some(top * LEAF_BINS + leaf_mask.trailing_zeros() as usize);
        }
        let higher = if top + 1 >= TOP_BINS { 0 } else { self.top_bitmap & (u64::MAX << (top + 1)) };
        if higher == 0 {
            return None;
        }
        let top = higher.trailing_zeros() as usize;
        Some(top * LEAF_BINS + self.leaf_bitmaps[top].trailing_zeros() as usize)
    }

    /// First block of at least `units` among the first [`FALLBACK_SCAN_LIMIT`] blocks of `bin`.
    fn scan_bin(&self, bin: usize, units: u64) -> Option<u32> {
        let mut idx = *self.bin_heads.get(bin)?;
        for _ in 0..FALLBACK_SCAN_LIMIT {
            let node = self.nodes.get(idx as usize)?;
            if node.size >= units {
                return Some(idx);
            }
            idx = node.bin_next;
        }
        None
    }

    fn new_node(&mut self, node: Node) -> u32 {
        match self.spare_nodes.pop() {
            Some(idx) => {
                self.nodes[idx as usize] = node;
                idx
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn insert_free(&mut self, idx: u32) {
        let bin = bin_round_down(self.nodes[idx as usize].size);
        let head = self.bin_heads[bin];
        let node = &mut self.nodes[idx as usize];
        node.bin_prev = NONE;
        node.bin_next = head;
        if head != NONE {
            self.nodes[head as usize].bin_prev = idx;
        }
        self.bin_heads[bin] = idx;
        self.leaf_bitmaps[bin / LEAF_BINS] |= 1 << (bin % LEAF_BINS);
        self.top_bitmap |= 1 << (bin / LEAF_BINS);
    }

    fn remove_free(&mut self, idx: u32) {
        let node = &self.nodes[idx as usize];
        let (prev, next, bin) = (node.bin_prev, node.bin_next, bin_round_down(node.size));
        if prev != NONE {
            self.nodes[prev as usize].bin_next = next;
        } else {
            self.bin_heads[bin] = next;
        }
        if next != NONE {
            self.nodes[next as usize].bin_prev = prev;
        }
        if self.bin_heads[bin] == NONE {
            self.leaf_bitmaps[bin / LEAF_BINS] &= !(1 << (bin % LEAF_BINS));
            if self.leaf_bitmaps[bin / LEAF_BINS] == 0 {
                self.top_bitmap &= !(1 << (bin / LEAF_BINS));
            }
        }
    }

    /// Checks every internal invariant; used by tests after random operation sequences.
    #[cfg(test)]
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let spare: std::collections::HashSet<u32> = self.spare_nodes.iter().copied().collect();
        let mut live: Vec<u32> = (0..self.nodes.len() as u32).filter(|i| !spare.contains(i)).collect();
        live.sort_by_key(|&i| self.nodes[i as usize].offset);
        let (mut end, mut free, mut used_count) = (0u64, 0u64, 0usize);
        for (pos, &i) in live.iter().enumerate() {
            let n = &self.nodes[i as usize];
            if n.offset != end || n.size == 0 {
                return Err(format!("node {i} at {} size {} but expected offset {end}", n.offset, n.size));
            }
            let want_prev = if pos == 0 { NONE } else { live[pos - 1] };
            let want_next = live.get(pos + 1).copied().unwrap_or(NONE);
            if n.prev != want_prev || n.next != want_next {
                return Err(format!("node {i} has broken neighbour links"));
            }
            if n.used {
                used_count += 1;
            } else {
                free += n.size;
                if n.next != NONE && !self.nodes[n.next as usize].used {
                    return Err(format!("free nodes {i} and {} not merged", n.next));
                }
            }
            end += n.size;
        }
        if end != self.total_units || free != self.free_units || used_count != self.allocations {
            return Err(format!("totals: end {end} free {free}/{} used {used_count}", self.free_units));
        }
        let mut listed = 0u64;
        for bin in 0..BIN_COUNT {
            let bit = self.leaf_bitmaps[bin / LEAF_BINS] & (1 << (bin % LEAF_BINS)) != 0;
            if bit != (self.bin_heads[bin] != NONE) {
                return Err(format!("bitmap of bin {bin} disagrees with its list"));
            }
            let (mut idx, mut prev) = (self.bin_heads[bin], NONE);
            while idx != NONE {
                let n = &self.nodes[idx as usize];
                if n.used || spare.contains(&idx) || bin_round_down(n.size) != bin || n.bin_prev != prev {
                    return Err(format!("bin {bin} lists a wrong node {idx}"));
                }
                listed += n.size;
                (prev, idx) = (idx, n.bin_next);
            }
        }
        for top in 0..TOP_BINS {
            if (self.top_bitmap & (1 << top) != 0) != (self.leaf_bitmaps[top] != 0) {
                return Err(format!("top bitmap bit {top} wrong"));
            }
        }
        if listed != self.free_units {
            return Err(format!("bins list {listed} free units, expected {}", self.free_units));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn bins_are_monotonic_and_round_correctly() {
        let mut last = 0;
        for units in 1..100_000u64 {
            let down = bin_round_down(units);
            let up = bin_round_up(units);
            assert!(down >= last);
            last = down;
            assert!(bin_size(down) <= units && units < bin_size(down + 1), "{units}");
            assert!(bin_size(up) >= units);
        }
        let huge = u64::MAX >> ALIGN_SHIFT;
        assert!(bin_round_up(huge) < BIN_COUNT);
    }

    #[test]
    fn one_byte_and_full_size() {
        let mut a = OffsetAllocator::new(1000);
        let one = a.allocate(1).unwrap();
        assert_eq!((one.offset(), one.len(), one.reserved()), (0, 1, 8));
        assert_eq!(a.used_bytes(), 8);
        a.free(one).unwrap();
        let full = a.allocate(1000).unwrap();
        assert_eq!(full.offset(), 0);
        assert_eq!(a.free_bytes(), 0);
        assert!(a.allocate(1).is_none());
        a.free(full).unwrap();
        assert!(a.allocate(1001).is_none());
        assert!(a.allocate(0).is_none());
        a.check().unwrap();
    }

    #[test]
    fn near_full_size_of_large_segments() {
        for size in [(1u64 << 30) + 12345 * 8, 700 << 20, (3 << 40) - 8] {
            let mut a = OffsetAllocator::new(size);
            let big = a.allocate(size - 8).unwrap();
            assert_eq!(big.offset(), 0);
            let tail = a.allocate(8).unwrap();
            assert_eq!(tail.offset(), size - 8);
            a.free(big).unwrap();
            a.free(tail).unwrap();
            assert_eq!(a.largest_free(), size);
            a.check().unwrap();
        }
    }

    #[test]
    fn double_free_and_foreign_handles_are_rejected() {
        let mut a = OffsetAllocator::new(4096);
        let x = a.allocate(100).unwrap();
        let y = a.allocate(100).unwrap();
        a.free(x).unwrap();
        assert_eq!(a.free(x), Err(ErrorCode::InvalidParams));
        let forged = Allocation { offset: y.offset() + 8, len: 100, node: y.node };
        assert_eq!(a.free(forged), Err(ErrorCode::InvalidParams));
        assert_eq!(a.free(Allocation { offset: 0, len: 8, node: 999 }), Err(ErrorCode::InvalidParams));
        a.free(y).unwrap();
        a.check().unwrap();
        assert_eq!(a.largest_free(), 4096);
    }

    #[test]
    fn zero_sized_segment_allocates_nothing() {
        let mut a = OffsetAllocator::new(7);
        assert_eq!(a.capacity(), 0);
        assert!(a.allocate(1).is_none());
        assert_eq!(a.largest_free(), 0);
        a.check().unwrap();
    }

    #[test]
    fn randomized_alloc_free_keeps_invariants_and_coalesces() {
        let size = 64 << 20;
        let mut a = OffsetAllocator::new(size);
        let mut rng = Rng::new(42);
        let mut live: Vec<Allocation> = Vec::new();
        for step in 0..20_000 {
            if live.is_empty() || rng.below(100) < 55 {
                let len = match rng.below(4) {
                    0 => 1 + rng.below(64) as u64,
                    1 => 1 + rng.below(64 << 10) as u64,
                    2 => 1 + rng.below(4 << 20) as u64,
                    _ => 1 + rng.below(16 << 20) as u64,
                };
                if let Some(x) = a.allocate(len) {
                    assert_eq!(x.offset() % ALIGNMENT, 0);
                    assert!(x.offset() + x.reserved() <= size);
                    live.push(x);
                }
            } else {
                let x = live.swap_remove(rng.below(live.len()));
                a.free(x).unwrap();
            }
            if step % 500 == 0 {
                a.check().unwrap();
                let mut ranges: Vec<(u64, u64)> = live.iter().map(|x| (x.offset(), x.reserved())).collect();
                ranges.sort();
                assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "overlap");
                assert_eq!(a.used_bytes(), ranges.iter().map(|r| r.1).sum::<u64>());
            }
        }
        for x in live.drain(..) {
            a.free(x).unwrap();
        }
        a.check().unwrap();
        assert_eq!(a.largest_free(), size);
        assert_eq!(a.allocation_count(), 0);
    }

    #[test]
    fn fragmentation_stays_low_with_mixed_sizes() {
        // Fill with mixed sizes, free every other block, then re-fill with the freed sizes: a good fit reuses
        // the holes, so at least 90% of the freed bytes come back.
        let size = 256 << 20;
        let mut a = OffsetAllocator::new(size);
        let mut rng = Rng::new(3);
        let mut live = Vec::new();
        while let Some(x) = a.allocate(4096 + rng.below(1 << 20) as u64) {
            live.push(x);
        }
        let mut freed = Vec::new();
        for (i, x) in live.iter().enumerate() {
            if i % 2 == 0 {
                a.free(*x).unwrap();
                freed.push(x.len());
            }
        }
        let free_before = a.free_bytes();
        let mut refilled = 0;
        for len in freed {
            if let Some(x) = a.allocate(len) {
                refilled += x.reserved();
            }
        }
        a.check().unwrap();
        assert!(refilled as f64 >= 0.9 * free_before as f64, "{refilled} of {free_before}");
    }

    #[test]
    fn uniform_sizes_reuse_every_hole() {
        // KV-cache blocks are mostly one size: any freed hole must be reused exactly.
        let len = 16 * 1024 + 3;
        let mut a = OffsetAllocator::new(1000 * 16 * 1024 + 5000);
        let mut live = Vec::new();
        while let Some(x) = a.allocate(len) {
            live.push(x);
        }
        let mut rng = Rng::new(9);
        let mut freed = 0;
        for _ in 0..400 {
            a.free(live.swap_remove(rng.below(live.len()))).unwrap();
            freed += 1;
        }
        for _ in 0..freed {
            live.push(a.allocate(len).expect("a hole of the same size is free"));
        }
        a.check().unwrap();
    }

    #[test]
    fn allocation_handle_is_small() {
        assert!(std::mem::size_of::<Allocation>() <= 24);
        assert!(std::mem::size_of::<Node>() <= 40);
    }
}
