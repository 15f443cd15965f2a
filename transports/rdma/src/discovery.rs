//! Device discovery as data: what the verbs layer reports about each NIC, and the pure decisions
//! taken from it (usable or not, which port attributes and GID, what `probe()` answers).
//!
//! The verbs calls that fill these structures live in `verbs.rs`; everything here is tested
//! without hardware.

use std::io;

use mooncake_core::registry::Availability;
use mooncake_core::{Error, Result};

use crate::gid::{GidEntry, select_gid};

/// Logical state of a port (`ibv_port_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// Link down.
    Down,
    /// Physical link up, subnet manager not done.
    Init,
    /// Armed by the subnet manager.
    Armed,
    /// Ready for traffic.
    Active,
    /// Was active; physical link is recovering.
    ActiveDefer,
    /// Any other value.
    Other(u32),
}

impl PortState {
    /// From the `ibv_port_state` number.
    pub fn from_ibv(v: u32) -> Self {
        match v {
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            5 => PortState::ActiveDefer,
            o => PortState::Other(o),
        }
    }
}

/// Link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// Not reported (old drivers; treated as InfiniBand).
    Unspecified,
    /// InfiniBand: LIDs route, GIDs are optional.
    InfiniBand,
    /// Ethernet (RoCE): every address needs a GID.
    Ethernet,
    /// Any other value.
    Other(u8),
}

impl LinkLayer {
    /// From the `IBV_LINK_LAYER_*` number.
    pub fn from_ibv(v: u8) -> Self {
        match v {
            0 => LinkLayer::Unspecified,
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            o => LinkLayer::Other(o),
        }
    }
}

/// MTU in bytes of an `ibv_mtu` value (1 = 256 ... 5 = 4096).
pub fn mtu_bytes(ibv_mtu: u32) -> Option<u32> {
    (1..=5).contains(&ibv_mtu).then(|| 128u32 << ibv_mtu)
}

/// `ibv_mtu` value of an MTU in bytes.
pub fn mtu_ibv(bytes: u32) -> Option<u32> {
    match bytes {
        256 => Some(1),
        512 => Some(2),
        1024 => Some(3),
        2048 => Some(4),
        4096 => Some(5),
        _ => None,
    }
}

/// The path MTU of a connection: the smaller of the port's active MTU and the configured one.
pub fn path_mtu(active: u32, configured: u32) -> u32 {
    active.min(configured)
}

/// What the verbs layer found on one port of one NIC.
#[derive(Debug, Clone, PartialEq)]
pub struct PortInfo {
    /// Port number (from 1).
    pub port: u8,
    /// Logical state.
    pub state: PortState,
    /// Active MTU in bytes (0 when the driver reports an unknown value).
    pub active_mtu: u32,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// The GID table.
    pub gids: Vec<GidEntry>,
}

/// One NIC as reported by the verbs layer.
#[derive(Debug, Clone, PartialEq)]
pub struct NicInfo {
    /// Device name (`mlx5_0`).
    pub name: String,
    /// The configured port, or why it could not be queried.
    pub port: std::result::Result<PortInfo, String>,
}

/// A NIC this transport will use, with the port attributes it publishes and connects with.
#[derive(Debug, Clone, PartialEq)]
pub struct UsableNic {
    /// Device name.
    pub name: String,
    /// Port number.
    pub port: u8,
    /// LID published in the descriptor.
    pub lid: u16,
    /// Chosen GID (published as `gid`, used as `sgid_index`).
    pub gid: GidEntry,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// Link layer.
    pub link_layer: LinkLayer,
}

/// Decides whether `nic` is usable: its port is active and has a usable GID.
pub fn usable_nic(nic: &NicInfo, gid_index: Option<u32>) -> Result<UsableNic> {
    let port =
        nic.port.as_ref().map_err(|why| Error::unavailable(format!("{}: cannot query the port: {why}", nic.name)))?;
    if port.state != PortState::Active {
        return Err(Error::unavailable(format!(
            "{} port {}: state {:?}, not Active (check the cable / subnet manager, or pick another port with MC_IB_PORT)",
            nic.name, port.port, port.state
        )));
    }
    if mtu_ibv(port.active_mtu).is_none() {
        return Err(Error::unavailable(format!(
            "{} port {}: unknown active MTU {}",
            nic.name, port.port, port.active_mtu
        )));
    }
    let gid = select_gid(&port.gids, gid_index).map_err(|e| match e {
        Error::Unavailable { reason } => Error::unavailable(format!("{} port {}: {reason}", nic.name, port.port)),
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{} port {}: {m}", nic.name, port.port)),
        other => other,
    })?;
    Ok(UsableNic {
        name: nic.name.clone(),
        port: port.port,
        lid: port.lid,
        gid,
        active_mtu: port.active_mtu,
        link_layer: port.link_layer,
    })
}

/// The "no RDMA devices" explanation for an error of `ibv_get_device_list`.
pub fn list_error_reason(err: &io::Error) -> String {
    let hint = match err.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no RDMA (InfiniBand verbs) support",
        Some(libc::ENODEV) | Some(libc::ENOENT) => "no RDMA device is present",
        Some(libc::EOPNOTSUPP) => "libibverbs.so.1 could not be loaded (install rdma-core's libibverbs1)",
        Some(libc::EPERM) | Some(libc::EACCES) => "permission denied on /dev/infiniband",
        _ => "ibv_get_device_list failed",
    };
    format!("no RDMA devices: {hint} ({err}); use protocol=tcp on this machine")
}

/// Filters `names` by `filter` (empty = keep all), keeping the verbs order.
pub fn apply_filter(names: Vec<String>, filter: &[String]) -> Vec<String> {
    if filter.is_empty() { names } else { names.into_iter().filter(|n| filter.iter().any(|f| f == n)).collect() }
}

/// Turns a device listing into the NICs to use, or a typed `Unavailable` that says why none is.
pub fn select_nics(
    listing: std::result::Result<Vec<NicInfo>, io::Error>,
    filter: &[String],
    gid_index: Option<u32>,
) -> Result<Vec<UsableNic>> {
    let nics = listing.map_err(|e| Error::unavailable(list_error_reason(&e)))?;
    if nics.is_empty() {
        return Err(Error::unavailable(
            "no RDMA devices: ibv_get_device_list returned an empty list; use protocol=tcp on this machine",
        ));
    }
    let total = nics.len();
    let nics: Vec<NicInfo> = nics.into_iter().filter(|n| filter.is_empty() || filter.contains(&n.name)).collect();
    if nics.is_empty() {
        return Err(Error::unavailable(format!(
            "no RDMA devices: none of the {total} devices matches the filter {filter:?} (MC_MS_FILTERS)"
        )));
    }
    let mut usable = Vec::new();
    let mut why = Vec::new();
    for nic in &nics {
        match usable_nic(nic, gid_index) {
            Ok(u) => usable.push(u),
            Err(e) => why.push(e.to_string()),
        }
    }
    if usable.is_empty() {
        return Err(Error::unavailable(format!("no usable RDMA device: {}", why.join("; "))));
    }
    for w in why {
        tracing::warn!(reason = %w, "skipping RDMA device");
    }
    Ok(usable)
}

/// `probe()`'s answer for a device listing.
pub fn availability(
    listing: std::result::Result<Vec<NicInfo>, io::Error>,
    filter: &[String],
    gid_index: Option<u32>,
) -> Availability {
    match select_nics(listing, filter, gid_index) {
        Ok(_) => Availability::Available,
        Err(Error::Unavailable { reason }) => Availability::Unavailable(reason),
        Err(e) => Availability::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gid::{Gid, GidType};

    fn port(state: PortState, gids: Vec<GidEntry>) -> PortInfo {
        PortInfo { port: 1, state, active_mtu: 4096, lid: 0, link_layer: LinkLayer::Ethernet, gids }
    }

    fn roce_v2(index: u32, last: u8) -> GidEntry {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12] = 10;
        raw[15] = last;
        GidEntry { index, gid: Gid(raw), kind: GidType::RoceV2 }
    }

    fn nic(name: &str, p: std::result::Result<PortInfo, String>) -> NicInfo {
        NicInfo { name: name.into(), port: p }
    }

    #[test]
    fn enosys_enodev_and_empty_are_unavailable_not_panics() {
        for errno in [libc::ENOSYS, libc::ENODEV, libc::EOPNOTSUPP, libc::EIO] {
            let a = availability(Err(io::Error::from_raw_os_error(errno)), &[], None);
            match a {
                Availability::Unavailable(r) => assert!(r.starts_with("no RDMA devices: "), "{r}"),
                Availability::Available => panic!("errno {errno} must be unavailable"),
            }
        }
        let Availability::Unavailable(r) = availability(Err(io::Error::from_raw_os_error(libc::ENOSYS)), &[], None)
        else {
            panic!()
        };
        assert!(r.contains("no RDMA (InfiniBand verbs) support") && r.contains("os error 38"), "{r}");
        let Availability::Unavailable(r) = availability(Ok(vec![]), &[], None) else { panic!() };
        assert!(r.contains("empty list"));
    }

    #[test]
    fn only_active_ports_with_a_gid_are_used() {
        let listing = vec![
            nic("mlx5_0", Ok(port(PortState::Down, vec![roce_v2(3, 1)]))),
            nic("mlx5_1", Ok(port(PortState::Active, vec![roce_v2(3, 2)]))),
            nic("mlx5_2", Err("EINVAL".into())),
            nic("mlx5_3", Ok(port(PortState::Active, vec![]))),
        ];
        let usable = select_nics(Ok(listing.clone()), &[], None).unwrap();
        assert_eq!(usable.len(), 1);
        assert_eq!(usable[0].name, "mlx5_1");
        assert_eq!(usable[0].gid.index, 3);
        assert_eq!(availability(Ok(listing.clone()), &[], None), Availability::Available);
        let Availability::Unavailable(r) = availability(Ok(listing[..1].to_vec()), &[], None) else { panic!() };
        assert!(r.contains("mlx5_0 port 1: state Down"), "{r}");
    }

    #[test]
    fn filter_selects_devices() {
        let listing = vec![
            nic("mlx5_0", Ok(port(PortState::Active, vec![roce_v2(0, 1)]))),
            nic("mlx5_1", Ok(port(PortState::Active, vec![roce_v2(0, 2)]))),
        ];
        let usable = select_nics(Ok(listing.clone()), &["mlx5_1".into()], None).unwrap();
        assert_eq!(usable.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["mlx5_1"]);
        let Availability::Unavailable(r) = availability(Ok(listing), &["mlx5_9".into()], None) else { panic!() };
        assert!(r.contains("MC_MS_FILTERS"), "{r}");
        assert_eq!(apply_filter(vec!["a".into(), "b".into()], &[]), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(apply_filter(vec!["a".into(), "b".into()], &["b".into()]), vec!["b".to_string()]);
    }

    #[test]
    fn fixed_gid_index_errors_are_typed() {
        let listing = vec![nic("mlx5_0", Ok(port(PortState::Active, vec![roce_v2(0, 1)])))];
        assert!(matches!(select_nics(Ok(listing), &[], Some(7)), Err(Error::Unavailable { .. })));
    }

    #[test]
    fn mtu_conversions() {
        assert_eq!(mtu_bytes(1), Some(256));
        assert_eq!(mtu_bytes(5), Some(4096));
        assert_eq!(mtu_bytes(0), None);
        assert_eq!(mtu_bytes(6), None);
        for b in [256, 512, 1024, 2048, 4096] {
            assert_eq!(mtu_bytes(mtu_ibv(b).unwrap()), Some(b));
        }
        assert_eq!(mtu_ibv(1500), None);
        assert_eq!(path_mtu(1024, 4096), 1024);
        assert_eq!(path_mtu(4096, 2048), 2048);
        assert_eq!(PortState::from_ibv(4), PortState::Active);
        assert_eq!(PortState::from_ibv(9), PortState::Other(9));
        assert_eq!(LinkLayer::from_ibv(2), LinkLayer::Ethernet);
    }
}
