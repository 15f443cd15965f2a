//! Link-time registry of backends (`inventory`). A backend crate submits a factory; the final
//! binary must reference the crate (`use mooncake_transport_tcp as _;`) or the linker drops it.

use std::sync::Arc;

use crate::device::MemoryDevice;
use crate::error::{Error, Result};
use crate::metadata::MetadataStore;
use crate::rpc::PeerRpc;
use crate::transport::{BackendConfig, Transport};

/// Whether a backend works on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Usable here.
    Available,
    /// Linked but not usable; the reason says what is missing.
    Unavailable(String),
}

impl Availability {
    /// True when usable.
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available)
    }
}

/// Registers a transport.
pub struct TransportFactory {
    /// Protocol string (`tcp`).
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// Checks that hardware and libraries are present. Never panics.
    pub probe: fn() -> Availability,
    /// Creates an instance.
    pub create: fn(&BackendConfig) -> Result<Arc<dyn Transport>>,
}

/// Registers a memory device driver.
pub struct DeviceFactory {
    /// Driver name (`host`, `cuda`).
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// Checks that the device and its driver are present. Never panics.
    pub probe: fn() -> Availability,
    /// Creates an instance.
    pub create: fn() -> Result<Arc<dyn MemoryDevice>>,
}

/// Registers a metadata store.
pub struct MetadataFactory {
    /// Backend name (`p2p`, `http`, `etcd`, `redis`).
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// Whether this backend handles a connection string (`P2PHANDSHAKE`, `http://...`).
    pub accepts: fn(&str) -> bool,
    /// Creates a client for a connection string (connects lazily).
    pub create: fn(&str) -> Result<Arc<dyn MetadataStore>>,
}

/// Registers the peer RPC channel.
pub struct PeerRpcFactory {
    /// Name (`handshake`).
    pub name: &'static str,
    /// Creates an instance.
    pub create: fn() -> Arc<dyn PeerRpc>,
}

inventory::collect!(TransportFactory);
inventory::collect!(DeviceFactory);
inventory::collect!(MetadataFactory);
inventory::collect!(PeerRpcFactory);

/// Every linked transport, sorted by name.
pub fn transports() -> Vec<&'static TransportFactory> {
    let mut v: Vec<_> = inventory::iter::<TransportFactory>.into_iter().collect();
    v.sort_by_key(|f| f.name);
    v
}

/// Every linked device driver, sorted by name.
pub fn devices() -> Vec<&'static DeviceFactory> {
    let mut v: Vec<_> = inventory::iter::<DeviceFactory>.into_iter().collect();
    v.sort_by_key(|f| f.name);
    v
}

/// Every linked metadata store, sorted by name.
pub fn metadata_stores() -> Vec<&'static MetadataFactory> {
    let mut v: Vec<_> = inventory::iter::<MetadataFactory>.into_iter().collect();
    v.sort_by_key(|f| f.name);
    v
}

/// The transport registered as `name`, or a typed error listing what is linked.
pub fn transport(name: &str) -> Result<&'static TransportFactory> {
    transports().into_iter().find(|f| f.name == name).ok_or_else(|| {
        Error::unavailable(format!(
            "transport {name:?} is not linked into this build (linked: {}); enable its cargo feature",
            names(transports().iter().map(|f| f.name))
        ))
    })
}

/// Creates the transport `name` after checking `probe()`.
pub fn create_transport(name: &str, config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    let f = transport(name)?;
    match (f.probe)() {
        Availability::Available => (f.create)(config),
        Availability::Unavailable(why) => Err(Error::unavailable(format!("transport {name:?}: {why}"))),
    }
}

/// Creates the metadata client for a connection string.
pub fn create_metadata(conn: &str) -> Result<Arc<dyn MetadataStore>> {
    let f = metadata_stores().into_iter().find(|f| (f.accepts)(conn)).ok_or_else(|| {
        Error::unavailable(format!(
            "no metadata backend accepts {conn:?} (linked: {}); enable the matching cargo feature",
            names(metadata_stores().iter().map(|f| f.name))
        ))
    })?;
    (f.create)(conn)
}

/// Creates the peer RPC channel (the first one linked).
pub fn create_peer_rpc() -> Result<Arc<dyn PeerRpc>> {
    inventory::iter::<PeerRpcFactory>.into_iter().next().map(|f| (f.create)()).ok_or_else(|| {
        Error::unavailable("no peer RPC channel is linked; link mooncake-metadata-p2p (the facade does)")
    })
}

/// Creates every device driver whose probe passes.
pub fn available_devices() -> Vec<Arc<dyn MemoryDevice>> {
    devices()
        .into_iter()
        .filter(|f| (f.probe)().is_available())
        .filter_map(|f| match (f.create)() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(device = f.name, error = %e, "device probe passed but creation failed");
                None
            }
        })
        .collect()
}

/// One row of [`probe_all`].
#[derive(Debug, Clone)]
pub struct BackendReport {
    /// `transport`, `device` or `metadata`.
    pub kind: &'static str,
    /// Backend name.
    pub name: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Probe result (metadata stores are always available; they fail at connect time).
    pub availability: Availability,
}

/// What is linked and what works here.
pub fn probe_all() -> Vec<BackendReport> {
    let mut out = Vec::new();
    for f in transports() {
        out.push(BackendReport { kind: "transport", name: f.name, summary: f.summary, availability: (f.probe)() });
    }
    for f in devices() {
        out.push(BackendReport { kind: "device", name: f.name, summary: f.summary, availability: (f.probe)() });
    }
    for f in metadata_stores() {
        out.push(BackendReport {
            kind: "metadata",
            name: f.name,
            summary: f.summary,
            availability: Availability::Available,
        });
    }
    out
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<_> = it.collect();
    if v.is_empty() { "none".into() } else { v.join(", ") }
}
