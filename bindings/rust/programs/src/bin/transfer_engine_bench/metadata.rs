//! `--mode metadata`: put and get throughput and latency against a metadata service.
//!
//! `--threads` tasks share one client (as an engine's threads do) and each loops over
//! `--metadata_keys` keys of its own with `--value_size`-byte values: puts for `--duration`
//! seconds, then gets for as long. Prints ops/s and p50/p99 per operation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake::MetadataStore;

use crate::{Args, percentile};

struct Phase {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<f64>,
}

#[derive(Clone, Copy)]
enum Op {
    Put,
    Get,
}

async fn worker(
    store: Arc<dyn MetadataStore>,
    op: Op,
    thread: usize,
    keys: usize,
    value: Arc<Vec<u8>>,
    until: Instant,
) -> (u64, Vec<f64>) {
    let mut lat = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let mut i = 0usize;
    while Instant::now() < until {
        let key = format!("mooncake/bench/{thread}/{}", i % keys);
        let t = Instant::now();
        let ok = match op {
            Op::Put => store.put(&key, &value).await.is_ok(),
            Op::Get => matches!(store.get(&key).await, Ok(Some(v)) if v.len() == value.len()),
        };
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        errors += u64::from(!ok);
        i += 1;
    }
    (errors, lat)
}

async fn phase(store: &Arc<dyn MetadataStore>, op: Op, args: &Args, value: &Arc<Vec<u8>>) -> Phase {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = (0..args.threads.max(1))
        .map(|t| tokio::spawn(worker(store.clone(), op, t, args.metadata_keys.max(1), value.clone(), until)))
        .collect();
    let mut out = Phase { ops: 0, errors: 0, elapsed: Duration::ZERO, latencies_us: Vec::new() };
    for t in tasks {
        if let Ok((errors, lat)) = t.await {
            out.errors += errors;
            out.ops += lat.len() as u64;
            out.latencies_us.extend(lat);
        }
    }
    out.elapsed = started.elapsed();
    out.latencies_us.sort_by(f64::total_cmp);
    out
}

/// Runs the put and get phases and prints the table.
pub fn run(args: &Args) -> mooncake::Result<()> {
    let store = mooncake::registry::create_metadata(&args.metadata_server)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let value = Arc::new((0..args.value_size).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>());
    println!(
        "metadata bench: backend={} conn={} threads={} value={} B keys/thread={} duration={}s per phase",
        store.name(),
        args.metadata_server,
        args.threads,
        args.value_size,
        args.metadata_keys,
        args.duration
    );
    let (put, get) = runtime.block_on(async {
        // Fail fast with the real error when the service is not there.
        store.put("mooncake/bench/probe", b"1").await?;
        store.delete("mooncake/bench/probe").await?;
        let put = phase(&store, Op::Put, args, &value).await;
        let get = phase(&store, Op::Get, args, &value).await;
        for t in 0..args.threads.max(1) {
            for k in 0..args.metadata_keys.max(1) {
                let _ = store.delete(&format!("mooncake/bench/{t}/{k}")).await;
            }
        }
        store.close().await;
        Ok::<_, mooncake::Error>((put, get))
    })?;
    println!("{:>4} {:>10} {:>10} {:>10} {:>8}", "op", "ops/s", "p50 us", "p99 us", "errors");
    for (name, p) in [("put", put), ("get", get)] {
        println!(
            "{name:>4} {:>10.0} {:>10.1} {:>10.1} {:>8}",
            p.ops as f64 / p.elapsed.as_secs_f64(),
            percentile(&p.latencies_us, 0.5),
            percentile(&p.latencies_us, 0.99),
            p.errors
        );
    }
    Ok(())
}
