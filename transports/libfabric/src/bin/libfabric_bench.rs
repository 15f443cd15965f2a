//! `libfabric_bench`: bandwidth and latency of the libfabric transport between two processes,
//! per provider and request size, driving the [`Transport`] trait directly (no engine, no
//! metadata service): the parent starts a child (`--serve`) that registers a buffer and prints
//! its segment descriptor, then writes to and reads from it.
//!
//! ```text
//! libfabric_bench                                   # tcp;ofi_rxm and shm, 4 KiB .. 16 MiB
//! libfabric_bench --provider shm --sizes 4K,1M --ops write --seconds 2 --depth 32
//! MC_LIBFABRIC_IDLE_US=0 libfabric_bench            # both progress threads busy-poll
//! ```
//!
//! Columns: provider, op, block size, batch depth, GB/s (batches of `depth` requests in flight),
//! latency of one request alone (avg, p50, p99). Build with `--release`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::transport::{PeerEvents, RemoteSegment, TransferTask, Transport, TransportContext};
use mooncake_core::{BackendConfig, Batch, BufferDesc, LocalRange, Location, Opcode, RegionTable, SegmentDescriptor};
use mooncake_transport_libfabric::{FabricConfig, LIBFABRIC, LibfabricTransport};

const USAGE: &str = "usage: libfabric_bench [--provider P]... [--sizes 4K,64K,1M,16M] [--ops write,read] \
                     [--depth N] [--seconds S] [--buffer-mib M]";

#[derive(Debug, Clone)]
struct Args {
    providers: Vec<String>,
    sizes: Vec<u64>,
    ops: Vec<Opcode>,
    depth: usize,
    seconds: f64,
    buffer: u64,
    serve: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: u64 = num.parse().map_err(|e| format!("size {s:?}: {e}"))?;
    let m = match mult.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(m).filter(|v| *v > 0).ok_or_else(|| format!("size {s:?} out of range"))
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        providers: Vec::new(),
        sizes: vec![4 << 10, 64 << 10, 1 << 20, 16 << 20],
        ops: vec![Opcode::Write, Opcode::Read],
        depth: 16,
        seconds: 1.0,
        buffer: 64 << 20,
        serve: false,
    };
    while let Some(flag) = it.next() {
        if flag == "--serve" {
            a.serve = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--provider" => a.providers.push(v),
            "--sizes" => a.sizes = v.split(',').map(parse_size).collect::<Result<_, _>>()?,
            "--ops" => {
                a.ops = v
                    .split(',')
                    .map(|o| match o.trim() {
                        "write" => Ok(Opcode::Write),
                        "read" => Ok(Opcode::Read),
                        x => Err(format!("unknown op {x:?}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--depth" => a.depth = v.parse::<usize>().map_err(|e| format!("--depth: {e}"))?.clamp(1, 1024),
            "--seconds" => a.seconds = v.parse::<f64>().map_err(|e| format!("--seconds: {e}"))?.clamp(0.05, 600.0),
            "--buffer-mib" => a.buffer = v.parse::<u64>().map_err(|e| format!("--buffer-mib: {e}"))?.max(1) << 20,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.providers.is_empty() {
        a.providers = vec!["tcp;ofi_rxm".into(), "shm".into()];
    }
    let largest = a.sizes.iter().copied().max().unwrap_or(1);
    a.buffer = a.buffer.max(largest);
    Ok(a)
}

struct Quiet;

impl PeerEvents for Quiet {
    fn peer_failed(&self, segment_name: &str) {
        eprintln!("libfabric_bench: transport reports peer {segment_name} failed");
    }
}

/// A page-aligned, zeroed buffer (mmap), registered with the transport.
struct Buf {
    ptr: *mut u8,
    len: usize,
}

impl Buf {
    fn new(len: u64) -> Result<Buf, String> {
        let len = usize::try_from(len).map_err(|e| e.to_string())?;
        // SAFETY: anonymous private mapping of `len` bytes; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of {len} bytes failed: {}", std::io::Error::last_os_error()));
        }
        let b = Buf { ptr: p.cast(), len };
        // SAFETY: the mapping is `len` writable bytes owned by `b`; touching every page up front
        // keeps page faults out of the measurements.
        unsafe { std::ptr::write_bytes(b.ptr, 0x5a, b.len) };
        Ok(b)
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A started transport with one registered buffer.
struct Side {
    rt: tokio::runtime::Runtime,
    transport: Arc<LibfabricTransport>,
    regions: Arc<RegionTable>,
    buf: Buf,
    desc: BufferDesc,
}

impl Side {
    fn new(provider: &str, len: u64) -> Result<Side, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let mut options = BackendConfig::default();
        options.options.insert("provider".into(), provider.to_string());
        let transport = Arc::new(
            LibfabricTransport::new(LIBFABRIC, FabricConfig::from_backend(LIBFABRIC, &options))
                .map_err(|e| e.to_string())?,
        );
        let regions = Arc::new(RegionTable::new());
        let ctx = TransportContext {
            local_name: format!("bench-{}", std::process::id()),
            bind_host: "127.0.0.1".into(),
            regions: regions.clone(),
            runtime: rt.handle().clone(),
            peer_events: Arc::new(Quiet),
            peers: Arc::new(mooncake_core::NoPeerHandshake),
            devices: Vec::new(),
        };
        rt.block_on(transport.start(&ctx)).map_err(|e| format!("starting the transport: {e}"))?;
        let buf = Buf::new(len)?;
        // SAFETY: `buf` is a mapping owned by this Side, unmapped only when the Side is dropped, after its Drop
        // unregistered the buffer and shut the transport down (fields drop after `drop`), so no transfer uses
        // it once unmapped; the benchmark never reads it through references.
        unsafe { regions.insert(buf.addr(), len, Location::Cpu(Some(0))) }.map_err(|e| e.to_string())?;
        let region = regions.get(buf.addr()).ok_or("region vanished")?;
        let mut desc = BufferDesc { name: "cpu:0".into(), addr: buf.addr(), length: len, ..Default::default() };
        transport.register_memory(&region, &mut desc).map_err(|e| format!("registering: {e}"))?;
        Ok(Side { rt, transport, regions, buf, desc })
    }

    fn descriptor(&self) -> SegmentDescriptor {
        let mut d = SegmentDescriptor {
            name: format!("bench-{}", std::process::id()),
            protocol: LIBFABRIC.into(),
            buffers: vec![self.desc.clone()],
            ..Default::default()
        };
        self.transport.describe(&mut d);
        d
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(r) = self.regions.get(self.buf.addr()) {
            let _ = self.transport.unregister_memory(&r);
        }
        let t = self.transport.clone();
        self.rt.block_on(async move { t.shutdown().await });
    }
}

/// Child: serve until stdin closes.
fn serve(args: &Args) -> Result<(), String> {
    let provider = args.providers.first().cloned().unwrap_or_default();
    let side = Side::new(&provider, args.buffer)?;
    let line = side.descriptor().to_json();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
    drop(side);
    Ok(())
}

/// The peer's segment and the part of its buffer the benchmark uses.
struct Target {
    seg: Arc<RemoteSegment>,
    base: u64,
    span: u64,
}

/// Runs `n` requests of `size` bytes (spread over the buffers) as one batch; returns when all
/// are done.
fn run_batch(side: &Side, target: &Target, op: Opcode, size: u64, n: usize, first: u64) -> Result<(), String> {
    let batch = Batch::new(n);
    let start = batch.reserve(n).map_err(|e| e.to_string())?;
    let slots = (target.span / size).max(1);
    let tasks: Vec<TransferTask> = (0..n)
        .map(|i| {
            let off = ((first + i as u64) % slots) * size;
            let local = LocalRange::check(&side.regions, side.buf.addr() + off, size, "benchmark buffer")?;
            Ok(TransferTask {
                opcode: op,
                local,
                remote_addr: target.base + off,
                completion: batch.completion(start + i),
            })
        })
        .collect::<mooncake_core::Result<_>>()
        .map_err(|e| e.to_string())?;
    side.transport.submit(&target.seg, tasks);
    batch.wait_blocking(Duration::from_secs(60)).map_err(|e| format!("batch: {e}"))?;
    let st = batch.overall();
    match st.error {
        Some(e) => Err(format!("{op:?} of {size} bytes failed: {e}")),
        None => Ok(()),
    }
}

fn human(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

fn bench_provider(exe: &std::path::Path, provider: &str, args: &Args) -> Result<(), String> {
    let mut child = Command::new(exe)
        .args(["--serve", "--provider", provider, "--buffer-mib", &(args.buffer >> 20).max(1).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the peer: {e}"))?;
    let result = (|| {
        let stdout = child.stdout.take().ok_or("no peer stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map_err(|e| format!("reading the peer line: {e}"))?;
        let desc = SegmentDescriptor::from_json(line.trim().as_bytes())
            .map_err(|e| format!("peer descriptor {line:?}: {e}"))?;
        let remote_base = desc.buffers.first().map(|b| b.addr).ok_or("peer published no buffer")?;
        let seg =
            Arc::new(RemoteSegment { handle: 1, name: desc.name.clone(), host: "127.0.0.1".into(), descriptor: desc });
        let target = Target { seg, base: remote_base, span: args.buffer };
        let side = Side::new(provider, args.buffer)?;
        let cfg = side.transport.config();
        println!(
            "# provider {provider}: rails {:?}, local address(es) {:?}, depth {}, {:.1}s per point, idle_us {:?}, spin_us {:?}",
            side.transport.rails(),
            side.transport.addresses(),
            args.depth,
            args.seconds,
            cfg.idle_sleep.as_micros(),
            cfg.spin.as_micros(),
        );
        println!(
            "{:<12} {:<5} {:>8} {:>5} {:>9} {:>10} {:>10} {:>10}",
            "provider", "op", "block", "batch", "GB/s", "avg_us", "p50_us", "p99_us"
        );
        for op in &args.ops {
            for &size in &args.sizes {
                // Warm-up: connect and fault in the provider's paths.
                run_batch(&side, &target, *op, size, args.depth, 0)?;
                // Bandwidth: batches of `depth` requests back to back.
                let t0 = Instant::now();
                let mut moved = 0u64;
                let mut next = 0u64;
                while t0.elapsed().as_secs_f64() < args.seconds {
                    run_batch(&side, &target, *op, size, args.depth, next)?;
                    next += args.depth as u64;
                    moved += size * args.depth as u64;
                }
                let gbps = moved as f64 / t0.elapsed().as_secs_f64() / 1e9;
                // Latency: one request at a time.
                let mut lat: Vec<f64> = Vec::new();
                let t1 = Instant::now();
                while t1.elapsed().as_secs_f64() < args.seconds / 2.0 || lat.len() < 20 {
                    let s = Instant::now();
                    run_batch(&side, &target, *op, size, 1, lat.len() as u64)?;
                    lat.push(s.elapsed().as_secs_f64() * 1e6);
                    if lat.len() >= 200_000 {
                        break;
                    }
                }
                lat.sort_by(f64::total_cmp);
                let avg = lat.iter().sum::<f64>() / lat.len() as f64;
                let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
                let name = match op {
                    Opcode::Write => "write",
                    Opcode::Read => "read",
                };
                println!(
                    "{:<12} {:<5} {:>8} {:>5} {:>9.3} {:>10.1} {:>10.1} {:>10.1}",
                    provider,
                    name,
                    human(size),
                    args.depth,
                    gbps,
                    avg,
                    pct(0.5),
                    pct(0.99)
                );
            }
        }
        drop(side);
        Ok(())
    })();
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.serve {
        return match serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("libfabric_bench --serve: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot locate this binary to start the peer: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "# libfabric_bench: two processes on this host, Transport trait driven directly; sizes {:?}, ops {:?}, \
         build {}",
        args.sizes.iter().map(|s| human(*s)).collect::<Vec<_>>(),
        args.ops,
        if cfg!(debug_assertions) { "debug (use --release for numbers)" } else { "release" }
    );
    let mut failed = false;
    for p in &args.providers {
        match mooncake_transport_libfabric::probe_provider(p) {
            mooncake_core::registry::Availability::Available => {}
            mooncake_core::registry::Availability::Unavailable(why) => {
                println!("# provider {p}: skipped ({why})");
                continue;
            }
        }
        if let Err(e) = bench_provider(&exe, p, &args) {
            eprintln!("libfabric_bench: provider {p}: {e}");
            failed = true;
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("7").unwrap(), 7);
        assert!(parse_size("0").is_err());
        assert!(parse_size("3X").is_err());
        let a = parse_args(
            ["--provider", "shm", "--sizes", "1K,2M", "--ops", "read", "--depth", "4"].map(String::from).into_iter(),
        )
        .unwrap();
        assert_eq!(a.providers, vec!["shm".to_string()]);
        assert_eq!(a.sizes, vec![1024, 2 << 20]);
        assert_eq!(a.ops, vec![Opcode::Read]);
        assert_eq!(a.depth, 4);
        assert!(parse_args(["--bogus", "1"].map(String::from).into_iter()).is_err());
        let d = parse_args(std::iter::empty()).unwrap();
        assert_eq!(d.providers, vec!["tcp;ofi_rxm".to_string(), "shm".to_string()]);
    }
}
