//! Transport-level tests without an engine: two transports in this process (pid == own pid; the
//! system calls and table checks are the same as across processes). Cross-process behaviour is
//! covered by the conformance suite (`conformance/tests/suites.rs`, which also runs the cross-process cases).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::{
    Batch, BufferDesc, Error, LocalRange, Location, MemoryKind, Opcode, PeerEvents, RegionTable, RemoteSegment,
    SegmentDescriptor, TransferState, TransferTask, Transport, TransportContext,
};

use super::*;

#[derive(Default)]
struct Events(Mutex<Vec<String>>);

impl PeerEvents for Events {
    fn peer_failed(&self, segment_name: &str) {
        self.0.lock().unwrap().push(segment_name.to_string());
    }
}

impl Events {
    fn failed(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// One started transport with its region table, its registered buffers and its descriptor.
struct Side {
    t: ShmTransport,
    regions: Arc<RegionTable>,
    events: Arc<Events>,
    bufs: Vec<Vec<u8>>,
    descs: Vec<Option<BufferDesc>>,
    _rt: tokio::runtime::Runtime,
}

impl Side {
    fn new(config: ShmConfig) -> Side {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let regions = Arc::new(RegionTable::new());
        let events = Arc::new(Events::default());
        let ctx = TransportContext {
            local_name: "test".into(),
            bind_host: "127.0.0.1".into(),
            regions: regions.clone(),
            runtime: rt.handle().clone(),
            peer_events: events.clone(),
            peers: Arc::new(mooncake_core::NoPeerHandshake),
            devices: Vec::new(),
        };
        let t = ShmTransport::new(config);
        rt.block_on(t.start(&ctx)).unwrap();
        Side { t, regions, events, bufs: Vec::new(), descs: Vec::new(), _rt: rt }
    }

    /// Registers a buffer of `len` bytes of pattern `seed`; returns its index.
    fn register(&mut self, len: usize, seed: u8) -> usize {
        let buf: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        self.bufs.push(buf);
        self.descs.push(None);
        self.reregister(self.bufs.len() - 1);
        self.bufs.len() - 1
    }

    /// Registers buffer `i` (again).
    fn reregister(&mut self, i: usize) {
        let (addr, len) = (self.addr(i), self.bufs[i].len() as u64);
        // SAFETY: `bufs[i]` is never resized and lives as long as the side (and its transport); the test reads
        // it only when no copy into it is running.
        unsafe { self.regions.insert(addr, len, Location::Cpu(Some(0))) }.unwrap();
        let region = self.regions.get(addr).unwrap();
        let mut desc = BufferDesc { name: "cpu:0".into(), addr, length: len, ..Default::default() };
        self.t.register_memory(&region, &mut desc).unwrap();
        self.descs[i] = Some(desc);
    }

    fn unregister(&mut self, i: usize) {
        let addr = self.addr(i);
        let region = self.regions.get(addr).unwrap();
        self.t.unregister_memory(&region).unwrap();
        drop(region);
        self.regions.remove(addr, Duration::from_secs(10)).unwrap();
        self.descs[i] = None;
    }

    fn addr(&self, i: usize) -> u64 {
        self.bufs[i].as_ptr() as u64
    }

    fn segment(&self, name: &str) -> Arc<RemoteSegment> {
        let mut d = SegmentDescriptor {
            name: name.into(),
            protocol: NAME.into(),
            buffers: self.descs.iter().flatten().cloned().collect(),
            ..Default::default()
        };
        self.t.describe(&mut d);
        let d = SegmentDescriptor::from_json(d.to_json().as_bytes()).unwrap();
        Arc::new(RemoteSegment { handle: 1, name: name.into(), host: "127.0.0.1".into(), descriptor: d })
    }
}

/// The local side of a request in these tests, vouched for: the transport itself must refuse a range outside
/// its registered memory.
fn local(addr: u64, len: u64) -> LocalRange {
    // SAFETY: shm hands the kernel only local ranges it finds registered (the tests' registered buffers,
    // alive for the whole test); a stray range is refused before any copy, which is what the tests check.
    unsafe { LocalRange::vouched(addr, len) }
}

/// Submits `(op, local, remote, len)` requests and waits; per-request results.
fn run(t: &ShmTransport, seg: &Arc<RemoteSegment>, reqs: &[(Opcode, u64, u64, u64)]) -> Vec<Result<u64>> {
    let batch = Batch::new(reqs.len());
    let start = batch.reserve(reqs.len()).unwrap();
    let tasks = reqs
        .iter()
        .enumerate()
        .map(|(i, &(opcode, local_addr, remote_addr, length))| TransferTask {
            opcode,
            local: local(local_addr, length),
            remote_addr,
            completion: batch.completion(start + i),
        })
        .collect();
    t.submit(seg, tasks);
    batch.wait_blocking(Duration::from_secs(60)).unwrap();
    (0..reqs.len())
        .map(|i| {
            let s = batch.status(i).unwrap();
            match s.state {
                TransferState::Completed => Ok(s.transferred_bytes),
                _ => Err(s.error.unwrap()),
            }
        })
        .collect()
}

fn config(workers: usize) -> ShmConfig {
    ShmConfig { workers, stripe_min: 64 << 10, ..ShmConfig::default() }
}

#[test]
fn batched_small_and_striped_large_requests_move_the_right_bytes() {
    for workers in [1, 3] {
        let mut target = Side::new(config(workers));
        let mut init = Side::new(config(workers));
        let tb = target.register(4 << 20, 1);
        let lb = init.register(8 << 20, 2);
        let seg = target.segment("target");
        let (l, r) = (init.addr(lb), target.addr(tb));
        // 600 writes of 1000 bytes (several iovec calls), one 2 MiB + 3 byte write (striped).
        let mut reqs: Vec<_> = (0..600u64).map(|i| (Opcode::Write, l + i * 1000, r + i * 1000, 1000)).collect();
        reqs.push((Opcode::Write, l + 600_000, r + 600_000, (2 << 20) + 3));
        for res in run(&init.t, &seg, &reqs) {
            assert!(res.is_ok(), "{res:?}");
        }
        let end = 600_000 + (2 << 20) + 3;
        assert!(target.bufs[tb][..end] == init.bufs[lb][..end], "workers={workers}");
        assert!(
            target.bufs[tb][end..]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == ((end + i) as u8).wrapping_mul(31).wrapping_add(1))
        );
        // Read it all back into the second half of the local buffer, mixed with writes.
        let half: usize = 4 << 20;
        let reqs = [
            (Opcode::Read, l + half as u64, r, 4 << 20),
            (Opcode::Read, l + half as u64 + 7, r + 7, 1),
            (Opcode::Write, l, r + (4 << 20) - 10, 10),
        ];
        let res = run(&init.t, &seg, &reqs);
        assert_eq!(res.iter().map(|r| r.clone().unwrap()).collect::<Vec<_>>(), vec![4 << 20, 1, 10]);
        assert!(init.bufs[lb][half..half + end] == init.bufs[lb][..end]);
        assert!(init.events.failed().is_empty());
    }
}

#[test]
fn blocking_path_copies_on_the_calling_thread() {
    let mut target = Side::new(config(2));
    let mut init = Side::new(config(2));
    let tb = target.register(1 << 20, 3);
    let lb = init.register(1 << 20, 4);
    let seg = target.segment("target");
    let (l, r) = (init.addr(lb), target.addr(tb));
    let t = Duration::from_secs(10);
    assert_eq!(init.t.transfer_blocking(&seg, Opcode::Write, &local(l, 4096), r + 5, t).unwrap().unwrap(), 4096);
    assert!(target.bufs[tb][5..4101] == init.bufs[lb][..4096]);
    assert_eq!(init.t.transfer_blocking(&seg, Opcode::Read, &local(l + 8192, 100), r, t).unwrap().unwrap(), 100);
    assert!(init.bufs[lb][8192..8292] == target.bufs[tb][..100]);
    // Requests that would be striped go to the workers instead.
    assert!(init.t.transfer_blocking(&seg, Opcode::Read, &local(l, 512 << 10), r, t).is_none());
    // Checks happen on this path too.
    let e = init.t.transfer_blocking(&seg, Opcode::Read, &local(l, 2), r + (1 << 20) - 1, t).unwrap().unwrap_err();
    assert!(matches!(e, Error::AddressNotRegistered { .. }), "{e:?}");
    let stray = [0u8; 64];
    let e =
        init.t.transfer_blocking(&seg, Opcode::Write, &local(stray.as_ptr() as u64, 64), r, t).unwrap().unwrap_err();
    assert!(matches!(e, Error::AddressNotRegistered { ref context, .. } if context.contains("local")), "{e:?}");
    let off = ShmTransport::new(ShmConfig { direct: false, ..config(2) });
    assert!(off.transfer_blocking(&seg, Opcode::Read, &local(l, 1), r, t).is_none());
}

#[test]
fn bad_ranges_are_typed_errors_and_touch_nothing() {
    let mut target = Side::new(config(2));
    let mut init = Side::new(config(2));
    let tb = target.register(4096, 5);
    let lb = init.register(8192, 6);
    let before = target.bufs[tb].clone();
    let seg = target.segment("target");
    let (l, r) = (init.addr(lb), target.addr(tb));
    let stray = vec![0u8; 4096];
    let res = run(
        &init.t,
        &seg,
        &[
            (Opcode::Write, l, r + 4000, 200),
            (Opcode::Write, l, r - 4096, 64),
            (Opcode::Write, l, u64::MAX - 7, 16),
            (Opcode::Write, l, r, 0),
            (Opcode::Write, stray.as_ptr() as u64, r, 64),
            (Opcode::Read, l, 0xFFFF_FFFF_0000_0000, 64),
            (Opcode::Write, l, r, 4096),
        ],
    );
    assert!(matches!(res[0], Err(Error::AddressNotRegistered { .. })), "{:?}", res[0]);
    assert!(matches!(res[1], Err(Error::AddressNotRegistered { .. })), "{:?}", res[1]);
    assert!(matches!(res[2], Err(Error::InvalidArgument(_))), "{:?}", res[2]);
    assert!(matches!(res[3], Err(Error::InvalidArgument(_))), "{:?}", res[3]);
    assert!(matches!(res[4], Err(Error::AddressNotRegistered { ref context, .. }) if context.contains("local")));
    assert!(matches!(res[5], Err(Error::AddressNotRegistered { .. })), "{:?}", res[5]);
    assert_eq!(res[6].as_ref().unwrap(), &4096, "the valid request of the batch still ran");
    assert_ne!(target.bufs[tb], before);
    assert!(target.bufs[tb] == init.bufs[lb][..4096]);
}

#[test]
fn stale_descriptor_is_refused_and_reported() {
    let mut target = Side::new(config(2));
    let mut init = Side::new(config(2));
    let keep = target.register(4096, 7);
    let gone = target.register(4096, 8);
    let lb = init.register(8192, 9);
    let seg = target.segment("target");
    let gone_addr = target.addr(gone);
    target.unregister(gone);
    let before = target.bufs[gone].clone();
    let (l, r) = (init.addr(lb), target.addr(keep));
    for op in [Opcode::Write, Opcode::Read] {
        let res = run(&init.t, &seg, &[(op, l, gone_addr, 4096), (op, l + 4096, r, 4096)]);
        assert!(
            matches!(res[0], Err(Error::AddressNotRegistered { ref context, .. }) if context.contains("stale")),
            "{op:?}: {:?}",
            res[0]
        );
        assert!(res[1].is_ok(), "the live buffer still works: {:?}", res[1]);
        let e =
            init.t.transfer_blocking(&seg, op, &local(l, 16), gone_addr, Duration::from_secs(5)).unwrap().unwrap_err();
        assert!(matches!(e, Error::AddressNotRegistered { .. }), "{e:?}");
    }
    assert_eq!(target.bufs[gone], before, "an unregistered buffer was written");
    assert!(init.events.failed().iter().all(|n| n == "target") && !init.events.failed().is_empty());
    // Registered again at the same address: the old descriptor stays stale, a fresh one works.
    target.reregister(gone);
    let fresh = target.segment("target");
    let res = run(&init.t, &seg, &[(Opcode::Write, l, gone_addr, 64)]);
    assert!(matches!(res[0], Err(Error::AddressNotRegistered { .. })), "{:?}", res[0]);
    assert_eq!(target.bufs[gone], before);
    assert_eq!(run(&init.t, &fresh, &[(Opcode::Write, l, gone_addr, 64)])[0].as_ref().unwrap(), &64);
    assert!(target.bufs[gone][..64] == init.bufs[lb][..64]);
}

#[test]
fn shut_down_target_is_a_disconnect() {
    let mut target = Side::new(config(2));
    let mut init = Side::new(config(2));
    let tb = target.register(4096, 11);
    let lb = init.register(4096, 12);
    let seg = target.segment("target");
    let (l, r) = (init.addr(lb), target.addr(tb));
    assert!(run(&init.t, &seg, &[(Opcode::Read, l, r, 64)])[0].is_ok());
    target._rt.block_on(target.t.shutdown());
    let res = run(&init.t, &seg, &[(Opcode::Read, l, r, 64), (Opcode::Write, l, r, 64)]);
    assert!(res.iter().all(|r| matches!(r, Err(e) if e.is_disconnect())), "{res:?}");
    let e =
        init.t.transfer_blocking(&seg, Opcode::Read, &local(l, 64), r, Duration::from_secs(5)).unwrap().unwrap_err();
    assert!(e.is_disconnect(), "{e:?}");
    assert!(init.events.failed().contains(&"target".to_string()));
    // The initiator's own shutdown fails its later submissions without hanging.
    init._rt.block_on(init.t.shutdown());
    let res = run(&init.t, &seg, &[(Opcode::Read, l, r, 64)]);
    assert!(res[0].is_err());
}

#[test]
fn dead_or_foreign_targets_are_refused() {
    let mut target = Side::new(config(1));
    let mut init = Side::new(config(1));
    target.register(4096, 13);
    let lb = init.register(4096, 14);
    let seg = target.segment("target");
    assert!(init.t.can_reach(&seg));
    // Another host (or container): not reachable.
    let mut foreign = (*seg).clone();
    foreign.descriptor.fields.insert(peer::FIELD_HOST_ID, "00000000-0000:1");
    assert!(!init.t.can_reach(&foreign));
    let mut plain = (*seg).clone();
    plain.descriptor.fields.clear();
    assert!(!init.t.can_reach(&plain));
    let res = run(&init.t, &Arc::new(plain), &[(Opcode::Read, init.addr(lb), target.addr(0), 64)]);
    assert!(matches!(res[0], Err(Error::Unavailable { .. })), "{:?}", res[0]);
    // A process that exited: a disconnect, reported to the engine.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let mut dead = (*seg).clone();
    dead.name = "dead".into();
    dead.descriptor.fields.insert(peer::FIELD_PID, pid);
    let res = run(&init.t, &Arc::new(dead), &[(Opcode::Read, init.addr(lb), target.addr(0), 64)]);
    assert!(matches!(&res[0], Err(e) if e.is_disconnect()), "{:?}", res[0]);
    assert_eq!(init.events.failed(), vec!["dead".to_string()]);
}

/// Peers copy into published memory without asking: the transport keeps the region registered (its memory
/// allocated) until the slot is retired, even if the region is removed from the table behind its back.
#[test]
fn published_regions_stay_registered_until_unregistered_here() {
    let mut side = Side::new(config(1));
    let i = side.register(4096, 1);
    let addr = side.addr(i);
    assert!(matches!(side.regions.remove(addr, Duration::from_millis(20)), Err(Error::Timeout(_))));
    assert!(side.regions.lookup(addr, 1).is_none(), "removal started: no new access");
    // The engine's order, transport first and then the table, releases it: register the range in the table
    // again and unregister it properly (the transport retires the slot and drops the region it kept).
    // SAFETY: `bufs[i]` still lives in the side, as in `reregister`.
    unsafe { side.regions.insert(addr, 4096, Location::Cpu(Some(0))) }.unwrap();
    side.unregister(i);
    assert!(side.regions.lookup(addr, 1).is_none());
}

#[test]
fn device_memory_is_not_published_and_descriptor_names_this_process() {
    let side = Side::new(config(1));
    let mut buf = vec![0u8; 4096];
    let addr = buf.as_mut_ptr() as u64;
    // SAFETY: registered at a device location no device owns: nothing reads or writes it (unreachable).
    unsafe { side.regions.insert(addr, 4096, Location::Device(MemoryKind::Cuda, 0)) }.unwrap();
    let mut desc = BufferDesc { name: "cuda:0".into(), addr, length: 4096, ..Default::default() };
    side.t.register_memory(&side.regions.get(addr).unwrap(), &mut desc).unwrap();
    assert!(desc.fields.is_empty(), "{desc:?}");
    let seg = side.segment("me");
    let info = PeerInfo::from_descriptor("me", &seg.descriptor).unwrap();
    let me = identity::local().unwrap();
    assert_eq!((info.pid, info.start_time, info.host_id.as_str()), (me.pid, me.start_time, me.host_id.as_str()));
    assert_eq!(info.slots, ShmConfig::default().max_buffers);
    // Not started: registration is refused, describe adds nothing.
    let idle = ShmTransport::new(config(1));
    let mut d = SegmentDescriptor::default();
    idle.describe(&mut d);
    assert!(d.fields.is_empty());
    assert!(matches!(idle.register_memory(&side.regions.get(addr).unwrap(), &mut desc), Err(Error::NotInitialized(_))));
}

#[test]
fn declared_model_beats_tcp_and_probe_passes() {
    assert!(probe().is_available(), "{:?}", probe());
    let shm = capabilities().model;
    // The tcp transport's declared model (transports/tcp): 3 GB/s, 25 us, 2 us per request.
    let tcp = PerfModel {
        bandwidth_bytes_per_sec: 3.0e9,
        latency: Duration::from_micros(25),
        per_request_overhead: Duration::from_micros(2),
    };
    for size in [1, 4096, 1 << 20, 1 << 30] {
        assert!(shm.estimate(size) < tcp.estimate(size), "{size}");
    }
    let c = ShmConfig::from_backend(&BackendConfig {
        options: [("workers".to_string(), "3".to_string()), ("direct".to_string(), "0".to_string())].into(),
    });
    assert_eq!((c.workers, c.direct), (3, false));
}

/// Set in the helper process of [`unprivileged_initiator_gets_a_permission_error`]: the target's
/// descriptor JSON.
const ATTACH_ENV: &str = "MC_SHM_TEST_ATTACH";

#[test]
fn unprivileged_initiator_gets_a_permission_error() {
    if let Ok(json) = std::env::var(ATTACH_ENV) {
        // Helper mode, running as another user: try to reach the target and print what happened.
        let d = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
        let info = PeerInfo::from_descriptor("target", &d).unwrap();
        match Conn::open("target", &info) {
            Ok(_) => println!("open: ok"),
            Err(e) => println!("open: {e:?}"),
        }
        let mut word = [0u8; 8];
        let local = [sys::iovec(word.as_mut_ptr() as u64, 8)];
        let remote = [sys::iovec(d.buffers[0].addr, 8)];
        match sys::process_vm(info.pid, Opcode::Read, &local, &remote) {
            Ok(n) => println!("vm: ok {n}"),
            Err(e) => println!("vm: errno {}", e.raw_os_error().unwrap_or(0)),
        }
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Unprivileged: pid 1 belongs to another user on most hosts; attaching to it must be refused.
        let owner = std::fs::read_to_string("/proc/1/status").unwrap_or_default();
        // SAFETY: as above.
        let me = unsafe { libc::geteuid() };
        if owner.lines().any(|l| l.starts_with("Uid:") && !l.split_whitespace().any(|w| w == me.to_string())) {
            let mut word = [0u8; 8];
            let e =
                sys::process_vm(1, Opcode::Read, &[sys::iovec(word.as_mut_ptr() as u64, 8)], &[sys::iovec(4096, 8)])
                    .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        } else {
            eprintln!("skipped: not root and pid 1 is ours; cannot stage a foreign target");
        }
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut target = Side::new(config(1));
    target.register(4096, 15);
    let seg = target.segment("target");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::unprivileged_initiator_gets_a_permission_error", "--nocapture", "--test-threads=1"])
        .env(ATTACH_ENV, seg.descriptor.to_json())
        .uid(65534)
        .gid(65534)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: user 65534 cannot execute this test binary ({e})");
            return;
        }
        Err(e) => panic!("starting the helper as user 65534: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helper failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    // (libtest prints the test name on the same line as the helper's first output)
    let open = text.lines().find_map(|l| l.find("open: ").map(|i| &l[i..])).unwrap_or_default();
    assert!(open.contains("Unavailable") && open.contains("permission denied"), "{text}");
    assert!(open.contains("CAP_SYS_PTRACE") && open.contains("same user"), "{text}");
    assert!(text.contains(&format!("vm: errno {}", libc::EPERM)), "{text}");
}
