//! `shm_bench`: single-thread `memcpy` bandwidth against shm transport bandwidth, measured in the
//! same run, for blocks of 4 KiB, 64 KiB, 1 MiB, 16 MiB and 64 MiB.
//!
//! The target engine runs in a child process (this executable started with `--child`); the
//! initiator moves blocks between its registered buffer and the child's with the engine's
//! blocking batch API (`batch_transfer_sync`). Both sides cycle through a 64 MiB window so the
//! two measurements see the same cache behaviour.
//!
//! ```text
//! cargo run --release -p mooncake-transport-shm --example shm_bench -- [--seconds 0.5] [--window-mib 64]
//! MC_SHM_WORKERS=1 cargo run --release ... # one copy thread (the default is min(4, cores))
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use mooncake_core::{EngineConfig, Opcode, TransferEngine};

const BLOCKS: [u64; 5] = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
/// Requests per batch for small blocks (a batch moves at least 4 MiB, at most this many requests).
const MAX_BATCH: u64 = 1024;

struct Args {
    child: bool,
    seconds: f64,
    window: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { child: false, seconds: 0.5, window: 64 << 20 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--child" => a.child = true,
            "--seconds" => a.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--window-mib" => {
                a.window = value()?.parse::<u64>().map_err(|e| format!("--window-mib: {e}"))?.max(64) << 20
            }
            "--help" | "-h" => {
                println!("shm_bench [--seconds S] [--window-mib N]   (memcpy vs shm, target in a child process)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn engine() -> Result<TransferEngine, String> {
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["shm"]))
        .map_err(|e| format!("starting an engine: {e}"))
}

/// The target: registers `window` bytes, prints `segment addr len`, serves until stdin closes.
fn child(window: u64) -> Result<(), String> {
    let e = engine()?;
    let buf: Vec<u8> = (0..window).map(|i| (i % 251) as u8).collect();
    // SAFETY: `buf` is neither resized nor read while registered, and dropped only after `e.shutdown()`
    // (which stops the transports and closes the shm table), so no transfer touches it once it is freed.
    unsafe { e.register_memory(buf.as_ptr() as u64, window, "cpu:0") }.map_err(|e| format!("register: {e}"))?;
    println!("{} {} {}", e.local_segment_name(), buf.as_ptr() as u64, window);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let _ = e.unregister_memory(buf.as_ptr() as u64);
    e.shutdown();
    Ok(())
}

/// Accumulated time of one side of a paired measurement.
#[derive(Default)]
struct Side {
    calls: u64,
    time: Duration,
}

impl Side {
    fn gbs(&self, bytes: u64) -> f64 {
        (self.calls * bytes) as f64 / self.time.as_secs_f64().max(1e-9) / 1e9
    }
}

/// Runs `a` and `b` (each moving `bytes` per call) in alternating slices of about `secs / ROUNDS`
/// each, so that load from other processes hits both alike; at least 3 calls of each per slice.
fn measure_pair(
    secs: f64,
    mut a: impl FnMut(u64) -> Result<(), String>,
    mut b: impl FnMut(u64) -> Result<(), String>,
) -> Result<(Side, Side), String> {
    const ROUNDS: u32 = 10;
    let slice = Duration::from_secs_f64(secs / f64::from(ROUNDS));
    a(0)?; // warm-up
    b(0)?;
    let (mut sa, mut sb) = (Side::default(), Side::default());
    for _ in 0..ROUNDS {
        for (f, side) in [(&mut a as &mut dyn FnMut(u64) -> Result<(), String>, &mut sa), (&mut b, &mut sb)] {
            let start = Instant::now();
            let mut n = 0;
            while n < 3 || start.elapsed() < slice {
                f(side.calls + n + 1)?;
                n += 1;
            }
            side.time += start.elapsed();
            side.calls += n;
        }
    }
    Ok((sa, sb))
}

fn human(n: u64) -> String {
    if n >= 1 << 20 { format!("{}MiB", n >> 20) } else { format!("{}KiB", n >> 10) }
}

fn run(a: &Args) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut kid = Command::new(exe)
        .args(["--child", "--window-mib", &(a.window >> 20).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the target process: {e}"))?;
    let mut line = String::new();
    BufReader::new(kid.stdout.take().ok_or("no child stdout")?)
        .read_line(&mut line)
        .map_err(|e| format!("reading the target's line: {e}"))?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [segment, addr, _len] = parts.as_slice() else {
        return Err(format!("target printed {line:?}"));
    };
    let remote: u64 = addr.parse().map_err(|e| format!("target address {addr:?}: {e}"))?;

    let e = engine()?;
    let window = a.window;
    let mut local: Vec<u8> = (0..window).map(|i| (i % 241) as u8).collect();
    let src: Vec<u8> = (0..window).map(|i| (i % 239) as u8).collect();
    let mut dst: Vec<u8> = vec![1u8; window as usize];
    let (src_p, dst_p) = (src.as_ptr(), dst.as_mut_ptr());
    let laddr = local.as_mut_ptr() as u64;
    // SAFETY: `local` is neither resized nor dropped before `e.shutdown()` below (every early return
    // leaks nothing that a transfer still uses: the engine is dropped, and shut down, first, as it was
    // created after `local`); it is read only between transfers.
    unsafe { e.register_memory(laddr, window, "cpu:0") }.map_err(|e| format!("register: {e}"))?;
    e.open_segment(segment).map_err(|e| format!("opening the target: {e}"))?;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = mooncake_transport_shm::ShmConfig::default().workers;
    println!("# shm_bench: memcpy (1 thread) vs shm transport, target engine in child process {}", kid.id());
    println!(
        "# cores {cores}, shm copy threads {workers} (MC_SHM_WORKERS), window {} per side, {:.2} s per cell \
         (memcpy and shm alternate in 10 slices), API batch_transfer_sync, batch = max(1, min({MAX_BATCH}, \
         4MiB/block)) requests",
        human(window),
        a.seconds
    );
    println!(
        "{:<6} {:>7} {:>6} {:>12} {:>12} {:>9} {:>14}",
        "op", "block", "batch", "memcpy GB/s", "shm GB/s", "shm/memcpy", "shm per batch"
    );
    let mut low = Vec::new();
    for block in BLOCKS.into_iter().filter(|b| *b <= window) {
        let batch = ((4 << 20) / block).clamp(1, MAX_BATCH);
        let per_call = batch * block;
        let slots = window / per_call; // distinct positions in the window
        for op in [Opcode::Read, Opcode::Write] {
            let mut locals = Vec::with_capacity(batch as usize);
            let mut remotes = Vec::with_capacity(batch as usize);
            let lengths = vec![block; batch as usize];
            // memcpy: the same blocks between two local buffers, paired with the shm transfers.
            let memcpy = |k: u64| {
                let base = (k % slots) * per_call;
                for i in 0..batch {
                    let o = (base + i * block) as usize;
                    let n = block as usize;
                    // SAFETY: `o + n` stays within the window; `src` and `dst` are distinct
                    // allocations of `window` bytes that live for the whole run.
                    unsafe { std::ptr::copy_nonoverlapping(src_p.add(o), dst_p.add(o), n) };
                }
                std::hint::black_box(dst_p);
                Ok(())
            };
            let shm = |k: u64| {
                let base = (k % slots) * per_call;
                locals.clear();
                remotes.clear();
                for i in 0..batch {
                    locals.push(laddr + base + i * block);
                    remotes.push(remote + base + i * block);
                }
                e.batch_transfer_sync(segment, op, &locals, &remotes, &lengths).map_err(|e| format!("transfer: {e}"))
            };
            let (mc, sh) = measure_pair(a.seconds, memcpy, shm)?;
            let (mc, gbs) = (mc.gbs(per_call), sh.gbs(per_call));
            let per = sh.time / sh.calls.max(1) as u32;
            let ratio = gbs / mc;
            if block >= 1 << 20 && ratio < 0.6 {
                low.push(format!("{} {}", op.as_str(), human(block)));
            }
            println!(
                "{:<6} {:>7} {:>6} {:>12.2} {:>12.2} {:>9.0}% {:>12.1}us",
                op.as_str(),
                human(block),
                batch,
                mc,
                gbs,
                ratio * 100.0,
                per.as_secs_f64() * 1e6
            );
        }
    }
    // Check the bytes once: a read of the whole window must equal the target's pattern.
    e.transfer_sync(segment, Opcode::Write, laddr, remote, 4096).map_err(|e| format!("final write: {e}"))?;
    e.transfer_sync(segment, Opcode::Read, laddr + 4096, remote, 4096).map_err(|e| format!("final read: {e}"))?;
    if local[..4096] != local[4096..8192] {
        return Err("data check failed: bytes written and read back differ".into());
    }
    let _ = e.unregister_memory(laddr);
    e.shutdown();
    drop((src, dst));
    drop(kid.stdin.take());
    let _ = kid.wait();
    if low.is_empty() {
        println!("# target met: shm >= 60% of single-thread memcpy for every block >= 1MiB");
    } else {
        println!("# below 60% of memcpy: {}", low.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    mooncake::link_all();
    mooncake_transport_shm::link();
    let r = parse().and_then(|a| if a.child { child(a.window) } else { run(&a) });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shm_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
