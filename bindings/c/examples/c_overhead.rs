//! What the C ABI adds over the Rust call it wraps, in ns per call, measured on the same engine and client:
//! `getTransferStatus` against `TransferEngine::transfer_status` (in memory: the wrapper's whole cost shows),
//! `mooncake_store_is_exist` against `StoreClient::is_exist` (one master round trip on 127.0.0.1), and a call
//! with a dead handle (the handle-table lookup alone).
//!
//! `cargo run --release -p mooncake-c --example c_overhead [iterations]`

use std::ffi::CString;
use std::hint::black_box;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use mooncake_c::*;
use mooncake_store_master::{MasterService, ServiceConfig};

fn ns_per_call(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

/// Best of five rounds, alternating the two sides so drift hits both.
fn compare(name: &str, n: u32, mut c: impl FnMut(), mut rust: impl FnMut()) {
    let (mut best_c, mut best_r) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        best_c = best_c.min(ns_per_call(n, &mut c));
        best_r = best_r.min(ns_per_call(n, &mut rust));
    }
    println!("{name:<28} {n:>9} {best_c:>12.1} {best_r:>12.1} {:>12.1}", best_c - best_r);
}

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let s = |v: &str| CString::new(v).unwrap();
    println!("c_overhead: build {}, best of 5 rounds", if cfg!(debug_assertions) { "debug" } else { "release" });
    println!("{:<28} {:>9} {:>12} {:>12} {:>12}", "call", "calls", "C ns/call", "Rust ns/call", "overhead ns");

    // Engine: one completed 8-byte write between two engines, then its status, over and over.
    let new = || {
        let e =
            createTransferEngine(s("P2PHANDSHAKE").as_ptr(), s("127.0.0.1").as_ptr(), s("127.0.0.1").as_ptr(), 0, 0);
        assert!(!installTransport(e, s("tcp").as_ptr(), null_mut()).is_null());
        e
    };
    let (a, b) = (new(), new());
    let mut src = vec![7u8; 4096];
    let mut dst = vec![0u8; 4096];
    assert_eq!(registerLocalMemory(a, src.as_mut_ptr().cast(), 4096, s("cpu:0").as_ptr(), 1), 0);
    assert_eq!(registerLocalMemory(b, dst.as_mut_ptr().cast(), 4096, s("cpu:0").as_ptr(), 1), 0);
    let mut name = [0 as std::ffi::c_char; 128];
    assert_eq!(getLocalIpAndPort(b, name.as_mut_ptr(), name.len()), 0);
    let seg = openSegment(a, name.as_ptr());
    assert!(seg >= 0);
    let batch = allocateBatchID(a, 1);
    let mut req = transfer_request {
        opcode: OPCODE_WRITE,
        source: src.as_mut_ptr().cast(),
        target_id: seg,
        file_id: 0,
        target_offset: dst.as_ptr() as u64,
        length: 8,
    };
    assert_eq!(submitTransfer(a, batch, &mut req, 1), 0);
    let mut st = transfer_status::default();
    while st.status != STATUS_COMPLETED {
        assert_eq!(getTransferStatus(a, batch, 0, &mut st), 0);
    }
    let engine = rust_engine(a).expect("engine is running");
    compare(
        "getTransferStatus",
        n,
        || {
            black_box(getTransferStatus(black_box(a), batch, 0, &mut st));
        },
        || {
            black_box(engine.transfer_status(black_box(batch), 0).ok());
        },
    );
    compare(
        "allocateBatchID(dead handle)",
        n,
        || {
            black_box(allocateBatchID(black_box(0x7777usize as transfer_engine_t), 1));
        },
        || {
            black_box(0u64);
        },
    );

    // Store: is_exist through the master on 127.0.0.1.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let master = rt
        .block_on(MasterService::start(ServiceConfig {
            rpc_addr: "127.0.0.1:0".into(),
            admin_addr: None,
            tick_interval: Duration::from_millis(50),
            ..Default::default()
        }))
        .unwrap();
    let store = mooncake_store_create();
    let master_addr = s(&master.rpc_addr().to_string());
    let rc = mooncake_store_setup(
        store,
        s("127.0.0.1").as_ptr(),
        s("P2PHANDSHAKE").as_ptr(),
        16 << 20,
        1 << 20,
        s("tcp").as_ptr(),
        s("").as_ptr(),
        master_addr.as_ptr(),
    );
    assert_eq!(rc, 0);
    let key = s("bench-key");
    assert_eq!(mooncake_store_put(store, key.as_ptr(), b"v".as_ptr().cast(), 1, std::ptr::null()), 0);
    let client = rust_client(store).expect("client is set up");
    compare(
        "mooncake_store_is_exist",
        (n / 20).max(1000),
        || {
            black_box(mooncake_store_is_exist(black_box(store), key.as_ptr()));
        },
        || {
            black_box(client.is_exist(black_box("bench-key")).ok());
        },
    );
    drop(client);
    mooncake_store_destroy(store);
    rt.block_on(master.shutdown());
    drop(engine);
    assert_eq!(freeBatchID(a, batch), 0);
    destroyTransferEngine(a);
    destroyTransferEngine(b);
}
