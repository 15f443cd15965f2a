//! Echo benchmark for the RPC layer over loopback TCP: latency percentiles and throughput on one connection.
//!
//! ```text
//! cargo run --release -p mooncake-store-rpc --example rpc_bench -- [--seconds 2] [--payloads 100,4096]
//!     [--in-flight 1,16] [--client-runtime current|multi|both] [--server-runtime current|multi]
//! ```
//! The server runs on its own thread and runtime; the client runtime is built per sweep.

use std::time::{Duration, Instant};

use mooncake_store_rpc::{ClientOptions, PeerInfo, RpcClient, RpcServer, ServiceId};
use serde_bytes::ByteBuf;
use tokio::runtime::{Builder, Runtime};

struct Config {
    seconds: f64,
    payloads: Vec<usize>,
    in_flight: Vec<usize>,
    client_runtimes: Vec<String>,
    server_runtime: String,
}

fn parse_list(value: &str) -> Vec<usize> {
    value.split(',').map(|v| v.trim().parse().unwrap_or_else(|_| usage(&format!("not a number: {v}")))).collect()
}

fn usage(problem: &str) -> ! {
    eprintln!("{problem}");
    eprintln!(
        "usage: rpc_bench [--seconds S] [--payloads 100,4096] [--in-flight 1,16] \
         [--client-runtime current|multi|both] [--server-runtime current|multi]"
    );
    std::process::exit(2)
}

fn parse_args() -> Config {
    let mut config = Config {
        seconds: 2.0,
        payloads: vec![100, 4096],
        in_flight: vec![1, 16],
        client_runtimes: vec!["current".into(), "multi".into()],
        server_runtime: "current".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--seconds" => config.seconds = value.parse().unwrap_or_else(|_| usage("bad --seconds")),
            "--payloads" => config.payloads = parse_list(&value),
            "--in-flight" => config.in_flight = parse_list(&value),
            "--client-runtime" if value == "both" => {}
            "--client-runtime" if value == "current" || value == "multi" => config.client_runtimes = vec![value],
            "--server-runtime" if value == "current" || value == "multi" => config.server_runtime = value,
            _ => usage(&format!("unknown argument {flag} {value}")),
        }
    }
    config
}

fn runtime(kind: &str) -> Runtime {
    let built = match kind {
        "current" => Builder::new_current_thread().enable_all().build(),
        _ => Builder::new_multi_thread().worker_threads(2).enable_all().build(),
    };
    built.unwrap_or_else(|e| usage(&format!("cannot build a {kind} runtime: {e}")))
}

/// Runs `in_flight` callers for `duration`; returns sorted latencies in nanoseconds and the elapsed time.
async fn run(
    client: &RpcClient<ByteBuf, ByteBuf>,
    payload: usize,
    in_flight: usize,
    duration: Duration,
) -> (Vec<u64>, Duration) {
    let start = Instant::now();
    let deadline = start + duration;
    let callers: Vec<_> = (0..in_flight)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let req = ByteBuf::from(vec![0x5a; payload]);
                let mut latencies = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let resp = client.call(&req).await.unwrap_or_else(|e| panic!("call failed: {e}"));
                    latencies.push(t0.elapsed().as_nanos() as u64);
                    assert_eq!(resp.len(), payload);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for caller in callers {
        all.extend(caller.await.unwrap_or_else(|e| panic!("caller task failed: {e}")));
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    (all, elapsed)
}

fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

fn main() {
    let config = parse_args();
    let service = ServiceId::new("rpc-bench", 1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("rpc_bench: loopback TCP echo, one client connection, postcard + length-delimited frames");
    println!(
        "config: cores={cores} build={} server_runtime={} client_runtimes={:?} seconds_per_case={} payloads={:?} \
         in_flight={:?}",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        config.server_runtime,
        config.client_runtimes,
        config.seconds,
        config.payloads,
        config.in_flight,
    );

    // The server gets its own thread and runtime, like a separate process would.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_runtime = runtime(&config.server_runtime);
    let server_service = service.clone();
    let server_thread = std::thread::spawn(move || {
        server_runtime.block_on(async move {
            let echo = |req: ByteBuf, _peer: PeerInfo| async move { req };
            let server = RpcServer::bind("127.0.0.1:0", server_service, echo)
                .await
                .unwrap_or_else(|e| usage(&format!("cannot start the server: {e}")));
            let _ = addr_tx.send(server.local_addr());
            let _ = stop_rx.await;
            server.shutdown().await;
        })
    });
    let addr = addr_rx.recv().unwrap_or_else(|_| usage("the server thread died"));

    println!(
        "{:<8} {:>8} {:>9} {:>10} {:>10} {:>12} {:>10}",
        "client", "payload", "in_flight", "p50_us", "p99_us", "req_per_s", "calls"
    );
    let duration = Duration::from_secs_f64(config.seconds);
    for kind in &config.client_runtimes {
        let client_runtime = runtime(kind);
        client_runtime.block_on(async {
            let client: RpcClient<ByteBuf, ByteBuf> =
                RpcClient::connect(addr, service.clone(), ClientOptions::default())
                    .await
                    .unwrap_or_else(|e| usage(&format!("cannot connect: {e}")));
            for &payload in &config.payloads {
                for &in_flight in &config.in_flight {
                    run(&client, payload, in_flight, Duration::from_millis(200)).await; // warm-up
                    let (latencies, elapsed) = run(&client, payload, in_flight, duration).await;
                    println!(
                        "{:<8} {:>8} {:>9} {:>10.1} {:>10.1} {:>12.0} {:>10}",
                        kind,
                        payload,
                        in_flight,
                        percentile_us(&latencies, 0.50),
                        percentile_us(&latencies, 0.99),
                        latencies.len() as f64 / elapsed.as_secs_f64(),
                        latencies.len(),
                    );
                }
            }
        });
    }
    let _ = stop_tx.send(());
    let _ = server_thread.join();
}
