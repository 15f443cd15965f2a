//! The cxl transport through engines: upstream's descriptor shape both ways (a JSON fixture of upstream's encoder,
//! and our descriptor checked with upstream's decoding rules), engines of one process and of two processes
//! mapping the same file, stale and dead peers, and the flush mode.
//!
//! Every test maps one file-backed region (`MC_CXL_DEV_PATH`, set once for the whole binary and inherited by the
//! child processes it starts).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mooncake::{
    AllocOptions, Allocation, EngineConfig, Error, LocalRange, MemoryDevice, Opcode, RemoteSegment, SegmentDescriptor,
    TransferEngine,
};
use mooncake_device_cxl::CxlDevice;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CHILD_ENV: &str = "MC_CXL_TEST_CHILD";

/// Tests of this binary that call setup() (the child roles run in other processes): the last to finish removes
/// the region.
const TESTS: usize = 5;

/// The region file every engine of this binary maps (created on first use; a child inherits its parent's), and a
/// guard the test holds. Regions of earlier runs whose process is gone are removed first.
fn setup() -> Done {
    static S: OnceLock<(PathBuf, bool)> = OnceLock::new();
    let (path, owned) = S.get_or_init(|| {
        mooncake::link_all();
        mooncake_transport_cxl::link();
        if let Ok(p) = std::env::var("MC_CXL_DEV_PATH") {
            return (PathBuf::from(p), false);
        }
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        for old in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("mc-cxl-transport-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(old.path());
                }
            }
        }
        let dir = base.join(format!("mc-cxl-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("region");
        std::fs::File::create(&path).unwrap().set_len(256 * MIB).unwrap();
        // SAFETY: set once, before any engine or device of this binary reads the environment (every test calls
        // setup() first, and the OnceLock makes the others wait).
        unsafe { std::env::set_var("MC_CXL_DEV_PATH", &path) };
        (path, true)
    });
    Done { path, owned: *owned }
}

/// Counts finished tests; the last removes the region's directory (when this process made it).
struct Done {
    path: &'static Path,
    owned: bool,
}

impl Done {
    fn path(&self) -> &'static Path {
        self.path
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        static FINISHED: AtomicUsize = AtomicUsize::new(0);
        if self.owned && FINISHED.fetch_add(1, Ordering::AcqRel) + 1 == TESTS {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn engine() -> TransferEngine {
    assert!(std::env::var_os("MC_CXL_DEV_PATH").is_some(), "call setup() first");
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["cxl"])).unwrap()
}

fn device(e: &TransferEngine) -> Arc<dyn MemoryDevice> {
    e.devices().iter().find(|d| d.name() == "cxl").expect("the cxl device is usable").clone()
}

fn base() -> u64 {
    CxlDevice::shared().unwrap().region().base()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(0x9E37_79B9) ^ seed.wrapping_mul(131)) as u8).collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn read_all(dev: &Arc<dyn MemoryDevice>, a: &Allocation) -> Vec<u8> {
    let mut v = vec![0u8; a.len as usize];
    dev.copy_to_host(a, 0, &mut v).unwrap();
    v
}

/// `(cxl_name, cxl_base_addr, [(name, offset, length)])` as upstream decodes them.
type UpstreamCxlSegment = (String, u64, Vec<(String, u64, u64)>);

/// What upstream's `TransferMetadata::decodeSegmentDesc` does with a `cxl` segment (transfer_metadata.cpp), strict
/// about the JSON types jsoncpp's `asString` / `asUInt64` accept: `(cxl_name, cxl_base_addr, [(name, offset,
/// length)])`, or why upstream would call the descriptor corrupted.
fn upstream_decode(v: &Value) -> Result<UpstreamCxlSegment, String> {
    let s = |v: &Value, what: &str| v.as_str().map(str::to_string).ok_or(format!("{what} is not a string: {v}"));
    let u = |v: &Value, what: &str| v.as_u64().ok_or(format!("{what} is not an unsigned integer: {v}"));
    s(&v["name"], "name")?;
    if v["protocol"] != "cxl" {
        return Err(format!("protocol {} is not \"cxl\"", v["protocol"]));
    }
    if !(v["tcp_data_port"].is_null() || v["tcp_data_port"].is_i64()) {
        return Err("tcp_data_port is not an integer".into());
    }
    let name = s(&v["cxl_name"], "cxl_name")?;
    let base = u(&v["cxl_base_addr"], "cxl_base_addr")?;
    let mut buffers = Vec::new();
    for b in v["buffers"].as_array().ok_or("buffers is not an array")? {
        let (n, off, len) = (s(&b["name"], "buffer name")?, u(&b["offset"], "offset")?, u(&b["length"], "length")?);
        if n.is_empty() || len == 0 {
            return Err(format!("corrupted buffer {b}"));
        }
        buffers.push((n, off, len));
    }
    Ok((name, base, buffers))
}

#[test]
fn our_descriptor_is_what_upstream_decodes() {
    let done = setup();
    let path = done.path();
    let e = engine();
    let dev = device(&e);
    let a = dev.allocate(MIB + 100, &AllocOptions::default()).unwrap();
    e.register_allocation(&dev, &a, "*").unwrap();
    // Host memory is not in the region: a cxl-primary engine does not publish it.
    let host = mooncake::HostBuffer::zeroed(4096);
    e.register_owned(host.owned(), "cpu:0").unwrap();
    let json = e.local_descriptor().to_json();
    let v: Value = serde_json::from_str(&json).unwrap();
    let (name, b, buffers) = upstream_decode(&v).unwrap_or_else(|why| panic!("{why}: {json}"));
    assert_eq!(name, path.display().to_string());
    assert_eq!(b, base());
    assert_eq!(buffers, vec![("cxl:0".to_string(), a.addr - base(), MIB + 100)], "{json}");
    // Our decoder addresses the buffer by its offset.
    let d = SegmentDescriptor::from_json(json.as_bytes()).unwrap();
    assert_eq!(d.buffers[0].addr, a.addr - base());
    assert!(d.locate(a.addr - base() + MIB, 100).is_some());
    e.unregister_memory(a.addr).unwrap();
    e.unregister_memory(host.addr()).unwrap();
    dev.free(&a).unwrap();
}

#[test]
fn upstreams_descriptor_decodes_and_its_buffers_are_reached_by_offset() {
    let done = setup();
    let path = done.path();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream_cxl_segment.json"))
            .unwrap();
    let d = SegmentDescriptor::from_json(text.as_bytes()).unwrap();
    assert_eq!((d.buffers[0].addr, d.buffers[1].addr), (2 * MIB, 8 * MIB));
    assert_eq!(d.locate(8 * MIB + 100, 1000).map(|b| b.length), Some(65536));
    let s = d.section::<mooncake_transport_cxl::section::CxlSegment>().unwrap().unwrap();
    assert_eq!((s.name.as_str(), s.base_addr, s.region_id, s.owner), ("/dev/dax0.0", 139637976727552, None, None));

    // The same shape naming our region and a real allocation: an upstream peer sharing our device.
    let e = engine();
    let dev = device(&e);
    let theirs = dev.allocate(64 * 1024, &AllocOptions::default()).unwrap();
    let off = theirs.addr - base();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["cxl_name"] = path.display().to_string().into();
    v["buffers"] = serde_json::json!([{"name": "10.0.0.7:15123", "offset": off, "length": 65536},
                                      {"name": "10.0.0.7:15123", "offset": 0, "length": 4096}]);
    let seg = Arc::new(RemoteSegment {
        handle: 0,
        name: "10.0.0.7:15123".into(),
        host: "10.0.0.7".into(),
        descriptor: SegmentDescriptor::from_json(v.to_string().as_bytes()).unwrap(),
    });
    let t = e.transport("cxl").unwrap();
    assert!(t.can_reach(&seg) && t.can_reach_buffer(&seg, &seg.descriptor.buffers[0]));
    let local = mooncake::HostBuffer::from_vec(pattern(5, 65536));
    e.register_owned(local.owned(), "cpu:0").unwrap();
    let range = LocalRange::check(e.regions(), local.addr(), 65536, "local").unwrap();
    let wait = Duration::from_secs(10);
    assert_eq!(t.transfer_blocking(&seg, Opcode::Write, &range, off, wait).unwrap().unwrap(), 65536);
    assert_eq!(read_all(&dev, &theirs), pattern(5, 65536));
    dev.copy_from_host(&pattern(6, 65536), &theirs, 0).unwrap();
    assert_eq!(t.transfer_blocking(&seg, Opcode::Read, &range, off, wait).unwrap().unwrap(), 65536);
    assert_eq!(local.to_vec(), pattern(6, 65536));
    // A buffer an upstream peer claims in our header is refused; so is a range past its buffer.
    let small = LocalRange::check(e.regions(), local.addr(), 4096, "local").unwrap();
    for (what, at) in [("the region header", 0), ("past the buffer", off + 65536 - 10)] {
        match t.transfer_blocking(&seg, Opcode::Write, &small, at, wait).unwrap() {
            Err(Error::AddressNotRegistered { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // Another device is not ours to reach.
    v["cxl_name"] = "/dev/dax9.9".into();
    let other =
        RemoteSegment { descriptor: SegmentDescriptor::from_json(v.to_string().as_bytes()).unwrap(), ..(*seg).clone() };
    assert!(!t.can_reach(&other));
    // The local ranges hold their region: drop them before unregistering it.
    drop((range, small));
    e.unregister_memory(local.addr()).unwrap();
    dev.free(&theirs).unwrap();
}

#[test]
fn engines_of_one_process_move_bytes_by_offset_and_refuse_stale_or_gone_peers() {
    let _done = setup();
    let a = engine();
    let b = engine();
    let dev = device(&b);
    let buf = dev.allocate(4 * MIB, &AllocOptions::default()).unwrap();
    b.register_allocation(&dev, &buf, "*").unwrap();
    let extra = dev.allocate(4096, &AllocOptions::default()).unwrap();
    b.register_allocation(&dev, &extra, "cxl:0").unwrap();
    let local = mooncake::HostBuffer::from_vec(pattern(1, 4 * MIB as usize));
    a.register_owned(local.owned(), "cpu:0").unwrap();
    let peer = b.local_segment_name().to_string();
    let off = a.first_buffer_address(&peer).unwrap();
    assert_eq!(off, buf.addr - base());
    // Large (striped) and small transfers, both directions, sync and async.
    a.transfer_sync(&peer, Opcode::Write, local.addr(), off, 4 * MIB).unwrap();
    assert_eq!(read_all(&dev, &buf), pattern(1, 4 * MIB as usize));
    dev.copy_from_host(&pattern(2, 4 * MIB as usize), &buf, 0).unwrap();
    let h = a.open_segment(&peer).unwrap();
    let reqs: Vec<_> = (0..4u64)
        .map(|i| mooncake::TransferRequest {
            opcode: Opcode::Read,
            local_addr: local.addr() + i * MIB,
            target: h,
            remote_addr: off + i * MIB,
            length: MIB,
        })
        .collect();
    let res = a.block_on({
        let a = a.clone();
        async move { a.transfer(&reqs).await }
    });
    assert!(res.unwrap().unwrap().iter().all(|r| r.as_ref().is_ok_and(|n| *n == MIB)));
    assert_eq!(local.to_vec(), pattern(2, 4 * MIB as usize));
    // A buffer B unregistered while A's descriptor still lists it: refused by the publication table.
    let extra_off = extra.addr - base();
    a.refresh_segment(h).unwrap();
    b.unregister_memory(extra.addr).unwrap();
    match a.transfer_sync(&peer, Opcode::Write, local.addr(), extra_off, 4096) {
        Err(Error::AddressNotRegistered { context, .. }) => assert!(context.contains("unregistered"), "{context}"),
        other => panic!("{other:?}"),
    }
    // B shut down: its owner entry is retired.
    b.shutdown();
    match a.transfer_sync(&peer, Opcode::Write, local.addr(), off, 4096) {
        Err(e) if e.is_disconnect() || matches!(e, Error::Unavailable { .. } | Error::Io(_)) => {}
        other => panic!("{other:?}"),
    }
    dev.free(&buf).unwrap();
    dev.free(&extra).unwrap();
}

/// Child roles: `peer` serves a buffer from a second process; `flush` runs a round trip with MC_CXL_FLUSH=1.
#[test]
fn child() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    let _done = setup();
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    let e = engine();
    let dev = device(&e);
    let buf = dev.allocate(4 * MIB, &AllocOptions::default()).unwrap();
    dev.copy_from_host(&pattern(7, 4 * MIB as usize), &buf, 0).unwrap();
    e.register_allocation(&dev, &buf, "*").unwrap();
    match role.as_str() {
        "peer" => {
            say(format!("serving {} {} {}", e.local_segment_name(), buf.addr - base(), base()));
            for line in std::io::stdin().lock().lines() {
                match line.unwrap().as_str() {
                    "hash" => say(format!("hash {}", fnv(&read_all(&dev, &buf)))),
                    _ => return,
                }
            }
        }
        "flush" => {
            let a = engine();
            let local = mooncake::HostBuffer::from_vec(pattern(8, MIB as usize));
            a.register_owned(local.owned(), "cpu:0").unwrap();
            let peer = e.local_segment_name().to_string();
            let off = buf.addr - base();
            a.transfer_sync(&peer, Opcode::Write, local.addr(), off + 4096, MIB).unwrap();
            a.transfer_sync(&peer, Opcode::Read, local.addr(), off + 2 * MIB, MIB).unwrap();
            let ok = local.to_vec() == pattern(7, 4 * MIB as usize)[2 * MIB as usize..3 * MIB as usize]
                && read_all(&dev, &buf)[4096..4096 + MIB as usize] == pattern(8, MIB as usize)[..];
            say(format!("flush {} {ok}", CxlDevice::shared().unwrap().region().flushes()));
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn(role: &str, env: &[(&str, &str)]) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn expect(out: &mut BufReader<std::process::ChildStdout>, prefix: &str) -> Vec<String> {
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited before printing {prefix:?}");
        if let Some(at) = line.find(prefix) {
            return line[at + prefix.len()..].split_whitespace().map(str::to_string).collect();
        }
    }
}

#[test]
fn a_second_process_mapping_the_file_reads_and_writes_by_offset() {
    let _done = setup();
    let (mut child, mut out) = spawn("peer", &[]);
    let w = expect(&mut out, "serving ");
    let (segment, off, their_base): (String, u64, u64) = (w[0].clone(), w[1].parse().unwrap(), w[2].parse().unwrap());
    let e = engine();
    assert_ne!(their_base, base(), "each process maps the region at its own address (here both may coincide)");
    let local = mooncake::HostBuffer::zeroed(4 * MIB as usize);
    e.register_owned(local.owned(), "cpu:0").unwrap();
    // Read what the child wrote, by offset.
    e.transfer_sync(&segment, Opcode::Read, local.addr(), off, 4 * MIB).unwrap();
    assert_eq!(local.to_vec(), pattern(7, 4 * MIB as usize));
    // Write; the child sees the bytes in its own mapping, and so does this process's mapping of the same offset.
    local.write(0, &pattern(9, 4 * MIB as usize)).unwrap();
    e.transfer_sync(&segment, Opcode::Write, local.addr(), off, 4 * MIB).unwrap();
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(stdin, "hash").unwrap();
    stdin.flush().unwrap();
    let h: u64 = expect(&mut out, "hash ")[0].parse().unwrap();
    assert_eq!(h, fnv(&pattern(9, 4 * MIB as usize)), "the child sees what this process wrote");
    let dev = CxlDevice::shared().unwrap();
    let view = dev
        .import_handle(&mooncake::SharingHandle {
            kind: "file".into(),
            data: off.to_le_bytes().to_vec(),
            fd: Some(dev.region().fd().clone()),
            len: 4 * MIB,
        })
        .unwrap();
    let mut mine = vec![0u8; 4 * MIB as usize];
    dev.copy_to_host(&view, 0, &mut mine).unwrap();
    assert_eq!(mine, pattern(9, 4 * MIB as usize));
    dev.free(&view).unwrap();
    // The child is killed: its process is gone (same host), so transfers fail with a disconnect.
    child.kill().unwrap();
    child.wait().unwrap();
    match e.transfer_sync(&segment, Opcode::Write, local.addr(), off, 4096) {
        Err(err) if err.is_disconnect() || matches!(err, Error::Unavailable { .. } | Error::Io(_)) => {}
        other => panic!("transfer to a killed peer: {other:?}"),
    }
    e.unregister_memory(local.addr()).unwrap();
}

#[test]
fn flush_mode_moves_the_same_bytes() {
    let _done = setup();
    let (mut child, mut out) = spawn("flush", &[("MC_CXL_FLUSH", "1")]);
    let w = expect(&mut out, "flush ");
    assert_eq!(w, vec!["true".to_string(), "true".to_string()], "flush mode on, bytes right");
    let _ = child.wait();
}
