//! The whole transport over an in-memory fabric: queue pairs follow the verbs state diagram,
//! memory regions are checked like a NIC checks lkeys and rkeys, RDMA READ/WRITE copy real
//! bytes between the test buffers, and completions arrive on the NIC's completion queue, polled
//! by the transport's own poller threads. NICs can be made to fail, and completions can be held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake_core::{
    Batch, BufferDesc, Error, Location, Opcode, PeerEvents, PeerHandshake, RegionTable, RemoteSegment, Result,
    SegmentDescriptor, TransferTask, Transport, TransportContext,
};
use serde_json::Value;

use crate::config::RdmaConfig;
use crate::discovery::{LinkLayer, UsableNic};
use crate::fabric::{Fabric, FabricProvider, PostFailure, WcStatus, WorkCompletion, WorkRequest};
use crate::gid::{Gid, GidEntry, GidType};
use crate::handshake::HandshakeDesc;
use crate::memory::MrSource;
use crate::qp::{InitAttrs, QpOps, QpState, RtrAttrs, RtsAttrs};
use crate::segment::RemoteRdma;

use super::RdmaTransport;

/// The local side of a request in these tests, vouched for: the RDMA transport must still find it registered
/// (with the engine's table and with the NICs) before the fake fabric touches it.
fn local(addr: u64, len: u64) -> mooncake_core::LocalRange {
    // SAFETY: the fake fabric copies only ranges the transport found registered: the nodes' buffers, alive for
    // the whole test; anything else is refused first, which is what the tests check.
    unsafe { mooncake_core::LocalRange::vouched(addr, len) }
}

// ---- the in-memory fabric ----------------------------------------------------------------------

type Cq = Arc<Mutex<VecDeque<WorkCompletion>>>;

struct QpRec {
    owner: String,
    state: QpState,
    dest: Option<u32>,
    dgid: Option<Gid>,
    cq: Cq,
}

struct MrRec {
    owner: String,
    addr: u64,
    len: u64,
}

#[derive(Default)]
struct WireState {
    next_qpn: u32,
    next_key: u32,
    qps: HashMap<u32, QpRec>,
    mrs: HashMap<u32, MrRec>,
    failing: HashSet<String>,
    hold: bool,
    held: Vec<(Cq, WorkCompletion)>,
    ok_by_nic: HashMap<String, usize>,
    failed_by_nic: HashMap<String, usize>,
    pending: Vec<(u32, WorkRequest)>,
}

#[derive(Default)]
struct Wire {
    s: Mutex<WireState>,
}

impl Wire {
    fn state(&self) -> std::sync::MutexGuard<'_, WireState> {
        self.s.lock().unwrap()
    }

    fn fail_nic(&self, owner: &str) {
        self.state().failing.insert(owner.to_string());
    }

    fn ok(&self, owner: &str) -> usize {
        self.state().ok_by_nic.get(owner).copied().unwrap_or(0)
    }

    fn failed(&self, owner: &str) -> usize {
        self.state().failed_by_nic.get(owner).copied().unwrap_or(0)
    }

    /// Executes one work request like a NIC would; returns the completion status, or `None` while
    /// the destination QP is not ready yet (a real NIC retransmits until it is, or gives up).
    fn execute(st: &mut WireState, qpn: u32, wr: &WorkRequest) -> Option<WcStatus> {
        let err = |code| Some(WcStatus::Error { code, vendor_err: 0 });
        let rec = &st.qps[&qpn];
        if rec.state == QpState::Error {
            return err(5);
        }
        if st.failing.contains(&rec.owner) {
            return err(12);
        }
        let Some(dest) = rec.dest.and_then(|d| st.qps.get(&d)) else { return err(12) };
        match dest.state {
            QpState::Rts | QpState::Rtr => {}
            QpState::Error => return err(12),
            _ => return None,
        }
        let covers = |key: u32, owner: &str, addr: u64, len: u64| {
            st.mrs.get(&key).is_some_and(|m| m.owner == owner && addr >= m.addr && addr + len <= m.addr + m.len)
        };
        let len = u64::from(wr.length);
        if !covers(wr.lkey, &rec.owner, wr.local_addr, len) {
            return err(4);
        }
        if !covers(wr.rkey, &dest.owner, wr.remote_addr, len) {
            return err(10);
        }
        let (src, dst) = match wr.opcode {
            Opcode::Write => (wr.local_addr, wr.remote_addr),
            Opcode::Read => (wr.remote_addr, wr.local_addr),
        };
        // SAFETY: both ranges lie inside memory regions registered by the test nodes, whose
        // buffers outlive every transfer (the transport holds the region guards meanwhile);
        // `copy` allows overlap (loopback within one buffer).
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, wr.length as usize) };
        Some(WcStatus::Success)
    }

    /// Queues the completion of `wr` posted on `qpn`; a failure moves the QP to the error state.
    fn complete(st: &mut WireState, qpn: u32, wr_id: u64, status: WcStatus) {
        let Some(rec) = st.qps.get_mut(&qpn) else { return };
        let owner = rec.owner.clone();
        let cq = rec.cq.clone();
        if status == WcStatus::Success {
            *st.ok_by_nic.entry(owner).or_default() += 1;
        } else {
            rec.state = QpState::Error;
            *st.failed_by_nic.entry(owner).or_default() += 1;
        }
        let wc = WorkCompletion { wr_id, status };
        if st.hold {
            st.held.push((cq, wc));
        } else {
            cq.lock().unwrap().push_back(wc);
        }
    }

    /// Retries the work requests waiting for a destination QP to become ready.
    fn progress(st: &mut WireState) {
        let waiting = std::mem::take(&mut st.pending);
        for (qpn, wr) in waiting {
            if !st.qps.contains_key(&qpn) {
                continue;
            }
            match Wire::execute(st, qpn, &wr) {
                Some(status) => Wire::complete(st, qpn, wr.wr_id, status),
                None => st.pending.push((qpn, wr)),
            }
        }
    }
}

struct WireQp {
    qpn: u32,
    wire: Arc<Wire>,
}

impl WireQp {
    fn go(&self, to: QpState, from: &[QpState]) -> io::Result<()> {
        let mut st = self.wire.state();
        let rec = st.qps.get_mut(&self.qpn).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if !from.is_empty() && !from.contains(&rec.state) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        rec.state = to;
        if to == QpState::Reset {
            rec.dest = None;
            // A reset flushes what this QP still had to send.
            let (flushed, keep): (Vec<_>, Vec<_>) = st.pending.drain(..).partition(|(q, _)| *q == self.qpn);
            st.pending = keep;
            for (q, wr) in flushed {
                Wire::complete(&mut st, q, wr.wr_id, WcStatus::Error { code: 5, vendor_err: 0 });
            }
        }
        Wire::progress(&mut st);
        Ok(())
    }
}

impl QpOps for WireQp {
    fn qp_num(&self) -> u32 {
        self.qpn
    }
    fn query_state(&self) -> io::Result<QpState> {
        Ok(self.wire.state().qps[&self.qpn].state)
    }
    fn modify_reset(&mut self) -> io::Result<()> {
        self.go(QpState::Reset, &[])
    }
    fn modify_init(&mut self, _a: &InitAttrs) -> io::Result<()> {
        self.go(QpState::Init, &[QpState::Reset])
    }
    fn modify_rtr(&mut self, a: &RtrAttrs) -> io::Result<()> {
        self.go(QpState::Rtr, &[QpState::Init])?;
        let mut st = self.wire.state();
        let rec = st.qps.get_mut(&self.qpn).unwrap();
        rec.dest = Some(a.dest_qpn);
        rec.dgid = Some(a.dgid);
        Ok(())
    }
    fn modify_rts(&mut self, _a: &RtsAttrs) -> io::Result<()> {
        self.go(QpState::Rts, &[QpState::Rtr])
    }
}

impl Drop for WireQp {
    fn drop(&mut self) {
        let mut st = self.wire.state();
        st.pending.retain(|(q, _)| *q != self.qpn);
        st.qps.remove(&self.qpn);
        // Senders waiting for this QP give up (transport retry counter exceeded).
        Wire::progress(&mut st);
    }
}

struct FakeMr {
    key: u32,
    wire: Arc<Wire>,
}

impl Drop for FakeMr {
    fn drop(&mut self) {
        self.wire.state().mrs.remove(&self.key);
    }
}

struct FakeFabric {
    wire: Arc<Wire>,
    owners: Vec<String>,
    cqs: Vec<Cq>,
}

impl Fabric for FakeFabric {
    type Qp = WireQp;
    type Mr = FakeMr;

    fn create_qp(&self, nic: usize) -> Result<WireQp> {
        let mut st = self.wire.state();
        st.next_qpn += 1;
        let qpn = st.next_qpn;
        let rec = QpRec {
            owner: self.owners[nic].clone(),
            state: QpState::Reset,
            dest: None,
            dgid: None,
            cq: self.cqs[nic].clone(),
        };
        st.qps.insert(qpn, rec);
        Ok(WireQp { qpn, wire: self.wire.clone() })
    }

    fn post(&self, qp: &mut WireQp, wrs: &[WorkRequest]) -> std::result::Result<(), PostFailure> {
        let mut st = self.wire.state();
        for (i, wr) in wrs.iter().enumerate() {
            if !matches!(st.qps[&qp.qpn].state, QpState::Rts | QpState::Error) {
                return Err(PostFailure {
                    posted: i,
                    error: Error::Io(Arc::new(io::Error::from_raw_os_error(libc::EINVAL))),
                });
            }
            match Wire::execute(&mut st, qp.qpn, wr) {
                Some(status) => Wire::complete(&mut st, qp.qpn, wr.wr_id, status),
                None => st.pending.push((qp.qpn, *wr)),
            }
        }
        Ok(())
    }

    fn poll(&self, nic: usize, out: &mut [WorkCompletion]) -> Result<usize> {
        let mut q = self.cqs[nic].lock().unwrap();
        let mut n = 0;
        while n < out.len() {
            match q.pop_front() {
                Some(wc) => {
                    out[n] = wc;
                    n += 1;
                }
                None => break,
            }
        }
        Ok(n)
    }

    fn register(&self, nic: usize, addr: u64, len: u64, _source: MrSource) -> Result<FakeMr> {
        let mut st = self.wire.state();
        st.next_key += 1;
        let key = st.next_key;
        st.mrs.insert(key, MrRec { owner: self.owners[nic].clone(), addr, len });
        Ok(FakeMr { key, wire: self.wire.clone() })
    }

    fn keys(mr: &FakeMr) -> (u32, u32) {
        (mr.key, mr.key)
    }
}

struct FakeProvider {
    wire: Arc<Wire>,
    node: String,
    nics: Vec<UsableNic>,
}

impl FabricProvider for FakeProvider {
    type Fabric = FakeFabric;

    fn discover(&self, _config: &RdmaConfig) -> Result<Vec<UsableNic>> {
        if self.nics.is_empty() {
            return Err(Error::unavailable("no RDMA devices: fake node without NICs"));
        }
        Ok(self.nics.clone())
    }

    fn open(&self, _config: &RdmaConfig, nics: &[UsableNic]) -> Result<FakeFabric> {
        Ok(FakeFabric {
            wire: self.wire.clone(),
            owners: nics.iter().map(|n| format!("{}/{}", self.node, n.name)).collect(),
            cqs: nics.iter().map(|_| Cq::default()).collect(),
        })
    }
}

// ---- the handshake "network" -------------------------------------------------------------------

type FakeTransport = RdmaTransport<FakeProvider>;

#[derive(Default)]
struct Router {
    nodes: Mutex<HashMap<String, Arc<FakeTransport>>>,
    descs: Mutex<HashMap<String, SegmentDescriptor>>,
    exchanges: AtomicUsize,
}

#[async_trait]
impl PeerHandshake for Router {
    async fn connect(&self, server: &str, request: &Value) -> Result<Value> {
        self.exchanges.fetch_add(1, Ordering::SeqCst);
        let t = self.nodes.lock().unwrap().get(server).cloned();
        let t = t.ok_or_else(|| Error::disconnected(server, "connection refused"))?;
        let reply = t.handle_handshake(request).await.expect("an RDMA frame")?;
        // As the P2P client does: a non-empty reply_msg is a rejection.
        if let Some(msg) = reply.get("reply_msg").and_then(Value::as_str).filter(|m| !m.is_empty()) {
            return Err(Error::Protocol(format!("peer {server} rejected the handshake: {msg}")));
        }
        Ok(reply)
    }

    async fn descriptor(&self, server: &str) -> Result<SegmentDescriptor> {
        self.descs.lock().unwrap().get(server).cloned().ok_or_else(|| Error::NotFound(server.to_string()))
    }
}

#[derive(Default)]
struct Events {
    failed: Mutex<Vec<String>>,
}

impl PeerEvents for Events {
    fn peer_failed(&self, segment_name: &str) {
        self.failed.lock().unwrap().push(segment_name.to_string());
    }
}

// ---- nodes -------------------------------------------------------------------------------------

const LEN: usize = 1 << 20;

struct Node {
    name: String,
    t: Arc<FakeTransport>,
    regions: Arc<RegionTable>,
    buf: Box<[u8]>,
    desc: SegmentDescriptor,
    events: Arc<Events>,
}

impl Node {
    fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    fn segment(&self) -> Arc<RemoteSegment> {
        Arc::new(RemoteSegment {
            handle: 1,
            name: self.name.clone(),
            host: "127.0.0.1".into(),
            descriptor: self.desc.clone(),
        })
    }
}

fn config() -> RdmaConfig {
    RdmaConfig { slice_size: 4096, sysfs_root: PathBuf::from("/nonexistent-sysfs"), ..RdmaConfig::default() }
}

fn nic(node: u8, i: u8, name: &str) -> UsableNic {
    let mut raw = [0u8; 16];
    raw[10] = 0xff;
    raw[11] = 0xff;
    raw[12] = 10;
    raw[14] = node;
    raw[15] = i;
    UsableNic {
        name: name.into(),
        port: 1,
        lid: u16::from(i),
        gid: GidEntry { index: 3, gid: Gid(raw), kind: GidType::RoceV2 },
        active_mtu: 4096,
        link_layer: LinkLayer::Ethernet,
    }
}

struct Net {
    rt: tokio::runtime::Runtime,
    wire: Arc<Wire>,
    router: Arc<Router>,
}

impl Net {
    fn new() -> Net {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        Net { rt, wire: Arc::default(), router: Arc::default() }
    }

    fn node(&self, name: &str, id: u8, nic_names: &[&str], config: RdmaConfig) -> Node {
        let nics = nic_names.iter().enumerate().map(|(i, n)| nic(id, i as u8, n)).collect();
        let provider = FakeProvider { wire: self.wire.clone(), node: name.into(), nics };
        let t = Arc::new(RdmaTransport::with_provider(config, provider));
        let regions = Arc::new(RegionTable::new());
        let events = Arc::new(Events::default());
        let ctx = TransportContext {
            local_name: name.into(),
            bind_host: "127.0.0.1".into(),
            regions: regions.clone(),
            runtime: self.rt.handle().clone(),
            peer_events: events.clone(),
            peers: self.router.clone(),
            devices: Vec::new(),
        };
        self.rt.block_on(t.start(&ctx)).unwrap();
        let buf = vec![0u8; LEN].into_boxed_slice();
        let addr = buf.as_ptr() as u64;
        let location = Location::Cpu(Some(0));
        // SAFETY: `buf` lives in the returned node as long as its transport and table; the fake fabric copies
        // into it only while a test's request runs, and tests read it after their requests finished.
        unsafe { regions.insert(addr, LEN as u64, location) }.unwrap();
        let mut bd = BufferDesc { name: "cpu:0".into(), addr, length: LEN as u64, ..Default::default() };
        t.register_memory(&regions.get(addr).unwrap(), &mut bd).unwrap();
        let mut desc =
            SegmentDescriptor { name: name.into(), protocol: "rdma".into(), buffers: vec![bd], ..Default::default() };
        t.describe(&mut desc);
        self.router.nodes.lock().unwrap().insert(name.into(), t.clone());
        self.router.descs.lock().unwrap().insert(name.into(), desc.clone());
        Node { name: name.into(), t, regions, buf, desc, events }
    }

    /// One request from `from` to `to`, waited for (bounded).
    fn transfer(&self, from: &Node, to: &Node, op: Opcode, local_off: u64, remote_off: u64, len: u64) -> Result<u64> {
        self.transfer_to(from, &to.segment(), op, from.addr() + local_off, to.addr() + remote_off, len)
    }

    fn transfer_to(
        &self,
        from: &Node,
        seg: &Arc<RemoteSegment>,
        op: Opcode,
        local_addr: u64,
        remote_addr: u64,
        len: u64,
    ) -> Result<u64> {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        let task = TransferTask { opcode: op, local: local(local_addr, len), remote_addr, completion: b.completion(0) };
        from.t.submit(seg, vec![task]);
        b.wait_blocking(Duration::from_secs(20))?;
        let s = b.status(0)?;
        match s.error {
            Some(e) => Err(e),
            None => Ok(s.transferred_bytes),
        }
    }
}

fn pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

// ---- tests -------------------------------------------------------------------------------------

#[test]
fn write_then_read_across_slices_and_nics() {
    let net = Net::new();
    let mut a = net.node("10.0.0.1:15000", 1, &["mlx5_0", "mlx5_1"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0", "mlx5_1"], config());
    pattern(&mut a.buf, 7);
    let len = 16 * 4096 + 123;
    assert_eq!(net.transfer(&a, &b, Opcode::Write, 100, 5000, len).unwrap(), len);
    assert_eq!(&b.buf[5000..5000 + len as usize], &a.buf[100..100 + len as usize]);
    // Read it back into another part of A.
    assert_eq!(net.transfer(&a, &b, Opcode::Read, 300_000, 5000, len).unwrap(), len);
    assert_eq!(&a.buf[300_000..300_000 + len as usize], &a.buf[100..100 + len as usize]);
    // The slices went over both of A's NICs (17 slices per request, spread round robin).
    let (n0, n1) = (net.wire.ok("10.0.0.1:15000/mlx5_0"), net.wire.ok("10.0.0.1:15000/mlx5_1"));
    assert_eq!(n0 + n1, 34);
    assert!(n0 >= 10 && n1 >= 10, "spread over rails: {n0} / {n1}");
    // One handshake per (local NIC, remote NIC) pair used; none repeated for the second request.
    let exchanges = net.router.exchanges.load(Ordering::SeqCst);
    assert!((1..=4).contains(&exchanges), "{exchanges} handshakes");
    assert_eq!(a.t.inflight(), 0);
    assert!(a.events.failed.lock().unwrap().is_empty());
}

#[test]
fn descriptor_carries_devices_keys_and_matrix() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0", "mlx5_1"], config());
    let json: Value = serde_json::from_str(&a.desc.to_json()).unwrap();
    assert_eq!(json["devices"][0]["name"], "mlx5_0");
    assert_eq!(json["devices"][1]["gid"], "00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:01:01");
    assert_eq!(json["devices"][1]["lid"], 1);
    assert_eq!(json["buffers"][0]["rkey"].as_array().unwrap().len(), 2);
    assert_eq!(json["buffers"][0]["lkey"].as_array().unwrap().len(), 2);
    // No sysfs knowledge: one CPU node, both NICs as fallbacks.
    assert_eq!(json["priority_matrix"], serde_json::json!({"cpu:0": [[], ["mlx5_0", "mlx5_1"]]}));
    let r = RemoteRdma::decode(&a.desc).unwrap();
    assert_eq!(r.devices.len(), 2);
    assert_eq!(a.t.devices(), r.devices);
}

#[test]
fn device_order_follows_the_fixture_matrix() {
    let net = Net::new();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/two_numa");
    let c = RdmaConfig { sysfs_root: fixture, ..config() };
    // Verbs order differs from the matrix order on purpose.
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_2", "mlx5_1", "mlx5_0"], c);
    let names: Vec<String> = a.t.devices().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["mlx5_0", "mlx5_2", "mlx5_1"], "upstream resolution order of the matrix");
    let m = a.t.priority_matrix().unwrap();
    assert_eq!(m.device_order(), names);
    assert_eq!(m.entries["cuda:0"].preferred, ["mlx5_0"]);
}

/// The exact bytes of an RDMA segment's descriptor (docs/wire-formats.md section 2), built by the
/// transport as an engine builds it: per-buffer `rkey`/`lkey` right after `length`, then top-level
/// `devices` and `priority_matrix` after `buffers`. Only the buffer address varies between runs.
#[test]
fn descriptor_bytes_of_an_rdma_segment() {
    let net = Net::new();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/two_numa");
    let a =
        net.node("10.0.0.1:15000", 1, &["mlx5_2", "mlx5_1", "mlx5_0"], RdmaConfig { sysfs_root: fixture, ..config() });
    let expected = concat!(
        r#"{"name":"10.0.0.1:15000","protocol":"rdma","buffers":[{"name":"cpu:0","addr":ADDR,"length":1048576,"#,
        r#""rkey":[1,2,3],"lkey":[1,2,3]}],"devices":["#,
        r#"{"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:01:02","lid":2,"name":"mlx5_0"},"#,
        r#"{"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:01:00","lid":0,"name":"mlx5_2"},"#,
        r#"{"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:01:01","lid":1,"name":"mlx5_1"}],"#,
        r#""priority_matrix":{"cpu:0":[["mlx5_0","mlx5_2"],["mlx5_1"]],"cpu:1":[["mlx5_1"],["mlx5_0","mlx5_2"]],"#,
        r#""cuda:0":[["mlx5_0"],["mlx5_1","mlx5_2"]],"cuda:1":[["mlx5_1"],["mlx5_0","mlx5_2"]],"#,
        r#""hip:0":[["mlx5_0","mlx5_2"],["mlx5_1"]]}}"#
    );
    assert_eq!(a.desc.to_json(), expected.replace("ADDR", &a.addr().to_string()));
}

#[test]
fn failed_rail_is_retried_on_another_nic() {
    let net = Net::new();
    let mut a = net.node("10.0.0.1:15000", 1, &["mlx5_0", "mlx5_1"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0", "mlx5_1"], config());
    net.wire.fail_nic("10.0.0.1:15000/mlx5_0");
    pattern(&mut a.buf, 3);
    let len = 8 * 4096;
    assert_eq!(net.transfer(&a, &b, Opcode::Write, 0, 0, len).unwrap(), len);
    assert_eq!(&b.buf[..len as usize], &a.buf[..len as usize]);
    assert!(net.wire.failed("10.0.0.1:15000/mlx5_0") >= 1, "slices were tried on the failing NIC");
    assert_eq!(net.wire.ok("10.0.0.1:15000/mlx5_1"), 8, "and all completed on the other one");
    assert_eq!(net.wire.ok("10.0.0.1:15000/mlx5_0"), 0);
    assert!(a.events.failed.lock().unwrap().is_empty(), "the peer did not fail");
}

#[test]
fn all_rails_failing_is_a_typed_error_not_a_hang() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0", "mlx5_1"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    net.wire.fail_nic("10.0.0.1:15000/mlx5_0");
    net.wire.fail_nic("10.0.0.1:15000/mlx5_1");
    let start = Instant::now();
    let err = net.transfer(&a, &b, Opcode::Write, 0, 0, 3 * 4096).unwrap_err();
    assert!(err.is_disconnect(), "{err}");
    assert!(err.to_string().contains("rails"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(a.events.failed.lock().unwrap().first().map(String::as_str), Some("10.0.0.2:15000"));
    assert_eq!(a.t.inflight(), 0);
}

#[test]
fn retry_budget_bounds_attempts() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["n0", "n1", "n2", "n3"], RdmaConfig { retry_cnt: 1, ..config() });
    let b = net.node("10.0.0.2:15000", 2, &["n0"], config());
    for n in ["n0", "n1", "n2", "n3"] {
        net.wire.fail_nic(&format!("10.0.0.1:15000/{n}"));
    }
    let err = net.transfer(&a, &b, Opcode::Read, 0, 0, 100).unwrap_err();
    assert!(err.to_string().contains("MC_RETRY_CNT"), "{err}");
    let tried: usize = ["n0", "n1", "n2", "n3"].iter().map(|n| net.wire.failed(&format!("10.0.0.1:15000/{n}"))).sum();
    assert_eq!(tried, 2, "first attempt + one retry");
}

#[test]
fn qp_count_mismatch_is_reported() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], RdmaConfig { qp_per_ep: 1, ..config() });
    let err = net.transfer(&a, &b, Opcode::Write, 0, 0, 10).unwrap_err();
    assert!(matches!(&err, Error::Protocol(m) if m.contains("MC_NUM_QP_PER_EP")), "{err}");
}

#[test]
fn out_of_range_addresses_are_rejected_before_posting() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    let err = net.transfer(&a, &b, Opcode::Write, 0, LEN as u64 - 10, 11).unwrap_err();
    assert!(matches!(&err, Error::AddressNotRegistered { context, .. } if context.contains("remote")), "{err}");
    let seg = b.segment();
    let err = net.transfer_to(&a, &seg, Opcode::Write, 0x1000, b.addr(), 8).unwrap_err();
    assert!(matches!(&err, Error::AddressNotRegistered { context, .. } if context.contains("local")), "{err}");
    let err = net.transfer_to(&a, &seg, Opcode::Write, a.addr(), u64::MAX - 2, 8).unwrap_err();
    assert!(matches!(err, Error::AddressNotRegistered { .. }), "{err}");
    assert_eq!(net.wire.ok("10.0.0.1:15000/mlx5_0") + net.wire.failed("10.0.0.1:15000/mlx5_0"), 0);
}

#[test]
fn local_memory_without_an_mr_is_rejected() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    // In the engine's region table but never registered with the NICs.
    let extra = vec![0u8; 8192].into_boxed_slice();
    // SAFETY: `extra` outlives the request, which is refused before the fake NIC touches anything.
    unsafe { a.regions.insert(extra.as_ptr() as u64, 8192, Location::Cpu(Some(0))) }.unwrap();
    let err = net.transfer_to(&a, &b.segment(), Opcode::Write, extra.as_ptr() as u64, b.addr(), 8192).unwrap_err();
    assert!(matches!(&err, Error::AddressNotRegistered { context, .. } if context.contains("RDMA")), "{err}");
}

#[test]
fn loopback_into_own_segment_needs_no_handshake() {
    let net = Net::new();
    let mut a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    pattern(&mut a.buf[..8192], 9);
    let seg = a.segment();
    assert_eq!(net.transfer_to(&a, &seg, Opcode::Write, a.addr(), a.addr() + 500_000, 8192).unwrap(), 8192);
    assert_eq!(&a.buf[500_000..508_192], &a.buf[..8192]);
    assert_eq!(net.router.exchanges.load(Ordering::SeqCst), 0);
}

#[test]
fn simultaneous_connects_in_both_directions_converge() {
    let net = Net::new();
    let a = Arc::new(net.node("10.0.0.1:15000", 1, &["mlx5_0"], config()));
    let b = Arc::new(net.node("10.0.0.2:15000", 2, &["mlx5_0"], config()));
    let net = Arc::new(net);
    let mut threads = Vec::new();
    for (from, to) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
        let net = net.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..20u64 {
                net.transfer(&from, &to, Opcode::Write, i * 4096, 600_000 + i * 4096, 4096)?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

#[test]
fn forget_peer_drops_endpoints_and_reconnects() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    net.transfer(&a, &b, Opcode::Write, 0, 0, 64).unwrap();
    assert_eq!(a.t.endpoint_count(), 1);
    a.t.forget_peer("10.0.0.9:1");
    assert_eq!(a.t.endpoint_count(), 1);
    a.t.forget_peer("10.0.0.2:15000");
    assert_eq!(a.t.endpoint_count(), 0);
    let before = net.router.exchanges.load(Ordering::SeqCst);
    net.transfer(&a, &b, Opcode::Read, 0, 0, 64).unwrap();
    assert_eq!(net.router.exchanges.load(Ordering::SeqCst), before + 1, "reconnected with a new handshake");
}

#[test]
fn endpoints_are_bounded_per_nic() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], RdmaConfig { max_ep_per_ctx: 2, ..config() });
    let peers: Vec<Node> =
        (0..4).map(|i| net.node(&format!("10.0.1.{i}:15000"), 10 + i as u8, &["mlx5_0"], config())).collect();
    for p in &peers {
        net.transfer(&a, p, Opcode::Write, 0, 0, 64).unwrap();
    }
    assert_eq!(a.t.endpoint_count(), 2, "idle endpoints beyond the bound were evicted");
}

#[test]
fn handshake_frames_are_filtered_and_checked() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    let rt = &net.rt;
    assert!(rt.block_on(a.t.handle_handshake(&serde_json::json!({"name": "x", "notify_msg": "y"}))).is_none());
    assert!(
        rt.block_on(a.t.handle_handshake(
            &serde_json::json!({"protocol": "efa", "local_nic_path": "a@b", "peer_nic_path": "c@d"})
        ))
        .is_none()
    );

    let ask = |peer_nic_path: &str, qps: Vec<u32>, gid: &str| {
        let req = HandshakeDesc {
            local_nic_path: "10.0.0.2:15000@mlx5_0".into(),
            peer_nic_path: peer_nic_path.into(),
            qp_num: qps,
            local_lid: 0,
            local_gid: gid.into(),
            ..Default::default()
        };
        let v = rt.block_on(a.t.handle_handshake(&req.to_json())).unwrap().unwrap();
        HandshakeDesc::from_json(&v).unwrap()
    };
    let gid = b.t.devices()[0].gid.clone();
    let r = ask("10.0.0.1:15000@mlx5_9", vec![1, 2], &gid);
    assert!(r.reply_msg.contains("not found"), "{}", r.reply_msg);
    let r = ask("10.0.0.7:15000@mlx5_0", vec![1, 2], &gid);
    assert!(r.reply_msg.contains("Invalid argument"), "{}", r.reply_msg);
    let r = ask("10.0.0.1:15000@mlx5_0", vec![1], &gid);
    assert!(r.reply_msg.contains("MC_NUM_QP_PER_EP"), "{}", r.reply_msg);
    assert_eq!(r.local_nic_path, "10.0.0.1:15000@mlx5_0");
    assert_eq!(r.peer_nic_path, "10.0.0.2:15000@mlx5_0");
    let bad = rt.block_on(a.t.handle_handshake(&serde_json::json!({"local_nic_path": 5, "peer_nic_path": "x@y"})));
    let bad = HandshakeDesc::from_json(&bad.unwrap().unwrap()).unwrap();
    assert!(!bad.reply_msg.is_empty());

    // A well-formed request from B's two (fake) QPs is accepted and answered with A's QPs.
    let (q1, q2) = {
        let mut st = net.wire.state();
        for q in [9001, 9002] {
            st.qps.insert(
                q,
                QpRec {
                    owner: "10.0.0.2:15000/mlx5_0".into(),
                    state: QpState::Rts,
                    dest: None,
                    dgid: None,
                    cq: Cq::default(),
                },
            );
        }
        (9001, 9002)
    };
    let r = ask("10.0.0.1:15000@mlx5_0", vec![q1, q2], &gid);
    assert_eq!(r.reply_msg, "");
    assert_eq!(r.qp_num.len(), 2);
    assert_eq!(r.local_gid, a.t.devices()[0].gid);
    let st = net.wire.state();
    let dests: Vec<Option<u32>> = r.qp_num.iter().map(|q| st.qps[q].dest).collect();
    assert_eq!(dests, vec![Some(q1), Some(q2)]);
}

#[test]
fn old_peers_without_gid_are_looked_up_in_their_descriptor() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    let req = serde_json::json!({
        "local_nic_path": "10.0.0.2:15000@mlx5_0", "peer_nic_path": "10.0.0.1:15000@mlx5_0",
        "qp_num": [1, 2], "reply_msg": ""
    });
    let v = net.rt.block_on(a.t.handle_handshake(&req)).unwrap().unwrap();
    let r = HandshakeDesc::from_json(&v).unwrap();
    assert_eq!(r.reply_msg, "", "connected using B's published GID");
    let st = net.wire.state();
    let b_gid = Gid::parse(&b.t.devices()[0].gid).unwrap();
    assert!(r.qp_num.iter().all(|q| st.qps[q].dgid == Some(b_gid)));
    drop(st);
    // Unknown segment: the descriptor cannot be fetched, the handshake is rejected.
    let req = serde_json::json!({
        "local_nic_path": "10.9.9.9:1@mlx5_0", "peer_nic_path": "10.0.0.1:15000@mlx5_0", "qp_num": [1, 2]
    });
    let v = net.rt.block_on(a.t.handle_handshake(&req)).unwrap().unwrap();
    assert!(!HandshakeDesc::from_json(&v).unwrap().reply_msg.is_empty());
}

#[test]
fn local_memory_outside_the_region_table_is_rejected_before_the_nic_sees_it() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    let stray = vec![0u8; 4096];
    for op in [Opcode::Write, Opcode::Read] {
        let err = net.transfer_to(&a, &b.segment(), op, stray.as_ptr() as u64, b.addr(), 4096).unwrap_err();
        assert!(matches!(&err, Error::AddressNotRegistered { context, .. } if context.contains("RDMA")), "{err}");
        // A range running past the registered buffer is refused too.
        let err = net.transfer_to(&a, &b.segment(), op, a.addr() + LEN as u64 - 16, b.addr(), 32).unwrap_err();
        assert!(matches!(err, Error::AddressNotRegistered { .. }), "{err}");
    }
    let st = net.wire.state();
    assert!(st.ok_by_nic.is_empty() && st.failed_by_nic.is_empty() && st.pending.is_empty(), "nothing was posted");
}

#[test]
fn shutdown_fails_requests_in_flight() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let b = net.node("10.0.0.2:15000", 2, &["mlx5_0"], config());
    net.transfer(&a, &b, Opcode::Write, 0, 0, 64).unwrap();
    net.wire.state().hold = true;
    let batch = Batch::new(1);
    batch.reserve(1).unwrap();
    let task = TransferTask {
        opcode: Opcode::Write,
        local: local(a.addr(), 3 * 4096),
        remote_addr: b.addr(),
        completion: batch.completion(0),
    };
    a.t.submit(&b.segment(), vec![task]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.t.inflight() < 3 {
        assert!(Instant::now() < deadline, "slices never posted");
        std::thread::sleep(Duration::from_millis(1));
    }
    net.rt.block_on(a.t.shutdown());
    batch.wait_blocking(Duration::from_secs(10)).unwrap();
    let s = batch.status(0).unwrap();
    assert!(matches!(s.error, Some(Error::NotInitialized(_))), "{:?}", s.error);
    assert_eq!(a.t.inflight(), 0);
    // After shutdown, submissions fail at once.
    let err = net.transfer(&a, &b, Opcode::Write, 0, 0, 64).unwrap_err();
    assert!(matches!(err, Error::NotInitialized(_)), "{err}");
    assert_eq!(net.wire.state().held.len(), 3, "the held completions never reached a poller");
}

#[test]
fn start_without_nics_is_unavailable_and_submit_before_start_fails() {
    let net = Net::new();
    let provider = FakeProvider { wire: net.wire.clone(), node: "x".into(), nics: vec![] };
    let t = RdmaTransport::with_provider(config(), provider);
    let b = Batch::new(1);
    b.reserve(1).unwrap();
    let seg = Arc::new(RemoteSegment {
        handle: 1,
        name: "p:1".into(),
        host: "p".into(),
        descriptor: SegmentDescriptor::default(),
    });
    t.submit(
        &seg,
        vec![TransferTask { opcode: Opcode::Read, local: local(1, 1), remote_addr: 1, completion: b.completion(0) }],
    );
    assert!(matches!(b.status(0).unwrap().error, Some(Error::NotInitialized(_))));
    let mut bd = BufferDesc::default();
    let table = RegionTable::new();
    // SAFETY: the transport was never started and refuses the registration; nothing touches the range.
    unsafe { table.insert(4096, 1, Location::Cpu(Some(0))) }.unwrap();
    assert!(t.register_memory(&table.get(4096).unwrap(), &mut bd).is_err());
    let ctx = TransportContext {
        local_name: "x:1".into(),
        bind_host: "127.0.0.1".into(),
        regions: Arc::new(RegionTable::new()),
        runtime: net.rt.handle().clone(),
        peer_events: Arc::new(Events::default()),
        peers: net.router.clone(),
        devices: Vec::new(),
    };
    let err = net.rt.block_on(t.start(&ctx)).unwrap_err();
    assert!(matches!(&err, Error::Unavailable { reason } if reason.starts_with("no RDMA devices")), "{err}");
    let mut desc = SegmentDescriptor::default();
    t.describe(&mut desc);
    assert!(desc.fields.is_empty(), "{desc:?}");
}

#[test]
fn peer_without_rdma_fields_fails_typed() {
    let net = Net::new();
    let a = net.node("10.0.0.1:15000", 1, &["mlx5_0"], config());
    let mut desc = a.desc.clone();
    desc.fields.remove("devices");
    let seg = Arc::new(RemoteSegment { handle: 2, name: "tcp-only:1".into(), host: "h".into(), descriptor: desc });
    assert!(!a.t.can_reach(&seg));
    let err = net.transfer_to(&a, &seg, Opcode::Write, a.addr(), a.addr(), 8).unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
}
