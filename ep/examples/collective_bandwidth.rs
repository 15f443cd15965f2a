//! Bandwidth of the group's all_reduce (f32 sum), all_gather and all_to_all with in-process ranks, one
//! engine each, over tcp and shm on 127.0.0.1. Our side only: the comparison with gloo is the Python
//! benchmark's. Bandwidth = bytes of the collective's tensor (all_reduce: the buffer; all_gather: the
//! output; all_to_all: one rank's input) / median time of one call.
//!
//! `cargo run --release -p mooncake-ep --example collective_bandwidth -- [ranks,..] [protocols,..] [min KiB] [max MiB] [chunk KiB] [small all_reduce KiB] [ops,..]`
//! e.g. `-- 2,4 tcp,shm 4 64 4096 256 all_reduce,all_gather,all_to_all`

use std::time::{Duration, Instant};

use mooncake_core::{EngineConfig, TransferEngine};
use mooncake_ep::group::{DType, Group, GroupOptions, MemberInfo, ReduceOp};

fn list<T: std::str::FromStr>(s: Option<&String>, default: &str) -> Vec<T> {
    s.map_or(default, |s| s.as_str()).split(',').filter_map(|x| x.parse().ok()).collect()
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let ranks: Vec<usize> = list(a.first(), "2,4");
    let protocols: Vec<String> = list(a.get(1), "tcp,shm");
    let min_kib: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let max_mib: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let chunk_kib: u64 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let small_kib: u64 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(256);
    let ops: Vec<String> = list(a.get(6), "all_reduce,all_gather,all_to_all");
    let options = GroupOptions {
        chunk_bytes: chunk_kib << 10,
        timeout: Duration::from_secs(120),
        small_all_reduce_bytes: small_kib << 10,
    };
    println!(
        "collective_bandwidth: ranks={ranks:?} protocols={protocols:?} sizes={min_kib} KiB..{max_mib} MiB (x4) \
         chunk_bytes={} small_all_reduce_bytes={} host=127.0.0.1 cpus={} (in-process ranks, one engine each)",
        options.chunk_bytes,
        options.small_all_reduce_bytes,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<5} {:>5} {:<10} {:>10} {:>6} {:>10} {:>9}",
        "proto", "ranks", "op", "bytes", "iters", "median ms", "GB/s"
    );
    mooncake::link_all();
    for protocol in &protocols {
        for &r in &ranks {
            let engines: Vec<TransferEngine> = (0..r)
                .map(|_| {
                    let config = EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([protocol.as_str()]);
                    TransferEngine::new(config).expect("engine")
                })
                .collect();
            let groups: Vec<Group> =
                engines.iter().enumerate().map(|(i, e)| Group::new(e, i, r, options.clone()).expect("group")).collect();
            let infos: Vec<MemberInfo> = groups.iter().map(Group::local_info).collect();
            for g in &groups {
                g.connect(&infos).expect("connect");
            }
            let mut size = min_kib << 10;
            while size <= max_mib << 20 {
                for op in ops.iter().map(String::as_str) {
                    let iters = ((256usize << 20) / size).clamp(3, 50);
                    let times = run(&groups, op, size, iters);
                    let med = times[times.len() / 2];
                    let gbs = size as f64 / med.as_secs_f64() / 1e9;
                    println!(
                        "{protocol:<5} {r:>5} {op:<10} {size:>10} {iters:>6} {:>10.3} {gbs:>9.2}",
                        med.as_secs_f64() * 1e3
                    );
                }
                size *= 4;
            }
        }
    }
}

/// `iters` timed calls (after one warm-up) on every rank; the slowest rank's time per call, sorted.
fn run(groups: &[Group], op: &str, size: usize, iters: usize) -> Vec<Duration> {
    let r = groups.len();
    let per_rank: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .iter()
            .map(|g| {
                s.spawn(move || {
                    let (mut input, mut output) = match op {
                        "all_reduce" => (vec![0u8; size], Vec::new()),
                        "all_gather" => (vec![1u8; size / r], vec![0u8; size / r * r]),
                        _ => (vec![1u8; size / r * r], vec![0u8; size / r * r]),
                    };
                    let counts = vec![(size / r) as u64; r];
                    let mut times = Vec::with_capacity(iters);
                    for i in 0..=iters {
                        let t = Instant::now();
                        match op {
                            "all_reduce" => g.all_reduce(&mut input, DType::F32, ReduceOp::Sum),
                            "all_gather" => g.all_gather(&input, &mut output),
                            _ => g.all_to_all(&input, &counts, &mut output, &counts),
                        }
                        .expect(op);
                        if i > 0 {
                            times.push(t.elapsed());
                        }
                    }
                    times
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    let mut worst: Vec<Duration> =
        (0..iters).map(|i| per_rank.iter().map(|t| t[i]).max().unwrap_or_default()).collect();
    worst.sort();
    worst
}
