//! The Transport suite: two engines in one process (and a child-process peer for cross-process
//! transports) moving bytes through the transport under test, under every memory pair that can run here.
//!
//! # Memory pairs
//! A memory pair is the kind of memory on each end of a transfer: the initiator's local buffer and the
//! peer's published buffer (`cuda->host`: local GPU memory, remote host memory). Every case runs with
//! host memory on both ends (`host->host`, trial names without a suffix). For each non-host memory device
//! that probes available in this process, the data-moving cases (the write/read size sweep, whose large
//! sizes are striped, the batches, the out-of-bounds and unregistered-range rejections, unregistering during
//! a transfer) run again under `gpu->host`, `host->gpu` and `gpu->gpu` for every transport whose
//! [`Capabilities::memory_kinds`] holds that kind, with the pair in the trial name
//! (`write_read_4KiB[cuda->host]`); the control-path, cross-process and fault cases stay host-only. Buffers on a device are filled and read only through
//! the device's copies. A pair that cannot run is one skipped trial `memory_pair[..]` with the reason (no
//! such device here, with its probe's answer; or the transport does not declare that kind). A remote buffer
//! the transport does not reach ([`Transport::can_reach_buffer`](mooncake_core::Transport::can_reach_buffer)
//! is false, and the engine indeed has no route: `Unavailable`) turns that pair's cases into skips; a pair
//! the transport declares and reaches but fails is a failure.
//!
//! # File segments
//! A protocol whose segments are files (core's [`Addressing::Concatenated`]: `nvmeof`) has no peer engine: the
//! initiator reads and writes the segment's files itself. For it the peer's buffer is a file segment of two
//! temporary files (the remote address is an offset into their concatenation, so transfers span files),
//! published with upstream's descriptor through the shared metadata service of [`SuiteOptions::metadata_conn`]
//! (without one its data cases skip, saying so). Cases that need a live peer (probing it, notifications, a peer
//! that shuts down or dies, a range the peer unregistered, cross-process peers, an engine's own segment) skip
//! with that reason, and only host memory is on the file segment's side of a memory pair.
//!
//! # Region-offset protocols
//! A protocol whose segments are addressed by offset into one shared region (core's [`Addressing::RegionOffset`]:
//! `cxl`) publishes only memory inside that region. For it every case runs under `host->cxl` (the initiator's
//! buffer in host memory, the peer's in the region) instead of host/host, and the data cases again under
//! `cxl->cxl`; pairs whose remote memory is not the region's are skipped saying so. Requests name the peer's
//! buffer by the address its segment publishes (the offset), and the cross-process cases skip: the `serve-peer`
//! child registers host memory, which such a protocol does not publish.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mooncake_core::registry::{self, Availability};
use mooncake_core::{
    Addressing, BackendConfig, Capabilities, EngineConfig, Error, MemoryDevice, MemoryKind, MetadataKeys,
    MetadataStore, Notification, Opcode, SegmentDescriptor, SegmentHandle, TransferEngine, TransferRequest,
    TransferState,
};

use crate::buffer::{Memory, TestBuffer};
use crate::peer::{PeerArgs, PeerProcess};
use crate::util::{
    OrFail, block_on_plain, block_on_timeout, check_equal, check_pattern, ensure, human, pattern, wait_until,
};
use crate::{Outcome, SuiteOptions, TestResult, Trial};

const KIND: &str = "transport";
/// Bound on one transfer or one blocking engine call in these tests.
const LIMIT: Duration = Duration::from_secs(60);
/// Bound on starting a child peer.
const PEER_START: Duration = Duration::from_secs(30);

// ---- memory pairs -------------------------------------------------------------------------------

/// The kinds of memory on the two ends of a transfer: the initiator's local buffer and the peer's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryPair {
    /// Kind of the initiator's (engine A's) buffer.
    pub local: MemoryKind,
    /// Kind of the peer's (engine B's) published buffer.
    pub remote: MemoryKind,
}

impl MemoryPair {
    /// Host memory on both ends: every case runs under it.
    pub const HOST: MemoryPair = MemoryPair { local: MemoryKind::Host, remote: MemoryKind::Host };

    /// The pair `local->remote`.
    pub fn new(local: MemoryKind, remote: MemoryKind) -> Self {
        MemoryPair { local, remote }
    }

    /// The three pairs a device of `kind` adds: `kind->host`, `host->kind`, `kind->kind`.
    pub fn with_device(kind: MemoryKind) -> [MemoryPair; 3] {
        let h = MemoryKind::Host;
        [MemoryPair::new(kind, h), MemoryPair::new(h, kind), MemoryPair::new(kind, kind)]
    }

    /// What trial names of this pair end with: nothing for [`MemoryPair::HOST`] (the names every backend
    /// has always had), else `[local->remote]`.
    pub fn suffix(&self) -> String {
        if *self == MemoryPair::HOST { String::new() } else { format!("[{self}]") }
    }
}

impl std::fmt::Display for MemoryPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{}", kind_name(self.local), kind_name(self.remote))
    }
}

/// The lower-case name of a memory kind as trial names spell it (`host`, `cuda`, `rocm`, `musa`, ...).
pub fn kind_name(kind: MemoryKind) -> &'static str {
    match kind {
        MemoryKind::Host => "host",
        MemoryKind::Cuda => "cuda",
        MemoryKind::Rocm => "rocm",
        MemoryKind::Musa => "musa",
        MemoryKind::Cxl => "cxl",
        MemoryKind::Nvme => "nvme",
    }
}

/// The memory kind of the device drivers this workspace ships, by registry name: how an unavailable device
/// (which cannot be created to ask) is still listed with its kind.
fn kind_of_driver(name: &str) -> Option<MemoryKind> {
    match name {
        "cuda" => Some(MemoryKind::Cuda),
        "rocm" | "hip" => Some(MemoryKind::Rocm),
        "musa" => Some(MemoryKind::Musa),
        "cxl" => Some(MemoryKind::Cxl),
        "nvme" => Some(MemoryKind::Nvme),
        _ => None,
    }
}

/// The non-host memory devices linked into this process, one per kind: a device that probes available
/// and could be created, else why there is none (`no cuda device here: libcuda.so.1 not found ...`).
fn scan_devices() -> BTreeMap<MemoryKind, Result<Arc<dyn MemoryDevice>, String>> {
    let mut out: BTreeMap<MemoryKind, Result<Arc<dyn MemoryDevice>, String>> = BTreeMap::new();
    let mut missing = |kind: MemoryKind, why: String| {
        out.entry(kind).or_insert_with(|| Err(format!("no {} device here: {why}", kind_name(kind))));
    };
    let mut found = Vec::new();
    for f in registry::devices() {
        match (f.probe)() {
            Availability::Available => match (f.create)() {
                Ok(d) if d.kind() != MemoryKind::Host => found.push(d),
                Ok(_) => {}
                Err(e) => {
                    if let Some(k) = kind_of_driver(f.name) {
                        missing(k, format!("device {:?} probes available but cannot be created: {e}", f.name));
                    }
                }
            },
            Availability::Unavailable(why) => {
                if let Some(k) = kind_of_driver(f.name) {
                    missing(k, why);
                }
            }
        }
    }
    for d in found {
        let slot = out.entry(d.kind()).or_insert_with(|| Ok(d.clone()));
        if slot.is_err() {
            *slot = Ok(d);
        }
    }
    out
}

/// How one memory pair runs for one transport.
enum PairPlan {
    Run { local: Memory, remote: Memory },
    Skip(String),
}

fn declared_kinds(caps: &Capabilities) -> String {
    caps.memory_kinds.iter().map(kind_name).collect::<Vec<_>>().join(", ")
}

/// The memory pairs of `protocol`: those `opts` names, else host/host and every pair of the non-host
/// devices here (see the module docs), each runnable or skipped with the reason.
fn plan_pairs(protocol: &str, caps: &Capabilities, opts: &SuiteOptions) -> Vec<(MemoryPair, PairPlan)> {
    let devices = scan_devices();
    let undeclared = |k: MemoryKind| {
        format!("{protocol} does not declare {} memory (memory_kinds: {})", kind_name(k), declared_kinds(caps))
    };
    let memory = |k: MemoryKind| -> Result<Memory, String> {
        if k == MemoryKind::Host {
            return Ok(Memory::Host);
        }
        match devices.get(&k) {
            Some(Ok(d)) => Ok(Memory::Device(d.clone())),
            Some(Err(why)) => Err(why.clone()),
            None => Err(format!("no {} device is linked into this binary", kind_name(k))),
        }
    };
    let plan = |pair: MemoryPair| -> PairPlan {
        if pair != base_pair(protocol) && !caps.memory_kinds.contains(pair.local) {
            return PairPlan::Skip(undeclared(pair.local));
        }
        if let Some(region) = region_kind(protocol).filter(|k| *k != pair.remote) {
            return PairPlan::Skip(format!(
                "{protocol} publishes only memory in its shared region ({} memory): the peer's buffer cannot be {} \
                 memory",
                kind_name(region),
                kind_name(pair.remote)
            ));
        }
        if is_file_protocol(protocol) && pair.remote != MemoryKind::Host {
            return PairPlan::Skip(format!(
                "{protocol} segments are files: the remote side of a transfer is a file, not {} memory",
                kind_name(pair.remote)
            ));
        }
        match (memory(pair.local), memory(pair.remote)) {
            (Ok(local), Ok(remote)) => PairPlan::Run { local, remote },
            (Err(why), _) | (_, Err(why)) => PairPlan::Skip(why),
        }
    };
    if let Some(pairs) = &opts.memory_pairs {
        return pairs.iter().map(|p| (*p, plan(*p))).collect();
    }
    let mut out = vec![(MemoryPair::HOST, plan(MemoryPair::HOST))];
    for (kind, device) in &devices {
        let declared = caps.memory_kinds.contains(*kind);
        for pair in MemoryPair::with_device(*kind) {
            match device {
                Ok(_) if declared => out.push((pair, plan(pair))),
                Ok(_) => out.push((pair, PairPlan::Skip(undeclared(*kind)))),
                Err(why) if declared => out.push((pair, PairPlan::Skip(why.clone()))),
                // Neither here nor declared: nothing to say about this pair.
                Err(_) => {}
            }
        }
    }
    out
}

// ---- cases --------------------------------------------------------------------------------------

/// What every test sees: the protocol, what it declares, the suite options, the memory pair.
struct Target {
    protocol: String,
    caps: Capabilities,
    opts: SuiteOptions,
    pair: MemoryPair,
    /// Where engine A's (the initiator's) buffers live.
    local: Memory,
    /// Where engine B's (the peer's) buffers live.
    remote: Memory,
    /// Whether the transport reaches the peer's memory of this pair: `Ok(Some(why))` when it does not
    /// (the pair's cases skip). Found out once, by the first case that moves data.
    reach: OnceLock<Result<Option<String>, String>>,
}

type Body = Arc<dyn Fn(&Target) -> TestResult + Send + Sync>;
type Gate = fn(&Target) -> Option<String>;

struct Case {
    name: String,
    gate: Gate,
    body: Body,
    /// Moves data to the peer: skipped (with the reason) when the transport cannot reach the peer's memory.
    moves_data: bool,
    /// Runs under every memory pair, not only host/host.
    every_pair: bool,
}

/// A data-moving case that runs under host/host only.
fn case(name: impl Into<String>, gate: Gate, body: impl Fn(&Target) -> TestResult + Send + Sync + 'static) -> Case {
    Case { name: name.into(), gate, body: Arc::new(body), moves_data: true, every_pair: false }
}

/// A case about the declaration and the control path (no data to the peer's memory): host/host only.
fn control(name: &str, body: impl Fn(&Target) -> TestResult + Send + Sync + 'static) -> Case {
    Case { moves_data: false, ..case(name, always, body) }
}

/// A data-moving case that runs under every memory pair.
fn paired(name: impl Into<String>, gate: Gate, body: impl Fn(&Target) -> TestResult + Send + Sync + 'static) -> Case {
    Case { every_pair: true, ..case(name, gate, body) }
}

// ---- gates ------------------------------------------------------------------------------------

fn always(_: &Target) -> Option<String> {
    None
}

fn local_kind(t: &Target) -> Option<String> {
    let k = t.local.kind();
    (!t.caps.memory_kinds.contains(k)).then(|| {
        format!(
            "transport cannot move local {} memory (memory_kinds lacks {k:?}); this run uses {} buffers",
            kind_name(k),
            kind_name(k)
        )
    })
}

/// The memory kind of the shared region a region-offset protocol (`cxl`) publishes, the only memory its peers
/// reach; `None` for other protocols.
fn region_kind(protocol: &str) -> Option<MemoryKind> {
    (Addressing::of(protocol) == Addressing::RegionOffset).then(|| kind_of_driver(protocol)).flatten()
}

/// The pair every case runs under: host/host, or `host-><region>` for region-offset protocols.
fn base_pair(protocol: &str) -> MemoryPair {
    region_kind(protocol).map_or(MemoryPair::HOST, |k| MemoryPair::new(MemoryKind::Host, k))
}

/// Whether `protocol`'s segments are files the initiator reads and writes itself (no peer engine serves them).
fn is_file_protocol(protocol: &str) -> bool {
    Addressing::of(protocol) == Addressing::Concatenated
}

/// Cases that need a peer engine serving its segment: not for file segments.
fn live_peer(t: &Target) -> Option<String> {
    is_file_protocol(&t.protocol).then(|| {
        format!(
            "{} segments are files the initiator reads and writes itself (one-sided): no peer engine serves them",
            t.protocol
        )
    })
}

fn served_read_write(t: &Target) -> Option<String> {
    live_peer(t).or_else(|| read_write(t))
}

fn served_read_or_write(t: &Target) -> Option<String> {
    live_peer(t).or_else(|| read_or_write(t))
}

fn read_write(t: &Target) -> Option<String> {
    local_kind(t).or_else(|| (!(t.caps.read && t.caps.write)).then(|| "needs both read and write capabilities".into()))
}

fn read_or_write(t: &Target) -> Option<String> {
    local_kind(t).or_else(|| (!(t.caps.read || t.caps.write)).then(|| "declares neither read nor write".into()))
}
fn aligned(t: &Target) -> Option<String> {
    read_or_write(t).or_else(|| (t.caps.alignment <= 1).then(|| "alignment is 1: every address is aligned".into()))
}

fn limited(t: &Target) -> Option<String> {
    read_or_write(t).or_else(|| {
        (t.caps.max_request_size >= t.opts.max_size).then(|| {
            format!(
                "max_request_size ({}) is at least the suite's largest buffer ({})",
                human(t.caps.max_request_size),
                human(t.opts.max_size)
            )
        })
    })
}

fn cross_process(t: &Target) -> Option<String> {
    served_read_write(t)
        .or_else(|| {
            region_kind(&t.protocol).map(|k| {
                format!(
                    "the serve-peer child registers host memory, which {} does not publish (only {} memory in its \
                     shared region); the {} crates test a second process themselves",
                    t.protocol,
                    kind_name(k),
                    t.protocol
                )
            })
        })
        .or_else(|| (!t.caps.cross_process).then(|| "in-process transport (cross_process = false)".into()))
        .or_else(|| {
            t.opts.peer.is_none().then(|| {
                "no peer executable configured (SuiteOptions::peer); the mooncake-conformance runner sets it".into()
            })
        })
}

fn peer_failure(t: &Target) -> Option<String> {
    cross_process(t).or_else(|| {
        (!t.caps.reports_peer_failure)
            .then(|| "transport does not report peer failure (reports_peer_failure = false)".into())
    })
}

// ---- the suite --------------------------------------------------------------------------------

/// Request sizes the write/read sweep uses for `caps`: `min_request_size`, 1, 7, 4 KiB, 64 KiB,
/// 1 MiB, `optimal_request_size` and `min(max_request_size, max)`, rounded up to the alignment,
/// within the declared limits, sorted, without duplicates.
pub fn size_sweep(caps: &Capabilities, max: u64) -> Vec<u64> {
    let align = caps.alignment.max(1);
    let hi = caps.max_request_size.min(max);
    let lo = caps.min_request_size.max(1);
    let mut v: Vec<u64> = [lo, 1, 7, 4 << 10, 64 << 10, 1 << 20, caps.optimal_request_size, hi]
        .into_iter()
        .map(|s| s.max(1).div_ceil(align) * align)
        .filter(|s| *s >= lo && *s <= hi)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Every Transport test for the linked transport `protocol`, gated on its declared capabilities, under
/// every memory pair of [`SuiteOptions::memory_pairs`] (by default host/host and the pairs of the
/// non-host devices available here; see the module docs).
///
/// Engines are built as `EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([protocol])`,
/// so the P2P handshake (`mooncake-metadata-p2p`) must be linked too. A transport whose probe fails
/// yields one skipped trial; one that is not linked yields one failed trial.
pub fn transport_suite(protocol: &str, opts: &SuiteOptions) -> Vec<Trial> {
    let factory = match registry::transport(protocol) {
        Ok(f) => f,
        Err(e) => return vec![Trial::fixed(KIND, protocol, "linked", Outcome::Failed(e.to_string()))],
    };
    if let Availability::Unavailable(why) = (factory.probe)() {
        return vec![Trial::fixed(KIND, protocol, "probe", Outcome::Skipped(format!("probe: {why}")))];
    }
    let caps = match (factory.create)(&BackendConfig::default()) {
        Ok(t) => t.capabilities().clone(),
        Err(e) => return vec![Trial::fixed(KIND, protocol, "create", Outcome::Failed(format!("create: {e}")))],
    };
    let mut trials = Vec::new();
    for (pair, plan) in plan_pairs(protocol, &caps, opts) {
        match plan {
            PairPlan::Skip(why) => trials.push(Trial::fixed(
                KIND,
                protocol,
                format!("memory_pair{}", pair.suffix()),
                Outcome::Skipped(why),
            )),
            PairPlan::Run { local, remote } => {
                let target = Arc::new(Target {
                    protocol: protocol.to_string(),
                    caps: caps.clone(),
                    opts: opts.clone(),
                    pair,
                    local,
                    remote,
                    reach: OnceLock::new(),
                });
                trials.extend(pair_trials(&target));
            }
        }
    }
    trials
}

/// The trials of one memory pair: every case under host/host, the data-moving ones under the others.
fn pair_trials(target: &Arc<Target>) -> Vec<Trial> {
    let (protocol, opts) = (target.protocol.as_str(), &target.opts);
    let mut cases = vec![
        control("capabilities_sane", capabilities_sane),
        control("probe_and_peer_probe", probe_and_peer_probe),
        control("descriptor_published", descriptor_published),
    ];
    for size in size_sweep(&target.caps, opts.max_size) {
        cases.push(paired(format!("write_read_{}", human(size)), read_or_write, move |t: &Target| write_read(t, size)));
    }
    cases.extend([
        case("self_segment_write_read", served_read_write, self_segment),
        paired("large_batch_1024x4KiB", read_write, large_batch),
        paired("mixed_size_batch", read_write, mixed_batch),
        paired("sync_batch_per_request_results", read_write, sync_batch_each),
        paired("sync_batch_stale_range_fails_alone", served_read_or_write, sync_batch_stale_range),
        case("concurrent_submitters", read_write, concurrent),
        case("async_transfer", read_or_write, async_transfer),
        case("async_transfer_without_tokio", read_or_write, async_without_tokio),
        case("polling_batch_lifecycle", read_or_write, polling),
        paired("out_of_bounds_remote_rejected", read_or_write, out_of_bounds),
        paired("unregistered_remote_range_rejected", served_read_or_write, stale_remote_range),
        case("overflowing_address_rejected", read_or_write, overflow),
        case("zero_length_rejected", read_or_write, zero_length),
        paired("unregistered_local_buffer_rejected", read_or_write, unregistered_local),
        paired("unregister_waits_for_local_transfers", read_or_write, unregister_waits_for_local_use),
        case("misaligned_request_rejected", aligned, misaligned),
        case("oversized_request_rejected", limited, oversized),
        Case { gate: live_peer, ..control("notifications", notifications) },
        case("peer_shutdown_reported", served_read_or_write, peer_shutdown),
        case("cross_process_read_write", cross_process, cross_read_write),
        case("cross_process_peer_gone_before_post", peer_failure, cross_gone_before_post),
        case("cross_process_peer_killed_mid_batch", peer_failure, cross_killed_mid_batch),
        case("cross_process_peer_restart_same_port", cross_process, cross_restart),
    ]);
    let base = target.pair == base_pair(&target.protocol);
    let suffix = target.pair.suffix();
    cases
        .into_iter()
        .filter(|c| base || c.every_pair)
        .map(|c| {
            let name = format!("{}{suffix}", c.name);
            // A test disabled by its plain name is disabled under every memory pair.
            if let Some(reason) = opts.disabled_reason(&name).or_else(|| opts.disabled_reason(&c.name)) {
                Trial::fixed(KIND, protocol, name, Outcome::Disabled(reason.to_string()))
            } else if let Some(reason) = (c.gate)(target) {
                Trial::fixed(KIND, protocol, name, Outcome::Skipped(reason))
            } else {
                let t = target.clone();
                let (body, moves_data) = (c.body, c.moves_data);
                Trial::new(KIND, protocol, name, opts.timeout, move || {
                    if moves_data {
                        match t.reach.get_or_init(|| remote_reach(&t)) {
                            Ok(None) => {}
                            Ok(Some(why)) => return Ok(Outcome::Skipped(why.clone())),
                            Err(e) => return Err(e.clone()),
                        }
                    }
                    body(&t)
                })
            }
        })
        .collect()
}

/// Whether the transport reaches the peer's memory of `t`'s pair: `Ok(None)` when it does; `Ok(Some(why))`
/// when it does not publish that memory (its `can_reach_buffer` is false) and the engine, as it must, finds
/// no route (`Unavailable`); `Err` when the two disagree.
fn remote_reach(t: &Target) -> Result<Option<String>, String> {
    if let Some(why) = no_file_service(t) {
        return Ok(Some(why));
    }
    let p = Pair::new(t, 4096, 4096)?;
    let seg = p.a.segment(p.seg).or_fail("A's view of B")?;
    let buffer = seg.descriptor.locate(p.bbuf.remote_addr(), p.bbuf.len()).or_fail("B's buffer in A's view of B")?;
    let transport = p.a.transport(&t.protocol).or_fail("the engine's transport")?;
    if transport.can_reach(&seg) && transport.can_reach_buffer(&seg, buffer) {
        return Ok(None);
    }
    let kind = kind_name(t.remote.kind());
    let what = format!("the peer's {kind} buffer (at {})", buffer.name);
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    match single_error(p.run(&[p.req(op, 0, 0, 64)])?, &format!("a transfer to {what}")) {
        Ok(Error::Unavailable { reason }) => Ok(Some(format!(
            "{} does not reach {what}: it does not publish {kind} memory (can_reach_buffer is false), and the \
             engine has no route: {reason}",
            t.protocol
        ))),
        Ok(e) => Err(format!(
            "{} says it cannot reach {what} (can_reach_buffer is false), but a transfer to it failed with {e:?} \
             instead of Unavailable (no route)",
            t.protocol
        )),
        Err(e) => Err(format!("{} says it cannot reach {what} (can_reach_buffer is false): {e}", t.protocol)),
    }
}

// ---- fixtures ---------------------------------------------------------------------------------

fn engine(t: &Target) -> Result<TransferEngine, String> {
    if is_file_protocol(&t.protocol) {
        // File segments are found through a shared metadata service; name engines by their rpc port so that
        // several share one service.
        let conn = t.opts.metadata_conn.as_deref().ok_or("no metadata service for file segments")?;
        let mut c = EngineConfig::new("127.0.0.1", conn).with_protocols([t.protocol.as_str()]);
        c.name_with_rpc_port = true;
        return TransferEngine::new(c).or_fail(&format!("starting an engine with metadata service {conn}"));
    }
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([t.protocol.as_str()]))
        .or_fail("starting an engine (is mooncake-metadata-p2p linked?)")
}

/// For file segments without a shared metadata service: why their cases skip.
fn no_file_service(t: &Target) -> Option<String> {
    (is_file_protocol(&t.protocol) && t.opts.metadata_conn.is_none()).then(|| {
        format!(
            "{} segments are files published through a shared metadata service: SuiteOptions::metadata_conn is not \
             set (e.g. the URL of an HTTP metadata server)",
            t.protocol
        )
    })
}

/// The peer's side of a [`Pair`]: a buffer engine B registered, or the files of a file segment.
enum Remote {
    Memory(TestBuffer),
    Files(FileSegment),
}

impl Remote {
    fn addr(&self) -> u64 {
        match self {
            Remote::Memory(b) => b.addr(),
            Remote::Files(_) => 0,
        }
    }

    /// The address requests name the peer's buffer by (the offset a region-offset segment publishes).
    fn remote_addr(&self) -> u64 {
        match self {
            Remote::Memory(b) => b.remote_addr(),
            Remote::Files(_) => 0,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Remote::Memory(b) => b.len(),
            Remote::Files(f) => f.files.iter().map(|(_, l)| l).sum(),
        }
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        self.read(0, self.len())
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        match self {
            Remote::Memory(b) => b.read(offset, len),
            Remote::Files(f) => {
                let mut out = vec![0u8; len as usize];
                f.each(offset, len, |file, file_off, at, n| {
                    use std::os::unix::fs::FileExt;
                    file.read_exact_at(&mut out[at..at + n], file_off)
                })?;
                Ok(out)
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        match self {
            Remote::Memory(b) => b.write(offset, data),
            Remote::Files(f) => f.each(offset, data.len() as u64, |file, file_off, at, n| {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&data[at..at + n], file_off)
            }),
        }
    }
}

/// A file segment of two temporary files (one when it is a single byte), published with upstream's descriptor
/// (`{file_path, length, local_path_map}` buffers) under the segment name `<protocol>/conformance-<pid>-<n>`;
/// unpublished and removed when dropped.
struct FileSegment {
    name: String,
    dir: std::path::PathBuf,
    files: Vec<(std::path::PathBuf, u64)>,
    store: Arc<dyn MetadataStore>,
    key: String,
}

impl FileSegment {
    fn create(t: &Target, initiator: &str, len: u64) -> Result<FileSegment, String> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = t.opts.metadata_conn.as_deref().ok_or("no metadata service for file segments")?;
        let name = format!("{}/conformance-{}-{n}", t.protocol, std::process::id());
        let dir = std::env::temp_dir().join(format!("mooncake-conformance-files-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).or_fail("creating the file segment's directory")?;
        let len = len.max(1);
        let first = if len >= 2 { len / 2 } else { len };
        let mut files = vec![(dir.join("0"), first)];
        if len > first {
            files.push((dir.join("1"), len - first));
        }
        for (p, l) in &files {
            std::fs::File::create(p).and_then(|f| f.set_len(*l)).or_fail("creating a segment file")?;
        }
        let buffers: Vec<serde_json::Value> = files
            .iter()
            .map(|(p, l)| {
                let p = p.to_string_lossy();
                serde_json::json!({"file_path": p, "length": l, "local_path_map": {initiator: p}})
            })
            .collect();
        let json = serde_json::json!({"name": name, "protocol": t.protocol, "buffers": buffers}).to_string();
        let store = registry::create_metadata(conn).or_fail("metadata client for the file segment")?;
        let key = MetadataKeys::from_env().segment(&name);
        let seg = FileSegment { name, dir, files, store, key };
        block_on_timeout(LIMIT, "publishing the file segment", seg.store.put(&seg.key, json.as_bytes()))?
            .or_fail("publishing the file segment")?;
        Ok(seg)
    }

    /// Calls `f(file, offset in it, offset in the range, bytes)` for each file `[offset, offset+len)` touches.
    fn each(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&std::fs::File, u64, usize, usize) -> std::io::Result<()>,
    ) -> Result<(), String> {
        let mut start = 0u64;
        for (path, flen) in &self.files {
            let (lo, hi) = (offset.max(start), (offset + len).min(start + flen));
            if lo < hi {
                let file = std::fs::OpenOptions::new().read(true).write(true).open(path).or_fail("opening a file")?;
                f(&file, lo - start, (lo - offset) as usize, (hi - lo) as usize)
                    .or_fail(&format!("file {} of the segment", path.display()))?;
            }
            start += flen;
        }
        ensure!(offset + len <= start, "range past the file segment's end");
        Ok(())
    }
}

impl Drop for FileSegment {
    fn drop(&mut self) {
        let _ = block_on_timeout(Duration::from_secs(5), "unpublishing", self.store.delete(&self.key));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a blocking engine call on its own thread; `Err` when it does not return within `limit`.
fn bounded<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).map_err(|_| format!("{what}: did not return within {limit:?} (hang)"))
}

/// Engine A with buffer `abuf` (on the pair's local memory), engine B with buffer `bbuf` (on the pair's
/// remote memory; for file segments there is no B and `bbuf` is a [`FileSegment`]), and A's handle of B's
/// segment.
struct Pair {
    a: TransferEngine,
    b: Option<TransferEngine>,
    abuf: TestBuffer,
    bbuf: Remote,
    seg: SegmentHandle,
    b_down: bool,
}

impl Pair {
    fn new(t: &Target, a_len: u64, b_len: u64) -> Result<Pair, String> {
        let a = engine(t)?;
        let abuf = TestBuffer::zeroed(&t.local, a_len)?;
        abuf.register(&a).or_fail("registering A's buffer")?;
        if is_file_protocol(&t.protocol) {
            let files = FileSegment::create(t, a.local_segment_name(), b_len)?;
            let mut pair = Pair { a, b: None, abuf, bbuf: Remote::Files(files), seg: 0, b_down: false };
            let name = pair.remote_name();
            pair.seg = pair.a.open_segment(&name).or_fail("A opening the file segment")?;
            return Ok(pair);
        }
        let b = engine(t)?;
        let bbuf = TestBuffer::zeroed(&t.remote, b_len)?;
        bbuf.register(&b).or_fail("registering B's buffer")?;
        let mut pair = Pair { a, b: Some(b), abuf, bbuf: Remote::Memory(bbuf), seg: 0, b_down: false };
        pair.seg = pair.a.open_segment(&pair.remote_name()).or_fail("A opening B's segment")?;
        Ok(pair)
    }

    /// Engine B (cases that need one are gated off for file segments).
    fn peer(&self) -> Result<&TransferEngine, String> {
        self.b.as_ref().ok_or_else(|| "no peer engine: the remote side is a file segment".to_string())
    }

    /// The segment A opens: B's, or the file segment's.
    fn remote_name(&self) -> String {
        match (&self.b, &self.bbuf) {
            (_, Remote::Files(f)) => f.name.clone(),
            (Some(b), _) => b.local_segment_name().to_string(),
            (None, _) => String::new(),
        }
    }

    fn req(&self, opcode: Opcode, local_off: u64, remote_off: u64, length: u64) -> TransferRequest {
        TransferRequest {
            opcode,
            local_addr: self.abuf.addr() + local_off,
            target: self.seg,
            remote_addr: self.bbuf.remote_addr() + remote_off,
            length,
        }
    }

    /// `TransferEngine::transfer` on a fresh runtime, bounded.
    fn run(&self, reqs: &[TransferRequest]) -> Result<mooncake_core::Result<Vec<mooncake_core::Result<u64>>>, String> {
        run(&self.a, reqs)
    }

    fn run_ok(&self, reqs: &[TransferRequest], what: &str) -> Result<(), String> {
        all_ok(self.run(reqs)?, reqs, what)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Unregistering waits for in-flight remote accesses; only then may the buffers go.
        let _ = self.a.unregister_memory(self.abuf.addr());
        if let Some(b) = &self.b {
            if !self.b_down {
                let _ = b.unregister_memory(self.bbuf.addr());
            }
            b.shutdown();
        }
        self.a.shutdown();
    }
}

/// One engine with one registered host buffer (for cross-process tests).
struct Solo {
    engine: TransferEngine,
    buf: TestBuffer,
}

impl Solo {
    fn new(t: &Target, len: u64) -> Result<Solo, String> {
        let engine = engine(t)?;
        let buf = TestBuffer::zeroed(&Memory::Host, len)?;
        buf.register(&engine).or_fail("registering the local buffer")?;
        Ok(Solo { engine, buf })
    }
}

impl Drop for Solo {
    fn drop(&mut self) {
        let _ = self.engine.unregister_memory(self.buf.addr());
        self.engine.shutdown();
    }
}

type Results = mooncake_core::Result<Vec<mooncake_core::Result<u64>>>;

fn run(e: &TransferEngine, reqs: &[TransferRequest]) -> Result<Results, String> {
    block_on_timeout(LIMIT, "transfer", e.transfer(reqs))
}

fn all_ok(res: Results, reqs: &[TransferRequest], what: &str) -> Result<(), String> {
    let v = res.or_fail(what)?;
    ensure!(v.len() == reqs.len(), "{what}: {} results for {} requests", v.len(), reqs.len());
    for (i, (r, q)) in v.iter().zip(reqs).enumerate() {
        match r {
            Ok(n) if *n == q.length => {}
            Ok(n) => return Err(format!("{what}: request {i} reports {n} bytes moved, expected {}", q.length)),
            Err(e) => return Err(format!("{what}: request {i} ({:?}, {} bytes) failed: {e}", q.opcode, q.length)),
        }
    }
    Ok(())
}

/// The error of a single-request transfer, whether it was refused at submission or failed later.
fn single_error(res: Results, what: &str) -> Result<Error, String> {
    match res {
        Err(e) => Ok(e),
        Ok(v) => match v.into_iter().next() {
            Some(Err(e)) => Ok(e),
            Some(Ok(n)) => Err(format!("{what}: succeeded ({n} bytes) but must be refused")),
            None => Err(format!("{what}: no result")),
        },
    }
}

fn is_address_error(e: &Error) -> bool {
    matches!(e, Error::AddressNotRegistered { .. } | Error::RemoteRejected { .. } | Error::InvalidArgument(_))
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align.max(1)) * align.max(1)
}

// ---- tests: declaration -------------------------------------------------------------------------

fn capabilities_sane(t: &Target) -> TestResult {
    let c = &t.caps;
    ensure!(c.read || c.write, "declares neither read nor write");
    ensure!(c.min_request_size >= 1, "min_request_size is 0");
    ensure!(c.min_request_size <= c.max_request_size, "min_request_size > max_request_size");
    ensure!(
        c.optimal_request_size >= c.min_request_size && c.optimal_request_size <= c.max_request_size,
        "optimal_request_size {} outside [{}, {}]",
        c.optimal_request_size,
        c.min_request_size,
        c.max_request_size
    );
    ensure!(c.alignment >= 1 && c.alignment.is_power_of_two(), "alignment {} is not a power of two", c.alignment);
    let m = &c.model;
    ensure!(
        m.bandwidth_bytes_per_sec.is_finite() && m.bandwidth_bytes_per_sec > 0.0,
        "model bandwidth {} is not a positive number",
        m.bandwidth_bytes_per_sec
    );
    ensure!(m.latency < Duration::from_secs(1), "model latency {:?} is implausible", m.latency);
    ensure!(c.memory_kinds.iter().next().is_some(), "memory_kinds is empty");
    ensure!(!(c.same_host_only && !c.cross_process && c.memory_kinds.iter().count() == 0), "unusable declaration");
    let f = registry::transport(&t.protocol).or_fail("registry lookup")?;
    let inst = (f.create)(&BackendConfig::default()).or_fail("creating a second instance")?;
    ensure!(inst.name() == t.protocol, "instance names itself {:?}, registered as {:?}", inst.name(), t.protocol);
    ensure!(inst.capabilities() == c, "two instances declare different capabilities");
    Ok(Outcome::Passed)
}

fn probe_and_peer_probe(t: &Target) -> TestResult {
    let f = registry::transport(&t.protocol).or_fail("registry lookup")?;
    ensure!((f.probe)().is_available(), "probe() changed its answer to unavailable");
    ensure!(
        registry::probe_all().iter().any(|r| r.kind == "transport" && r.name == t.protocol),
        "probe_all() does not list {:?}",
        t.protocol
    );
    if is_file_protocol(&t.protocol) {
        // No peer engine to probe: a file segment is files.
        return Ok(Outcome::Passed);
    }
    let p = Pair::new(t, 4096, 4096)?;
    let (a, name) = (p.a.clone(), p.remote_name());
    bounded(LIMIT, "probe_peer", move || a.probe_peer(&name))?.or_fail("probing a live peer")?;
    // A port nobody listens on: the probe must fail, and promptly.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").or_fail("binding a scratch port")?;
    let port = dead.local_addr().or_fail("scratch port")?.port();
    drop(dead);
    let a = p.a.clone();
    let r = bounded(LIMIT, "probe_peer of a dead address", move || a.probe_peer(&format!("127.0.0.1:{port}")))?;
    ensure!(r.is_err(), "probing 127.0.0.1:{port}, where nothing listens, succeeded");
    Ok(Outcome::Passed)
}

fn descriptor_published(t: &Target) -> TestResult {
    if let Some(why) = no_file_service(t) {
        return Ok(Outcome::Skipped(why));
    }
    let p = Pair::new(t, 4096, 8192)?;
    if is_file_protocol(&t.protocol) {
        // Upstream's file-segment descriptor, as A decodes it: files addressed by their concatenation.
        let seen = p.a.segment(p.seg).or_fail("A's view of the file segment")?;
        let d = &seen.descriptor;
        ensure!(d.protocol == t.protocol, "file segment protocol {:?}, expected {:?}", d.protocol, t.protocol);
        ensure!(d.buffers.len() == 2 && d.buffers[1].addr == d.buffers[0].length, "files not concatenated: {d:?}");
        ensure!(d.locate(0, p.bbuf.len()).is_some(), "the whole file segment is not addressable");
        ensure!(d.locate(0, p.bbuf.len() + 1).is_none(), "a range past the last file is addressable");
        let again = SegmentDescriptor::from_json(d.to_json().as_bytes()).or_fail("descriptor JSON round trip")?;
        ensure!(again.locate(0, p.bbuf.len()).is_some(), "round-tripped descriptor lost the files");
        let tr = p.a.transport(&t.protocol).or_fail("the engine's transport")?;
        ensure!(tr.can_reach(&seen), "{} cannot reach the file segment", t.protocol);
        return Ok(Outcome::Passed);
    }
    let d = p.peer()?.local_descriptor();
    ensure!(d.protocol == t.protocol, "descriptor protocol {:?}, expected {:?}", d.protocol, t.protocol);
    ensure!(
        d.find_buffer(p.bbuf.remote_addr(), p.bbuf.len()).is_some(),
        "registered buffer missing from the descriptor"
    );
    let again = SegmentDescriptor::from_json(d.to_json().as_bytes()).or_fail("descriptor JSON round trip")?;
    ensure!(again.protocols().contains(&t.protocol), "round-tripped descriptor lost the protocol");
    let seen = p.a.segment(p.seg).or_fail("A's view of B")?;
    ensure!(seen.descriptor.find_buffer(p.bbuf.remote_addr(), p.bbuf.len()).is_some(), "A does not see B's buffer");
    ensure!(p.a.transport(&t.protocol).is_some(), "engine does not list the transport");
    Ok(Outcome::Passed)
}

// ---- tests: data movement -------------------------------------------------------------------------

fn write_read(t: &Target, size: u64) -> TestResult {
    // A non-zero, aligned offset into the remote buffer, with guard bands on both sides.
    let off = align_up(3, t.caps.alignment);
    let n = size as usize;
    let p = Pair::new(t, 2 * size, size + 2 * off)?;
    p.abuf.write(0, &pattern(size, n))?;
    if t.caps.write {
        p.run_ok(&[p.req(Opcode::Write, 0, off, size)], "write")?;
        let b = p.bbuf.bytes()?;
        check_pattern(&b[off as usize..off as usize + n], size, 0, "remote bytes after write")?;
        ensure!(b[..off as usize].iter().all(|x| *x == 0), "write touched bytes before the target range");
        ensure!(b[off as usize + n..].iter().all(|x| *x == 0), "write touched bytes after the target range");
    } else {
        p.bbuf.write(off, &pattern(size, n))?;
    }
    if t.caps.read {
        p.run_ok(&[p.req(Opcode::Read, size, off, size)], "read")?;
        check_pattern(&p.abuf.read(size, size)?, size, 0, "local bytes after read")?;
    }
    Ok(Outcome::Passed)
}

fn self_segment(t: &Target) -> TestResult {
    let a = engine(t)?;
    // On the pair's remote memory, which the segment publishes (the same as the local memory but for
    // region-offset protocols, whose segments publish only region memory).
    let buf = TestBuffer::zeroed(&t.remote, 8192)?;
    buf.write(0, &pattern(3, 4096))?;
    buf.register(&a).or_fail("registering")?;
    let res = (|| {
        let me = a.open_segment(a.local_segment_name()).or_fail("opening our own segment")?;
        let w = TransferRequest {
            opcode: Opcode::Write,
            local_addr: buf.addr(),
            target: me,
            remote_addr: buf.remote_addr() + 4096,
            length: 4096,
        };
        all_ok(run(&a, &[w])?, &[w], "write to our own segment")
    })();
    let _ = a.unregister_memory(buf.addr());
    a.shutdown();
    res?;
    check_pattern(&buf.read(4096, 4096)?, 3, 0, "bytes written through our own segment")?;
    Ok(Outcome::Passed)
}

fn large_batch(t: &Target) -> TestResult {
    const N: u64 = 1024;
    const CHUNK: u64 = 4096;
    let total = N * CHUNK;
    let p = Pair::new(t, 2 * total, total)?;
    p.abuf.write(0, &pattern(41, total as usize))?;
    // Writes through the polling API, in submissions no larger than max_batch_size.
    let writes: Vec<_> = (0..N).map(|i| p.req(Opcode::Write, i * CHUNK, i * CHUNK, CHUNK)).collect();
    let id = p.a.allocate_batch(N as usize).or_fail("allocate_batch(1024)")?;
    let per = if t.caps.max_batch_size == 0 { writes.len() } else { t.caps.max_batch_size };
    for chunk in writes.chunks(per) {
        p.a.submit_transfer(id, chunk).or_fail("submit_transfer")?;
    }
    let batch = p.a.batch(id).or_fail("batch")?;
    batch.wait_blocking(LIMIT).map_err(|e| format!("1024 writes did not finish: {e}"))?;
    for i in 0..N as usize {
        let s = p.a.transfer_status(id, i).or_fail("transfer_status")?;
        ensure!(
            s.state == TransferState::Completed && s.transferred_bytes == CHUNK,
            "write {i}: {:?}, {} bytes, {:?}",
            s.state,
            s.transferred_bytes,
            s.error
        );
    }
    p.a.free_batch(id).or_fail("free_batch")?;
    check_pattern(&p.bbuf.bytes()?, 41, 0, "remote bytes after 1024 writes")?;
    // Reads through the async API, reversing the chunk order.
    let reads: Vec<_> = (0..N).map(|i| p.req(Opcode::Read, total + (N - 1 - i) * CHUNK, i * CHUNK, CHUNK)).collect();
    p.run_ok(&reads, "1024 reads")?;
    let back = p.abuf.read(total, total)?;
    for i in 0..N {
        let local = ((N - 1 - i) * CHUNK) as usize;
        check_pattern(&back[local..local + CHUNK as usize], 41, i * CHUNK, &format!("read {i}"))?;
    }
    Ok(Outcome::Passed)
}

/// `batch_transfer_sync_each` (the blocking batch, which transports may run on the calling thread): 32 writes
/// and 32 reads of 1 KiB give one result each and the right bytes.
fn sync_batch_each(t: &Target) -> TestResult {
    const N: u64 = 32;
    const CHUNK: u64 = 1024;
    let total = N * CHUNK;
    let p = Pair::new(t, 2 * total, total)?;
    p.abuf.write(0, &pattern(43, total as usize))?;
    let (a, name) = (p.a.clone(), p.remote_name());
    let (abuf, bbuf) = (p.abuf.addr(), p.bbuf.remote_addr());
    let offsets: Vec<u64> = (0..N).map(|i| i * CHUNK).collect();
    let writes =
        sync_each(&a, &name, Opcode::Write, offsets.iter().map(|o| abuf + o), offsets.iter().map(|o| bbuf + o), CHUNK)?
            .or_fail("32 writes")?;
    ensure!(writes.len() == N as usize, "{} results for {N} writes", writes.len());
    ensure!(writes.iter().all(Result::is_ok), "writes failed: {writes:?}");
    check_pattern(&p.bbuf.bytes()?, 43, 0, "remote bytes after 32 writes")?;
    // Reads into the second half, in reverse chunk order.
    let locals = (0..N).map(|i| abuf + total + (N - 1 - i) * CHUNK);
    let reads =
        sync_each(&a, &name, Opcode::Read, locals, offsets.iter().map(|o| bbuf + o), CHUNK)?.or_fail("32 reads")?;
    ensure!(reads.len() == N as usize && reads.iter().all(Result::is_ok), "reads failed: {reads:?}");
    let back = p.abuf.read(total, total)?;
    for i in 0..N {
        let local = ((N - 1 - i) * CHUNK) as usize;
        check_pattern(&back[local..local + CHUNK as usize], 43, i * CHUNK, &format!("read {i}"))?;
    }
    drop(p);
    Ok(Outcome::Passed)
}

/// `batch_transfer_sync_each` with one range the peer unregistered (A's cached descriptor still lists it) among
/// 32: that request fails with an address error while its neighbours move their bytes. Refusing the whole call up
/// front is allowed too.
fn sync_batch_stale_range(t: &Target) -> TestResult {
    const N: u64 = 32;
    const CHUNK: u64 = 1024;
    let total = N * CHUNK;
    let extra = TestBuffer::with_pattern(&t.remote, 9, CHUNK)?;
    let p = Pair::new(t, total, total)?;
    p.abuf.write(0, &pattern(44, total as usize))?;
    p.bbuf.write(0, &pattern(45, total as usize))?;
    extra.register(p.peer()?).or_fail("registering B's extra buffer")?;
    let seg = p.a.refresh_segment(p.seg).or_fail("A refreshing B")?;
    ensure!(seg.descriptor.find_buffer(extra.remote_addr(), CHUNK).is_some(), "A does not see B's extra buffer");
    p.peer()?.unregister_memory(extra.addr()).or_fail("B unregistering the extra buffer")?;
    let (a, name) = (p.a.clone(), p.remote_name());
    let (abuf, bbuf) = (p.abuf.addr(), p.bbuf.remote_addr());
    let op = if t.caps.read { Opcode::Read } else { Opcode::Write };
    let mut remotes: Vec<u64> = (0..N).map(|i| bbuf + i * CHUNK).collect();
    remotes[3] = extra.remote_addr();
    let outcome = sync_each(&a, &name, op, (0..N).map(|i| abuf + i * CHUNK), remotes, CHUNK)?;
    let results = match outcome {
        Err(e) => {
            ensure!(is_address_error(&e), "a batch with one stale range failed with {e:?}");
            return Ok(Outcome::Passed);
        }
        Ok(results) => results,
    };
    ensure!(results.len() == N as usize, "{} results for {N} requests", results.len());
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (3, Err(e)) => ensure!(is_address_error(e), "{op:?} of the stale range: {e:?}"),
            (3, Ok(_)) => return Err(format!("{op:?} of a range the peer unregistered succeeded")),
            (_, Err(e)) => return Err(format!("{op:?} {i} failed next to the stale one: {e}")),
            (_, Ok(_)) => {}
        }
    }
    // The neighbours moved their bytes (request 3's local chunk stays as it was).
    let (moved, want_seed, stays) = match op {
        Opcode::Read => (p.abuf.bytes()?, 45, pattern(44, total as usize)),
        Opcode::Write => (p.bbuf.bytes()?, 44, pattern(45, total as usize)),
    };
    for i in (0..N as usize).filter(|&i| i != 3) {
        let range = i * CHUNK as usize..(i + 1) * CHUNK as usize;
        check_pattern(&moved[range], want_seed, (i as u64) * CHUNK, &format!("{op:?} {i} next to the stale one"))?;
    }
    let range = 3 * CHUNK as usize..4 * CHUNK as usize;
    check_equal(&moved[range.clone()], &stays[range], "the chunk of the refused request")?;
    check_pattern(&extra.bytes()?, 9, 0, "unregistered remote buffer (must be untouched)")?;
    drop(p);
    drop(extra);
    Ok(Outcome::Passed)
}

/// `batch_transfer_sync_each` of `CHUNK`-byte requests from A to segment `name`, on its own thread, bounded.
fn sync_each(
    a: &TransferEngine,
    name: &str,
    op: Opcode,
    locals: impl Iterator<Item = u64>,
    remotes: impl IntoIterator<Item = u64>,
    chunk: u64,
) -> Result<mooncake_core::Result<Vec<mooncake_core::Result<()>>>, String> {
    let locals: Vec<u64> = locals.collect();
    let remotes: Vec<u64> = remotes.into_iter().collect();
    let lens = vec![chunk; locals.len()];
    let (a, name) = (a.clone(), name.to_string());
    bounded(LIMIT, "batch_transfer_sync_each", move || a.batch_transfer_sync_each(&name, op, &locals, &remotes, &lens))
}

fn mixed_batch(t: &Target) -> TestResult {
    let align = t.caps.alignment.max(1);
    let sizes: Vec<u64> = [1u64, 7, 4096, 13, 65536, 1 << 20, 3, 300_000, 8192, 1, 2 << 20]
        .into_iter()
        .map(|s| align_up(s, align))
        .filter(|s| *s >= t.caps.min_request_size && *s <= t.caps.max_request_size.min(t.opts.max_size))
        .collect();
    ensure!(!sizes.is_empty(), "no size of the mix fits the declared limits");
    let gap = align_up(64, align);
    let mut offs = Vec::new();
    let mut end = 0;
    for s in &sizes {
        offs.push(end);
        end += align_up(s + gap, align);
    }
    let total = end;
    let p = Pair::new(t, 2 * total, 2 * total)?;
    p.abuf.write(0, &pattern(66, total as usize))?;
    p.bbuf.write(total, &pattern(77, total as usize))?;
    let mut reqs = Vec::new();
    for (o, s) in offs.iter().zip(&sizes) {
        reqs.push(p.req(Opcode::Write, *o, *o, *s));
        reqs.push(p.req(Opcode::Read, total + o, total + o, *s));
    }
    p.run_ok(&reqs, "mixed batch")?;
    let (remote, local) = (p.bbuf.read(0, total)?, p.abuf.read(total, total)?);
    for (o, s) in offs.iter().zip(&sizes) {
        let (o, s) = (*o as usize, *s as usize);
        check_pattern(&remote[o..o + s], 66, o as u64, &format!("remote chunk at {o} ({s} bytes)"))?;
        check_pattern(&local[o..o + s], 77, o as u64, &format!("local chunk at {o} ({s} bytes)"))?;
        let next = o + s;
        let gap_end = (next + gap as usize).min(total as usize);
        ensure!(remote[next..gap_end].iter().all(|b| *b == 0), "write {s}B at {o} spilled past its end");
    }
    Ok(Outcome::Passed)
}

fn concurrent(t: &Target) -> TestResult {
    const THREADS: u64 = 8;
    const SLICE: u64 = 256 << 10;
    const ROUNDS: usize = 8;
    let total = THREADS * SLICE;
    let p = Pair::new(t, 2 * total, total)?;
    for k in 0..THREADS {
        let s = (k * SLICE) as usize;
        p.abuf.write(s as u64, &pattern(100 + k, SLICE as usize))?;
    }
    let peer = p.remote_name();
    let errors: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                let p = &p;
                let peer = peer.as_str();
                scope.spawn(move || -> Result<(), String> {
                    let local = p.abuf.addr() + k * SLICE;
                    let back = p.abuf.addr() + total + k * SLICE;
                    let remote = p.bbuf.remote_addr() + k * SLICE;
                    for round in 0..ROUNDS {
                        if k % 2 == 0 {
                            // Blocking API.
                            p.a.transfer_sync(peer, Opcode::Write, local, remote, SLICE)
                                .or_fail(&format!("thread {k} round {round} write"))?;
                            p.a.transfer_sync(peer, Opcode::Read, back, remote, SLICE)
                                .or_fail(&format!("thread {k} round {round} read"))?;
                        } else {
                            // Async API, one request each way per round, as a 2-request batch.
                            let w = p.req(Opcode::Write, k * SLICE, k * SLICE, SLICE);
                            p.run_ok(&[w], &format!("thread {k} round {round} write"))?;
                            let r = p.req(Opcode::Read, total + k * SLICE, k * SLICE, SLICE);
                            p.run_ok(&[r], &format!("thread {k} round {round} read"))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a submitting thread panicked".into()),
            })
            .collect()
    });
    ensure!(errors.is_empty(), "{}", errors.join("; "));
    let (remote, back) = (p.bbuf.read(0, total)?, p.abuf.read(total, total)?);
    for k in 0..THREADS {
        let s = (k * SLICE) as usize;
        let e = s + SLICE as usize;
        check_pattern(&remote[s..e], 100 + k, 0, &format!("remote slice of thread {k}"))?;
        check_pattern(&back[s..e], 100 + k, 0, &format!("read-back slice of thread {k}"))?;
    }
    Ok(Outcome::Passed)
}

fn async_transfer(t: &Target) -> TestResult {
    let p = Pair::new(t, 3 * 4096, 3 * 4096)?;
    let empty = run(&p.a, &[])?.or_fail("an empty transfer")?;
    ensure!(empty.is_empty(), "an empty transfer returned {} results", empty.len());
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    let reqs: Vec<_> = (0..3).map(|i| p.req(op, i * 4096, i * 4096, 100 + i)).collect();
    let res = run(&p.a, &reqs)?.or_fail("async transfer")?;
    ensure!(res.len() == 3, "{} results for 3 requests", res.len());
    for (i, r) in res.iter().enumerate() {
        ensure!(matches!(r, Ok(n) if *n == 100 + i as u64), "request {i}: {r:?}, expected Ok({})", 100 + i);
    }
    // Many transfers awaited at once on one runtime thread.
    let futs: Vec<_> = (0..3).map(|i| reqs[i..i + 1].to_vec()).collect();
    let all = block_on_timeout(LIMIT, "joined transfers", async {
        let mut handles = Vec::new();
        for r in &futs {
            handles.push(p.a.transfer(r));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await);
        }
        out
    })?;
    for (i, r) in all.into_iter().enumerate() {
        all_ok(r, &futs[i], &format!("joined transfer {i}"))?;
    }
    Ok(Outcome::Passed)
}

fn async_without_tokio(t: &Target) -> TestResult {
    let p = Pair::new(t, 4096, 4096)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    let reqs = [p.req(op, 0, 0, 4096)];
    let res = block_on_plain(LIMIT, "transfer() outside any runtime", p.a.transfer(&reqs))?;
    all_ok(res, &reqs, "transfer() outside any runtime")?;
    Ok(Outcome::Passed)
}

fn polling(t: &Target) -> TestResult {
    let p = Pair::new(t, 1 << 20, 1 << 20)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    ensure!(
        matches!(p.a.allocate_batch(0), Err(Error::InvalidArgument(_))),
        "allocate_batch(0) must be InvalidArgument"
    );
    let id = p.a.allocate_batch(4).or_fail("allocate_batch(4)")?;
    p.a.submit_transfer(id, &[p.req(op, 0, 0, 100), p.req(op, 4096, 4096, 200)]).or_fail("first submission")?;
    let over = p.a.submit_transfer(id, &[p.req(op, 0, 0, 1), p.req(op, 0, 0, 1), p.req(op, 0, 0, 1)]);
    ensure!(
        matches!(over, Err(Error::TooManyRequests { capacity: 4, .. })),
        "submitting 3 more into a batch of 4 holding 2 must be TooManyRequests, got {over:?}"
    );
    p.a.submit_transfer(id, &[p.req(op, 8192, 8192, 300), p.req(op, 12288, 12288, 400)])
        .or_fail("second submission (fills the batch)")?;
    ensure!(
        matches!(p.a.submit_transfer(id, &[p.req(op, 0, 0, 1)]), Err(Error::TooManyRequests { .. })),
        "a full batch must refuse more requests"
    );
    let done =
        wait_until(LIMIT, || (0..4).all(|i| p.a.transfer_status(id, i).map(|s| s.state.is_final()).unwrap_or(true)));
    ensure!(done, "requests still pending after {LIMIT:?} of polling");
    for (i, want) in [100u64, 200, 300, 400].into_iter().enumerate() {
        let s = p.a.transfer_status(id, i).or_fail("transfer_status")?;
        ensure!(
            s.state == TransferState::Completed && s.transferred_bytes == want,
            "request {i}: {:?} with {} bytes ({:?}), expected Completed with {want}",
            s.state,
            s.transferred_bytes,
            s.error
        );
    }
    let st = p.a.batch_status(id).or_fail("batch_status")?;
    ensure!(st.state == TransferState::Completed, "batch status {:?}", st.state);
    ensure!(
        matches!(p.a.transfer_status(id, 4), Err(Error::InvalidArgument(_))),
        "status of a task index beyond the submitted ones must be InvalidArgument"
    );
    p.a.free_batch(id).or_fail("free_batch")?;
    ensure!(matches!(p.a.free_batch(id), Err(Error::UnknownBatch(_))), "double free_batch must be UnknownBatch");
    ensure!(
        matches!(p.a.transfer_status(id, 0), Err(Error::UnknownBatch(_))),
        "status of a freed batch must be UnknownBatch"
    );
    // BatchBusy while in flight: a big batch freed right after submission. A transport fast
    // enough to finish first makes the free succeed, which is also correct.
    let n = 64u64;
    let chunk = (1u64 << 20) / n;
    let id = p.a.allocate_batch(n as usize).or_fail("allocate_batch")?;
    let reqs: Vec<_> = (0..n).map(|i| p.req(op, i * chunk, i * chunk, chunk)).collect();
    p.a.submit_transfer(id, &reqs).or_fail("submitting 64 requests")?;
    match p.a.free_batch(id) {
        Err(Error::BatchBusy(b)) if b == id => {
            let batch = p.a.batch(id).or_fail("batch")?;
            batch.wait_blocking(LIMIT).map_err(|e| format!("batch did not finish: {e}"))?;
            p.a.free_batch(id).or_fail("free_batch after completion")?;
        }
        Ok(()) => {}
        other => return Err(format!("free_batch right after submission: {other:?}, expected BatchBusy or Ok")),
    }
    Ok(Outcome::Passed)
}

// ---- tests: rejection -------------------------------------------------------------------------------

fn out_of_bounds(t: &Target) -> TestResult {
    let p = Pair::new(t, 8192, 4096)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    let cases = [
        ("straddling the end of the remote buffer", p.req(op, 0, 4000, 200)),
        ("ending one byte past the remote buffer", p.req(op, 0, 1, 4096)),
        (
            "before the remote buffer",
            TransferRequest { remote_addr: p.bbuf.remote_addr().wrapping_sub(4096), ..p.req(op, 0, 0, 64) },
        ),
        ("in unmapped high memory", TransferRequest { remote_addr: 0xFFFF_FFFF_0000_0000, ..p.req(op, 0, 0, 64) }),
    ];
    for (what, r) in cases {
        let e = single_error(p.run(&[r])?, what)?;
        ensure!(is_address_error(&e), "{what}: error {e:?} is not AddressNotRegistered/RemoteRejected/InvalidArgument");
    }
    ensure!(p.bbuf.bytes()?.iter().all(|b| *b == 0), "a rejected request modified the remote buffer");
    // The peer keeps serving: a valid transfer right after succeeds.
    p.abuf.write(0, &pattern(9, 4096))?;
    p.run_ok(&[p.req(op, 0, 0, 4096)], "valid transfer after rejected ones")?;
    if t.caps.write {
        check_pattern(&p.bbuf.bytes()?, 9, 0, "remote bytes after the valid write")?;
    }
    Ok(Outcome::Passed)
}

fn stale_remote_range(t: &Target) -> TestResult {
    // The peer unregisters a buffer A still has in its cached descriptor: the transport's own
    // server-side check (not the engine's descriptor check) must refuse the access.
    let extra = TestBuffer::with_pattern(&t.remote, 5, 4096)?;
    let p = Pair::new(t, 8192, 4096)?;
    extra.register(p.peer()?).or_fail("registering B's extra buffer")?;
    let seg = p.a.refresh_segment(p.seg).or_fail("A refreshing B")?;
    ensure!(seg.descriptor.find_buffer(extra.remote_addr(), 4096).is_some(), "A does not see B's extra buffer");
    p.peer()?.unregister_memory(extra.addr()).or_fail("B unregistering the extra buffer")?;
    let mut ops = Vec::new();
    if t.caps.write {
        ops.push(Opcode::Write);
    }
    if t.caps.read {
        ops.push(Opcode::Read);
    }
    for op in ops {
        let r = TransferRequest { remote_addr: extra.remote_addr(), ..p.req(op, 4096, 0, 4096) };
        let e = single_error(p.run(&[r])?, &format!("{op:?} of a range the peer unregistered"))?;
        ensure!(
            matches!(e, Error::RemoteRejected { .. } | Error::AddressNotRegistered { .. }),
            "{op:?} of a range the peer unregistered: {e:?}, expected RemoteRejected or AddressNotRegistered"
        );
    }
    check_pattern(&extra.bytes()?, 5, 0, "unregistered remote buffer (must be untouched)")?;
    ensure!(p.abuf.read(4096, 4096)?.iter().all(|b| *b == 0), "a refused read still delivered bytes");
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    p.run_ok(&[p.req(op, 0, 0, 4096)], "valid transfer after the refusal")?;
    drop(p);
    drop(extra);
    Ok(Outcome::Passed)
}

fn overflow(t: &Target) -> TestResult {
    let p = Pair::new(t, 4096, 4096)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    let cases = [
        ("remote address + length overflows", TransferRequest { remote_addr: u64::MAX - 7, ..p.req(op, 0, 0, 16) }),
        ("remote address u64::MAX", TransferRequest { remote_addr: u64::MAX, ..p.req(op, 0, 0, 1) }),
        ("local address + length overflows", TransferRequest { local_addr: u64::MAX - 7, ..p.req(op, 0, 0, 16) }),
        ("length u64::MAX", TransferRequest { length: u64::MAX, ..p.req(op, 0, 0, 1) }),
    ];
    for (what, r) in cases {
        let e = single_error(p.run(&[r])?, what)?;
        ensure!(is_address_error(&e), "{what}: {e:?} is not InvalidArgument/AddressNotRegistered/RemoteRejected");
    }
    Ok(Outcome::Passed)
}

fn zero_length(t: &Target) -> TestResult {
    let p = Pair::new(t, 4096, 4096)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    let e = single_error(p.run(&[p.req(op, 0, 0, 0)])?, "zero-length transfer")?;
    ensure!(matches!(e, Error::InvalidArgument(_)), "zero-length transfer: {e:?}, expected InvalidArgument");
    let id = p.a.allocate_batch(2).or_fail("allocate_batch")?;
    let r = p.a.submit_transfer(id, &[p.req(op, 0, 0, 16), p.req(op, 0, 0, 0)]);
    ensure!(matches!(r, Err(Error::InvalidArgument(_))), "submission with a zero-length request: {r:?}");
    let batch = p.a.batch(id).or_fail("batch")?;
    ensure!(batch.is_empty(), "a rejected submission still started {} requests", batch.len());
    p.a.free_batch(id).or_fail("free_batch")?;
    Ok(Outcome::Passed)
}

/// The safe calls check every local range against registered memory, whatever the transport (tcp too, whose
/// `requires_local_registration` is false: only the `unsafe` `TransferEngine::unchecked` calls skip the check).
fn unregistered_local(t: &Target) -> TestResult {
    let p = Pair::new(t, 4096, 4096)?;
    let stray = TestBuffer::zeroed(&t.local, 4096)?;
    for op in [Opcode::Write, Opcode::Read]
        .into_iter()
        .filter(|op| if *op == Opcode::Write { t.caps.write } else { t.caps.read })
    {
        // Outside registered memory, and running past the end of the registered buffer.
        let cases = [
            (stray.addr(), 4096, "an unregistered local buffer"),
            (p.abuf.addr() + 2048, 4096, "a range past the registered buffer"),
        ];
        for (local_addr, length, what) in cases {
            let r = TransferRequest { local_addr, length, ..p.req(op, 0, 0, 4096) };
            let e = single_error(p.run(&[r])?, &format!("{op:?} async from {what}"))?;
            ensure!(
                matches!(e, Error::AddressNotRegistered { .. }),
                "{op:?} async from {what}: {e:?}, expected AddressNotRegistered"
            );
            let seg = p.remote_name();
            let e = p.a.transfer_sync(&seg, op, local_addr, p.bbuf.remote_addr(), length);
            ensure!(
                matches!(e, Err(Error::AddressNotRegistered { .. })),
                "{op:?} sync from {what}: {e:?}, expected AddressNotRegistered"
            );
            let id = p.a.allocate_batch(1).or_fail("allocate_batch")?;
            let e = p.a.submit_transfer(id, &[r]);
            ensure!(
                matches!(e, Err(Error::AddressNotRegistered { .. })),
                "{op:?} batch from {what}: {e:?}, expected AddressNotRegistered"
            );
            p.a.free_batch(id).or_fail("free_batch")?;
        }
    }
    ensure!(p.bbuf.bytes()?.iter().all(|b| *b == 0), "a refused request touched the remote buffer");
    ensure!(stray.bytes()?.iter().all(|b| *b == 0), "a refused request touched the unregistered local buffer");
    Ok(Outcome::Passed)
}

/// A transfer holds its local region until it is finished: `unregister_memory` of the local buffer returns only
/// after the transfer using it is done (it waits, as it does for peers' accesses).
fn unregister_waits_for_local_use(t: &Target) -> TestResult {
    let total = (16u64 << 20).min(t.caps.max_request_size);
    let total = align_up(total.max(t.caps.alignment), t.caps.alignment).min(t.caps.max_request_size);
    let p = Pair::new(t, total, total)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    for _ in 0..3 {
        let id = p.a.allocate_batch(1).or_fail("allocate_batch")?;
        p.a.submit_transfer(id, &[p.req(op, 0, 0, total)]).or_fail("submitting a large transfer")?;
        p.a.unregister_memory(p.abuf.addr()).or_fail("unregistering the local buffer during a transfer")?;
        let batch = p.a.batch(id).or_fail("batch")?;
        ensure!(batch.is_done(), "unregister_memory returned while a transfer still used the local buffer");
        let s = batch.overall();
        ensure!(s.error.is_none(), "the transfer failed: {:?}", s.error);
        p.a.free_batch(id).or_fail("free_batch")?;
        p.abuf.register(&p.a).or_fail("registering the local buffer again")?;
    }
    Ok(Outcome::Passed)
}

fn misaligned(t: &Target) -> TestResult {
    let align = t.caps.alignment;
    let p = Pair::new(t, 4 * align, 4 * align)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    for (what, r) in [
        ("misaligned length", p.req(op, 0, 0, align + 1)),
        ("misaligned remote address", p.req(op, 0, 1, align)),
        ("misaligned local address", p.req(op, 1, 0, align)),
    ] {
        let e = single_error(p.run(&[r])?, what)?;
        ensure!(matches!(e, Error::InvalidArgument(_)), "{what}: {e:?}, expected InvalidArgument");
    }
    Ok(Outcome::Passed)
}

fn oversized(t: &Target) -> TestResult {
    let len = align_up(t.caps.max_request_size + 1, t.caps.alignment);
    let p = Pair::new(t, len, len)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    let e = single_error(p.run(&[p.req(op, 0, 0, len)])?, "request above max_request_size")?;
    ensure!(matches!(e, Error::InvalidArgument(_)), "request above max_request_size: {e:?}, expected InvalidArgument");
    Ok(Outcome::Passed)
}

// ---- tests: control path and failures ---------------------------------------------------------------

fn notifications(t: &Target) -> TestResult {
    let p = Pair::new(t, 4096, 4096)?;
    let peer = p.peer()?.clone();
    let (a_name, b_name) = (p.a.local_segment_name().to_string(), p.remote_name());
    let msg = "ping \"quoted\" \u{1F680} \u{4E2D}\u{6587}\n";
    let n = Notification { name: a_name.clone(), message: msg.into() };
    let a = p.a.clone();
    let (bn, nn) = (b_name.clone(), n.clone());
    bounded(LIMIT, "send_notify", move || a.send_notify(&bn, nn))?.or_fail("A notifying B")?;
    let n2 = Notification { name: a_name.clone(), message: "second".into() };
    block_on_timeout(LIMIT, "send_notify_async", p.a.send_notify_async(&b_name, n2.clone()))?
        .or_fail("A notifying B (async)")?;
    let mut got = Vec::new();
    wait_until(LIMIT, || {
        got.extend(peer.drain_notifications());
        got.len() >= 2
    });
    ensure!(got.contains(&n) && got.contains(&n2), "B received {got:?}, expected {n:?} and {n2:?}");
    ensure!(peer.drain_notifications().is_empty(), "drain did not empty the queue");
    let back = Notification { name: b_name, message: "pong".into() };
    let b = peer.clone();
    let (an, bk) = (a_name, back.clone());
    bounded(LIMIT, "send_notify", move || b.send_notify(&an, bk))?.or_fail("B notifying A")?;
    let mut got = Vec::new();
    wait_until(LIMIT, || {
        got.extend(p.a.drain_notifications());
        !got.is_empty()
    });
    ensure!(got == vec![back.clone()], "A received {got:?}, expected [{back:?}]");
    Ok(Outcome::Passed)
}

fn is_gone_error(e: &Error) -> bool {
    e.is_disconnect() || matches!(e, Error::Unavailable { .. } | Error::NotFound(_) | Error::Io(_))
}

fn peer_shutdown(t: &Target) -> TestResult {
    let mut p = Pair::new(t, 4096, 4096)?;
    let op = if t.caps.write { Opcode::Write } else { Opcode::Read };
    p.run_ok(&[p.req(op, 0, 0, 4096)], "transfer before the peer shut down")?;
    p.peer()?.shutdown();
    p.b_down = true;
    match p.run(&[p.req(op, 0, 0, 4096)])? {
        Ok(v) => match v.first() {
            Some(Err(e)) if e.is_disconnect() => {}
            Some(Err(e)) => {
                return Err(format!("in-flight request to a shut-down peer: {e:?}, expected RemoteDisconnected"));
            }
            other => return Err(format!("transfer to a shut-down peer: {other:?}, expected an error")),
        },
        Err(e) if is_gone_error(&e) => {}
        Err(e) => {
            return Err(format!("submission to a shut-down peer: {e:?}, expected a disconnect/unavailable error"));
        }
    }
    // And again (the engine may now re-read the descriptor): still a prompt error, never success.
    let again = p.run(&[p.req(op, 0, 0, 4096)])?;
    ensure!(!matches!(&again, Ok(v) if v.iter().all(|r| r.is_ok())), "a transfer to a shut-down peer succeeded");
    Ok(Outcome::Passed)
}

fn spawn_peer(t: &Target, size: u64, rpc_port: u16, seed: u64) -> Result<PeerProcess, String> {
    let cmd = t.opts.peer.as_ref().ok_or("no peer command")?;
    PeerProcess::spawn(cmd, &PeerArgs { rpc_port, ..PeerArgs::new(&t.protocol, size, seed) }, PEER_START)
}

fn remote_req(h: SegmentHandle, op: Opcode, local: u64, remote: u64, len: u64) -> TransferRequest {
    TransferRequest { opcode: op, local_addr: local, target: h, remote_addr: remote, length: len }
}

fn cross_read_write(t: &Target) -> TestResult {
    const SIZE: u64 = 1 << 20;
    let peer = spawn_peer(t, SIZE, 0, 11)?;
    let s = Solo::new(t, 2 * SIZE)?;
    let h = s.engine.open_segment(&peer.info.segment).or_fail("opening the child's segment")?;
    let (local, remote) = (s.buf.addr(), peer.info.addr);
    let r = [remote_req(h, Opcode::Read, local, remote, SIZE)];
    all_ok(run(&s.engine, &r)?, &r, "reading the child's buffer")?;
    check_pattern(&s.buf.read(0, SIZE)?, 11, 0, "bytes read from the child")?;
    s.buf.write(SIZE, &pattern(12, 65536))?;
    let w = [remote_req(h, Opcode::Write, local + SIZE, remote + 4096, 65536)];
    all_ok(run(&s.engine, &w)?, &w, "writing into the child")?;
    let r = [remote_req(h, Opcode::Read, local, remote, 8192 + 65536)];
    all_ok(run(&s.engine, &r)?, &r, "reading back from the child")?;
    let b = s.buf.bytes()?;
    check_pattern(&b[..4096], 11, 0, "child bytes before the written range")?;
    check_pattern(&b[4096..4096 + 65536], 12, 0, "child bytes written and read back")?;
    check_pattern(&b[4096 + 65536..8192 + 65536], 11, 4096 + 65536, "child bytes after the written range")?;
    // Out of bounds in another process: typed error, and the child keeps serving.
    let oob = [remote_req(h, Opcode::Read, local, remote + SIZE - 10, 100)];
    let e = single_error(run(&s.engine, &oob)?, "out-of-bounds read from the child")?;
    ensure!(is_address_error(&e), "out-of-bounds read from the child: {e:?}");
    let r = [remote_req(h, Opcode::Read, local, remote, 4096)];
    all_ok(run(&s.engine, &r)?, &r, "reading after a rejected request")?;
    drop(peer);
    Ok(Outcome::Passed)
}

fn cross_gone_before_post(t: &Target) -> TestResult {
    let mut peer = spawn_peer(t, 65536, 0, 13)?;
    let s = Solo::new(t, 65536)?;
    let h = s.engine.open_segment(&peer.info.segment).or_fail("opening the child's segment")?;
    let r = [remote_req(h, Opcode::Read, s.buf.addr(), peer.info.addr, 65536)];
    all_ok(run(&s.engine, &r)?, &r, "reading before the kill")?;
    peer.kill()?;
    for attempt in 0..2 {
        match run(&s.engine, &r)? {
            Ok(v) => match v.first() {
                Some(Err(e)) if e.is_disconnect() => {}
                Some(Err(e)) => {
                    return Err(format!(
                        "attempt {attempt}: request to a killed peer: {e:?}, expected RemoteDisconnected"
                    ));
                }
                other => return Err(format!("attempt {attempt}: transfer to a killed peer: {other:?}")),
            },
            Err(e) if is_gone_error(&e) => {}
            Err(e) => return Err(format!("attempt {attempt}: submission to a killed peer: {e:?}")),
        }
    }
    Ok(Outcome::Passed)
}

fn cross_killed_mid_batch(t: &Target) -> TestResult {
    const SIZE: u64 = 32 << 20;
    const N: u64 = 128;
    let chunk = SIZE / N;
    let mut peer = spawn_peer(t, SIZE, 0, 17)?;
    let s = Solo::new(t, SIZE)?;
    let h = s.engine.open_segment(&peer.info.segment).or_fail("opening the child's segment")?;
    let warm = [remote_req(h, Opcode::Read, s.buf.addr(), peer.info.addr, 4096)];
    all_ok(run(&s.engine, &warm)?, &warm, "warm-up read")?;
    let reqs: Vec<_> = (0..N)
        .map(|i| remote_req(h, Opcode::Read, s.buf.addr() + i * chunk, peer.info.addr + i * chunk, chunk))
        .collect();
    let id = s.engine.allocate_batch(N as usize).or_fail("allocate_batch")?;
    s.engine.submit_transfer(id, &reqs).or_fail("submitting the batch")?;
    // Kill once the first request is through, so the rest are in flight or queued.
    let completed = |i: usize| s.engine.transfer_status(id, i).is_ok_and(|st| st.state == TransferState::Completed);
    wait_until(LIMIT, || (0..N as usize).any(completed));
    peer.kill()?;
    let batch = s.engine.batch(id).or_fail("batch")?;
    batch.wait_blocking(LIMIT).map_err(|e| format!("batch did not finish after the peer was killed: {e} (hang)"))?;
    let mut bad = Vec::new();
    for i in 0..N as usize {
        let st = s.engine.transfer_status(id, i).or_fail("transfer_status")?;
        match (st.state, &st.error) {
            (TransferState::Completed, _) => {
                let o = i * chunk as usize;
                let start = i as u64 * chunk;
                check_pattern(&s.buf.read(o as u64, chunk)?, 17, start, &format!("completed request {i}"))?;
            }
            (TransferState::Failed, Some(e)) if e.is_disconnect() => {}
            (state, e) => bad.push(format!("request {i}: {state:?} {e:?}")),
        }
    }
    if std::env::var_os("MC_CONFORMANCE_DEBUG").is_some() {
        let done = (0..N as usize).filter(|i| completed(*i)).count();
        eprintln!("killed mid-batch: {done} of {N} completed");
    }
    ensure!(bad.is_empty(), "requests cut off by the kill must fail with RemoteDisconnected: {}", bad.join("; "));
    s.engine.free_batch(id).or_fail("free_batch")?;
    Ok(Outcome::Passed)
}

fn cross_restart(t: &Target) -> TestResult {
    let mut first = spawn_peer(t, 65536, 0, 21)?;
    let port = first.info.rpc_port;
    let segment = first.info.segment.clone();
    let s = Solo::new(t, 65536)?;
    let h = s.engine.open_segment(&segment).or_fail("opening the child's segment")?;
    let r = [remote_req(h, Opcode::Read, s.buf.addr(), first.info.addr, 4096)];
    all_ok(run(&s.engine, &r)?, &r, "reading from the first child")?;
    first.kill()?;
    // The same rpc port again (a few tries: the old socket may linger briefly).
    let mut second = None;
    let mut last = String::new();
    for _ in 0..20 {
        match spawn_peer(t, 65536, port, 22) {
            Ok(p) => {
                second = Some(p);
                break;
            }
            Err(e) => {
                last = e;
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    let second = second.ok_or_else(|| format!("restarting the peer on port {port}: {last}"))?;
    ensure!(second.info.segment == segment, "restarted peer is {:?}, expected {segment:?}", second.info.segment);
    // Re-read its descriptor, then transfer.
    let e = s.engine.clone();
    let seg = bounded(LIMIT, "refresh_segment", move || e.refresh_segment(h))?.or_fail("refresh_segment")?;
    ensure!(
        seg.descriptor.find_buffer(second.info.addr, second.info.len).is_some(),
        "refreshed descriptor does not show the restarted peer's buffer"
    );
    let r = [remote_req(h, Opcode::Read, s.buf.addr(), second.info.addr, 65536)];
    all_ok(run(&s.engine, &r)?, &r, "reading from the restarted child")?;
    check_pattern(&s.buf.bytes()?, 22, 0, "bytes from the restarted child")?;
    Ok(Outcome::Passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_pairs_name_their_trials() {
        assert_eq!(MemoryPair::HOST.suffix(), "");
        let [gpu_host, host_gpu, gpu_gpu] = MemoryPair::with_device(MemoryKind::Rocm);
        assert_eq!(gpu_host.suffix(), "[rocm->host]");
        assert_eq!(host_gpu.to_string(), "host->rocm");
        assert_eq!(gpu_gpu, MemoryPair::new(MemoryKind::Rocm, MemoryKind::Rocm));
        assert_eq!(kind_of_driver("cuda"), Some(MemoryKind::Cuda));
        assert_eq!(kind_of_driver("host"), None);
    }

    #[test]
    fn sweep_follows_limits() {
        let caps = Capabilities::default();
        assert_eq!(size_sweep(&caps, 64 << 20), vec![1, 7, 4096, 65536, 1 << 20, 64 << 20]);
        let caps = Capabilities { alignment: 512, max_request_size: 1 << 20, optimal_request_size: 8192, ..caps };
        assert_eq!(size_sweep(&caps, 64 << 20), vec![512, 4096, 8192, 65536, 1 << 20]);
        let caps = Capabilities { min_request_size: 4096, alignment: 1, ..Capabilities::default() };
        assert_eq!(size_sweep(&caps, 1 << 20)[0], 4096);
    }
}
