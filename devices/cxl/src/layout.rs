//! The region header: where each table lives and what each word means. Every process that maps the region reads
//! and writes these words, on this host or (CXL 3.x shared memory) on others, so the layout is versioned and
//! checked before use. All words are little-endian `u64`s accessed as atomics.
//!
//! ```text
//! offset 0        header page (4 KiB)
//!   0   magic            "MCRSCXL1" (written last when the region is initialized; "MCRSCXL~" while it is)
//!   8   version          1
//!   16  region_size      bytes of the region, header included
//!   24  granularity      allocation unit (power of two, >= page size)
//!   32  max_owners       slots of the owner table
//!   40  max_buffers      slots of the publication table
//!   48  max_allocations  slots of the allocation table
//!   56  owners_offset    = 4096
//!   64  buffers_offset
//!   72  allocs_offset
//!   80  data_offset      first allocatable byte (a multiple of the granularity)
//!   88  region_id (lo)   random, chosen when the region is initialized
//!   96  region_id (hi)
//!   104 checksum         FNV-1a of the words 8..104
//!   128 lock word        0 = free, else the holder: high half of its host tag, low half its pid
//! owners_offset   owner table: max_owners x 64 B   {state = generation << 1 | live, host, pid, start, kind,
//!                                                   heartbeat (ms, realtime)}
//! buffers_offset  publication table: max_buffers x 64 B {seq (odd = published), in_flight, offset, length,
//!                                                          owner index + 1 (0 = free), owner generation}
//! allocs_offset   allocation table: max_allocations x 32 B {start, length (0 = free), owner index + 1,
//!                                                             owner generation}
//! data_offset     allocatable memory, up to region_size
//! ```

use crate::error::CxlError;

/// `"MCRSCXL1"`: an initialized mooncake-rs region.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MCRSCXL1");
/// `"MCRSCXL~"`: a process is initializing the region.
pub const MAGIC_FORMATTING: u64 = u64::from_le_bytes(*b"MCRSCXL~");
/// Layout version written by this crate.
pub const VERSION: u64 = 1;
/// Bytes of the header page.
pub const HEADER_BYTES: u64 = 4096;

/// Byte offset of a header word (see the module docs).
pub const H_MAGIC: u64 = 0;
/// Byte offset of a header word (see the module docs).
pub const H_VERSION: u64 = 8;
/// Byte offset of a header word (see the module docs).
pub const H_REGION_SIZE: u64 = 16;
/// Byte offset of a header word (see the module docs).
pub const H_GRANULARITY: u64 = 24;
/// Byte offset of a header word (see the module docs).
pub const H_MAX_OWNERS: u64 = 32;
/// Byte offset of a header word (see the module docs).
pub const H_MAX_BUFFERS: u64 = 40;
/// Byte offset of a header word (see the module docs).
pub const H_MAX_ALLOCS: u64 = 48;
/// Byte offset of a header word (see the module docs).
pub const H_OWNERS_OFF: u64 = 56;
/// Byte offset of a header word (see the module docs).
pub const H_BUFFERS_OFF: u64 = 64;
/// Byte offset of a header word (see the module docs).
pub const H_ALLOCS_OFF: u64 = 72;
/// Byte offset of a header word (see the module docs).
pub const H_DATA_OFF: u64 = 80;
/// Byte offset of a header word (see the module docs).
pub const H_ID_LO: u64 = 88;
/// Byte offset of a header word (see the module docs).
pub const H_ID_HI: u64 = 96;
/// Byte offset of a header word (see the module docs).
pub const H_CHECKSUM: u64 = 104;
/// Byte offset of a header word (see the module docs).
pub const H_LOCK: u64 = 128;

/// Bytes of one owner table entry.
pub const OWNER_BYTES: u64 = 64;
/// Byte offset of a word in an owner table entry.
pub const O_STATE: u64 = 0;
/// Byte offset of a word in an owner table entry.
pub const O_HOST: u64 = 8;
/// Byte offset of a word in an owner table entry.
pub const O_PID: u64 = 16;
/// Byte offset of a word in an owner table entry.
pub const O_START: u64 = 24;
/// Byte offset of a word in an owner table entry.
pub const O_KIND: u64 = 32;
/// Byte offset of a word in an owner table entry: the owning process's last heartbeat, in milliseconds of
/// `CLOCK_REALTIME` (0: the process does not beat, e.g. an older version).
pub const O_BEAT: u64 = 40;

/// Bytes of one publication table slot (a cache line: initiators' in-flight counts of different slots do not
/// share lines).
pub const SLOT_BYTES: u64 = 64;
/// Byte offset of a word in a publication table slot.
pub const S_SEQ: u64 = 0;
/// Byte offset of a word in a publication table slot.
pub const S_INFLIGHT: u64 = 8;
/// Byte offset of a word in a publication table slot.
pub const S_OFFSET: u64 = 16;
/// Byte offset of a word in a publication table slot.
pub const S_LEN: u64 = 24;
/// Byte offset of a word in a publication table slot.
pub const S_OWNER: u64 = 32;
/// Byte offset of a word in a publication table slot.
pub const S_OWNER_GEN: u64 = 40;

/// Bytes of one allocation table entry.
pub const ALLOC_BYTES: u64 = 32;
/// Byte offset of a word in an allocation table entry.
pub const A_START: u64 = 0;
/// Byte offset of a word in an allocation table entry.
pub const A_LEN: u64 = 8;
/// Byte offset of a word in an allocation table entry.
pub const A_OWNER: u64 = 16;
/// Byte offset of a word in an allocation table entry.
pub const A_OWNER_GEN: u64 = 24;
/// [`A_OWNER`] of a named shared area: no process owns it, it is never reclaimed, and [`A_OWNER_GEN`] holds
/// the hash of its name.
pub const SHARED_OWNER: u64 = u64::MAX;

/// Where everything is in a region: read from its header, or computed for a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the region, header included.
    pub region_size: u64,
    /// Allocation unit.
    pub granularity: u64,
    /// Owner table slots.
    pub max_owners: u32,
    /// Publication table slots.
    pub max_buffers: u32,
    /// Allocation table slots.
    pub max_allocations: u32,
    /// Start of the owner table.
    pub owners_offset: u64,
    /// Start of the publication table.
    pub buffers_offset: u64,
    /// Start of the allocation table.
    pub allocs_offset: u64,
    /// First allocatable byte.
    pub data_offset: u64,
}

impl Layout {
    /// The layout of a region of `region_size` bytes with these table sizes; `None` when the numbers overflow.
    pub fn compute(
        region_size: u64,
        granularity: u64,
        max_owners: u32,
        max_buffers: u32,
        max_allocations: u32,
    ) -> Option<Layout> {
        let owners_offset = HEADER_BYTES;
        let buffers_offset = owners_offset.checked_add(u64::from(max_owners).checked_mul(OWNER_BYTES)?)?;
        let allocs_offset = buffers_offset.checked_add(u64::from(max_buffers).checked_mul(SLOT_BYTES)?)?;
        let end = allocs_offset.checked_add(u64::from(max_allocations).checked_mul(ALLOC_BYTES)?)?;
        let data_offset = end.checked_next_multiple_of(granularity)?;
        Some(Layout {
            region_size,
            granularity,
            max_owners,
            max_buffers,
            max_allocations,
            owners_offset,
            buffers_offset,
            allocs_offset,
            data_offset,
        })
    }

    /// The header page alone (before the header is read).
    pub(crate) fn header_only(region_size: u64) -> Layout {
        Layout {
            region_size,
            granularity: HEADER_BYTES,
            max_owners: 0,
            max_buffers: 0,
            max_allocations: 0,
            owners_offset: HEADER_BYTES,
            buffers_offset: HEADER_BYTES,
            allocs_offset: HEADER_BYTES,
            data_offset: HEADER_BYTES,
        }
    }

    /// Bytes available for allocation.
    pub fn data_bytes(&self) -> u64 {
        self.region_size.saturating_sub(self.data_offset)
    }

    /// The header words 8..104 this layout writes (version first), for the checksum.
    pub(crate) fn words(&self, id: u128) -> [u64; 12] {
        [
            VERSION,
            self.region_size,
            self.granularity,
            u64::from(self.max_owners),
            u64::from(self.max_buffers),
            u64::from(self.max_allocations),
            self.owners_offset,
            self.buffers_offset,
            self.allocs_offset,
            self.data_offset,
            id as u64,
            (id >> 64) as u64,
        ]
    }

    /// Checks the settings before a region is formatted or opened with them.
    pub(crate) fn check_settings(path: &std::path::Path, granularity: u64) -> Result<(), CxlError> {
        let page = crate::sys::page_size() as u64;
        if !granularity.is_power_of_two() || granularity < page || granularity > crate::MAX_ALIGNMENT {
            return Err(CxlError::BadValue {
                name: crate::config::ENV_GRANULARITY.into(),
                value: granularity.to_string(),
                reason: format!(
                    "the granularity of {} must be a power of two between the page size ({page}) and {}",
                    path.display(),
                    crate::MAX_ALIGNMENT
                ),
            });
        }
        Ok(())
    }
}

/// FNV-1a over the checksummed header words.
pub(crate) fn checksum(words: &[u64]) -> u64 {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    crate::sys::fnv1a(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_header_and_data_is_aligned() {
        let l = Layout::compute(1 << 30, 4096, 256, 4096, 4096).unwrap();
        assert_eq!(l.owners_offset, 4096);
        assert_eq!(l.buffers_offset, 4096 + 256 * 64);
        assert_eq!(l.allocs_offset, l.buffers_offset + 4096 * 64);
        assert_eq!(l.data_offset, (l.allocs_offset + 4096 * 32).next_multiple_of(4096));
        assert_eq!(l.data_offset % 4096, 0);
        let big = Layout::compute(1 << 30, 2 << 20, 256, 4096, 4096).unwrap();
        assert_eq!(big.data_offset, 2 << 20);
        assert!(Layout::compute(1, 4096, u32::MAX, u32::MAX, u32::MAX).is_some());
        assert_ne!(checksum(&l.words(1)), checksum(&l.words(2)));
    }
}
