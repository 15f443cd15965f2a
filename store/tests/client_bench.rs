//! A quick latency/throughput sweep of the store client (ignored by default; asserts nothing about speed):
//! `cargo test --release -p mooncake-store --test client_bench -- --ignored --nocapture`.
//! One in-process master, client A (the caller) and client B (holding the remote segment), TCP only.

use std::time::{Duration, Instant};

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::ReplicateConfig;
use mooncake_store_master::{MasterService, ServiceConfig};

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn on(c: &StoreClient) -> ReplicateConfig {
    ReplicateConfig { preferred_segments: vec![c.hostname().to_string()], ..Default::default() }
}

#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn client_sweep() {
    mooncake::link_all();
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let service = rt
        .block_on(MasterService::start(ServiceConfig {
            rpc_addr: "127.0.0.1:0".into(),
            admin_addr: None,
            ..Default::default()
        }))
        .unwrap();
    let config = ClientConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: service.rpc_addr().to_string(),
        global_segment_size: 1 << 30,
        local_buffer_size: 64 << 20,
        same_host_transports: false,
        ..Default::default()
    };
    let a = StoreClient::setup(config.clone()).unwrap();
    let b = StoreClient::setup(config).unwrap();
    let mut buf = vec![7u8; 64 << 20];
    let ptr = buf.as_mut_ptr() as u64;
    // SAFETY: `buf` is unregistered (and both clients closed) before it is dropped, and read only between calls.
    unsafe { a.register_buffer(ptr, buf.len() as u64) }.unwrap();
    println!("iters {iters}; A -> B over tcp unless noted");

    // Components: one master round trip, one raw engine transfer of 4 KiB to B.
    a.put_from("probe", ptr, 4096, &on(&b)).unwrap();
    let replica = a.get_replica_desc("probe").unwrap().remove(0);
    let mut rtt = Vec::with_capacity(iters);
    let mut xfer = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.is_exist("probe").unwrap();
        rtt.push(t.elapsed());
        let t = Instant::now();
        a.engine()
            .transfer_sync(&replica.transport_endpoint, mooncake_core::Opcode::Read, ptr + 8192, replica.addr, 4096)
            .unwrap();
        xfer.push(t.elapsed());
    }
    let mut again = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.get_into("probe", ptr + 8192, 4096).unwrap();
        again.push(t.elapsed());
    }
    let mut rtt_only = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.is_exist("probe").unwrap();
        rtt_only.push(t.elapsed());
    }
    println!("get_into of one key, repeated: p50 {:.1?}", percentile(&mut again, 0.5));
    println!("is_exist alone, repeated: p50 {:.1?}", percentile(&mut rtt_only, 0.5));
    println!("master round trip (is_exist): p50 {:.1?}", percentile(&mut rtt, 0.5));
    println!("engine transfer_sync 4KiB read: p50 {:.1?}", percentile(&mut xfer, 0.5));
    a.remove_all(true).unwrap();

    // 4 KiB latency.
    let value = vec![1u8; 4096];
    for (name, target) in [("remote", &b), ("same-process", &a)] {
        let cfg = on(target);
        let mut put = Vec::with_capacity(iters);
        let mut get = Vec::with_capacity(iters);
        let mut put_from = Vec::with_capacity(iters);
        let mut get_into = Vec::with_capacity(iters);
        for i in 0..iters {
            let t = Instant::now();
            a.put(&format!("{name}-p{i}"), &value, &cfg).unwrap();
            put.push(t.elapsed());
            let t = Instant::now();
            a.get(&format!("{name}-p{i}")).unwrap();
            get.push(t.elapsed());
            let t = Instant::now();
            a.put_from(&format!("{name}-z{i}"), ptr, 4096, &cfg).unwrap();
            put_from.push(t.elapsed());
            let t = Instant::now();
            a.get_into(&format!("{name}-z{i}"), ptr + 8192, 4096).unwrap();
            get_into.push(t.elapsed());
        }
        for (op, v) in [("put", &mut put), ("get", &mut get), ("put_from", &mut put_from), ("get_into", &mut get_into)]
        {
            println!("4KiB {name:>12} {op:>9}: p50 {:>7.1?} p99 {:>7.1?}", percentile(v, 0.5), percentile(v, 0.99));
        }
        a.remove_all(true).unwrap();
    }

    // Batches of 32 x 4 KiB.
    let cfg = on(&b);
    let keys: Vec<String> = (0..32).map(|i| format!("batch-{i}")).collect();
    let ptrs: Vec<u64> = (0..32).map(|i| ptr + i * 4096).collect();
    let lens = vec![4096u64; 32];
    assert!(a.batch_put_from(&keys, &ptrs, &lens, &cfg).iter().all(Result::is_ok));
    let out: Vec<u64> = (0..32).map(|i| ptr + (1 << 20) + i * 4096).collect();
    let rounds = iters / 4 + 1;
    let t = Instant::now();
    for _ in 0..rounds {
        assert!(a.batch_get_into(&keys, &out, &lens).iter().all(Result::is_ok));
    }
    let secs = t.elapsed().as_secs_f64();
    println!("batch_get_into 32x4KiB: {:.0} keys/s", (rounds * 32) as f64 / secs);
    let t = Instant::now();
    for r in 0..rounds {
        let keys: Vec<String> = (0..32).map(|i| format!("bp-{r}-{i}")).collect();
        assert!(a.batch_put_from(&keys, &ptrs, &lens, &cfg).iter().all(Result::is_ok));
    }
    let secs = t.elapsed().as_secs_f64();
    println!("batch_put_from 32x4KiB: {:.0} keys/s", (rounds * 32) as f64 / secs);
    a.remove_all(true).unwrap();

    // Large objects.
    for size in [1u64 << 20, 4 << 20, 16 << 20] {
        for (name, target) in [("remote", &b), ("same-process", &a)] {
            let cfg = on(target);
            let n = ((64u64 << 20) / size).max(4) as usize;
            let t = Instant::now();
            for i in 0..n {
                a.put_from(&format!("big-{i}"), ptr, size, &cfg).unwrap();
            }
            let put = (n as u64 * size) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let t = Instant::now();
            for i in 0..n {
                a.get_into(&format!("big-{i}"), ptr + (32 << 20), size).unwrap();
            }
            let get = (n as u64 * size) as f64 / t.elapsed().as_secs_f64() / 1e9;
            a.remove_all(true).unwrap();
            let t = Instant::now();
            let v = vec![3u8; size as usize];
            for i in 0..n {
                a.put(&format!("bytes-{i}"), &v, &cfg).unwrap();
            }
            let bput = (n as u64 * size) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let t = Instant::now();
            for i in 0..n {
                a.get(&format!("bytes-{i}")).unwrap();
            }
            let bget = (n as u64 * size) as f64 / t.elapsed().as_secs_f64() / 1e9;
            a.remove_all(true).unwrap();
            println!(
                "{:>5} KiB {name:>12}: put_from {put:.2} GB/s, get_into {get:.2} GB/s, put {bput:.2} GB/s, get {bget:.2} GB/s",
                size >> 10
            );
        }
    }
    a.unregister_buffer(ptr).unwrap();
    buf[0] = 0;
    a.close().unwrap();
    b.close().unwrap();
    rt.block_on(service.shutdown());
}
