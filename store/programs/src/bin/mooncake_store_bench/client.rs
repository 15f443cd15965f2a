//! `--mode client`: the store client's data path, one call at a time from one thread.
//!
//! Configurations (each prints its own section of the table):
//! - `remote/tcp` and `remote/default`: the data lives in another store node, a `mooncake_client` child
//!   process (next to this program, killed by PID on exit and on error); this process's client contributes no
//!   memory (`global_segment_size` 0), so every object is placed on the child. `tcp` sets
//!   `same_host_transports: false` (the comparison with upstream, which runs TCP only); `default` keeps the
//!   engine's same-host choice (shm when the node is on this host).
//! - `local`: no other node; this process's client contributes the memory, so every replica is in this
//!   process (copied with memcpy).
//!
//! Points: every op of `--ops` for every size of `--sizes`; batch ops for every batch of `--batches` (single
//! ops use batch 1). Per point: at least `--min_calls` calls and at least `--duration` seconds of calls, after
//! one warm-up call. Only the calls are timed (key names, buffers and cleanup are prepared outside); ops/s
//! counts keys (so batch points give keys/s), GB/s is keys x size / time spent in calls (1 GB = 1e9 bytes),
//! p50/p99 are per call. Writes go to a ring of fresh keys sized to half the segment; when it is full,
//! `remove_all` runs (untimed) and the ring starts over. Reads first populate `max(batch, min(1024, 256 MiB /
//! size))` keys (or `--read_keys`; rounded to whole batches, untimed) and read them round robin: by default
//! the bytes read are not in the CPU caches (except for the smallest sizes); `--read_keys=1` reads one hot key.
//! Every point ends with `remove_all`. Removed objects that were read stay allocated until their lease (10 s)
//! runs out; with the master in this process each point first waits (untimed) until its keys fit under 80% of
//! the capacity, so the master neither refuses nor evicts during a point (a refusal anyway: `remove_all`, wait,
//! repeat the call). Sources and destinations lie in one registered buffer: the source half, then the
//! destination half, each as large as the biggest call; key `j` of a call uses slot `j` of its half.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mooncake_store::Error;
use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::{ErrorCode, ReplicateConfig};
use mooncake_store_programs::flags::{Flags, parse_size};

use crate::{BenchMaster, percentile};

/// The operations, in the table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
    PutFrom,
    GetInto,
    BatchPutFrom,
    BatchGetInto,
}

impl Op {
    const ALL: [Op; 6] = [Op::Put, Op::Get, Op::PutFrom, Op::GetInto, Op::BatchPutFrom, Op::BatchGetInto];

    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::PutFrom => "put_from",
            Op::GetInto => "get_into",
            Op::BatchPutFrom => "batch_put_from",
            Op::BatchGetInto => "batch_get_into",
        }
    }

    fn batched(self) -> bool {
        matches!(self, Op::BatchPutFrom | Op::BatchGetInto)
    }

    fn writes(self) -> bool {
        matches!(self, Op::Put | Op::PutFrom | Op::BatchPutFrom)
    }
}

/// Where the data is and how it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// In the child node, `same_host_transports` as given (false = tcp only).
    Remote { same_host: bool },
    /// In this process's own segment.
    Local,
}

impl Setup {
    fn placement(self) -> &'static str {
        match self {
            Setup::Remote { .. } => "remote",
            Setup::Local => "local",
        }
    }

    fn transport(self) -> &'static str {
        match self {
            Setup::Remote { same_host: false } => "tcp",
            Setup::Remote { same_host: true } => "default",
            Setup::Local => "-",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Point {
    op: Op,
    size: u64,
    batch: usize,
}

/// Everything the flags say.
struct Plan {
    setups: Vec<Setup>,
    points: Vec<Point>,
    skipped: Vec<String>,
    duration: Duration,
    min_calls: usize,
    /// Keys a read point populates (0: automatic).
    read_keys: u64,
    segment_size: u64,
    local_buffer_size: u64,
    /// Bytes of each half (sources, destinations) of the registered buffer.
    half: u64,
}

const MIB: u64 = 1 << 20;
/// Bytes of objects a read point populates at most (unless one batch needs more).
const POPULATE_BYTES: u64 = 256 * MIB;
/// Keys a read point populates at most (unless one batch needs more).
const POPULATE_KEYS: u64 = 1024;

/// `4KiB`, `1MiB`, or bytes.
fn size_label(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

impl Plan {
    fn from_flags(flags: &Flags) -> Result<Plan, String> {
        let placements: &[&str] = match flags.text("placement") {
            "both" => &["remote", "local"],
            "remote" => &["remote"],
            "local" => &["local"],
            other => return Err(format!("--placement={other:?}: use remote, local or both")),
        };
        let transports: &[bool] = match flags.text("transport") {
            "both" => &[false, true],
            "tcp" => &[false],
            "default" => &[true],
            other => return Err(format!("--transport={other:?}: use tcp, default or both")),
        };
        let mut setups = Vec::new();
        for p in placements {
            match *p {
                "remote" => setups.extend(transports.iter().map(|&same_host| Setup::Remote { same_host })),
                _ => setups.push(Setup::Local),
            }
        }
        let sizes: Vec<u64> = list(flags.text("sizes"))
            .map(|s| parse_size(s).filter(|n| *n > 0).ok_or_else(|| format!("--sizes: {s:?} is not a size")))
            .collect::<Result<_, _>>()?;
        let batches: Vec<usize> = list(flags.text("batches"))
            .map(|s| s.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| format!("--batches: {s:?}")))
            .collect::<Result<_, _>>()?;
        let ops: Vec<Op> = list(flags.text("ops"))
            .map(|s| Op::ALL.into_iter().find(|op| op.name() == s).ok_or_else(|| format!("--ops: unknown op {s:?}")))
            .collect::<Result<_, _>>()?;
        if sizes.is_empty() || ops.is_empty() {
            return Err("--sizes and --ops must name at least one".into());
        }
        let segment_size = flags.size("segment_size");
        let max_batch_bytes = flags.size("max_batch_bytes");
        let mut points = Vec::new();
        let mut skipped = Vec::new();
        for &op in &ops {
            let op_batches = if op.batched() { batches.clone() } else { vec![1] };
            if op_batches.is_empty() {
                return Err(format!("--batches is empty but --ops has {}", op.name()));
            }
            for &size in &sizes {
                for &batch in &op_batches {
                    let bytes = size.saturating_mul(batch as u64);
                    if op.batched() && bytes > max_batch_bytes {
                        skipped.push(format!("{} {}x{batch} (> --max_batch_bytes)", op.name(), size_label(size)));
                    } else if bytes > segment_size / 2 {
                        skipped.push(format!("{} {}x{batch} (> half of --segment_size)", op.name(), size_label(size)));
                    } else {
                        points.push(Point { op, size, batch });
                    }
                }
            }
        }
        let half = points.iter().map(|p| p.size * p.batch as u64).max().unwrap_or(0);
        let duration = if flags.given("duration") { flags.float("duration").max(0.01) } else { 1.0 };
        Ok(Plan {
            setups,
            points,
            skipped,
            duration: Duration::from_secs_f64(duration),
            min_calls: flags.int("min_calls").max(1) as usize,
            read_keys: flags.int("read_keys").max(0) as u64,
            segment_size,
            local_buffer_size: flags.size("local_buffer_size"),
            half,
        })
    }
}

/// PID of the running node child, for the signal handler.
static NODE: Mutex<Option<u32>> = Mutex::new(None);

/// Sends SIGTERM to `pid` (through `kill(1)`: this crate has no unsafe code).
fn terminate(pid: u32) {
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).stderr(Stdio::null()).status();
}

/// A `mooncake_client` child holding the data; terminated (by PID) when dropped.
struct Node {
    child: Child,
    segment: String,
    /// Seconds the child took to fault its segment in after reporting it (`None`: not reported within 120 s).
    prefaulted_after: Option<f64>,
}

impl Node {
    fn spawn(program: &std::path::Path, master: &str, segment_size: u64) -> Result<Node, String> {
        let mut command = Command::new(program);
        command
            .arg("--host=127.0.0.1")
            .arg("--port=0")
            .arg(format!("--master_server_address={master}"))
            .arg(format!("--global_segment_size={segment_size}"))
            .arg("--protocol=tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        *NODE.lock().unwrap_or_else(|e| e.into_inner()) = Some(child.id());
        let stdout = child.stdout.take();
        // From here on, dropping `node` terminates the child.
        let mut node = Node { child, segment: String::new(), prefaulted_after: None };
        let (tx, rx) = mpsc::channel();
        let (prefaulted_tx, prefaulted_rx) = mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(secs) = line.strip_prefix("mooncake_client segment prefaulted after ") {
                        let _ = prefaulted_tx.send(secs.trim_end_matches(" s").trim().parse::<f64>().unwrap_or(0.0));
                    } else if let Some(rest) = line.strip_prefix("mooncake_client segment ") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                        }
                    }
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(segment) if !segment.is_empty() => {
                node.segment = segment;
                // Measure only once the node's background prefault no longer takes a core.
                node.prefaulted_after = prefaulted_rx.recv_timeout(Duration::from_secs(120)).ok();
                Ok(node)
            }
            _ => {
                let status = node.child.try_wait().ok().flatten();
                Err(format!("{} did not report its segment within 30 s (exit status {status:?})", program.display()))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(self.child.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        *NODE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// On SIGINT or SIGTERM: terminate the node child (if any) and exit.
fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(mooncake_store_programs::process::shutdown_signal());
        if let Some(pid) = *NODE.lock().unwrap_or_else(|e| e.into_inner()) {
            terminate(pid);
        }
        eprintln!("mooncake_store_bench: interrupted");
        std::process::exit(130);
    });
}

/// Runs the client benchmark.
pub(crate) fn client_bench(flags: &Flags) -> Result<(), String> {
    mooncake_store_programs::process::init_logging("warn");
    mooncake::link_all();
    watch_signals();
    let plan = Plan::from_flags(flags)?;
    let program = match flags.text("node_program") {
        "" => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("mooncake_client"),
        p => p.into(),
    };
    let master = BenchMaster::start(flags)?;

    println!("# mooncake_store_bench --mode client");
    println!("# master {} ({})", master.address, master.describe());
    println!(
        "# per point: >= {:.2} s of calls and >= {} calls after 1 warm-up call, one thread, one call at a time; reads cycle over {}",
        plan.duration.as_secs_f64(),
        plan.min_calls,
        match plan.read_keys {
            0 => "max(batch, min(1024, 256 MiB / size)) keys".to_string(),
            n => format!("max(batch, {n}) keys"),
        }
    );
    println!(
        "# segment {} (data node or, for local, this process), registered buffer 2 x {}, staging (local_buffer_size) {}",
        size_label(plan.segment_size),
        size_label(plan.half),
        size_label(plan.local_buffer_size)
    );
    println!(
        "# host: {} cpus; ops/s counts keys (keys/s for batch_*); GB/s = 1e9 bytes/s over time in calls; p50/p99 per call",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    for s in &plan.skipped {
        println!("# skipped: {s}");
    }
    if plan.points.is_empty() {
        return Err("no point to measure".into());
    }

    // One buffer for sources and destinations, touched once so page faults do not land in the calls.
    let mut buffer = vec![0x5au8; (plan.half * 2) as usize];
    let base = buffer.as_mut_ptr() as u64;

    let remote: Vec<Setup> = plan.setups.iter().copied().filter(|s| *s != Setup::Local).collect();
    let mut header = false;
    if !remote.is_empty() {
        let node = Node::spawn(&program, &master.address, plan.segment_size)?;
        println!(
            "# data node: {} pid {} segment {} ({}, {}); this client contributes 0 bytes",
            program.display(),
            node.pid(),
            node.segment,
            size_label(plan.segment_size),
            node.prefaulted_after.map_or_else(
                || "its prefault did not report its end within 120 s".to_string(),
                |s| format!("pages faulted in {s:.2} s after it started serving; measuring since")
            ),
        );
        let replicate = if master.in_process() {
            ReplicateConfig::default()
        } else {
            ReplicateConfig { preferred_segments: vec![node.segment.clone()], ..Default::default() }
        };
        for setup in remote {
            let Setup::Remote { same_host } = setup else { continue };
            let client = connect(&master.address, 0, plan.local_buffer_size, same_host)?;
            run_setup(&plan, &master, setup, &client, base, &replicate, &mut header)?;
            client.close().map_err(|e| format!("close: {e}"))?;
        }
        drop(node);
    }
    if plan.setups.contains(&Setup::Local) {
        let client = connect(&master.address, plan.segment_size, plan.local_buffer_size, true)?;
        // Measure only once the background prefault of our own segment no longer takes a core.
        if !client.wait_segment_prefaulted(Duration::from_secs(120)) {
            println!("# local: the segment's prefault did not end within 120 s");
        }
        let replicate = if master.in_process() {
            ReplicateConfig::default()
        } else {
            ReplicateConfig { preferred_segments: vec![client.hostname().to_string()], ..Default::default() }
        };
        println!("# local: segment {} in this process, no other node", client.hostname());
        run_setup(&plan, &master, Setup::Local, &client, base, &replicate, &mut header)?;
        client.close().map_err(|e| format!("close: {e}"))?;
    }
    buffer[0] = 0;
    drop(buffer);
    Ok(())
}

fn connect(master: &str, segment: u64, staging: u64, same_host: bool) -> Result<StoreClient, String> {
    StoreClient::setup(ClientConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.to_string(),
        global_segment_size: segment,
        local_buffer_size: staging,
        same_host_transports: same_host,
        ..Default::default()
    })
    .map_err(|e| format!("client setup against {master}: {e}"))
}

/// Measures every point of `plan` with `client`, printing one row per point.
fn run_setup(
    plan: &Plan,
    master: &BenchMaster,
    setup: Setup,
    client: &StoreClient,
    base: u64,
    replicate: &ReplicateConfig,
    header: &mut bool,
) -> Result<(), String> {
    // SAFETY: `base` is the start of `run`'s `buffer` (`plan.half * 2` bytes), which is neither resized nor
    // dropped before every client using it is closed; it is unregistered below, and never read through
    // references while registered.
    unsafe { client.register_buffer(base, plan.half * 2) }.map_err(|e| format!("register_buffer: {e}"))?;
    client.remove_all(true).map_err(|e| format!("remove_all: {e}"))?;
    let bench = Bench { plan, client, base, replicate, master };
    let result = (|| {
        for (n, point) in plan.points.iter().enumerate() {
            if !*header {
                println!(
                    "{:<9} {:<9} {:<15} {:>7} {:>5} {:>12} {:>8} {:>10} {:>10}",
                    "placement", "transport", "op", "size", "batch", "ops/s", "GB/s", "p50_us", "p99_us"
                );
                *header = true;
            }
            let stats = bench.point(n, *point).map_err(|e| {
                format!(
                    "{}/{} {} {}x{}: {e}",
                    setup.placement(),
                    setup.transport(),
                    point.op.name(),
                    size_label(point.size),
                    point.batch
                )
            })?;
            println!(
                "{:<9} {:<9} {:<15} {:>7} {:>5} {:>12.0} {:>8.3} {:>10.1} {:>10.1}",
                setup.placement(),
                setup.transport(),
                point.op.name(),
                size_label(point.size),
                point.batch,
                stats.keys_per_sec,
                stats.gb_per_sec,
                stats.p50_us,
                stats.p99_us
            );
            if stats.waited >= Duration::from_millis(100) {
                println!(
                    "#   (waited {:.1} s, untimed, for space of removed but leased objects)",
                    stats.waited.as_secs_f64()
                );
            }
            if stats.evicted > 0 {
                println!("#   ({} objects evicted by the master during this point)", stats.evicted);
            }
        }
        Ok(())
    })();
    let _ = client.remove_all(true);
    let _ = client.unregister_buffer(base);
    result
}

struct Stats {
    keys_per_sec: f64,
    gb_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// Untimed waits for space held by leased removed objects.
    waited: Duration,
    /// Objects the master evicted during the point (in-process master only).
    evicted: u64,
}

struct Bench<'a> {
    plan: &'a Plan,
    client: &'a StoreClient,
    base: u64,
    replicate: &'a ReplicateConfig,
    master: &'a BenchMaster,
}

/// Why a call failed: no room (objects removed while leased are freed when the lease ends, so space may come
/// back shortly), or anything else.
enum Fail {
    NoRoom,
    Other(String),
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::Other(s)
    }
}

fn fail(what: &str, e: Error) -> Fail {
    match e.kind() {
        ErrorCode::NoAvailableHandle => Fail::NoRoom,
        _ => Fail::Other(format!("{what}: {e}")),
    }
}

fn check<T>(what: &str, results: Vec<Result<T, Error>>) -> Result<Vec<T>, Fail> {
    let n = results.len();
    let mut ok = Vec::with_capacity(n);
    let mut first = None;
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if e == ErrorCode::NoAvailableHandle => return Err(Fail::NoRoom),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    match first {
        None => Ok(ok),
        Some(e) => {
            Err(Fail::Other(format!("{what}: {} of {n} keys failed, first with {e} (code {})", n - ok.len(), e.code())))
        }
    }
}

/// How long a point waits in all for space freed by expiring leases.
const ROOM_WAIT: Duration = Duration::from_secs(30);

impl Bench<'_> {
    fn src(&self, slot: usize, size: u64) -> u64 {
        self.base + slot as u64 * size
    }

    fn dst(&self, slot: usize, size: u64) -> u64 {
        self.base + self.plan.half + slot as u64 * size
    }

    /// With the master in this process: waits (untimed) until `need` more bytes fit under 80% of the capacity, so
    /// that the point neither runs out of room nor triggers eviction (at 90%) while space of removed objects is
    /// still protected by their read leases (10 s). At most [`ROOM_WAIT`].
    fn wait_for_space(&self, need: u64) -> Duration {
        let start = Instant::now();
        while let Some((used, capacity)) = self.master.usage() {
            if used == 0 || used.saturating_add(need) <= capacity / 10 * 8 || start.elapsed() >= ROOM_WAIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match start.elapsed() {
            d if d >= Duration::from_millis(50) => d,
            _ => Duration::ZERO,
        }
    }

    /// No room: removes everything and waits a little (untimed) for leased space to be freed; `Err` when this
    /// point has waited [`ROOM_WAIT`] in all.
    fn wait_for_room(&self, waited: &mut Duration) -> Result<(), String> {
        if *waited >= ROOM_WAIT {
            return Err(format!("no room in the segment for {} s", ROOM_WAIT.as_secs()));
        }
        self.client.remove_all(true).map_err(|e| format!("remove_all: {e}"))?;
        std::thread::sleep(Duration::from_millis(100));
        *waited += Duration::from_millis(100);
        Ok(())
    }

    /// Writes `keys` (untimed: populating reads).
    fn populate(&self, keys: &[String], size: u64, waited: &mut Duration) -> Result<(), String> {
        let per_call = ((self.plan.half / size) as usize).max(1);
        let mut done = 0;
        while done < keys.len() {
            let chunk = &keys[done..(done + per_call).min(keys.len())];
            let ptrs: Vec<u64> = (0..chunk.len()).map(|j| self.src(j, size)).collect();
            let lens = vec![size; chunk.len()];
            match check("populate", self.client.batch_put_from(chunk, &ptrs, &lens, self.replicate)) {
                Ok(_) => done += chunk.len(),
                Err(Fail::NoRoom) => {
                    self.wait_for_room(waited)?;
                    done = 0;
                }
                Err(Fail::Other(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// One call of `op` on `keys`.
    fn call(&self, op: Op, keys: &[String], size: u64, srcs: &[u64], dsts: &[u64], value: &[u8]) -> Result<(), Fail> {
        let (client, replicate) = (self.client, self.replicate);
        let lens = vec![size; keys.len()];
        match op {
            Op::Put => client.put(&keys[0], value, replicate).map_err(|e| fail("put", e)),
            Op::PutFrom => client.put_from(&keys[0], srcs[0], size, replicate).map_err(|e| fail("put_from", e)),
            Op::Get => match client.get(&keys[0]) {
                Ok(v) if v.len() as u64 == size => Ok(()),
                Ok(v) => Err(Fail::Other(format!("get returned {} bytes", v.len()))),
                Err(e) => Err(fail("get", e)),
            },
            Op::GetInto => match client.get_into(&keys[0], dsts[0], size) {
                Ok(got) if got == size => Ok(()),
                Ok(got) => Err(Fail::Other(format!("get_into returned {got}"))),
                Err(e) => Err(fail("get_into", e)),
            },
            Op::BatchPutFrom => check("batch_put_from", client.batch_put_from(keys, srcs, &lens, replicate)).map(drop),
            Op::BatchGetInto => {
                let got = check("batch_get_into", client.batch_get_into(keys, dsts, &lens))?;
                match got.iter().all(|&g| g == size) {
                    true => Ok(()),
                    false => Err(Fail::Other("batch_get_into returned a short count".into())),
                }
            }
        }
    }

    fn point(&self, n: usize, p: Point) -> Result<Stats, String> {
        let Point { op, size, batch } = p;
        let client = self.client;
        client.remove_all(true).map_err(|e| format!("remove_all: {e}"))?;
        let prefix = format!("bench-{n}");
        let value = vec![0x3cu8; if op == Op::Put { size as usize } else { 0 }];
        let srcs: Vec<u64> = (0..batch).map(|j| self.src(j, size)).collect();
        let dsts: Vec<u64> = (0..batch).map(|j| self.dst(j, size)).collect();
        // Writes: a ring of fresh keys over half the segment. Reads: populated keys, read round robin.
        let call_bytes = size * batch as u64;
        let (ring, mut waited) = if op.writes() {
            // Half the segment, or what fits now under 80% of the capacity (at least one call).
            let waited = self.wait_for_space(call_bytes);
            let free = self.master.usage().map_or(u64::MAX, |(used, cap)| (cap / 10 * 8).saturating_sub(used));
            let bytes = (self.plan.segment_size / 2).min(free).max(call_bytes);
            let keys = (bytes / size).clamp(batch as u64, 1 << 20) as usize;
            (keys / batch * batch, waited)
        } else {
            let keys = match self.plan.read_keys {
                0 => (POPULATE_BYTES / size).clamp(1, POPULATE_KEYS),
                n => n,
            };
            let keys = (keys.max(batch as u64) as usize).div_ceil(batch) * batch;
            (keys, self.wait_for_space(keys as u64 * size))
        };
        let evicted_before = self.master.evicted().unwrap_or(0);
        if !op.writes() {
            let keys: Vec<String> = (0..ring).map(|i| format!("{prefix}-{i}")).collect();
            self.populate(&keys, size, &mut waited)?;
        }
        let mut next = 0usize;
        let mut samples = Vec::new();
        let mut busy = Duration::ZERO;
        let mut calls = 0usize;
        // Call 0 is the warm-up.
        while calls <= self.plan.min_calls || busy < self.plan.duration {
            if next + batch > ring {
                if op.writes() {
                    client.remove_all(true).map_err(|e| format!("remove_all: {e}"))?;
                }
                next = 0;
            }
            let keys: Vec<String> = (next..next + batch).map(|i| format!("{prefix}-{i}")).collect();
            let t = Instant::now();
            let result = self.call(op, &keys, size, &srcs, &dsts, &value);
            let spent = t.elapsed();
            match result {
                Ok(()) => {}
                // Only writes allocate; the keys were removed with everything else, so the call is repeated.
                Err(Fail::NoRoom) => {
                    self.wait_for_room(&mut waited)?;
                    next = 0;
                    continue;
                }
                Err(Fail::Other(e)) => return Err(e),
            }
            next += batch;
            if calls > 0 {
                busy += spent;
                samples.push(spent.as_secs_f64() * 1e6);
            }
            calls += 1;
        }
        client.remove_all(true).map_err(|e| format!("remove_all: {e}"))?;
        samples.sort_by(f64::total_cmp);
        let keys = (samples.len() * batch) as f64;
        let secs = busy.as_secs_f64();
        Ok(Stats {
            keys_per_sec: keys / secs,
            gb_per_sec: keys * size as f64 / secs / 1e9,
            p50_us: percentile(&samples, 0.5),
            p99_us: percentile(&samples, 0.99),
            waited,
            evicted: self.master.evicted().unwrap_or(0).saturating_sub(evicted_before),
        })
    }
}
