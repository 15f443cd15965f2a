//! Global identifiers (GIDs): upstream's text form and the choice of a GID index.

use std::fmt;
use std::net::Ipv6Addr;

use mooncake_core::{Error, Result};

/// A 16-byte InfiniBand/RoCE global identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// True when all bytes are zero (an unused GID table slot).
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }

    /// True for an IPv4-mapped address (`::ffff:a.b.c.d`), the GID of an IPv4 RoCE interface.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10].iter().all(|b| *b == 0) && self.0[10] == 0xff && self.0[11] == 0xff
    }

    /// Parses upstream's form (16 hex bytes joined by `:`, e.g. `fe:80:00:...:01`) or, as an
    /// extension, a standard IPv6 text (`fe80::1`).
    pub fn parse(s: &str) -> Result<Gid> {
        let s = s.trim();
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() == 16 {
            let mut raw = [0u8; 16];
            for (i, p) in parts.iter().enumerate() {
                if p.is_empty() || p.len() > 2 {
                    return Err(bad_gid(s));
                }
                raw[i] = u8::from_str_radix(p, 16).map_err(|_| bad_gid(s))?;
            }
            return Ok(Gid(raw));
        }
        s.parse::<Ipv6Addr>().map(|a| Gid(a.octets())).map_err(|_| bad_gid(s))
    }
}

fn bad_gid(s: &str) -> Error {
    Error::Protocol(format!("GID {s:?} is neither 16 colon-separated hex bytes nor an IPv6 address"))
}

/// Upstream's text form: 16 lowercase two-digit hex bytes joined by `:`.
impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Wire format a GID is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// InfiniBand (link layer IB).
    Ib,
    /// RoCE v1 (Ethernet, no IP header).
    RoceV1,
    /// RoCE v2 (UDP/IP); routable, the usual choice on Ethernet fabrics.
    RoceV2,
    /// A value this crate does not know.
    Other(u32),
}

impl GidType {
    /// From the text of sysfs `ports/<port>/gid_attrs/types/<index>` (`"RoCE v2"`,
    /// `"IB/RoCE v1"`), for libibverbs versions without `ibv_query_gid_type`.
    pub fn from_sysfs(text: &str, ethernet: bool) -> GidType {
        match text.trim() {
            "RoCE v2" => GidType::RoceV2,
            "IB/RoCE v1" | "RoCE v1" | "IB" if ethernet => GidType::RoceV1,
            "IB/RoCE v1" | "RoCE v1" | "IB" => GidType::Ib,
            _ => GidType::Other(u32::MAX),
        }
    }
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    /// Index in the table (`sgid_index`).
    pub index: u32,
    /// The GID.
    pub gid: Gid,
    /// Its type.
    pub kind: GidType,
}

/// Chooses the GID a port uses: `fixed` (`MC_GID_INDEX`) when given, else the first RoCE v2
/// IPv4-mapped GID, else index 0. Zero (unused) entries are never chosen.
pub fn select_gid(table: &[GidEntry], fixed: Option<u32>) -> Result<GidEntry> {
    if let Some(index) = fixed {
        return match table.iter().find(|e| e.index == index) {
            Some(e) if !e.gid.is_zero() => Ok(*e),
            Some(_) => Err(Error::InvalidArgument(format!(
                "GID index {index} (MC_GID_INDEX) is empty on this port; unset MC_GID_INDEX for automatic selection"
            ))),
            None => Err(Error::InvalidArgument(format!(
                "GID index {index} (MC_GID_INDEX) is not in this port's GID table ({} entries)",
                table.len()
            ))),
        };
    }
    if let Some(e) = table.iter().find(|e| e.kind == GidType::RoceV2 && e.gid.is_ipv4_mapped()) {
        return Ok(*e);
    }
    table.iter().find(|e| e.index == 0 && !e.gid.is_zero()).copied().ok_or_else(|| {
        Error::unavailable("the port's GID table has no usable entry (no RoCE v2 IPv4 GID and index 0 is empty)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u32, text: &str, kind: GidType) -> GidEntry {
        GidEntry { index, gid: Gid(text.parse::<Ipv6Addr>().unwrap().octets()), kind }
    }

    #[test]
    fn upstream_text_form_round_trips() {
        let g = Gid::parse("fe80::202:c9ff:fe00:1").unwrap();
        assert_eq!(g.to_string(), "fe:80:00:00:00:00:00:00:02:02:c9:ff:fe:00:00:01");
        assert_eq!(Gid::parse(&g.to_string()).unwrap(), g);
        // Upstream's parser accepts single digits too.
        assert_eq!(Gid::parse("fe:80:0:0:0:0:0:0:2:2:c9:ff:fe:0:0:1").unwrap(), g);
        let v4 = Gid::parse("00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:01").unwrap();
        assert!(v4.is_ipv4_mapped());
        assert!(!g.is_ipv4_mapped());
        assert!(Gid::default().is_zero());
    }

    #[test]
    fn sysfs_gid_types() {
        assert_eq!(GidType::from_sysfs("RoCE v2\n", true), GidType::RoceV2);
        assert_eq!(GidType::from_sysfs("IB/RoCE v1\n", true), GidType::RoceV1);
        assert_eq!(GidType::from_sysfs("IB/RoCE v1", false), GidType::Ib);
        assert_eq!(GidType::from_sysfs("", true), GidType::Other(u32::MAX));
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "",
            "fe80",
            "zz:80:00:00:00:00:00:00:00:00:00:00:00:00:00:01",
            "1:2:3",
            "100:80:0:0:0:0:0:0:0:0:0:0:0:0:0:1",
        ] {
            assert!(matches!(Gid::parse(bad), Err(Error::Protocol(_))), "{bad}");
        }
    }

    #[test]
    fn selection_prefers_fixed_then_roce_v2_ipv4_then_zero() {
        let table = [
            entry(0, "fe80::1", GidType::RoceV1),
            entry(1, "fe80::1", GidType::RoceV2),
            entry(2, "::ffff:10.0.0.1", GidType::RoceV1),
            entry(3, "::ffff:10.0.0.1", GidType::RoceV2),
            entry(4, "::", GidType::RoceV2),
        ];
        assert_eq!(select_gid(&table, None).unwrap().index, 3);
        assert_eq!(select_gid(&table, Some(1)).unwrap().index, 1);
        assert!(matches!(select_gid(&table, Some(4)), Err(Error::InvalidArgument(_))));
        assert!(matches!(select_gid(&table, Some(9)), Err(Error::InvalidArgument(_))));
        // InfiniBand: no RoCE entries, index 0 is the link-local GID.
        let ib = [entry(0, "fe80::2", GidType::Ib), entry(1, "fe80::3", GidType::Ib)];
        assert_eq!(select_gid(&ib, None).unwrap().index, 0);
        assert!(matches!(select_gid(&[], None), Err(Error::Unavailable { .. })));
        assert!(matches!(select_gid(&[entry(0, "::", GidType::Ib)], None), Err(Error::Unavailable { .. })));
    }
}
