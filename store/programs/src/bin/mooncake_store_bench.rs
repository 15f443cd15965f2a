//! `mooncake_store_bench`: store benchmarks that print their configuration.
//!
//! `--mode client`: the store client's data path (put, get, put_from, get_into, batch_put_from,
//! batch_get_into) over `--sizes` and `--batches`, with the data in another store node (a
//! `mooncake_client` child process; `--transport` tcp and/or the default same-host choice) and/or
//! in this process's own segment; prints ops/s (keys/s for batches), GB/s and p50/p99 per call. See
//! the `client` module. `tests/interop/store_bench_upstream.py` measures the same on upstream and
//! `scripts/bench_store.sh` runs both.
//!
//! `--mode master`: the master alone, through its RPC: populates `--objects` objects with batched
//! put_start/put_end, then measures single `exist` calls (latency; through the async client, then through
//! the blocking client the store client uses) and batched `exist` calls of
//! `--batch` keys with `--in_flight` calls outstanding on one connection (keys per second). It
//! starts a master in this process (on its own runtime and threads) unless
//! `--master_server_address` names a running one.

#[path = "mooncake_store_bench/client.rs"]
mod client;

use std::time::{Duration, Instant};

use mooncake_store::protocol::{Request, Response};
use mooncake_store::types::{ClientId, ReplicateConfig, Segment};
use mooncake_store_master::{MasterService, ServiceConfig, service_id};
use mooncake_store_programs::flags::{FlagError, Flags, Kind, Spec};
use mooncake_store_rpc::{BlockingClient, ClientOptions, RpcClient};

const FLAGS: &[Spec] = &[
    Spec { name: "mode", kind: Kind::Text, default: "master", help: "master | client" },
    Spec {
        name: "master_server_address",
        kind: Kind::Text,
        default: "",
        help: "use a running master (default: start one here)",
    },
    Spec { name: "objects", kind: Kind::Int, default: "1000000", help: "objects to create before measuring" },
    Spec { name: "batch", kind: Kind::Int, default: "128", help: "keys per batched call" },
    Spec { name: "in_flight", kind: Kind::Int, default: "8", help: "batched calls outstanding at once" },
    Spec {
        name: "duration",
        kind: Kind::Float,
        default: "3",
        help: "seconds per measurement (--mode client: per point, 1 unless given)",
    },
    // --mode client
    Spec {
        name: "placement",
        kind: Kind::Text,
        default: "both",
        help: "client: remote (data in a mooncake_client child) | local (this process) | both",
    },
    Spec {
        name: "transport",
        kind: Kind::Text,
        default: "both",
        help: "client, remote placement: tcp (same_host_transports off) | default (same-host shm allowed) | both",
    },
    Spec { name: "sizes", kind: Kind::Text, default: "4KiB,64KiB,1MiB,8MiB,32MiB", help: "client: object sizes" },
    Spec { name: "batches", kind: Kind::Text, default: "32,128", help: "client: keys per batch_* call" },
    Spec {
        name: "ops",
        kind: Kind::Text,
        default: "put,get,put_from,get_into,batch_put_from,batch_get_into",
        help: "client: operations to measure",
    },
    Spec { name: "min_calls", kind: Kind::Int, default: "3", help: "client: calls per point at least" },
    Spec {
        name: "read_keys",
        kind: Kind::Int,
        default: "0",
        help: "client: keys a read point populates and cycles through (0: max(batch, min(1024, 256 MiB / size)))",
    },
    Spec {
        name: "segment_size",
        kind: Kind::Size,
        default: "2GiB",
        help: "client: memory of the node holding the data (half of it is used per point)",
    },
    Spec {
        name: "max_batch_bytes",
        kind: Kind::Size,
        default: "1GiB",
        help: "client: skip batch points moving more bytes per call; the registered buffer is twice the largest call",
    },
    Spec {
        name: "local_buffer_size",
        kind: Kind::Size,
        default: "128MiB",
        help: "client: staging buffer of the bench's client (bytes API)",
    },
    Spec {
        name: "node_program",
        kind: Kind::Text,
        default: "",
        help: "client: the store node program (default: mooncake_client next to this program)",
    },
];

type Client = RpcClient<Request, Response>;

/// Resident set size of this process in bytes (0 where /proc is missing).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).map_or(0, |pages| pages * 4096)
}

fn key(i: u64) -> String {
    format!("key-{i:010}")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let flags = match Flags::parse("mooncake_store_bench", "store benchmarks", FLAGS, std::env::args().skip(1)) {
        Ok(f) => f,
        Err(FlagError::Help(text)) => return println!("{text}"),
        Err(e) => {
            eprintln!("mooncake_store_bench: {e}");
            std::process::exit(2);
        }
    };
    let result = match flags.text("mode") {
        "master" => master_bench(&flags),
        "client" => client::client_bench(&flags),
        other => Err(format!("unknown --mode {other:?}: use master or client")),
    };
    if let Err(e) = result {
        eprintln!("mooncake_store_bench: {e}");
        std::process::exit(1);
    }
}

/// The master the bench talks to: started in this process (on its own runtime and threads, as it would run as
/// a separate program) unless `--master_server_address` names a running one.
struct BenchMaster {
    address: String,
    service: Option<MasterService>,
    runtime: tokio::runtime::Runtime,
}

impl BenchMaster {
    fn start(flags: &Flags) -> Result<BenchMaster, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (address, service) = match flags.text("master_server_address") {
            "" => {
                let config = ServiceConfig { rpc_addr: "127.0.0.1:0".into(), admin_addr: None, ..Default::default() };
                let service = runtime.block_on(MasterService::start(config)).map_err(|e| e.to_string())?;
                (service.rpc_addr().to_string(), Some(service))
            }
            a => (a.to_string(), None),
        };
        Ok(BenchMaster { address, service, runtime })
    }

    fn in_process(&self) -> bool {
        self.service.is_some()
    }

    /// Bytes allocated (including removed objects whose lease still protects their space) and the capacity of
    /// all segments, when the master runs in this process.
    fn usage(&self) -> Option<(u64, u64)> {
        let service = self.service.as_ref()?;
        let stats = service.with_core(|core| core.stats());
        Some((stats.allocated_bytes, stats.total_capacity_bytes))
    }

    /// Objects evicted since the start, when the master runs in this process.
    fn evicted(&self) -> Option<u64> {
        Some(self.service.as_ref()?.with_core(|core| core.stats().evicted_key_count))
    }

    fn describe(&self) -> &'static str {
        if self.in_process() { "in this process, 2 worker threads" } else { "external" }
    }
}

impl Drop for BenchMaster {
    fn drop(&mut self) {
        if let Some(service) = self.service.take() {
            self.runtime.block_on(service.shutdown());
        }
    }
}

fn master_bench(flags: &Flags) -> Result<(), String> {
    let objects = flags.int("objects").max(1) as u64;
    let batch = flags.int("batch").max(1) as usize;
    let in_flight = flags.int("in_flight").max(1) as usize;
    let duration = Duration::from_secs_f64(flags.float("duration").max(0.1));
    let master = BenchMaster::start(flags)?;
    let address = master.address.clone();
    let in_process = master.service.is_some();
    println!("# mooncake_store_bench --mode master");
    println!(
        "# master {address} ({}), objects {objects}, batch {batch}, in_flight {in_flight}, duration {:.1}s/phase, client: one connection, current_thread runtime",
        master.describe(),
        duration.as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let client: Client =
            RpcClient::connect(&address, service_id(), ClientOptions::default()).await.map_err(|e| e.to_string())?;
        let owner = ClientId::random();
        let segment = Segment {
            name: format!("bench-{owner}"),
            transport_endpoint: "bench:1".into(),
            base: 1 << 40,
            size: 64 << 30,
            host: "bench".into(),
            protocol: "tcp".into(),
        };
        expect_done(client.call(&Request::MountSegment { client: owner, segment }).await)?;
        // Ping as a real client does: a silent client is suspect after 3 s and gets no placements.
        let pinger = client.clone();
        let pings = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = pinger.call(&Request::Ping { client: owner }).await;
            }
        });
        let rss_before = rss_bytes();
        let t = Instant::now();
        let mut next = 0u64;
        while next < objects {
            let n = (objects - next).min(batch as u64);
            let keys: Vec<String> = (next..next + n).map(key).collect();
            let items = keys.iter().map(|k| (k.clone(), 4096)).collect();
            let config = ReplicateConfig::default();
            match client.call(&Request::PutStart { client: owner, items, config, upsert: false }).await {
                Ok(Response::Placed(v)) if v.iter().all(Result::is_ok) => {}
                Ok(Response::Placed(v)) => {
                    let failed = v.iter().filter(|r| r.is_err()).count();
                    return Err(format!(
                        "populating objects {next}..: {failed} of {n} puts failed: {:?}",
                        v.iter().find_map(|r| r.as_ref().err())
                    ));
                }
                other => return Err(format!("populating: {other:?}")),
            }
            client.call(&Request::PutEnd { client: owner, keys }).await.map_err(|e| e.to_string())?;
            next += n;
        }
        println!("populate (batched put_start + put_end): {:.0} objects/s", objects as f64 / t.elapsed().as_secs_f64());
        if in_process {
            let grown = rss_bytes().saturating_sub(rss_before);
            println!(
                "memory: process RSS grew {:.1} MiB while populating, {:.1} bytes per object (master and client together)",
                grown as f64 / f64::from(1 << 20),
                grown as f64 / objects as f64
            );
        }

        // Single exist calls, one at a time.
        let mut i = 0u64;
        let mut samples = Vec::new();
        let start = Instant::now();
        while start.elapsed() < duration {
            let t = Instant::now();
            let r = client.call(&Request::Exist { keys: vec![key(i % objects)] }).await.map_err(|e| e.to_string())?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            check_exist(&r)?;
            i = next_index(i);
        }
        print_single("async client on this thread's runtime", samples, start.elapsed());

        // The same through the blocking client, as the store client calls the master.
        let blocking: BlockingClient<Request, Response> =
            BlockingClient::new(&address, service_id(), ClientOptions::default());
        let blocking = tokio::task::spawn_blocking(move || {
            let mut samples = Vec::new();
            let start = Instant::now();
            while start.elapsed() < duration {
                let t = Instant::now();
                let r = blocking.call(&Request::Exist { keys: vec![key(i % objects)] }).map_err(|e| e.to_string())?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                check_exist(&r)?;
                i = next_index(i);
            }
            Ok::<_, String>((samples, start.elapsed()))
        });
        let (samples, took) = blocking.await.map_err(|e| e.to_string())??;
        print_single("blocking client, as the store client calls", samples, took);

        // Batched exist calls, `in_flight` at once on the one connection.
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..in_flight {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut keys_done = 0u64;
                let mut seed = w as u64 + 1;
                while start.elapsed() < duration {
                    let keys: Vec<String> = (0..batch)
                        .map(|_| {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                            key((seed >> 11) % objects)
                        })
                        .collect();
                    match client.call(&Request::Exist { keys }).await {
                        Ok(Response::Exist(v)) if v.len() == batch => keys_done += batch as u64,
                        other => return Err(format!("batched exist answered {other:?}")),
                    }
                }
                Ok(keys_done)
            }));
        }
        let mut total = 0u64;
        for t in tasks {
            total += t.await.map_err(|e| e.to_string())??;
        }
        println!(
            "exist, batches of {batch}, {in_flight} in flight: {:.0} keys/s",
            total as f64 / start.elapsed().as_secs_f64()
        );
        pings.abort();
        Ok::<(), String>(())
    })
}

fn check_exist(r: &Response) -> Result<(), String> {
    if *r == Response::Exist(vec![Ok(true)]) { Ok(()) } else { Err(format!("exist answered {r:?}")) }
}

/// The next key index of the single-key phases (a pseudo-random walk).
fn next_index(i: u64) -> u64 {
    i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407)
}

/// Prints one single-key phase: calls/s, p50 and p99.
fn print_single(client: &str, mut samples: Vec<f64>, took: Duration) {
    samples.sort_by(f64::total_cmp);
    println!(
        "exist, single key, 1 in flight, {client}: {:.0} calls/s, p50 {:.1} us, p99 {:.1} us",
        samples.len() as f64 / took.as_secs_f64(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99)
    );
}

fn expect_done(r: Result<Response, mooncake_store_rpc::RpcError>) -> Result<(), String> {
    match r {
        Ok(Response::Done(Ok(()))) => Ok(()),
        other => Err(format!("mount: {other:?}")),
    }
}
