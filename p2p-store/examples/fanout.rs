//! Fan-out bench: 1 source and N readers of one checkpoint, against N sequential full reads from the source, in
//! the same run.
//!
//! `cargo run --release -p mooncake-p2p-store --example fanout -- [N] [SIZE_MIB] [SHARD_MIB]` (defaults 4, 256,
//! 16). The catalogue is a real etcd: `MC_P2P_ETCD=host:port`, or one the bench starts on a free port. Every
//! reader is its own engine (own RPC port and TCP connections) in this process. `MC_P2P_BENCH_PROTOCOL=tcp`
//! keeps the engines to one protocol (by default same-host peers use `shm`, one copy by the kernel).
//!
//! - sequential: reader 1 fetches, leaves; reader 2 fetches, leaves; ... every byte comes from the source.
//! - waves: as many readers at once as there are holders (1, 2, 4, ...); readers are preferred over the source.
//! - waves+source: the same, spreading each wave's reads over every holder, the source included.
//! - all-at-once: the N readers start together (all find only the source: a replica is published when complete).

use std::time::{Duration, Instant};

use mooncake::{EngineConfig, HostBuffer, TransferEngine};
use mooncake_p2p_store::{Options, P2PStore};

const MIB: usize = 1 << 20;

fn store(etcd: &str, include_source: bool) -> P2PStore {
    let mut config = EngineConfig::new("127.0.0.1", "P2PHANDSHAKE");
    if let Ok(p) = std::env::var("MC_P2P_BENCH_PROTOCOL") {
        config = config.with_protocols([p]);
    }
    let engine = TransferEngine::new(config).expect("engine");
    P2PStore::with_options(engine, &[etcd.to_string()], Options { include_source, ..Options::default() })
        .expect("store")
}

/// Fetches with `readers` in waves of `wave(holders)` readers; returns the wall time. Every reader leaves after.
fn run(name: &str, readers: &[P2PStore], bufs: &[HostBuffer], wave: impl Fn(usize) -> usize) -> Duration {
    let t = Instant::now();
    let mut next = 0;
    let mut holders = 1;
    while next < readers.len() {
        let n = wave(holders).min(readers.len() - next);
        std::thread::scope(|s| {
            for k in next..next + n {
                let (r, b) = (&readers[k], &bufs[k]);
                s.spawn(move || r.get_replica_buffers(name, &[b]).expect("get_replica"));
            }
        });
        next += n;
        holders += n;
    }
    let took = t.elapsed();
    for r in readers {
        r.delete_replica(name).expect("delete_replica");
    }
    took
}

fn main() {
    mooncake::link_all();
    let args: Vec<usize> =
        std::env::args().skip(1).map(|a| a.parse().expect("numbers: N SIZE_MIB SHARD_MIB")).collect();
    let n = args.first().copied().unwrap_or(4);
    let size = args.get(1).copied().unwrap_or(256) * MIB;
    let shard = args.get(2).copied().unwrap_or(16) * MIB;
    let _server;
    let etcd = match std::env::var("MC_P2P_ETCD") {
        Ok(e) => e,
        Err(_) => {
            let s = mooncake_testkit::EtcdServer::start().expect("starting etcd (apt-get install etcd-server)");
            let e = s.endpoint();
            _server = s;
            e
        }
    };
    println!(
        "p2p-store fan-out: {n} readers, checkpoint {} MiB in shards of {} MiB, protocol {}, engines on 127.0.0.1, etcd {etcd}, {} cores",
        size / MIB,
        shard / MIB,
        std::env::var("MC_P2P_BENCH_PROTOCOL").unwrap_or_else(|_| "default (tcp, shm for same-host peers)".into()),
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ i as u8).collect();
    let source = store(&etcd, false);
    let src = HostBuffer::from_vec(data.clone());
    source.register_buffers("bench/ckpt", &[&src], shard as u64, true).expect("register");
    let bufs: Vec<HostBuffer> = (0..n).map(|_| HostBuffer::zeroed(size)).collect();
    let plain: Vec<P2PStore> = (0..n).map(|_| store(&etcd, false)).collect();
    let spread: Vec<P2PStore> = (0..n).map(|_| store(&etcd, true)).collect();
    // Warm-up: connections and first-touch of the destination pages.
    run("bench/ckpt", &plain, &bufs, |_| 1);
    run("bench/ckpt", &spread, &bufs, |_| 1);

    let mut rows = Vec::new();
    for round in 0..3 {
        let seq = run("bench/ckpt", &plain, &bufs, |_| 1);
        let waves = run("bench/ckpt", &plain, &bufs, |h| h);
        let waves_src = run("bench/ckpt", &spread, &bufs, |h| h);
        let all = run("bench/ckpt", &plain, &bufs, |_| usize::MAX);
        rows.push((round, seq, waves, waves_src, all));
    }
    assert!(bufs.iter().all(|b| b.to_vec() == data), "a reader has wrong bytes");
    println!("round  sequential_s  waves_s  (ratio)  waves+source_s  (ratio)  all-at-once_s  (ratio)");
    for (round, seq, w, ws, all) in &rows {
        let r = |d: &Duration| d.as_secs_f64() / seq.as_secs_f64();
        println!(
            "{round:>5}  {:>12.3}  {:>7.3}  ({:.2})  {:>14.3}  ({:.2})  {:>13.3}  ({:.2})",
            seq.as_secs_f64(),
            w.as_secs_f64(),
            r(w),
            ws.as_secs_f64(),
            r(ws),
            all.as_secs_f64(),
            r(all)
        );
    }
    source.unregister("bench/ckpt").expect("unregister");
}
