//! The extern functions called from Rust as C would call them: two engines in this process moving bytes over
//! TCP (P2P handshake), a store client against a master in-process, and every kind of bad input answered with
//! upstream's codes.

use std::ffi::{CString, c_char, c_int, c_void};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use mooncake_c::*;
use mooncake_store_master::{MasterService, ServiceConfig};

fn s(v: &str) -> CString {
    CString::new(v).unwrap()
}

fn engine() -> transfer_engine_t {
    let e = createTransferEngine(s("P2PHANDSHAKE").as_ptr(), s("127.0.0.1").as_ptr(), s("127.0.0.1").as_ptr(), 0, 0);
    assert!(!e.is_null());
    assert!(!installTransport(e, s("tcp").as_ptr(), null_mut()).is_null());
    e
}

fn name_of(e: transfer_engine_t) -> String {
    let mut buf = [0 as c_char; 128];
    assert_eq!(getLocalIpAndPort(e, buf.as_mut_ptr(), buf.len()), 0);
    // SAFETY: getLocalIpAndPort wrote a NUL-terminated string into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap().to_string()
}

fn wait(e: transfer_engine_t, batch: batch_id_t, task: usize) -> transfer_status {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut st = transfer_status::default();
    loop {
        assert_eq!(getTransferStatus(e, batch, task, &mut st), 0);
        if st.status != STATUS_WAITING && st.status != STATUS_PENDING {
            return st;
        }
        assert!(Instant::now() < deadline, "transfer did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn two_engines_write_read_and_notify() {
    let a = engine();
    let b = engine();
    let len = 1 << 20;
    let mut src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; len];
    let mut back = vec![0u8; len];
    let location = s("cpu:0");
    assert_eq!(registerLocalMemory(b, dst.as_mut_ptr().cast(), len, location.as_ptr(), 1), 0);
    let mut entries = [
        buffer_entry { addr: src.as_mut_ptr().cast(), length: len },
        buffer_entry { addr: back.as_mut_ptr().cast(), length: len },
    ];
    assert_eq!(registerLocalMemoryBatch(a, entries.as_mut_ptr(), 2, location.as_ptr()), 0);
    assert_eq!(registerLocalMemory(a, src.as_mut_ptr().cast(), len, location.as_ptr(), 1), -7, "overlap");

    let peer = s(&name_of(b));
    let seg = openSegment(a, peer.as_ptr());
    assert!(seg >= 0, "openSegment: {seg}");
    assert_eq!(openSegmentNoCache(a, peer.as_ptr()), seg);
    assert_eq!(syncSegmentCache(a), 0);

    let batch = allocateBatchID(a, 2);
    assert_ne!(batch, INVALID_BATCH);
    let mut w = transfer_request {
        opcode: OPCODE_WRITE,
        source: src.as_mut_ptr().cast(),
        target_id: seg,
        file_id: 0,
        target_offset: dst.as_ptr() as u64,
        length: len as u64,
    };
    assert_eq!(submitTransfer(a, batch, &mut w, 1), 0);
    let st = wait(a, batch, 0);
    assert_eq!((st.status, st.transferred_bytes), (STATUS_COMPLETED, len as u64));
    assert_eq!(dst, src);

    let mut r = transfer_request { opcode: OPCODE_READ, source: back.as_mut_ptr().cast(), ..w };
    let (name, msg) = (s("c-test"), s("written"));
    let note = notify_msg { name: name.as_ptr().cast_mut(), msg: msg.as_ptr().cast_mut() };
    assert_eq!(submitTransferWithNotify(a, batch, &mut r, 1, note), 0);
    assert_eq!(wait(a, batch, 1).status, STATUS_COMPLETED);
    assert_eq!(back, src);
    assert_eq!(freeBatchID(a, batch), 0);
    assert_eq!(freeBatchID(a, batch), -1, "a freed batch is unknown");

    // The notification owed by submitTransferWithNotify, then one from genNotifyInEngine.
    assert_eq!(genNotifyInEngine(a, seg as u64, note), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 2 && Instant::now() < deadline {
        let mut n: c_int = -5;
        let msgs = getNotifsFromEngine(b, &mut n);
        assert!(n >= 0);
        for i in 0..n as usize {
            // SAFETY: getNotifsFromEngine returned an array of n messages with NUL-terminated strings.
            let m = unsafe { *msgs.add(i) };
            // SAFETY: as above.
            let (nm, ms) = unsafe { (std::ffi::CStr::from_ptr(m.name), std::ffi::CStr::from_ptr(m.msg)) };
            got.push((nm.to_str().unwrap().to_string(), ms.to_str().unwrap().to_string()));
        }
        assert_eq!(freeNotifsMsgBuf(msgs, n), 0);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(got, vec![("c-test".to_string(), "written".to_string()); 2]);

    // LOCAL_SEGMENT: a copy inside engine a, between its two registered buffers.
    back.fill(0);
    let local = allocateBatchID(a, 1);
    let mut l = transfer_request { target_id: LOCAL_SEGMENT, target_offset: back.as_ptr() as u64, ..w };
    assert_eq!(submitTransfer(a, local, &mut l, 1), 0);
    assert_eq!(wait(a, local, 0).status, STATUS_COMPLETED);
    assert_eq!(back, src);
    assert_eq!(freeBatchID(a, local), 0);

    let mut links = [0 as c_char; 512];
    assert_eq!(showLinks(a, links.as_mut_ptr(), links.len(), 1), 0);
    // SAFETY: showLinks wrote a NUL-terminated string.
    let links = unsafe { std::ffi::CStr::from_ptr(links.as_ptr()) }.to_str().unwrap().to_string();
    assert!(links.contains("\"tcp\"") && links.contains(&name_of(b)), "{links}");
    assert_eq!(discoverTopology(a), 0);
    assert_eq!(warmupEfaSegment(a, peer.as_ptr()), 0);
    enableGracefulShutdown(a);

    assert_eq!(closeSegment(a, seg), 0);
    assert_eq!(closeSegment(a, seg), -1);
    let mut addrs = [src.as_mut_ptr().cast::<c_void>(), back.as_mut_ptr().cast()];
    assert_eq!(unregisterLocalMemoryBatch(a, addrs.as_mut_ptr(), 2), 0);
    assert_eq!(unregisterLocalMemory(b, dst.as_mut_ptr().cast()), 0);
    destroyTransferEngine(a);
    destroyTransferEngine(b);
}

#[test]
fn engine_bad_input_gets_upstream_codes() {
    // Null strings, unknown protocol (the handle stays usable), then tcp.
    assert!(createTransferEngine(std::ptr::null(), s("127.0.0.1").as_ptr(), std::ptr::null(), 0, 0).is_null());
    assert!(createTransferEngine(s("P2PHANDSHAKE").as_ptr(), std::ptr::null(), std::ptr::null(), 0, 0).is_null());
    let e = createTransferEngine(s("P2PHANDSHAKE").as_ptr(), s("127.0.0.1").as_ptr(), std::ptr::null(), 0, 0);
    assert!(!e.is_null());
    assert!(installTransport(e, s("no-such-transport").as_ptr(), null_mut()).is_null());
    assert!(installTransport(e, std::ptr::null(), null_mut()).is_null());
    assert!(!installTransport(e, s("tcp").as_ptr(), null_mut()).is_null());
    assert_eq!(uninstallTransport(e, s("no-such-transport").as_ptr()), -1);

    let mut buf = vec![0u8; 4096];
    let mut small = [0 as c_char; 4];
    assert_eq!(getLocalIpAndPort(e, small.as_mut_ptr(), small.len()), -1);
    assert_eq!(getLocalIpAndPort(e, null_mut(), 64), -1);
    assert_eq!(registerLocalMemory(e, null_mut(), 64, std::ptr::null(), 1), -1);
    assert_eq!(registerLocalMemory(e, buf.as_mut_ptr().cast(), 0, std::ptr::null(), 1), -1);
    assert_eq!(unregisterLocalMemory(e, buf.as_mut_ptr().cast()), -3, "never registered");
    assert_eq!(registerLocalMemoryBatch(e, null_mut(), 1, std::ptr::null()), -1);
    assert_eq!(unregisterLocalMemoryBatch(e, null_mut(), 2), -1);
    assert!(openSegment(e, std::ptr::null()) < 0);
    assert!(openSegment(e, s("127.0.0.1:1").as_ptr()) < 0, "nobody listens there");
    assert_eq!(allocateBatchID(e, 0), INVALID_BATCH);
    let batch = allocateBatchID(e, 1);
    assert_ne!(batch, INVALID_BATCH);
    assert_eq!(submitTransfer(e, batch, null_mut(), 1), -1);
    let mut bad = transfer_request {
        opcode: 7,
        source: buf.as_mut_ptr().cast(),
        target_id: 0,
        file_id: 0,
        target_offset: 0,
        length: 8,
    };
    assert_eq!(submitTransfer(e, batch, &mut bad, 0), -1);
    assert_eq!(submitTransfer(e, batch, &mut bad, 1), -1, "unknown opcode");
    bad.opcode = OPCODE_WRITE;
    bad.target_id = -3;
    assert_eq!(submitTransfer(e, batch, &mut bad, 1), -1, "negative segment id");
    let note = notify_msg { name: null_mut(), msg: null_mut() };
    assert_eq!(submitTransferWithNotify(e, batch, &mut bad, 1, note), -1);
    assert_eq!(getTransferStatus(e, batch, 0, null_mut()), -1);
    let mut st = transfer_status::default();
    assert_eq!(getTransferStatus(e, batch + 1000, 0, &mut st), -1, "unknown batch");
    assert_eq!(freeBatchID(e, batch + 1000), -1);
    assert_eq!(freeBatchID(e, batch), 0);
    assert_eq!(getNotifsFromEngine(e, null_mut()), null_mut());
    assert_eq!(freeNotifsMsgBuf(null_mut(), 0), 0);
    assert_eq!(freeNotifsMsgBuf(null_mut(), -1), 0);
    assert!(!supportFileBuffer(e));
    let mut id: file_id_t = 0;
    assert_eq!(registerLocalFile(e, s("/tmp/x").as_ptr(), 8, &mut id), -303);
    assert_eq!(registerLocalFile(e, std::ptr::null(), 8, &mut id), -1);
    assert_eq!(removeLocalSegment(e, std::ptr::null()), -1);

    // A destroyed handle, a never-issued one and null are refused, never dereferenced.
    destroyTransferEngine(e);
    destroyTransferEngine(e);
    destroyTransferEngine(null_mut());
    for dead in [e, null_mut(), 0xdead_beef_usize as transfer_engine_t, (e as usize ^ (1 << 40)) as transfer_engine_t] {
        assert!(installTransport(dead, s("tcp").as_ptr(), null_mut()).is_null());
        assert_eq!(allocateBatchID(dead, 1), INVALID_BATCH);
        assert_eq!(registerLocalMemory(dead, buf.as_mut_ptr().cast(), 64, std::ptr::null(), 1), -1);
        assert_eq!(openSegment(dead, s("127.0.0.1:1").as_ptr()), -1);
        assert_eq!(getTransferStatus(dead, 1, 0, &mut st), -1);
        assert_eq!(syncSegmentCache(dead), -1);
        let mut n: c_int = 0;
        assert!(getNotifsFromEngine(dead, &mut n).is_null());
        assert_eq!(n, -1);
    }
}

struct Master {
    rt: tokio::runtime::Runtime,
    service: Option<MasterService>,
}

impl Master {
    fn start() -> (Master, String) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let service = rt
            .block_on(MasterService::start(ServiceConfig {
                rpc_addr: "127.0.0.1:0".into(),
                admin_addr: None,
                tick_interval: Duration::from_millis(50),
                ..Default::default()
            }))
            .unwrap();
        let addr = service.rpc_addr().to_string();
        (Master { rt, service: Some(service) }, addr)
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Some(s) = self.service.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn store(master: &str) -> mooncake_store_t {
    let st = mooncake_store_create();
    assert!(!st.is_null());
    let rc = mooncake_store_setup(
        st,
        s("127.0.0.1").as_ptr(),
        s("P2PHANDSHAKE").as_ptr(),
        16 << 20,
        4 << 20,
        s("tcp").as_ptr(),
        s("").as_ptr(),
        s(master).as_ptr(),
    );
    assert_eq!(rc, 0);
    st
}

#[test]
fn store_round_trip_and_bad_input() {
    let (_master, addr) = Master::start();
    let st = store(&addr);
    assert_eq!(mooncake_store_health_check(st), 0);
    let mut host = [0 as c_char; 128];
    assert_eq!(mooncake_store_get_hostname(st, host.as_mut_ptr(), host.len()), 0);
    assert_eq!(mooncake_store_get_hostname(st, host.as_mut_ptr(), 2), -1);

    let value = b"hello from C";
    let key = s("k1");
    assert_eq!(mooncake_store_put(st, key.as_ptr(), value.as_ptr().cast(), value.len(), std::ptr::null()), 0);
    assert_eq!(mooncake_store_is_exist(st, key.as_ptr()), 1);
    assert_eq!(mooncake_store_is_exist(st, s("absent").as_ptr()), 0);
    assert_eq!(mooncake_store_get_size(st, key.as_ptr()), value.len() as i64);
    assert_eq!(mooncake_store_get_size(st, s("absent").as_ptr()), -704);

    // Zero-copy calls through a registered buffer.
    let mut buf = vec![0u8; 1 << 16];
    assert_eq!(mooncake_store_register_buffer(st, buf.as_mut_ptr().cast(), buf.len()), 0);
    let n = mooncake_store_get_into(st, key.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
    assert_eq!(n, value.len() as i64);
    assert_eq!(&buf[..value.len()], value);
    assert_eq!(mooncake_store_get_into(st, key.as_ptr(), buf.as_mut_ptr().cast(), 4), -10, "buffer overflow");
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let mut segs = [std::ptr::null::<c_char>()];
    let config = mooncake_replicate_config {
        replica_num: 1,
        with_soft_pin: 0,
        preferred_segments: segs.as_mut_ptr(),
        preferred_segments_count: 1,
    };
    let (k2, k3) = (s("k2"), s("k3"));
    assert_eq!(mooncake_store_put_from(st, k2.as_ptr(), buf.as_mut_ptr().cast(), 1000, &config), 0);
    assert_eq!(mooncake_store_put_from(st, k2.as_ptr(), buf.as_mut_ptr().cast(), 1000, &config), -705, "exists");
    let mut keys = [k2.as_ptr(), k3.as_ptr()];
    // SAFETY: both offsets lie inside buf.
    let half = unsafe { buf.as_mut_ptr().add(1 << 15) };
    let mut ptrs = [buf.as_mut_ptr().cast::<c_void>(), half.cast()];
    let sizes = [1000usize, 2000];
    let mut results = [9 as c_int; 2];
    assert_eq!(
        mooncake_store_batch_put_from(
            st,
            keys.as_mut_ptr(),
            ptrs.as_mut_ptr(),
            sizes.as_ptr(),
            2,
            std::ptr::null(),
            results.as_mut_ptr()
        ),
        0
    );
    assert_eq!(results, [-705, 0]);
    let expect = buf.clone();
    buf.fill(0);
    let mut sizes_out = [0i64; 2];
    let big = [1 << 15, 1 << 15];
    assert_eq!(
        mooncake_store_batch_get_into(
            st,
            keys.as_mut_ptr(),
            ptrs.as_mut_ptr(),
            big.as_ptr(),
            2,
            sizes_out.as_mut_ptr()
        ),
        0
    );
    assert_eq!(sizes_out, [1000, 2000]);
    assert_eq!(&buf[..1000], &expect[..1000]);
    assert_eq!(&buf[1 << 15..(1 << 15) + 2000], &expect[1 << 15..(1 << 15) + 2000]);
    let mut exist = [9 as c_int; 3];
    let absent = s("absent");
    let mut three = [k2.as_ptr(), absent.as_ptr(), k3.as_ptr()];
    assert_eq!(mooncake_store_batch_is_exist(st, three.as_mut_ptr(), 3, exist.as_mut_ptr()), 0);
    assert_eq!(exist, [1, 0, 1]);

    // Bad input: nulls and lengths.
    assert_eq!(mooncake_store_put(st, std::ptr::null(), value.as_ptr().cast(), 1, std::ptr::null()), -1);
    assert_eq!(mooncake_store_put(st, key.as_ptr(), std::ptr::null(), 1, std::ptr::null()), -1);
    assert_eq!(mooncake_store_put_from(st, key.as_ptr(), null_mut(), 8, std::ptr::null()), -1);
    let mut stack = [0u8; 8];
    assert_eq!(
        mooncake_store_put_from(st, s("k9").as_ptr(), stack.as_mut_ptr().cast(), 8, std::ptr::null()),
        -600,
        "unregistered"
    );
    assert_eq!(mooncake_store_get_into(st, key.as_ptr(), null_mut(), 8), -1);
    assert_eq!(mooncake_store_is_exist(st, std::ptr::null()), -1);
    assert_eq!(mooncake_store_batch_is_exist(st, null_mut(), 2, exist.as_mut_ptr()), -1);
    assert_eq!(mooncake_store_batch_is_exist(st, three.as_mut_ptr(), 3, null_mut()), -1);
    let mut with_null = [k2.as_ptr(), std::ptr::null()];
    assert_eq!(mooncake_store_batch_is_exist(st, with_null.as_mut_ptr(), 2, exist.as_mut_ptr()), -1);
    assert_eq!(
        mooncake_store_batch_get_into(
            st,
            keys.as_mut_ptr(),
            ptrs.as_mut_ptr(),
            std::ptr::null(),
            2,
            sizes_out.as_mut_ptr()
        ),
        -1
    );
    assert_eq!(mooncake_store_register_buffer(st, null_mut(), 8), -1);
    assert_eq!(mooncake_store_register_buffer(st, buf.as_mut_ptr().cast(), 0), -1);
    assert_eq!(mooncake_store_remove(st, std::ptr::null(), 0), -1);
    assert_eq!(mooncake_store_remove_by_regex(st, std::ptr::null(), 0), -1);
    let again = mooncake_store_setup(
        st,
        std::ptr::null(),
        std::ptr::null(),
        0,
        0,
        std::ptr::null(),
        std::ptr::null(),
        s(&addr).as_ptr(),
    );
    assert_eq!(again, -600, "a handle is set up once");

    assert_eq!(mooncake_store_remove(st, key.as_ptr(), 1), 0);
    assert_eq!(mooncake_store_remove(st, key.as_ptr(), 1), -704);
    assert_eq!(mooncake_store_remove_by_regex(st, s("^k2$").as_ptr(), 1), 1);
    assert_eq!(mooncake_store_remove_all(st, 1), 1);
    assert_eq!(mooncake_store_unregister_buffer(st, buf.as_mut_ptr().cast()), 0);
    assert_eq!(mooncake_store_unregister_buffer(st, buf.as_mut_ptr().cast()), -600);

    // A handle never set up, a destroyed one, and invented ones.
    let fresh = mooncake_store_create();
    assert_eq!(mooncake_store_is_exist(fresh, key.as_ptr()), -1);
    assert_eq!(mooncake_store_health_check(fresh), 1);
    mooncake_store_destroy(fresh);
    mooncake_store_destroy(st);
    mooncake_store_destroy(st);
    for dead in [st, fresh, null_mut(), 0x1234_usize as mooncake_store_t] {
        assert_eq!(mooncake_store_is_exist(dead, key.as_ptr()), -1);
        assert_eq!(mooncake_store_get_size(dead, key.as_ptr()), -1);
        assert_eq!(mooncake_store_remove_all(dead, 1), -1);
        assert_eq!(mooncake_store_health_check(dead), -1);
        assert_eq!(mooncake_store_put(dead, key.as_ptr(), value.as_ptr().cast(), value.len(), std::ptr::null()), -1);
    }
}

#[test]
fn destroy_racing_with_calls_is_safe() {
    // Threads hammer a handle while it is destroyed: every call either works or gets -1 / INVALID_BATCH.
    for _ in 0..3 {
        let e = engine();
        let h = e as usize;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let e = h as transfer_engine_t;
                    let mut st = transfer_status::default();
                    let mut refused = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let b = allocateBatchID(e, 1);
                        if b == INVALID_BATCH {
                            refused += 1;
                            continue;
                        }
                        let rc = getTransferStatus(e, b, 0, &mut st);
                        assert!(rc <= 0, "0 or an error code, got {rc}");
                        let rc = freeBatchID(e, b);
                        assert!(rc <= 0, "0 or an error code, got {rc}");
                    }
                    refused
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        destroyTransferEngine(e);
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let refused: u32 = workers.into_iter().map(|w| w.join().expect("no panic in a worker")).sum();
        assert!(refused > 0, "calls after destroy were refused");
        assert_eq!(allocateBatchID(e, 1), INVALID_BATCH);
    }
}

#[test]
fn legacy_client_round_trip_and_bad_input() {
    let (_master, addr) = Master::start();
    let c = mooncake_client_create(
        s("127.0.0.1").as_ptr(),
        s("P2PHANDSHAKE").as_ptr(),
        s("tcp").as_ptr(),
        std::ptr::null(),
        s(&addr).as_ptr(),
    );
    assert!(!c.is_null());
    assert_eq!(mooncake_client_mount_segment(c, 16 << 20), MOONCAKE_ERROR_OK);
    let mut buf: Vec<u8> = (0..8192).map(|i| (i % 241) as u8).collect();
    let loc = s("cpu:0");
    assert_eq!(
        mooncake_client_register_local_memory(c, buf.as_mut_ptr().cast(), buf.len(), loc.as_ptr(), true, true),
        0
    );
    assert_eq!(mooncake_client_register_local_memory(c, null_mut(), 0, loc.as_ptr(), true, true), 0, "no-op");
    // SAFETY: offset 4096 lies inside buf.
    let second = unsafe { buf.as_mut_ptr().add(4096) };
    let mut parts = [Slice_t { ptr: buf.as_mut_ptr().cast(), size: 1000 }, Slice_t { ptr: second.cast(), size: 3000 }];
    let config = ReplicateConfig_t { replica_num: 1, preferred_segment: std::ptr::null() };
    let key = s("legacy");
    assert_eq!(mooncake_client_put(c, key.as_ptr(), parts.as_mut_ptr(), 2, config), MOONCAKE_ERROR_OK);
    assert_eq!(
        mooncake_client_put(c, key.as_ptr(), parts.as_mut_ptr(), 2, config),
        MOONCAKE_ERROR_OBJECT_ALREADY_EXISTS
    );
    assert_eq!(mooncake_client_isexist(c, key.as_ptr()), MOONCAKE_ERROR_OK);
    assert_eq!(mooncake_client_isexist(c, s("nope").as_ptr()), MOONCAKE_ERROR_OBJECT_NOT_FOUND);
    let expect: Vec<u8> = buf[..1000].iter().chain(&buf[4096..7096]).copied().collect();
    buf.fill(0);
    let mut one = [Slice_t { ptr: buf.as_mut_ptr().cast(), size: 4000 }];
    assert_eq!(mooncake_client_get(c, key.as_ptr(), one.as_mut_ptr(), 1), MOONCAKE_ERROR_OK);
    assert_eq!(&buf[..4000], &expect[..]);
    let mut small = [Slice_t { ptr: buf.as_mut_ptr().cast(), size: 10 }];
    assert_eq!(mooncake_client_get(c, key.as_ptr(), small.as_mut_ptr(), 1), MOONCAKE_ERROR_BUFFER_OVERFLOW);
    assert_eq!(mooncake_client_get(c, key.as_ptr(), null_mut(), 1), MOONCAKE_ERROR_INVALID_PARAMS);
    assert_eq!(mooncake_client_get(c, std::ptr::null(), one.as_mut_ptr(), 1), MOONCAKE_ERROR_INVALID_PARAMS);
    // The read leased the object: a plain remove is refused, as upstream's.
    assert_eq!(mooncake_client_remove(c, key.as_ptr()), MOONCAKE_ERROR_OBJECT_HAS_LEASE);
    assert_eq!(mooncake_client_remove(c, s("nope").as_ptr()), MOONCAKE_ERROR_OBJECT_NOT_FOUND);
    assert_eq!(mooncake_client_unregister_local_memory(c, buf.as_mut_ptr().cast(), true), 0);
    assert_eq!(mooncake_max_slice_size(), (16 << 20) - 16);
    mooncake_client_destroy(c);
    mooncake_client_destroy(c);
    assert_eq!(mooncake_client_isexist(c, key.as_ptr()), MOONCAKE_ERROR_INVALID_PARAMS, "destroyed handle");
    assert_eq!(mooncake_client_mount_segment(null_mut(), 1), MOONCAKE_ERROR_INVALID_PARAMS);
    let none = mooncake_client_create(
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
    );
    assert!(none.is_null());
}
