//! Throughput and memory of the master's sans-IO core: inserts N objects (put_start + put_end, 1 replica), then
//! measures `exist` per second on one thread, single and batched, with keys in random and sequential order,
//! and the resident memory added per object.
//!
//! Run: `cargo run --release -p mooncake-store-core --example master_core_bench [objects]` (default 1,000,000).

use std::hint::black_box;
use std::time::Instant;

use mooncake_store_core::master::{Clock, ManualClock, MasterCore, SystemClock};
use mooncake_store_core::types::{ClientId, MasterConfig, ReplicateConfig, Segment};

const VALUE_LEN: u64 = 16 * 1024;
const SEGMENTS: u64 = 4;
const SEGMENT_SIZE: u64 = 64 << 30;
const BATCH: usize = 128;

/// Resident set size of this process in bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn key(i: u64) -> String {
    format!("key-{i:010}")
}

/// A fixed pseudo-random permutation of 0..n (SplitMix64-driven Fisher-Yates).
fn shuffled(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut s = 0x1234_5678_u64;
    for i in (1..v.len()).rev() {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        v.swap(i, (z % (i as u64 + 1)) as usize);
    }
    v
}

fn rate(ops: u64, secs: f64) -> String {
    format!("{:>8.2} M ops/s ({:>6.1} ns/op)", ops as f64 / secs / 1e6, secs * 1e9 / ops as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let config = MasterConfig::default();
    println!("master_core_bench");
    println!(
        "  objects {n}, value_len {VALUE_LEN} B, replicas 1, keys like {:?} ({} B), segments {SEGMENTS} x {} GiB",
        key(123456),
        key(0).len(),
        SEGMENT_SIZE >> 30
    );
    println!(
        "  strategy {}, lease {} ms, build {}",
        config.allocation_strategy,
        config.default_kv_lease_ttl_ms,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );

    // `MC_BENCH_CLOCK=manual` uses a clock read with a plain atomic load instead of the service's clock
    // (`SystemClock`: CLOCK_MONOTONIC_COARSE on Linux, `Instant::now()` elsewhere).
    let manual = std::env::var("MC_BENCH_CLOCK").is_ok_and(|v| v == "manual");
    let clock: Box<dyn Clock> =
        if manual { Box::new(ManualClock::new(SystemClock::new().now_ms())) } else { Box::new(SystemClock::new()) };
    println!("  clock {}", if manual { "manual (atomic load)" } else { "system (SystemClock, as the service)" });
    let client = ClientId(1);
    let mut core = MasterCore::new(config, clock, 42)?;
    for s in 0..SEGMENTS {
        core.mount_segment(
            client,
            Segment {
                name: format!("seg-{s}"),
                transport_endpoint: format!("node-{s}:12345"),
                base: 0x7f00_0000_0000 + s * SEGMENT_SIZE,
                size: SEGMENT_SIZE,
                host: format!("node-{s}"),
                protocol: "tcp".into(),
            },
        )?;
    }

    let cfg = ReplicateConfig::default();
    let rss_before = rss_bytes();
    let t = Instant::now();
    let mut k = String::with_capacity(32);
    for i in 0..n {
        use std::fmt::Write;
        k.clear();
        write!(k, "key-{i:010}")?;
        core.put_start(client, &k, VALUE_LEN, &cfg)?;
        core.put_end(client, &k)?;
    }
    let insert_secs = t.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let stats = core.stats();
    assert_eq!(stats.key_count, n);
    println!("insert (put_start + put_end)   {}", rate(n, insert_secs));
    println!(
        "memory: RSS {:.1} MiB -> {:.1} MiB, {:.1} bytes per object",
        rss_before as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64
    );

    let random: Vec<String> = shuffled(n).into_iter().map(key).collect();
    let sequential: Vec<String> = (0..n).map(key).collect();
    for (order, keys) in [("random", &random), ("sequential", &sequential)] {
        let t = Instant::now();
        let mut hits = 0u64;
        for k in keys.iter() {
            hits += u64::from(black_box(core.exist(black_box(k)))?);
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(hits, n);
        println!("exist, single, {order:<10}      {}", rate(n, secs));

        let t = Instant::now();
        let mut hits = 0u64;
        for chunk in keys.chunks(BATCH) {
            for r in black_box(core.batch_exist(chunk)) {
                hits += u64::from(r?);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(hits, n);
        println!("exist, batch {BATCH}, {order:<10}   {}", rate(n, secs));
    }

    let t = Instant::now();
    for k in random.iter().take(n as usize / 4) {
        black_box(core.get_replica_list(k)?);
    }
    println!("get_replica_list, random        {}", rate(n / 4, t.elapsed().as_secs_f64()));
    let t = Instant::now();
    for k in random.iter().take(n as usize / 4) {
        black_box(core.exist(&format!("{k}-missing"))?);
    }
    println!("exist (miss, incl. format!)     {}", rate(n / 4, t.elapsed().as_secs_f64()));
    Ok(())
}
