//! Interop with upstream Mooncake (the `mooncake-transfer-engine-non-cuda` wheel) over TCP:
//! P2PHANDSHAKE mode, both directions, v1 and v2 framing, verified byte for byte; and HTTP
//! metadata mode, where upstream registers through OUR metadata server and we register through
//! upstream's `mooncake_http_metadata_server`.
//!
//! Needs the wheel in a venv: `tests/interop/setup_upstream_venv.sh` (the test script runs it and
//! then these tests with `--ignored`). `MOONCAKE_UPSTREAM_PYTHON` overrides the interpreter path.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use mooncake::{EngineConfig, Error, Opcode, TransferEngine};

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xBF58_476D_1CE4_E5B9;

/// PATTERN(seed) of tests/interop/upstream_peer.py.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0u64..).flat_map(|k| (k.wrapping_mul(K1) ^ seed.wrapping_mul(K2)).to_le_bytes()).take(len).collect()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let p = std::env::var_os("MOONCAKE_UPSTREAM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/upstream-venv/bin/python"));
    assert!(p.exists(), "{} not found: run tests/interop/setup_upstream_venv.sh first", p.display());
    p
}

/// An upstream engine in a child process, killed on drop.
struct Upstream {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Upstream {
    fn spawn(args: &[String]) -> Upstream {
        let mut child = Command::new(python())
            .arg(repo().join("tests/interop/upstream_peer.py"))
            .args(args)
            .env("MC_FORCE_TCP", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start upstream peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Upstream { child, stdin, stdout }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read upstream output");
        s.trim().to_string()
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("write command");
        self.stdin.flush().expect("flush");
        self.line()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the engines find each other: P2P handshakes, or a metadata service (engine names are then
/// `127.0.0.1:<free port>`).
#[derive(Clone, Copy)]
enum Meta<'a> {
    P2p,
    Service(&'a str),
}

impl Meta<'_> {
    fn conn(&self) -> &str {
        match self {
            Meta::P2p => "P2PHANDSHAKE",
            Meta::Service(conn) => conn,
        }
    }

    fn name(&self) -> String {
        match self {
            Meta::P2p => "127.0.0.1".into(),
            Meta::Service(_) => {
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                format!("127.0.0.1:{port}")
            }
        }
    }

    /// Arguments that put an upstream peer in the same mode.
    fn upstream_args(&self) -> Vec<String> {
        match self {
            Meta::P2p => vec![],
            Meta::Service(conn) => vec!["--metadata".into(), conn.to_string(), "--host".into(), self.name()],
        }
    }
}

fn our_engine_via(version: u32, meta: Meta<'_>) -> TransferEngine {
    mooncake::link_all();
    let mut config = EngineConfig::new(meta.name(), meta.conn()).with_protocols(["tcp"]);
    config.backend.options.insert("proto".into(), version.to_string());
    TransferEngine::new(config).expect("start our engine")
}

/// Ours initiates against an upstream target: read its pattern, write ours, read back, reject OOB.
fn ours_to_upstream(version: u32, size: usize) {
    ours_to_upstream_via(version, size, Meta::P2p)
}

fn ours_to_upstream_via(version: u32, size: usize, meta: Meta<'_>) {
    let mut args: Vec<String> = vec!["target".into(), "--size".into(), size.to_string(), "--seed".into(), "7".into()];
    args.extend(meta.upstream_args());
    let mut up = Upstream::spawn(&args);
    let hello: serde_json::Value = serde_json::from_str(&up.line()).expect("target JSON line");
    let segment = hello["segment"].as_str().expect("segment").to_string();
    let addr = hello["addr"].as_u64().expect("addr");

    let ours = our_engine_via(version, meta);
    let mut local = vec![0u8; size];
    // SAFETY: `local` is unregistered at the end of this function before it is dropped, never resized, and read or
    // written only between the blocking transfers.
    unsafe { ours.register_memory(local.as_mut_ptr() as u64, size as u64, "cpu:0") }.unwrap();
    let seg = ours.segment(ours.open_segment(&segment).unwrap()).unwrap();
    let tcp = seg.descriptor.section::<mooncake::transport_tcp::TcpSection>().unwrap().expect("upstream's tcp fields");
    assert_eq!(tcp.version(), 2, "upstream publishes v2");
    assert_eq!(seg.descriptor.buffers[0].addr, addr);

    ours.transfer_sync(&segment, Opcode::Read, local.as_mut_ptr() as u64, addr, size as u64).unwrap();
    assert!(local == pattern(7, size), "v{version} {size}: bytes read from upstream differ");

    local.copy_from_slice(&pattern(9, size));
    ours.transfer_sync(&segment, Opcode::Write, local.as_ptr() as u64, addr, size as u64).unwrap();
    // A v1 write has no acknowledgement: it completes once sent, so the bytes land shortly after.
    let mut answer = up.command(&format!("check 0 {size} 9"));
    for _ in 0..50 {
        if answer == "ok" || version >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        answer = up.command(&format!("check 0 {size} 9"));
    }
    assert_eq!(answer, "ok", "v{version} {size}: upstream memory after our write");

    local.fill(0);
    ours.transfer_sync(&segment, Opcode::Read, local.as_mut_ptr() as u64, addr, size as u64).unwrap();
    assert!(local == pattern(9, size), "v{version} {size}: read-back differs");

    if version >= 2 {
        // Out of bounds: refused against upstream's published descriptor (after one refresh),
        // and the next transfer still works.
        let bad = ours.transfer_sync(&segment, Opcode::Read, local.as_mut_ptr() as u64, addr + size as u64 - 4, 8);
        assert!(matches!(bad, Err(Error::AddressNotRegistered { .. })), "{bad:?}");
        ours.transfer_sync(&segment, Opcode::Read, local.as_mut_ptr() as u64, addr, 64).unwrap();
    }
    ours.unregister_memory(local.as_mut_ptr() as u64).unwrap();
}

/// Upstream initiates against our target: it reads our pattern, writes its own, reads back.
fn upstream_to_ours(version: u32, size: usize) {
    upstream_to_ours_via(version, size, Meta::P2p)
}

fn upstream_to_ours_via(version: u32, size: usize, meta: Meta<'_>) {
    let ours = our_engine_via(version, meta);
    let mut buf = pattern(7, size);
    let addr = buf.as_mut_ptr() as u64;
    // SAFETY: `buf` is unregistered at the end of this function before it is dropped, and read only after the
    // upstream initiator exited.
    unsafe { ours.register_memory(addr, size as u64, "*") }.unwrap();
    let mut args: Vec<String> = vec![
        "initiator".into(),
        "--segment".into(),
        ours.local_segment_name().into(),
        "--remote-addr".into(),
        addr.to_string(),
        "--size".into(),
        size.to_string(),
        "--seed".into(),
        "9".into(),
        "--expect-seed".into(),
        "7".into(),
    ];
    args.extend(meta.upstream_args());
    let mut up = Upstream::spawn(&args);
    let report = up.line();
    let status = up.child.wait().expect("initiator exit");
    assert!(status.success(), "v{version} {size}: upstream initiator failed: {report}");
    let parsed: serde_json::Value = serde_json::from_str(&report).expect("initiator JSON");
    assert_eq!(parsed["ok"], true, "{report}");
    assert!(buf == pattern(9, size), "v{version} {size}: our memory after upstream's write differs");
    ours.unregister_memory(addr).unwrap();
}

#[test]
#[ignore = "needs the upstream wheel (tests/interop/setup_upstream_venv.sh); run by scripts/test.sh"]
fn ours_initiates_to_upstream_v2() {
    for size in [4096, 1 << 20, 64 << 20] {
        ours_to_upstream(2, size);
    }
}

#[test]
#[ignore = "needs the upstream wheel (tests/interop/setup_upstream_venv.sh); run by scripts/test.sh"]
fn ours_initiates_to_upstream_v1() {
    for size in [4096, 1 << 20, 16 << 20] {
        ours_to_upstream(1, size);
    }
}

#[test]
#[ignore = "needs the upstream wheel (tests/interop/setup_upstream_venv.sh); run by scripts/test.sh"]
fn upstream_initiates_to_ours_v2() {
    for size in [4096, 1 << 20, 64 << 20] {
        upstream_to_ours(2, size);
    }
}

#[test]
#[ignore = "needs the upstream wheel (tests/interop/setup_upstream_venv.sh); run by scripts/test.sh"]
fn upstream_initiates_to_ours_v1() {
    for size in [4096, 1 << 20, 16 << 20] {
        upstream_to_ours(1, size);
    }
}

#[test]
#[ignore = "needs the upstream wheel (tests/interop/setup_upstream_venv.sh); run by scripts/test.sh"]
fn upstream_registers_through_our_http_metadata_server() {
    let config = mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0);
    let server = mooncake::metadata_http::HttpMetadataServer::new(config).unwrap().spawn().unwrap();
    let conn = server.url();
    for size in [4096, 4 << 20] {
        ours_to_upstream_via(2, size, Meta::Service(&conn));
        upstream_to_ours_via(2, size, Meta::Service(&conn));
    }
    drop(server);
}

/// Upstream's own `mooncake_http_metadata_server` from the wheel, killed on drop.
struct UpstreamMetadataServer(Child);

impl Drop for UpstreamMetadataServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs the upstream wheel (tests/interop/setup_upstream_venv.sh); run by scripts/test.sh"]
fn ours_registers_through_upstream_http_metadata_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let program = python().with_file_name("mooncake_http_metadata_server");
    let child = Command::new(&program)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let _server = UpstreamMetadataServer(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "upstream metadata server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let conn = format!("http://127.0.0.1:{port}/metadata");
    for size in [4096, 4 << 20] {
        upstream_to_ours_via(2, size, Meta::Service(&conn));
        ours_to_upstream_via(2, size, Meta::Service(&conn));
    }
}
