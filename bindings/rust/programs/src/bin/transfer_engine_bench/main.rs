//! `transfer_engine_bench`: upstream's benchmark flags, plus a sweep mode.
//!
//! - `--mode target`: registers `--buffer_size` bytes and prints `segment <name>`; serves until killed.
//! - `--mode initiator --segment_id NAME`: `--threads` threads each submit batches of `--batch_size`
//!   requests of `--block_size` bytes for `--duration` seconds; prints `throughput X GB/s`.
//! - `--mode sweep`: starts a target child process itself and prints block x batch -> GB/s,
//!   blocks/s and p50/p99 batch latency, with the effective configuration.
//!   With `nvmeof` among the protocols the target is a file segment on /tmp instead, and `fio` runs on the same
//!   file next to the engine (see `files.rs`).
//! - `--mode metadata`: put/get ops per second and p50/p99 latency against `--metadata_server`
//!   (`scripts/bench_metadata.sh` runs it against every backend and upstream's HTTP server).
//!
//! Buffers are host memory unless `--memory cuda|rocm|musa` (or upstream's `--use_vram`, with `--gpu_id`) puts
//! them on a GPU; `--target_memory` sets the target's side alone. With GPU memory the sweep also measures the
//! device's own copy (`cuMemcpy`-style, [`mooncake::MemoryDevice::copy_between`]) per block size and prints the
//! transfer's ratio to it.
//!
//! With `cxl` (a region-offset protocol: the target publishes only memory of the shared CXL region,
//! `MC_CXL_DEV_PATH`) the target's buffer is allocated in the region unless `--target_memory` says otherwise,
//! and the sweep also measures a single-thread `memcpy` of the same blocks (host to host, in this process) and
//! prints the transfer's ratio to it: the transport is a CPU copy, so that is its limit per thread.

mod files;
mod metadata;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use mooncake::{AllocOptions, Allocation, EngineConfig, Location, MemoryDevice, Opcode, TransferEngine};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    Target,
    Initiator,
    Sweep,
    Metadata,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Operation {
    Read,
    Write,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Transfer engine benchmark (upstream-compatible flags)")]
struct Args {
    /// target, initiator or sweep.
    #[arg(long, value_enum, default_value = "initiator")]
    mode: Mode,
    /// Metadata connection string.
    #[arg(long = "metadata_server", default_value = "P2PHANDSHAKE")]
    metadata_server: String,
    /// Target segment name (initiator).
    #[arg(long = "segment_id", default_value = "")]
    segment_id: String,
    /// read or write.
    #[arg(long, value_enum, default_value = "write")]
    operation: Operation,
    /// Transport.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Bytes per request.
    #[arg(long = "block_size", default_value_t = 65536)]
    block_size: u64,
    /// Requests per batch.
    #[arg(long = "batch_size", default_value_t = 128)]
    batch_size: usize,
    /// Submitting threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds to run (per sweep point in sweep mode).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Bytes registered on each side.
    #[arg(long = "buffer_size", default_value_t = 1 << 30)]
    buffer_size: u64,
    /// This engine's server name.
    #[arg(long = "local_server_name", default_value = "127.0.0.1")]
    local_server_name: String,
    /// Accepted for compatibility with upstream; ignored (no RDMA here).
    #[arg(long = "device_name", default_value = "")]
    device_name: String,
    /// Accepted for compatibility; always GB (1e9 bytes).
    #[arg(long = "report_unit", default_value = "GB")]
    report_unit: String,
    /// Walk through the whole buffer instead of reusing each thread's first blocks (upstream reuses).
    #[arg(long)]
    walk: bool,
    /// Sweep: block sizes.
    #[arg(long, value_delimiter = ',', default_value = "4096,65536,1048576,4194304,16777216,67108864")]
    blocks: Vec<u64>,
    /// Metadata mode: bytes per value.
    #[arg(long = "value_size", default_value_t = 1024)]
    value_size: usize,
    /// Metadata mode: keys each thread cycles through.
    #[arg(long = "metadata_keys", default_value_t = 1000)]
    metadata_keys: usize,
    /// Sweep: batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
    batches: Vec<usize>,
    /// Where buffers live: `host`, or a GPU memory device (`cuda`, `rocm`, `musa`).
    #[arg(long, default_value = "host")]
    memory: String,
    /// Where the target's buffer lives (default: `--memory`).
    #[arg(long = "target_memory")]
    target_memory: Option<String>,
    /// Upstream's flag: buffers in GPU memory (`--memory cuda`).
    #[arg(long = "use_vram", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    use_vram: bool,
    /// GPU ordinal of GPU buffers.
    #[arg(long = "gpu_id", default_value_t = 0)]
    gpu_id: u32,
    /// nvmeof sweep: the fio comparison jobs to run (`randread`, `randwrite`, `read`, `write`; `none`: no job),
    /// e.g. one job at a time under a profiler.
    #[arg(long = "fio_jobs", value_delimiter = ',', default_value = "randread,randwrite,read,write")]
    fio_jobs: Vec<String>,
    /// Sweep: protocols to compare, the first being the baseline of the ratio table (e.g.
    /// `tcp,shm,libfabric`); `available` = tcp, then every other linked transport whose probe
    /// passes here. Empty: sweep `--protocol` alone.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<String>,
}

/// The `p` quantile of sorted samples (NaN when there are none).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    mooncake::link_all();
    let args = Args::parse();
    let result = match args.mode {
        Mode::Target => target(&args),
        Mode::Initiator => initiator(&args).map(|r| r.print_throughput()),
        Mode::Sweep => sweep(&args),
        Mode::Metadata => metadata::run(&args),
    };
    if let Err(e) = result {
        eprintln!("transfer_engine_bench: {e}");
        std::process::exit(1);
    }
}

fn engine(args: &Args) -> mooncake::Result<TransferEngine> {
    let mut config = EngineConfig::new(args.local_server_name.as_str(), args.metadata_server.as_str());
    config = config.with_protocols([args.protocol.as_str()]);
    TransferEngine::new(config)
}

impl Args {
    /// The initiator's memory: `--use_vram` means `cuda`, as upstream.
    fn local_memory(&self) -> String {
        if self.use_vram { "cuda".into() } else { self.memory.clone() }
    }

    /// The target's memory. A region-offset protocol (`cxl`) publishes only memory of its region: its target
    /// allocates from the memory device named like the protocol.
    fn target_memory(&self) -> String {
        if let Some(m) = &self.target_memory {
            return m.clone();
        }
        if self.region_offset() {
            return self.protocol.clone();
        }
        self.local_memory()
    }

    /// Whether the protocol addresses its segments by offset into a shared region (`cxl`).
    fn region_offset(&self) -> bool {
        mooncake::Addressing::of(&self.protocol) == mooncake::Addressing::RegionOffset
    }
}

/// A buffer the engine holds while it is registered (no `unsafe` needed): pre-faulted host memory, or an
/// allocation of a GPU memory device.
enum Buffer {
    Host(mooncake::HostBuffer),
    Device { device: Arc<dyn MemoryDevice>, allocation: Allocation },
}

/// The linked, usable memory device called `name`, or why there is none.
fn device_named(name: &str) -> mooncake::Result<Arc<dyn MemoryDevice>> {
    mooncake::registry::available_devices().into_iter().find(|d| d.name() == name).ok_or_else(|| {
        let why = mooncake::registry::devices()
            .into_iter()
            .find(|f| f.name == name)
            .map_or_else(|| "not linked into this build".to_string(), |f| format!("{:?}", (f.probe)()));
        mooncake::Error::unavailable(format!("memory device {name:?} is not usable here: {why}"))
    })
}

impl Buffer {
    fn new(memory: &str, gpu_id: u32, len: u64) -> mooncake::Result<Self> {
        if memory == "host" || memory == "cpu" {
            // One page more, so that `addr` can start on a page (O_DIRECT file I/O needs aligned memory).
            let mut storage = vec![0u8; len as usize + 4096];
            for (i, b) in storage.iter_mut().enumerate().step_by(4096) {
                *b = i as u8;
            }
            return Ok(Buffer::Host(mooncake::HostBuffer::from_vec(storage)));
        }
        let device = device_named(memory)?;
        let options = AllocOptions { location: Location::Device(device.kind(), gpu_id), ..Default::default() };
        let allocation = device.allocate(len, &options)?;
        let chunk = vec![0x5au8; (64usize << 20).min(len as usize)];
        let mut off = 0;
        while off < len {
            let n = chunk.len().min((len - off) as usize);
            device.copy_from_host(&chunk[..n], &allocation, off)?;
            off += n as u64;
        }
        Ok(Buffer::Device { device, allocation })
    }

    /// Where the buffer's `len` bytes start (page-aligned for host memory).
    fn addr(&self) -> u64 {
        match self {
            Buffer::Host(h) => h.addr().next_multiple_of(4096),
            Buffer::Device { allocation, .. } => allocation.addr,
        }
    }

    /// Where the registration starts (for `unregister_memory`).
    fn start(&self) -> u64 {
        match self {
            Buffer::Host(h) => h.addr(),
            Buffer::Device { allocation, .. } => allocation.addr,
        }
    }

    fn register(&self, e: &TransferEngine) -> mooncake::Result<()> {
        match self {
            Buffer::Host(h) => e.register_owned(h.owned(), "*"),
            Buffer::Device { device, allocation } => e.register_allocation(device, allocation, "*"),
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Buffer::Device { device, allocation } = self {
            // The engine holds the memory while registered; the free completes when its hold ends.
            let _ = device.free(allocation);
        }
    }
}

/// GB/s of the device's own copy of `block` bytes between two of its allocations (the limit a GPU-to-GPU
/// transfer within a node can reach), over about `seconds`.
fn device_copy_gbps(memory: &str, gpu_id: u32, block: u64, seconds: f64) -> mooncake::Result<f64> {
    let device = device_named(memory)?;
    let options = AllocOptions { location: Location::Device(device.kind(), gpu_id), ..Default::default() };
    let (a, b) = (device.allocate(block, &options)?, device.allocate(block, &options)?);
    let start = Instant::now();
    let mut copies = 0u64;
    let result = loop {
        if let Err(e) = device.copy_between(&a, 0, &b, 0, block) {
            break Err(e);
        }
        copies += 1;
        if start.elapsed().as_secs_f64() >= seconds {
            break Ok((copies * block) as f64 / start.elapsed().as_secs_f64() / 1e9);
        }
    };
    let _ = device.free(&a);
    let _ = device.free(&b);
    result
}

/// GB/s of one thread copying `batch` blocks of `block` bytes between two host buffers (what the cxl transport's
/// CPU copy does per request), over about `seconds`.
fn memcpy_gbps(block: u64, batch: usize, seconds: f64) -> f64 {
    let span = (block as usize) * batch;
    let src: Vec<u8> = (0..span).map(|i| i as u8).collect();
    // Written once before timing, so that page faults are not counted (the transfer's buffers are faulted in).
    let mut dst = vec![1u8; span];
    let b = block as usize;
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for i in 0..batch {
            dst[i * b..(i + 1) * b].copy_from_slice(&src[i * b..(i + 1) * b]);
        }
        std::hint::black_box(&mut dst);
        bytes += span as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn target(args: &Args) -> mooncake::Result<()> {
    let e = engine(args)?;
    let buf = Buffer::new(&args.target_memory(), args.gpu_id, args.buffer_size)?;
    buf.register(&e)?;
    println!("segment {}", e.local_segment_name());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

struct RunResult {
    bytes: u64,
    blocks: u64,
    elapsed: Duration,
    latencies_us: Vec<f64>,
    errors: u64,
}

impl RunResult {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e9
    }
    fn blocks_per_sec(&self) -> f64 {
        self.blocks as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p)
    }
    fn print_throughput(&self) {
        println!(
            "throughput {:.3} GB/s ({:.0} blocks/s, batch latency p50 {:.1} us p99 {:.1} us, {} errors)",
            self.gbps(),
            self.blocks_per_sec(),
            self.percentile(0.5),
            self.percentile(0.99),
            self.errors
        );
    }
}

fn initiator(args: &Args) -> mooncake::Result<RunResult> {
    if args.segment_id.is_empty() {
        return Err(mooncake::Error::InvalidArgument("--segment_id is required in initiator mode".into()));
    }
    let e = engine(args)?;
    run_on(&e, args, &args.segment_id)
}

fn run_on(e: &TransferEngine, args: &Args, segment: &str) -> mooncake::Result<RunResult> {
    let threads = args.threads.max(1);
    let span = args.block_size * args.batch_size as u64;
    let slot = args.buffer_size / threads as u64;
    if span > slot {
        return Err(mooncake::Error::InvalidArgument(format!(
            "block_size x batch_size = {span} bytes does not fit the per-thread share {slot} of --buffer_size"
        )));
    }
    let local = Buffer::new(&args.local_memory(), args.gpu_id, args.buffer_size)?;
    local.register(e)?;
    let handle = e.open_segment(segment)?;
    let seg = e.segment(handle)?;
    let remote =
        seg.descriptor.buffers.first().ok_or_else(|| mooncake::Error::NotFound("target has no buffer".into()))?;
    if remote.length < args.buffer_size {
        e.unregister_memory(local.start())?;
        return Err(mooncake::Error::InvalidArgument(format!(
            "target buffer ({} bytes) is smaller than --buffer_size {}",
            remote.length, args.buffer_size
        )));
    }
    let remote_base = remote.addr;
    let op = match args.operation {
        Operation::Read => Opcode::Read,
        Operation::Write => Opcode::Write,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let e = e.clone();
            let stop = stop.clone();
            let segment = segment.to_string();
            let base = t as u64 * slot;
            let (local_base, block, batch, walk) = (local.addr(), args.block_size, args.batch_size, args.walk);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let (mut bytes, mut blocks, mut errors) = (0u64, 0u64, 0u64);
                let lens = vec![block; batch];
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let off = if walk { base + (round * span) % (slot - slot % span).max(span) } else { base };
                    let locals: Vec<u64> = (0..batch as u64).map(|i| local_base + off + i * block).collect();
                    let remotes: Vec<u64> = (0..batch as u64).map(|i| remote_base + off + i * block).collect();
                    let t0 = Instant::now();
                    match e.batch_transfer_sync(&segment, op, &locals, &remotes, &lens) {
                        Ok(()) => {
                            lat.push(t0.elapsed().as_secs_f64() * 1e6);
                            bytes += span;
                            blocks += batch as u64;
                        }
                        Err(err) => {
                            errors += 1;
                            if errors <= 3 {
                                eprintln!("transfer failed: {err}");
                            }
                        }
                    }
                    round += 1;
                }
                (bytes, blocks, errors, lat)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    stop.store(true, Ordering::Relaxed);
    let mut r = RunResult { bytes: 0, blocks: 0, elapsed: Duration::ZERO, latencies_us: Vec::new(), errors: 0 };
    for w in workers {
        let (b, n, errs, lat) = w.join().map_err(|_| mooncake::Error::Protocol("worker panicked".into()))?;
        r.bytes += b;
        r.blocks += n;
        r.errors += errs;
        r.latencies_us.extend(lat);
    }
    r.elapsed = start.elapsed();
    r.latencies_us.sort_by(f64::total_cmp);
    e.unregister_memory(local.start())?;
    Ok(r)
}

/// Kills the target child on every exit path.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One sweep point's result.
type Point = (u64, usize, Option<RunResult>);

fn sweep(args: &Args) -> mooncake::Result<()> {
    if args.compare.is_empty() {
        return sweep_protocol(args).map(|_| ());
    }
    let protocols = compared_protocols(&args.compare);
    println!("# comparing {} (baseline {})", protocols.join(", "), protocols[0]);
    let mut tables = Vec::new();
    for protocol in &protocols {
        let run = Args { protocol: protocol.clone(), ..args.clone() };
        match sweep_protocol(&run) {
            Ok(points) => tables.push((protocol.clone(), points)),
            Err(e) => println!("# {protocol}: not measured: {e}"),
        }
        println!();
    }
    let Some((base_name, base)) = tables.first() else { return Ok(()) };
    println!("# GB/s by protocol, ratio to {base_name} in brackets");
    print!("{:>10} {:>6}", "block", "batch");
    for (name, _) in &tables {
        print!(" {name:>18}");
    }
    println!();
    for (i, (block, batch, base_run)) in base.iter().enumerate() {
        print!("{block:>10} {batch:>6}");
        for (_, points) in &tables {
            let cell = match (&points[i].2, base_run) {
                (Some(r), Some(b)) if b.gbps() > 0.0 => format!("{:.2} ({:.1}x)", r.gbps(), r.gbps() / b.gbps()),
                (Some(r), _) => format!("{:.2}", r.gbps()),
                (None, _) => "-".into(),
            };
            print!(" {cell:>18}");
        }
        println!();
    }
    Ok(())
}

/// `available` expands to tcp plus every other linked transport whose probe passes.
fn compared_protocols(requested: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in requested {
        if p == "available" {
            out.push("tcp".into());
            for f in mooncake::registry::transports() {
                if (f.probe)().is_available() {
                    out.push(f.name.to_string());
                } else {
                    println!("# {}: skipped, probe says it cannot run here", f.name);
                }
            }
        } else {
            out.push(p.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// Sweeps `args.protocol` against a target child process and prints a table.
fn sweep_protocol(args: &Args) -> mooncake::Result<Vec<Point>> {
    if args.protocol == "nvmeof" {
        return files::sweep(args);
    }
    for memory in [args.local_memory(), args.target_memory()] {
        if !matches!(memory.as_str(), "host" | "cpu") {
            device_named(&memory)?; // say why here, not through a silent child
        }
    }
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--mode", "target", "--protocol", &args.protocol, "--metadata_server", &args.metadata_server])
        .args(["--local_server_name", &args.local_server_name, "--buffer_size", &args.buffer_size.to_string()])
        .args(["--memory", &args.target_memory(), "--gpu_id", &args.gpu_id.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| mooncake::Error::Protocol("no target stdout".into()))?;
    let guard = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let segment = line
        .trim()
        .strip_prefix("segment ")
        .ok_or_else(|| mooncake::Error::Protocol(format!("target printed {line:?}, expected 'segment NAME'")))?
        .to_string();
    println!("# transfer_engine_bench sweep");
    println!(
        "# protocol={} operation={:?} memory={}->{} threads={} duration={}s/point buffer_size={} walk={} metadata={} \
         target={} (child pid {})",
        args.protocol,
        args.operation,
        args.local_memory(),
        args.target_memory(),
        args.threads,
        args.duration,
        args.buffer_size,
        args.walk,
        args.metadata_server,
        segment,
        guard.0.id()
    );
    println!(
        "# env: MC_TCP_LANES={} MC_TCP_PROTO={} MC_ENGINE_THREADS={}",
        std::env::var("MC_TCP_LANES").unwrap_or_else(|_| "default(2)".into()),
        std::env::var("MC_TCP_PROTO").unwrap_or_else(|_| "default(2)".into()),
        std::env::var("MC_ENGINE_THREADS").unwrap_or_else(|_| "default(2)".into())
    );
    let e = engine(args)?;
    let mut points = Vec::new();
    // With GPU memory on both sides, the device's own copy is the limit to compare with; for cxl, a single-thread
    // memcpy.
    let gpu = args.local_memory() == args.target_memory() && !matches!(args.local_memory().as_str(), "host" | "cpu");
    let memcpy = args.region_offset();
    println!(
        "{:>10} {:>6} {:>10} {:>12} {:>12} {:>12}{}",
        "block",
        "batch",
        "GB/s",
        "blocks/s",
        "p50 us",
        "p99 us",
        if gpu {
            "   device copy GB/s (ratio)"
        } else if memcpy {
            "   memcpy GB/s (ratio)"
        } else {
            ""
        }
    );
    for &block in &args.blocks {
        let limit = gpu.then(|| device_copy_gbps(&args.local_memory(), args.gpu_id, block, args.duration.min(1.0)));
        for &batch in &args.batches {
            let point = Args { block_size: block, batch_size: batch, ..args.clone() };
            if block * batch as u64 * point.threads as u64 > point.buffer_size {
                println!("{block:>10} {batch:>6} {:>10}", "skip (exceeds buffer)");
                points.push((block, batch, None));
                continue;
            }
            let r = run_on(&e, &point, &segment)?;
            let limit = match &limit {
                Some(l) => Some(l.clone()),
                None if memcpy => Some(Ok(memcpy_gbps(block, batch, args.duration.min(1.0)))),
                None => None,
            };
            let versus = match &limit {
                Some(Ok(copy)) if *copy > 0.0 => format!("   {copy:>10.3} ({:.2})", r.gbps() / copy),
                Some(Ok(_)) => String::new(),
                Some(Err(err)) => format!("   device copy failed: {err}"),
                None => String::new(),
            };
            println!(
                "{block:>10} {batch:>6} {:>10.3} {:>12.0} {:>12.1} {:>12.1}{versus}{}",
                r.gbps(),
                r.blocks_per_sec(),
                r.percentile(0.5),
                r.percentile(0.99),
                if r.errors > 0 { format!("  ({} errors)", r.errors) } else { String::new() }
            );
            points.push((block, batch, Some(r)));
        }
    }
    e.shutdown();
    drop(guard);
    Ok(points)
}
