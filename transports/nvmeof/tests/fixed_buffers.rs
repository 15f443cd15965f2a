//! Registered host memory as io_uring fixed buffers: transfers give the same bytes with and without them, the
//! pages pinned for them are released when the memory is unregistered, and memory registered again afterwards
//! (new slots) moves correctly. One test per process: it reads the process's pinned-page count (`VmPin`).

use std::time::{Duration, Instant};

use mooncake::metadata_http::{HttpMetadataServer, ServerConfig};
use mooncake::transport_nvmeof::{FileSpec, register_file_segment};
use mooncake::{EngineConfig, HostBuffer, Opcode, TransferEngine};

/// Kilobytes of this process's memory pinned by the kernel (io_uring fixed buffers count there).
fn pinned_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn engine(conn: &str, fixed: &str) -> TransferEngine {
    let mut c = EngineConfig::new("127.0.0.1", conn).with_protocols(["nvmeof"]);
    c.name_with_rpc_port = true;
    c.backend.options.insert("fixed_buffers".into(), fixed.into());
    TransferEngine::new(c).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32 * 77).to_le_bytes()[2]).collect()
}

/// Writes `len` bytes from a fresh registered buffer at file offset 0 in 64 KiB requests, reads them back into
/// its second half, checks them; returns the buffer (still registered).
fn round_trip(e: &TransferEngine, seg: &str, len: u64, seed: u8) -> HostBuffer {
    let buf = HostBuffer::zeroed((2 * len + 4096) as usize);
    e.register_owned(buf.owned(), "cpu:0").unwrap();
    let base = buf.addr().next_multiple_of(4096);
    let skew = base - buf.addr();
    let data = pattern(seed, len as usize);
    buf.write(skew, &data).unwrap();
    let step = 65536u64;
    let n = len / step;
    let locals: Vec<u64> = (0..n).map(|i| base + i * step).collect();
    let remotes: Vec<u64> = (0..n).map(|i| i * step).collect();
    let lens = vec![step; n as usize];
    e.batch_transfer_sync(seg, Opcode::Write, &locals, &remotes, &lens).unwrap();
    let back: Vec<u64> = locals.iter().map(|l| l + len).collect();
    e.batch_transfer_sync(seg, Opcode::Read, &back, &remotes, &lens).unwrap();
    let mut got = vec![0u8; len as usize];
    buf.read(skew + len, &mut got).unwrap();
    assert!(got == data, "bytes read back differ (seed {seed})");
    buf
}

#[test]
fn fixed_buffers_move_the_same_bytes_and_unpin_on_unregister() {
    mooncake::link_all();
    let server = HttpMetadataServer::new(ServerConfig::new("127.0.0.1", 0)).unwrap().spawn().unwrap();
    let conn = server.url();
    let dir = tempfile::Builder::new().prefix("mc-nvmeof-fixed-").tempdir_in("/tmp").unwrap();
    let len = 16u64 << 20;
    let path = dir.path().join("f");
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    let seg = register_file_segment(&conn, "fixed", &[FileSpec::new(path.to_string_lossy(), len)]).unwrap();

    // Without fixed buffers: the same bytes.
    {
        let plain = engine(&conn, "0");
        let buf = round_trip(&plain, &seg, len, 1);
        plain.unregister_memory(buf.addr()).unwrap();
        plain.shutdown();
    }

    let e = engine(&conn, "1");
    let before = pinned_kb();
    let buf = round_trip(&e, &seg, len, 2);
    let pinned = pinned_kb();
    if pinned == before {
        // Kernels that do not count io_uring buffers in VmPin (or refuse sparse tables): nothing more to see.
        eprintln!("VmPin did not change ({before} kB): not checking the release");
        e.unregister_memory(buf.addr()).unwrap();
        return;
    }
    assert!(pinned >= before + 2 * len / 1024, "the registered buffer is pinned: {before} -> {pinned} kB");
    e.unregister_memory(buf.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pinned_kb() > pinned - 2 * len / 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(pinned_kb() <= pinned - 2 * len / 1024, "unregistering unpins: {pinned} -> {} kB", pinned_kb());
    drop(buf);

    // Memory registered afterwards (perhaps at the same address) gets fresh slots and the right bytes.
    for seed in 3..6 {
        let buf = round_trip(&e, &seg, len, seed);
        e.unregister_memory(buf.addr()).unwrap();
    }
    e.shutdown();
}
