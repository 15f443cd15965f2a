//! The master service end to end on 127.0.0.1: RPC requests through `mooncake-store-rpc`, the tick
//! timer, and the admin HTTP endpoints with upstream's paths and formats.

use std::io::{Read, Write};
use std::time::Duration;

use mooncake_store_core::master::PingOutcome;
use mooncake_store_core::protocol::{Request, Response};
use mooncake_store_core::types::{ClientId, ErrorCode, MasterConfig, ReplicateConfig, Segment};
use mooncake_store_master::{MasterService, ServiceConfig, service_id};
use mooncake_store_rpc::{ClientOptions, RpcClient};

fn config() -> ServiceConfig {
    ServiceConfig {
        rpc_addr: "127.0.0.1:0".into(),
        admin_addr: Some("127.0.0.1:0".into()),
        tick_interval: Duration::from_millis(20),
        seed: 7,
        ..Default::default()
    }
}

/// A plain HTTP/1.0 GET: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn segment(name: &str, size: u64) -> Segment {
    Segment {
        name: name.into(),
        transport_endpoint: format!("{name}-engine"),
        base: 0x1000_0000,
        size,
        host: "node".into(),
        protocol: "tcp".into(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn rpc_requests_and_admin_endpoints() {
    let service = MasterService::start(config()).await.unwrap();
    let rpc: RpcClient<Request, Response> =
        RpcClient::connect(service.rpc_addr(), service_id(), ClientOptions::default()).await.unwrap();
    let client = ClientId(0xabc);

    // Unknown client: remount.
    assert_eq!(rpc.call(&Request::Ping { client }).await.unwrap(), Response::Ping(PingOutcome::NeedRemount));
    let r = rpc.call(&Request::MountSegment { client, segment: segment("seg-a", 1 << 20) }).await.unwrap();
    assert_eq!(r, Response::Done(Ok(())));
    assert_eq!(rpc.call(&Request::Ping { client }).await.unwrap(), Response::Ping(PingOutcome::Ok));
    let r = rpc.call(&Request::MountSegment { client: ClientId(2), segment: segment("seg-a", 1 << 20) }).await;
    assert_eq!(r.unwrap(), Response::Done(Err(ErrorCode::SegmentAlreadyExists)));

    // A batch of puts: one round trip, one result per key (the oversized one fails alone).
    let items = vec![("k1".to_string(), 4096), ("k2".to_string(), 8192), ("huge".to_string(), 1 << 30)];
    let config = ReplicateConfig::default();
    let Response::Placed(placed) = rpc.call(&Request::PutStart { client, items, config, upsert: false }).await.unwrap()
    else {
        panic!("PutStart answered with the wrong kind")
    };
    assert_eq!(placed.len(), 3);
    assert_eq!(placed[0].as_ref().unwrap()[0].transport_endpoint, "seg-a-engine");
    assert_eq!(placed[0].as_ref().unwrap()[0].len, 4096);
    assert_eq!(placed[2], Err(ErrorCode::NoAvailableHandle));
    let keys = vec!["k1".to_string(), "k2".to_string()];
    let r = rpc.call(&Request::PutEnd { client, keys: keys.clone() }).await.unwrap();
    assert_eq!(r, Response::PerKey(vec![Ok(()), Ok(())]));

    let probe = vec!["k1".to_string(), "nope".to_string(), "k2".to_string()];
    let r = rpc.call(&Request::Exist { keys: probe.clone() }).await.unwrap();
    assert_eq!(r, Response::Exist(vec![Ok(true), Ok(false), Ok(true)]));
    let Response::Replicas(lists) = rpc.call(&Request::GetReplicaList { keys: probe }).await.unwrap() else {
        panic!("wrong kind")
    };
    assert_eq!(lists[0].as_ref().unwrap().1, MasterConfig::default().default_kv_lease_ttl_ms);
    assert_eq!(lists[1], Err(ErrorCode::ObjectNotFound));
    // Leased by the read above: removal without force is refused, with force it goes.
    let r = rpc.call(&Request::Remove { keys: vec!["k1".into()], force: false }).await.unwrap();
    assert_eq!(r, Response::PerKey(vec![Err(ErrorCode::ObjectHasLease)]));
    let r = rpc.call(&Request::RemoveByRegex { pattern: "^k".into(), force: true }).await.unwrap();
    assert_eq!(r, Response::Count(Ok(2)));
    let r = rpc.call(&Request::RemoveByRegex { pattern: "(".into(), force: true }).await.unwrap();
    assert_eq!(r, Response::Count(Err(ErrorCode::InvalidParams)));

    // Admin HTTP.
    let admin = service.admin_addr().unwrap();
    let key = vec![("q".to_string(), 100)];
    let config = ReplicateConfig::default();
    rpc.call(&Request::PutStart { client, items: key, config, upsert: false }).await.unwrap();
    rpc.call(&Request::PutEnd { client, keys: vec!["q".into()] }).await.unwrap();
    let admin_check = tokio::task::spawn_blocking(move || {
        let (status, body) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        assert!(body.contains("master_key_count 1\n"), "{body}");
        assert!(body.contains("master_total_capacity_bytes 1048576\n"), "{body}");
        assert!(body.contains("master_batch_put_start_requests_total 1\n"), "{body}");
        assert!(body.contains("master_put_start_requests_total 1\n"), "{body}");
        assert!(body.contains("master_remove_failures_total 1\n"), "{body}");
        let (status, body) = http_get(admin, "/health");
        assert_eq!(status, 200);
        assert!(body.contains("\"status\":\"ok\""), "{body}");
        assert_eq!(http_get(admin, "/get_all_segments"), (200, "seg-a\n".to_string()));
        let (status, body) = http_get(admin, "/query_key?key=q");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"size\":100") && body.contains("\"success\":true"), "{body}");
        let (status, body) = http_get(admin, "/query_key?key=absent");
        assert_eq!(status, 404);
        assert!(body.contains("-704") && body.contains("OBJECT_NOT_FOUND"), "{body}");
        assert_eq!(http_get(admin, "/query_key").0, 400);
    });
    admin_check.await.unwrap();
    service.shutdown().await;
}

/// A client that stops pinging is dropped after `client_ttl` by the tick timer alone, with its
/// segments; a client that comes back is told to remount.
#[tokio::test(flavor = "current_thread")]
async fn silent_clients_are_dropped_by_the_timer() {
    let mut cfg = config();
    cfg.master.client_ttl_ms = 300;
    cfg.master.client_suspect_after_ms = 100;
    let service = MasterService::start(cfg).await.unwrap();
    let rpc: RpcClient<Request, Response> =
        RpcClient::connect(service.rpc_addr(), service_id(), ClientOptions::default()).await.unwrap();
    let client = ClientId(9);
    rpc.call(&Request::MountSegment { client, segment: segment("seg-z", 1 << 20) }).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let Response::Segments(s) = rpc.call(&Request::GetAllSegments).await.unwrap() else { panic!("wrong kind") };
        if s.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the silent client's segment was never dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rpc.call(&Request::Ping { client }).await.unwrap(), Response::Ping(PingOutcome::NeedRemount));
    service.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn bad_configuration_and_busy_ports_are_typed_errors() {
    let mut cfg = config();
    cfg.master.eviction_ratio = 2.0;
    let err = MasterService::start(cfg).await.err().expect("an invalid ratio must be refused");
    assert!(err.to_string().contains("invalid master configuration"), "{err}");
    let first = MasterService::start(config()).await.unwrap();
    let mut cfg = config();
    cfg.rpc_addr = first.rpc_addr().to_string();
    let err = MasterService::start(cfg).await.err().expect("a busy port must be refused");
    assert!(err.to_string().contains("cannot serve RPC"), "{err}");
    first.shutdown().await;
}
