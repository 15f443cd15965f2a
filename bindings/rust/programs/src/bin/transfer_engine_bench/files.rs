//! The `nvmeof` row of the sweep: a file segment of one file (on `MC_BENCH_FILE_DIR`, default /tmp: ext4 here,
//! so O_DIRECT), published with upstream's descriptor through a metadata service (an in-process HTTP server
//! when `--metadata_server` is P2PHANDSHAKE), then `fio` on the same file with the same block size and queue
//! depth next to the engine: 4 KiB random reads and writes at queue depth 32 (IOPS), 1 MiB sequential reads
//! and writes at queue depth 8 (GB/s), `ioengine=io_uring`, `direct=1`. The engine keeps the queue depth with
//! a sliding window of single-request submissions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mooncake::{EngineConfig, MetadataKeys, Opcode, SegmentHandle, TransferEngine, TransferRequest};

use crate::{Args, Buffer, Point, run_on};

/// A file of `len` bytes filled with data (so reads hit written blocks, not holes), removed when dropped.
struct BenchFile(PathBuf);

impl BenchFile {
    fn create(len: u64) -> mooncake::Result<BenchFile> {
        let dir = std::env::var("MC_BENCH_FILE_DIR").unwrap_or_else(|_| "/tmp".into());
        let path = Path::new(&dir).join(format!("mooncake-bench-{}.bin", std::process::id()));
        let mut f = std::fs::File::create(&path)?;
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        Ok(BenchFile(path))
    }
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sweeps the nvmeof transport over a file segment, then compares with fio.
pub fn sweep(args: &Args) -> mooncake::Result<Vec<Point>> {
    let file = BenchFile::create(args.buffer_size)?;
    let _server;
    let conn = if args.metadata_server.trim().eq_ignore_ascii_case("P2PHANDSHAKE") {
        let config = mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0);
        let server = mooncake::metadata_http::HttpMetadataServer::new(config)
            .map_err(|e| mooncake::Error::unavailable(e.to_string()))?
            .spawn()?;
        let url = server.url();
        _server = server;
        url
    } else {
        args.metadata_server.clone()
    };
    let segment = format!("nvmeof/bench-{}", std::process::id());
    let path = file.0.to_string_lossy().into_owned();
    let json = format!(
        r#"{{"name":"{segment}","protocol":"nvmeof","buffers":[{{"file_path":"{path}","length":{},"local_path_map":{{}}}}]}}"#,
        args.buffer_size
    );
    let store = mooncake::registry::create_metadata(&conn)?;
    let key = MetadataKeys::from_env().segment(&segment);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(store.put(&key, json.as_bytes()))?;
    let mut config = EngineConfig::new(args.local_server_name.as_str(), conn.as_str()).with_protocols(["nvmeof"]);
    config.name_with_rpc_port = true;
    let e = TransferEngine::new(config)?;
    println!("# transfer_engine_bench sweep");
    println!(
        "# protocol=nvmeof operation={:?} memory={} threads={} duration={}s/point file={} ({} bytes) metadata={conn}",
        args.operation,
        args.local_memory(),
        args.threads,
        args.duration,
        file.0.display(),
        args.buffer_size
    );
    println!(
        "# env: MC_NVMEOF_QUEUE_DEPTH={} MC_NVMEOF_IO_THREADS={} MC_NVMEOF_MAX_IO={} MC_NVMEOF_DIRECT={}",
        std::env::var("MC_NVMEOF_QUEUE_DEPTH").unwrap_or_else(|_| "default(32)".into()),
        std::env::var("MC_NVMEOF_IO_THREADS").unwrap_or_else(|_| "default(1)".into()),
        std::env::var("MC_NVMEOF_MAX_IO").unwrap_or_else(|_| "default(1048576)".into()),
        std::env::var("MC_NVMEOF_DIRECT").unwrap_or_else(|_| "default(1)".into()),
    );
    println!("{:>10} {:>6} {:>10} {:>12} {:>12} {:>12}", "block", "batch", "GB/s", "blocks/s", "p50 us", "p99 us");
    let mut points = Vec::new();
    for &block in &args.blocks {
        for &batch in &args.batches {
            let point = Args { block_size: block, batch_size: batch, ..args.clone() };
            if block * batch as u64 * point.threads as u64 > point.buffer_size {
                println!("{block:>10} {batch:>6} {:>10}", "skip (exceeds buffer)");
                points.push((block, batch, None));
                continue;
            }
            let r = run_on(&e, &point, &segment)?;
            println!(
                "{block:>10} {batch:>6} {:>10.3} {:>12.0} {:>12.1} {:>12.1}{}",
                r.gbps(),
                r.blocks_per_sec(),
                r.percentile(0.5),
                r.percentile(0.99),
                if r.errors > 0 { format!("  ({} errors)", r.errors) } else { String::new() }
            );
            points.push((block, batch, Some(r)));
        }
    }
    compare_fio(&e, &segment, &file.0, args)?;
    e.shutdown();
    let _ = rt.block_on(store.delete(&key));
    Ok(points)
}

/// The engine's IOPS and GB/s over `duration` with `qd` requests in flight: `qd` tasks on one current-thread
/// runtime, each submitting its next request as soon as its previous one is done (as fio keeps its queue full).
#[allow(clippy::too_many_arguments)]
fn engine_qd(
    e: &TransferEngine,
    handle: SegmentHandle,
    local: u64,
    size: u64,
    op: Opcode,
    bs: u64,
    qd: usize,
    random: bool,
    duration: f64,
) -> mooncake::Result<(f64, f64, u64)> {
    let blocks = (size / bs).max(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration);
    let tasks: Vec<_> = (0..qd)
        .map(|slot| {
            let e = e.clone();
            rt.spawn(async move {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((slot as u64 + 1) << 32) ^ u64::from(std::process::id());
                let mut seq = slot as u64;
                let (mut done, mut errors) = (0u64, 0u64);
                while Instant::now() < end {
                    let off = if random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        (rng % blocks) * bs
                    } else {
                        seq = (seq + qd as u64) % blocks;
                        seq * bs
                    };
                    let r = TransferRequest {
                        opcode: op,
                        local_addr: local + slot as u64 * bs,
                        target: handle,
                        remote_addr: off,
                        length: bs,
                    };
                    match e.transfer(&[r]).await.and_then(|mut v| v.remove(0)) {
                        Ok(_) => done += 1,
                        Err(err) => {
                            errors += 1;
                            if errors <= 3 {
                                eprintln!("nvmeof {op:?} failed: {err}");
                            }
                        }
                    }
                }
                (done, errors)
            })
        })
        .collect();
    let (mut done, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (d, er) = rt.block_on(t).map_err(|e| mooncake::Error::Protocol(format!("bench task: {e}")))?;
        done += d;
        errors += er;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((done as f64 / secs, (done * bs) as f64 / secs / 1e9, errors))
}

/// fio's IOPS and GB/s for one job (terse output: read bandwidth KiB/s and IOPS are fields 7 and 8, write
/// fields 48 and 49).
fn fio(file: &Path, size: u64, rw: &str, bs: u64, qd: usize, duration: f64) -> Result<(f64, f64), String> {
    let out = Command::new("fio")
        .args(["--name=mooncake-compare", "--ioengine=io_uring", "--direct=1", "--time_based", "--norandommap"])
        .args(["--randrepeat=0", "--minimal", "--numjobs=1", "--thread"])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={}", duration.ceil().max(1.0) as u64))
        .output()
        .map_err(|e| format!("running fio: {e} (apt-get install fio)"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("3;")).ok_or_else(|| format!("no terse line in {text:?}"))?;
    let f: Vec<&str> = line.split(';').collect();
    let (bw, iops) = if rw.contains("write") { (47, 48) } else { (6, 7) };
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).ok_or_else(|| format!("fio field {i} in {line}"));
    Ok((num(iops)?, num(bw)? * 1024.0 / 1e9))
}

fn compare_fio(e: &TransferEngine, segment: &str, file: &Path, args: &Args) -> mooncake::Result<()> {
    let size = args.buffer_size;
    println!();
    println!(
        "# fio comparison on {} ({size} bytes): same file, block size and queue depth; fio ioengine=io_uring direct=1 \
         norandommap; {}s per job",
        file.display(),
        args.duration
    );
    let handle = e.open_segment(segment)?;
    let local = Buffer::new("host", 0, 32 << 20)?;
    local.register(e)?;
    println!(
        "{:>10} {:>8} {:>4} {:>14} {:>14} {:>8}   {:>10} {:>10}",
        "job", "block", "qd", "engine IOPS", "fio IOPS", "ratio", "engine GB/s", "fio GB/s"
    );
    for (rw, bs, qd) in
        [("randread", 4096u64, 32usize), ("randwrite", 4096, 32), ("read", 1 << 20, 8), ("write", 1 << 20, 8)]
    {
        if !args.fio_jobs.iter().any(|j| j == rw) {
            continue;
        }
        let op = if rw.contains("write") { Opcode::Write } else { Opcode::Read };
        let ours = engine_qd(e, handle, local.addr(), size, op, bs, qd, rw.starts_with("rand"), args.duration)?;
        match fio(file, size, rw, bs, qd, args.duration) {
            Ok((iops, gbps)) => println!(
                "{rw:>10} {bs:>8} {qd:>4} {:>14.0} {iops:>14.0} {:>8.2}   {:>10.3} {gbps:>10.3}{}",
                ours.0,
                ours.0 / iops.max(1.0),
                ours.1,
                if ours.2 > 0 { format!("  ({} engine errors)", ours.2) } else { String::new() }
            ),
            Err(why) => {
                println!("{rw:>10} {bs:>8} {qd:>4} {:>14.0} {:>14} {:>8}   {:>10.3}  # {why}", ours.0, "-", "-", ours.1)
            }
        }
    }
    e.unregister_memory(local.start())?;
    Ok(())
}
