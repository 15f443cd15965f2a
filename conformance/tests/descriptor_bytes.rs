//! The exact bytes of the segment descriptor our engines publish (docs/wire-formats.md section 2):
//! key order, which keys appear, and number formatting. Upstream ignores key order, but peers and
//! tools that cache or compare descriptors see these bytes, so they change only on purpose.
//!
//! The descriptor is read the way a peer reads it, through the handshake socket (a type-1 frame),
//! and compared with a literal template in which only the values that vary between runs (port,
//! address, timestamp, process identity) are filled in from the reply itself.

use std::io::{Read, Write};
use std::net::TcpStream;

use mooncake::{EngineConfig, TransferEngine};
use serde_json::Value;

/// The descriptor JSON `engine` serves on its handshake socket, as sent (trailing newline removed).
fn published(engine: &TransferEngine) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", engine.rpc_port())).expect("connecting to the handshake socket");
    let body = b"{}";
    s.write_all(&(1 + body.len() as u64).to_le_bytes()).unwrap();
    s.write_all(&[1]).unwrap();
    s.write_all(body).unwrap();
    let mut len = [0u8; 8];
    s.read_exact(&mut len).unwrap();
    let mut frame = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut frame).unwrap();
    assert_eq!(frame[0], 1, "reply type");
    let json = String::from_utf8(frame[1..].to_vec()).unwrap();
    json.trim_end_matches('\n').to_string()
}

fn engine(protocols: &[&str]) -> TransferEngine {
    mooncake::link_all();
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(protocols.iter().copied()))
        .expect("starting an engine")
}

/// Field `key` of `v` as it is written in JSON (strings with their quotes).
fn raw(v: &Value, key: &str) -> String {
    v.get(key).unwrap_or_else(|| panic!("{key} missing from {v}")).to_string()
}

#[test]
fn tcp_engine_descriptor_bytes() {
    let e = engine(&["tcp"]);
    let mut mem = vec![0u8; 4096];
    let addr = mem.as_mut_ptr() as u64;
    // SAFETY: `mem` outlives the registration (unregistered below) and no transfer touches it.
    unsafe { e.register_memory(addr, 4096, "cpu:0") }.unwrap();
    let json = published(&e);
    let v: Value = serde_json::from_str(&json).unwrap();
    let expected = format!(
        r#"{{"name":"{name}","protocol":"tcp","tcp_data_port":{port},"tcp_proto_version":2,"timestamp":{ts},"buffers":[{{"name":"cpu:0","addr":{addr},"length":4096}}]}}"#,
        name = e.local_segment_name(),
        port = raw(&v, "tcp_data_port"),
        ts = raw(&v, "timestamp"),
    );
    assert_eq!(json, expected);
    // Without memory the buffer list is still there, empty.
    e.unregister_memory(addr).unwrap();
    let json = published(&e);
    let v: Value = serde_json::from_str(&json).unwrap();
    let expected = format!(
        r#"{{"name":"{name}","protocol":"tcp","tcp_data_port":{port},"tcp_proto_version":2,"timestamp":{ts},"buffers":[]}}"#,
        name = e.local_segment_name(),
        port = raw(&v, "tcp_data_port"),
        ts = raw(&v, "timestamp"),
    );
    assert_eq!(json, expected);
    e.shutdown();
}

#[test]
fn shm_and_tcp_engine_descriptor_bytes() {
    let e = engine(&["shm", "tcp"]);
    let mut mem = vec![0u8; 8192];
    let (a, b) = (mem.as_mut_ptr() as u64, mem.as_mut_ptr() as u64 + 4096);
    // SAFETY: `mem` outlives the engine (shut down at the end of the test) and no transfer touches it.
    unsafe { e.register_memory(a, 4096, "cpu:0") }.unwrap();
    // SAFETY: as above.
    unsafe { e.register_memory(b, 4096, "cpu:0") }.unwrap();
    let json = published(&e);
    let v: Value = serde_json::from_str(&json).unwrap();
    let buffer = |i: usize, addr: u64| {
        let bv = &v["buffers"][i];
        format!(
            r#"{{"name":"cpu:0","addr":{addr},"length":4096,"shm_seq":{seq},"shm_slot":{slot}}}"#,
            seq = raw(bv, "shm_seq"),
            slot = raw(bv, "shm_slot"),
        )
    };
    let expected = format!(
        concat!(
            r#"{{"name":"{name}","protocol":"shm","tcp_data_port":{port},"tcp_proto_version":2,"timestamp":{ts},"#,
            r#""buffers":[{b0},{b1}],"protocols":["shm","tcp"],"shm_host_id":{host},"shm_pid":{pid},"#,
            r#""shm_start_time":{start},"shm_table_fd":{fd},"shm_table_slots":{slots},"shm_token":{token}}}"#
        ),
        name = e.local_segment_name(),
        port = raw(&v, "tcp_data_port"),
        ts = raw(&v, "timestamp"),
        b0 = buffer(0, a),
        b1 = buffer(1, b),
        host = raw(&v, "shm_host_id"),
        pid = std::process::id(),
        start = raw(&v, "shm_start_time"),
        fd = raw(&v, "shm_table_fd"),
        slots = raw(&v, "shm_table_slots"),
        token = raw(&v, "shm_token"),
    );
    assert_eq!(json, expected);
    e.shutdown();
}

/// The JSON upstream publishes (tests/interop/UPSTREAM_FACTS.md section 1, keys sorted by jsoncpp)
/// is read by our engine as before: the segment opens and its buffer is found.
#[test]
fn upstream_descriptor_reads_as_before() {
    const UPSTREAM: &str = r#"{"buffers":[{"addr":94019169706720,"length":4096,"name":"127.0.0.1:15589"}],"name":"127.0.0.1:15589","protocol":"tcp","rdma_server_name":"","tcp_data_host":"127.0.0.1","tcp_data_port":15824,"tcp_proto_version":2,"timestamp":"2026-11-21 10:50:11.849299"}"#;
    let d = mooncake::SegmentDescriptor::from_json(UPSTREAM.as_bytes()).unwrap();
    assert_eq!((d.name.as_str(), d.protocol.as_str()), ("127.0.0.1:15589", "tcp"));
    assert_eq!(d.timestamp, "2026-11-21 10:50:11.849299");
    assert!(d.find_buffer(94019169706720, 4096).is_some());
    // Every field is kept: reading our own serialization back gives the same descriptor.
    let back = mooncake::SegmentDescriptor::from_json(d.to_json().as_bytes()).unwrap();
    assert_eq!(back, d);
    let again: Value = serde_json::from_str(&d.to_json()).unwrap();
    assert_eq!(again, serde_json::from_str::<Value>(UPSTREAM).unwrap(), "no field lost or changed");
}
