//! Unit tests of the transport: keys, error classes, the published descriptor,
//! and transfers between two instances in this process (one rail, and striped over several rails
//! where this host has several interfaces).

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::transport::{PeerEvents, TransportContext};
use mooncake_core::{Batch, Location, RegionTable, TransferState, TransferStatus};
use mooncake_libfabric_sys as sys;

use super::*;
use crate::core::{Class, classify, next_key};

#[test]
fn requested_keys_are_unique_and_fit_the_key_size() {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10_000 {
        assert!(seen.insert(next_key(8)), "a key was handed out twice");
    }
    for _ in 0..70_000 {
        let k = next_key(2);
        assert!((1..=0xffff).contains(&k), "{k} outside a 2-byte key space (0 excluded)");
    }
    // Interleaved sizes still never repeat an 8-byte key.
    assert!(seen.insert(next_key(8)));
}

#[test]
fn errors_are_classified() {
    assert_eq!(classify(sys::FI_EACCES, 0), Class::Rejected);
    assert_eq!(classify(sys::FI_EKEYREJECTED, 0), Class::Rejected);
    assert_eq!(classify(sys::FI_ENOTCONN, libc::EPIPE), Class::Connection);
    assert_eq!(classify(sys::FI_ECONNREFUSED, 0), Class::Connection);
    assert_eq!(classify(sys::FI_ECANCELED, libc::ENOENT), Class::Ambiguous);
    assert_eq!(classify(sys::FI_ECANCELED, 0), Class::Connection);
    assert_eq!(classify(sys::FI_EOTHER, libc::ESRCH), Class::Connection);
    assert_eq!(classify(sys::FI_ENOMEM, 0), Class::Other);
}

#[test]
fn capabilities_follow_the_provider() {
    let tcp = capabilities_for(&FabricConfig { provider: "tcp;ofi_rxm".into(), ..FabricConfig::default() });
    let shm = capabilities_for(&FabricConfig { provider: "shm".into(), ..FabricConfig::default() });
    assert!(!tcp.same_host_only && shm.same_host_only);
    assert!(tcp.requires_local_registration && tcp.read && tcp.write && tcp.reports_peer_failure);
    assert!(shm.model.latency < tcp.model.latency);
    assert!(LibfabricTransport::new("rdma", FabricConfig::default()).is_err());
    assert_eq!(LibfabricTransport::new(EFA, FabricConfig::default()).unwrap().name(), EFA);
}

#[test]
fn efa_probe_names_what_is_missing() {
    match probe_provider(EFA_PROVIDER) {
        Availability::Available => {} // an EFA instance
        Availability::Unavailable(why) => assert!(why.starts_with("no efa provider"), "{why}"),
    }
    match probe_provider("no-such-provider") {
        Availability::Unavailable(why) => assert!(why.contains("no no-such-provider provider"), "{why}"),
        Availability::Available => panic!("an unknown provider probed available"),
    }
}

struct NoEvents;

impl PeerEvents for NoEvents {
    fn peer_failed(&self, _segment_name: &str) {}
}

/// A started transport with one registered, zeroed buffer (owned through a raw pointer: the
/// transport writes it behind Rust's back).
struct Node {
    rt: tokio::runtime::Runtime,
    t: Arc<LibfabricTransport>,
    regions: Arc<RegionTable>,
    ptr: *mut u8,
    len: usize,
    desc: BufferDesc,
}

impl Node {
    fn new(config: FabricConfig, len: usize) -> Node {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let t = Arc::new(LibfabricTransport::new(LIBFABRIC, config).unwrap());
        let regions = Arc::new(RegionTable::new());
        let ctx = TransportContext {
            local_name: "unit".into(),
            bind_host: "127.0.0.1".into(),
            regions: regions.clone(),
            runtime: rt.handle().clone(),
            peer_events: Arc::new(NoEvents),
            peers: Arc::new(mooncake_core::NoPeerHandshake),
            devices: Vec::new(),
        };
        rt.block_on(t.start(&ctx)).expect("starting the transport (is the provider available?)");
        let ptr = Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>();
        let addr = ptr as u64;
        // SAFETY: the block is freed only in Drop, after the transport is shut down (its endpoints closed).
        unsafe { regions.insert(addr, len as u64, Location::Cpu(Some(0))) }.unwrap();
        let mut desc = BufferDesc { name: "cpu:0".into(), addr, length: len as u64, ..Default::default() };
        t.register_memory(&regions.get(addr).unwrap(), &mut desc).unwrap();
        Node { rt, t, regions, ptr, len, desc }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialized bytes until drop; tests look only while no
        // transfer touching them is in flight.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, with `&mut self` making this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn segment(&self, name: &str) -> Arc<RemoteSegment> {
        let mut d = SegmentDescriptor {
            name: name.into(),
            protocol: LIBFABRIC.into(),
            buffers: vec![self.desc.clone()],
            ..Default::default()
        };
        self.t.describe(&mut d);
        Arc::new(RemoteSegment { handle: 1, name: name.into(), host: "127.0.0.1".into(), descriptor: d })
    }

    /// Runs one request and returns its final status.
    fn run(&self, target: &Arc<RemoteSegment>, opcode: Opcode, local: u64, remote: u64, len: u64) -> TransferStatus {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        // SAFETY: the transport must itself find the range registered (its own table) before the NIC touches it;
        // the tests' registered blocks live as long as their nodes.
        let local = unsafe { mooncake_core::LocalRange::vouched(local, len) };
        let task = TransferTask { opcode, local, remote_addr: remote, completion: b.completion(0) };
        self.t.submit(target, vec![task]);
        b.wait_blocking(Duration::from_secs(30)).expect("transfer did not finish");
        b.status(0).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(r) = self.regions.get(self.addr()) {
            let _ = self.t.unregister_memory(&r);
        }
        let t = self.t.clone();
        self.rt.block_on(async move { t.shutdown().await });
        // SAFETY: the pointer came from Box::into_raw of a `len`-byte slice; the transport is shut
        // down (its endpoints closed), so nothing touches the memory any more.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn descriptor_carries_addresses_provider_and_keys() {
    let config = FabricConfig { provider: "tcp;ofi_rxm".into(), ..FabricConfig::default() };
    let a = Node::new(config, 8192);
    let seg = a.segment("a");
    let d = &seg.descriptor;
    let addrs = d.fields["libfabric_addr"].as_array().unwrap();
    assert_eq!(addrs.len(), a.t.rails().len());
    assert_eq!(addrs[0].as_str().unwrap(), a.t.addresses()[0]);
    assert!(!desc::from_hex(addrs[0].as_str().unwrap()).unwrap().is_empty());
    assert_eq!(d.fields["libfabric_provider"], "tcp;ofi_rxm");
    assert_eq!(d.fields["libfabric_devices"].as_array().unwrap().len(), addrs.len());
    let keys = d.buffers[0].fields["libfabric_rkey"].as_array().unwrap();
    assert_eq!(keys.len(), addrs.len(), "one key per rail");
    // A second registration gets different keys.
    let other = vec![0u8; 4096];
    let addr = other.as_ptr() as u64;
    assert_ne!(addr, a.addr());
    // SAFETY: `other` outlives the registration (removed below) and no transfer touches it.
    unsafe { a.regions.insert(addr, 4096, Location::Cpu(Some(0))) }.unwrap();
    let mut bd = BufferDesc { name: "cpu:0".into(), addr, length: 4096, ..Default::default() };
    a.t.register_memory(&a.regions.get(addr).unwrap(), &mut bd).unwrap();
    assert_ne!(bd.fields["libfabric_rkey"], d.buffers[0].fields["libfabric_rkey"]);
    a.t.unregister_memory(&a.regions.get(addr).unwrap()).unwrap();
    a.regions.remove(addr, Duration::ZERO).unwrap();
    // The transport reads its own publication back.
    let me = RemotePeer::parse(&desc::Fields::new(LIBFABRIC), d).unwrap();
    assert_eq!(me.buffers.len(), 1);
    assert!(a.t.can_reach(&seg));
    let mut foreign = (*seg).clone();
    foreign.descriptor.fields.insert("libfabric_provider", "shm");
    assert!(!a.t.can_reach(&foreign), "a peer on another provider is unreachable");
}

fn write_then_read(config: FabricConfig, len: usize) {
    let mut a = Node::new(config.clone(), 2 * len);
    let mut b = Node::new(config, len + 4096);
    let target = b.segment("b");
    let src = pattern(len, 7);
    a.bytes_mut()[..len].copy_from_slice(&src);
    let (a_base, b_base) = (a.addr(), b.addr());
    let st = a.run(&target, Opcode::Write, a_base, b_base + 4096, len as u64);
    assert_eq!(st.state, TransferState::Completed, "{:?}", st.error);
    assert_eq!(st.transferred_bytes, len as u64);
    assert!(b.bytes()[4096..] == src[..], "remote bytes after the write");
    assert!(b.bytes()[..4096].iter().all(|x| *x == 0), "write spilled before the target range");
    b.bytes_mut()[4096] ^= 0xff;
    let st = a.run(&target, Opcode::Read, a_base + len as u64, b_base + 4096, len as u64);
    assert_eq!(st.state, TransferState::Completed, "{:?}", st.error);
    let back = &a.bytes()[len..];
    assert_eq!(back[0], src[0] ^ 0xff);
    assert!(back[1..] == src[1..], "bytes read back");
    // Outside B's published buffer: refused before posting.
    let st = a.run(&target, Opcode::Write, a_base, b_base + 4096 + 1, len as u64);
    assert!(matches!(st.error, Some(Error::AddressNotRegistered { .. })), "{:?}", st.error);
}

#[test]
fn tcp_moves_bytes_and_splits_by_max_msg() {
    // A 3 MiB request with 1 MiB operations: split into three, finished once.
    let config = FabricConfig { provider: "tcp;ofi_rxm".into(), max_msg: 1 << 20, ..FabricConfig::default() };
    write_then_read(config, 3 << 20);
}

#[test]
fn shm_moves_bytes() {
    let config = FabricConfig { provider: "shm".into(), ..FabricConfig::default() };
    write_then_read(config, 1 << 20);
}

#[test]
fn striped_over_every_local_interface() {
    // Every IPv4 interface libfabric's tcp provider serves here becomes a rail (lo, eth0, ...).
    let list =
        fabric::InfoList::query(&fabric::Hints { provider: Some("tcp;ofi_rxm".into()), ..Default::default() }).unwrap();
    let mut domains: Vec<String> = Vec::new();
    for i in list.iter() {
        let a = i.attrs();
        if a.addr_format == sys::FI_SOCKADDR_IN && !domains.contains(&a.domain) {
            domains.push(a.domain);
        }
    }
    assert!(!domains.is_empty(), "tcp;ofi_rxm serves no IPv4 interface");
    let config = FabricConfig {
        provider: "tcp;ofi_rxm".into(),
        domains: domains.clone(),
        stripe_min: 1 << 20,
        ..FabricConfig::default()
    };
    let a = Node::new(config.clone(), 16 << 20);
    assert_eq!(a.t.rails(), domains, "one rail per interface");
    drop(a);
    write_then_read(config, 8 << 20);
}
