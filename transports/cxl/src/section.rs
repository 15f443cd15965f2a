//! The descriptor fields of the `cxl` protocol.
//!
//! Upstream's (docs/wire-formats.md section 2): top-level `cxl_name` (the device path) and `cxl_base_addr` (where
//! the owner mapped the region), per buffer `offset` (its offset in the region; the decoder makes it the buffer's
//! address). Ours, ignored by upstream: top-level `cxl_region_id` (the id in the region header: the same region
//! whatever path a host names it by), `cxl_owner` and `cxl_owner_gen` (the engine's entry in the region's owner
//! table), per buffer `cxl_slot` and `cxl_seq` (its entry in the publication table).

use mooncake_core::descriptor::{FIELD_OFFSET, FieldError, Fields, Section};
use mooncake_device_cxl::{OwnerRef, Publication};

/// Top-level `cxl_name`.
pub const FIELD_NAME: &str = "cxl_name";
/// Top-level `cxl_base_addr`.
pub const FIELD_BASE_ADDR: &str = "cxl_base_addr";
/// Top-level `cxl_region_id` (32 hex digits).
pub const FIELD_REGION_ID: &str = "cxl_region_id";
/// Top-level `cxl_owner`.
pub const FIELD_OWNER: &str = "cxl_owner";
/// Top-level `cxl_owner_gen`.
pub const FIELD_OWNER_GEN: &str = "cxl_owner_gen";
/// Per-buffer `cxl_slot`.
pub const FIELD_SLOT: &str = "cxl_slot";
/// Per-buffer `cxl_seq`.
pub const FIELD_SEQ: &str = "cxl_seq";

/// The segment's part: which region, and (peers of ours) which owner entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CxlSegment {
    /// The device path on the owner's host (upstream's `cxl_name`).
    pub name: String,
    /// Where the owner mapped the region (upstream's `cxl_base_addr`; informational).
    pub base_addr: u64,
    /// The region's id (ours).
    pub region_id: Option<u128>,
    /// The owner entry of the engine (ours).
    pub owner: Option<OwnerRef>,
}

impl Section for CxlSegment {
    fn read(fields: &Fields) -> Result<Option<Self>, FieldError> {
        let Some(name) = fields.get_as::<String>(FIELD_NAME)? else {
            return Ok(None);
        };
        let base_addr = fields.get_as::<u64>(FIELD_BASE_ADDR)?.unwrap_or(0);
        let region_id = match fields.get_as::<String>(FIELD_REGION_ID)? {
            None => None,
            Some(hex) => Some(
                u128::from_str_radix(&hex, 16).map_err(|_| FieldError::new(FIELD_REGION_ID, "is not 32 hex digits"))?,
            ),
        };
        let owner = match (fields.get_as::<u32>(FIELD_OWNER)?, fields.get_as::<u64>(FIELD_OWNER_GEN)?) {
            (Some(index), Some(generation)) => Some(OwnerRef { index, generation }),
            (None, None) => None,
            _ => return Err(FieldError::new(FIELD_OWNER, "comes without cxl_owner_gen (or the other way round)")),
        };
        Ok(Some(CxlSegment { name, base_addr, region_id, owner }))
    }

    fn write(&self, fields: &mut Fields) {
        fields.insert_leading(FIELD_NAME, self.name.clone());
        fields.insert_leading(FIELD_BASE_ADDR, self.base_addr);
        if let Some(id) = self.region_id {
            fields.insert(FIELD_REGION_ID, format!("{id:032x}"));
        }
        if let Some(o) = self.owner {
            fields.insert(FIELD_OWNER, o.index);
            fields.insert(FIELD_OWNER_GEN, o.generation);
        }
    }
}

/// A buffer's part: its offset in the region and (peers of ours) its publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CxlBuffer {
    /// Offset in the region (upstream's `offset`).
    pub offset: u64,
    /// Its entry in the publication table (ours).
    pub publication: Option<Publication>,
}

impl Section for CxlBuffer {
    fn read(fields: &Fields) -> Result<Option<Self>, FieldError> {
        let Some(offset) = fields.get_as::<u64>(FIELD_OFFSET)? else {
            return Ok(None);
        };
        let publication = match (fields.get_as::<u32>(FIELD_SLOT)?, fields.get_as::<u64>(FIELD_SEQ)?) {
            (Some(slot), Some(seq)) => Some(Publication { slot, seq }),
            (None, None) => None,
            _ => return Err(FieldError::new(FIELD_SLOT, "comes without cxl_seq (or the other way round)")),
        };
        Ok(Some(CxlBuffer { offset, publication }))
    }

    fn write(&self, fields: &mut Fields) {
        fields.insert_leading(FIELD_OFFSET, self.offset);
        if let Some(p) = self.publication {
            fields.insert(FIELD_SLOT, p.slot);
            fields.insert(FIELD_SEQ, p.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip_and_reject_halves() {
        let seg = CxlSegment {
            name: "/dev/dax0.0".into(),
            base_addr: 1 << 40,
            region_id: Some(0xabc),
            owner: Some(OwnerRef { index: 3, generation: 9 }),
        };
        let mut f = Fields::default();
        seg.write(&mut f);
        assert_eq!(f[FIELD_REGION_ID], "00000000000000000000000000000abc");
        assert_eq!(CxlSegment::read(&f).unwrap(), Some(seg));
        f.remove(FIELD_OWNER_GEN);
        assert!(CxlSegment::read(&f).is_err());
        assert_eq!(CxlSegment::read(&Fields::default()).unwrap(), None);
        let b = CxlBuffer { offset: 4096, publication: Some(Publication { slot: 1, seq: 3 }) };
        let mut f = Fields::default();
        b.write(&mut f);
        assert_eq!(CxlBuffer::read(&f).unwrap(), Some(b));
        f.remove(FIELD_SEQ);
        assert!(CxlBuffer::read(&f).is_err());
    }
}
