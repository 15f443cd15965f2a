//! The handshake socket over real TCP on 127.0.0.1: round trips, hostile input, binding.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_core::{Error, MetadataStore, Notification, PeerRpc, RpcHandler};
use mooncake_metadata_p2p::{
    Frame, FrameType, HandshakeConfig, HandshakeRpc, NOTIFY_REPLY, P2pMetadataStore, PROBE_REPLY,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DESCRIPTOR: &str =
    r#"{"name":"127.0.0.1:1","protocol":"tcp","tcp_data_port":2,"buffers":[{"name":"cpu:0","addr":4096,"length":8}]}"#;

#[derive(Default)]
struct TestHandler {
    notes: Mutex<Vec<Notification>>,
    connections: Mutex<Vec<Value>>,
}

#[async_trait::async_trait]
impl RpcHandler for TestHandler {
    fn local_descriptor(&self) -> String {
        DESCRIPTOR.to_string()
    }

    fn on_notify(&self, notification: Notification) {
        self.notes.lock().unwrap().push(notification);
    }

    async fn on_connection(&self, request: Value) -> Value {
        self.connections.lock().unwrap().push(request.clone());
        if request.get("refuse").is_some() {
            return json!({ "reply_msg": "refused by test" });
        }
        json!({ "echo": request, "reply_msg": "" })
    }
}

fn quick_config() -> HandshakeConfig {
    HandshakeConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_millis(500),
        ..HandshakeConfig::default()
    }
}

async fn start() -> (HandshakeRpc, Arc<TestHandler>, String) {
    let rpc = HandshakeRpc::new(quick_config());
    let handler = Arc::new(TestHandler::default());
    let port = rpc.serve("127.0.0.1", 0, (15000, 17000), handler.clone()).await.unwrap();
    (rpc, handler, format!("127.0.0.1:{port}"))
}

/// Sends raw bytes, then reads until the server closes; returns what it sent back.
async fn raw(addr: &str, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.expect("server must close");
    out
}

#[tokio::test]
async fn round_trips() {
    let (rpc, handler, addr) = start().await;

    let desc = rpc.fetch_descriptor(&addr).await.unwrap();
    assert_eq!(desc, DESCRIPTOR.as_bytes());

    rpc.notify(&addr, &Notification { name: "peer-a".into(), message: "hello".into() }).await.unwrap();
    assert_eq!(
        handler.notes.lock().unwrap().as_slice(),
        [Notification { name: "peer-a".into(), message: "hello".into() }]
    );

    rpc.probe(&addr).await.unwrap();

    let reply = rpc.connect(&addr, &json!({ "qp_num": [1, 2], "local_nic_path": "a@mlx5_0" })).await.unwrap();
    assert_eq!(reply["echo"]["qp_num"], json!([1, 2]));

    let err = rpc.connect(&addr, &json!({ "refuse": true })).await.unwrap_err();
    assert!(matches!(&err, Error::Protocol(m) if m.contains("refused by test")), "{err}");
    assert_eq!(handler.connections.lock().unwrap().len(), 2);

    rpc.shutdown().await;
}

#[tokio::test]
async fn exact_reply_bytes() {
    let (rpc, _handler, addr) = start().await;

    let probe = raw(&addr, &Frame::new(FrameType::Probe, b"{}\n".to_vec()).encode(), false).await;
    assert_eq!(probe, Frame::new(FrameType::Probe, PROBE_REPLY.to_vec()).encode());

    let body = b"{\"name\":\"n\",\"notify_msg\":\"m\"}\n".to_vec();
    let notify = raw(&addr, &Frame::new(FrameType::Notify, body).encode(), false).await;
    assert_eq!(notify, Frame::new(FrameType::Notify, NOTIFY_REPLY.to_vec()).encode());

    let meta = raw(&addr, &Frame::new(FrameType::Metadata, b"{}".to_vec()).encode(), false).await;
    let mut expected = DESCRIPTOR.as_bytes().to_vec();
    expected.push(b'\n');
    assert_eq!(meta, Frame::new(FrameType::Metadata, expected).encode());

    // A legacy frame (no type byte) is a connection handshake and is answered without a type byte.
    let legacy = br#"{"local_nic_path":"x@y"}"#;
    let mut wire = (legacy.len() as u64).to_le_bytes().to_vec();
    wire.extend_from_slice(legacy);
    let reply = raw(&addr, &wire, false).await;
    let len = u64::from_le_bytes(reply[..8].try_into().unwrap()) as usize;
    assert_eq!(len, reply.len() - 8);
    assert_eq!(reply[8], b'{');
    let v: Value = serde_json::from_slice(&reply[8..]).unwrap();
    assert_eq!(v["echo"]["local_nic_path"], "x@y");

    rpc.shutdown().await;
}

#[tokio::test]
async fn hostile_input_drops_only_that_connection() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (rpc, handler, addr) = start().await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero length", 0u64.to_le_bytes().to_vec()),
        ("oversized length", (1u64 << 40).to_le_bytes().to_vec()),
        ("garbage json", Frame::new(FrameType::Notify, b"{not json".to_vec()).encode()),
        ("non-object notify", Frame::new(FrameType::Notify, b"[1,2]".to_vec()).encode()),
        ("http request", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("half a frame", Frame::new(FrameType::Metadata, b"{\"a\":1}".to_vec()).encode()[..10].to_vec()),
        ("half a prefix", vec![9, 0, 0]),
        ("type byte only", vec![1, 0, 0, 0, 0, 0, 0, 0, 1]),
    ];
    for (what, bytes) in cases {
        let reply = raw(&addr, &bytes, true).await;
        assert!(reply.is_empty(), "{what}: server must close without replying, got {reply:?}");
        rpc.probe(&addr).await.unwrap_or_else(|e| panic!("probe after {what}: {e}"));
    }
    assert!(handler.notes.lock().unwrap().is_empty());

    // A peer that connects and says nothing: the server keeps serving others meanwhile, and
    // closes the silent one after its read timeout.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    rpc.probe(&addr).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(3));

    // A peer that disconnects mid-frame without half-closing first.
    {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&(100u64).to_le_bytes()).await.unwrap();
        s.write_all(&[1, b'{']).await.unwrap();
    }
    rpc.probe(&addr).await.unwrap();

    // Many hostile connections at once do not starve a well-behaved client.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    rpc.probe(&addr).await.unwrap();
    drop(idle);

    rpc.shutdown().await;
}

#[tokio::test]
async fn binds_exactly_the_given_host() {
    let (rpc, _handler, addr) = start().await;
    let local = rpc.local_addr().unwrap();
    assert_eq!(local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!((15000..=17000).contains(&local.port()), "{local}");
    assert_eq!(addr, local.to_string());
    rpc.shutdown().await;
    assert!(rpc.local_addr().is_none());
}

#[tokio::test]
async fn fixed_port_and_busy_port() {
    let (rpc, _handler, addr) = start().await;
    let port = rpc.local_addr().unwrap().port();
    // The same port again is busy.
    let other = HandshakeRpc::new(quick_config());
    let err = other.serve("127.0.0.1", port, (0, 0), Arc::new(TestHandler::default())).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    // A range whose only port is busy falls back to an OS-chosen port.
    let fallback = other.serve("127.0.0.1", 0, (port, port), Arc::new(TestHandler::default())).await.unwrap();
    assert_ne!(fallback, port);
    other.probe(&addr).await.unwrap();
    other.probe(&format!("127.0.0.1:{fallback}")).await.unwrap();
    // Serving twice is refused.
    let err = other.serve("127.0.0.1", 0, (0, 0), Arc::new(TestHandler::default())).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    other.shutdown().await;
    rpc.shutdown().await;
}

#[tokio::test]
async fn ipv6_loopback_in_brackets() {
    let rpc = HandshakeRpc::new(quick_config());
    let port = match rpc.serve("[::1]", 0, (15000, 17000), Arc::new(TestHandler::default())).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping: no IPv6 loopback here ({e})");
            return;
        }
    };
    assert_eq!(rpc.local_addr().unwrap().ip(), "::1".parse::<IpAddr>().unwrap());
    rpc.probe(&format!("[::1]:{port}")).await.unwrap();
    rpc.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let (rpc, _handler, addr) = start().await;
    rpc.probe(&addr).await.unwrap();
    rpc.shutdown().await;
    let err = rpc.probe(&addr).await.unwrap_err();
    assert!(err.is_disconnect(), "{err}");
    rpc.shutdown().await; // idempotent
}

#[tokio::test]
async fn closed_port_is_a_quick_disconnect() {
    // Find a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let rpc = HandshakeRpc::new(quick_config());
    let started = Instant::now();
    let err = rpc.probe(&format!("127.0.0.1:{port}")).await.unwrap_err();
    assert!(err.is_disconnect(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let err = rpc.fetch_descriptor(&format!("127.0.0.1:{port}")).await.unwrap_err();
    assert!(err.is_disconnect(), "{err}");
}

#[tokio::test]
async fn silent_server_is_a_timeout() {
    // A listener that accepts and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let rpc = HandshakeRpc::new(HandshakeConfig { request_timeout: Duration::from_millis(300), ..quick_config() });
    let err = rpc.probe(&addr).await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    hold.abort();
}

#[tokio::test]
async fn bad_reply_is_a_protocol_error() {
    // A server that answers a probe with a metadata frame, then one that answers garbage JSON.
    for reply in [
        Frame::new(FrameType::Metadata, b"{}".to_vec()).encode(),
        Frame::new(FrameType::Probe, b"{oops".to_vec()).encode(),
        (1u64 << 40).to_le_bytes().to_vec(),
    ] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.write_all(&reply).await.unwrap();
            let _ = s.shutdown().await;
        });
        let err = HandshakeRpc::new(quick_config()).probe(&addr).await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_) | Error::MalformedJson(_)), "{err}");
        task.await.unwrap();
    }
}

#[tokio::test]
async fn store_fetches_remote_descriptor() {
    let (rpc, _handler, addr) = start().await;
    let store = P2pMetadataStore::new(quick_config());
    for key in [format!("mooncake/ram/{addr}"), format!("mooncake/prod/ram/{addr}")] {
        let got = store.get(&key).await.unwrap().unwrap();
        assert_eq!(got, DESCRIPTOR.as_bytes(), "{key}");
    }
    // Local keys win and are not sent over the wire.
    store.put(&format!("mooncake/ram/{addr}"), b"{\"local\":true}").await.unwrap();
    assert_eq!(store.get(&format!("mooncake/ram/{addr}")).await.unwrap().unwrap(), b"{\"local\":true}");

    rpc.shutdown().await;
    let err = store.get(&format!("mooncake/prod/ram/{addr}")).await.unwrap_err();
    assert!(err.is_disconnect(), "{err}");
}

#[test]
fn registered_in_the_core_registry() {
    let names: Vec<&str> = mooncake_core::registry::metadata_stores().iter().map(|f| f.name).collect();
    assert!(names.contains(&"p2p"), "{names:?}");
    let store = mooncake_core::registry::create_metadata(" p2phandshake ").unwrap();
    assert_eq!(store.name(), "p2p");
    assert!(!store.capabilities().shared);
    assert!(mooncake_core::registry::create_peer_rpc().is_ok());
    assert!(mooncake_metadata_p2p::accepts("P2PHANDSHAKE"));
    assert!(!mooncake_metadata_p2p::accepts("http://x/metadata"));
}
