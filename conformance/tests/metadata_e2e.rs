//! End to end through every metadata service: an engine in a child process publishes its
//! segment, an engine here finds it by name and moves data both ways; then the metadata service
//! restarts EMPTY, transfers keep working, and both engines put their keys back by themselves so
//! that a third engine started afterwards finds the first one (no engine restarted).
//!
//! Real servers: our HTTP server, and `etcd` / `redis-server` on free 127.0.0.1 ports.

use std::time::{Duration, Instant};

use mooncake::{EngineConfig, MetadataKeys, Opcode, TransferEngine};
use mooncake_conformance::peer::{PeerArgs, PeerProcess};
use mooncake_conformance::{PeerCommand, pattern};

const SIZE: u64 = 1 << 20;
const SEED: u64 = 0x5eed;

fn free_name() -> String {
    format!("127.0.0.1:{}", mooncake_testkit::free_port())
}

fn engine(conn: &str) -> TransferEngine {
    mooncake::link_all();
    let mut config = EngineConfig::new(free_name(), conn);
    config.republish_interval = Duration::from_millis(300);
    TransferEngine::new(config).expect("starting an engine")
}

/// Reads the whole peer buffer and checks the pattern; writes a block and reads it back.
fn exchange(engine: &TransferEngine, peer: &PeerProcess, salt: u8) {
    let seg = &peer.info.segment;
    let mut buf = vec![0u8; SIZE as usize];
    // SAFETY: `buf` is unregistered at the end of this function before it is dropped, and read only between
    // the blocking transfers.
    unsafe { engine.register_memory(buf.as_mut_ptr() as u64, SIZE, "cpu:0") }.unwrap();
    let local = buf.as_ptr() as u64;
    engine.transfer_sync(seg, Opcode::Read, local, peer.info.addr, SIZE).expect("read from the peer");
    // Earlier rounds overwrote the first 64 KiB; the rest is the peer's pattern.
    assert_eq!(&buf[64 << 10..], &pattern(SEED, SIZE as usize)[64 << 10..], "bytes read from the peer");
    buf[..64 << 10].fill(salt);
    engine.transfer_sync(seg, Opcode::Write, local, peer.info.addr, 64 << 10).expect("write to the peer");
    buf[..64 << 10].fill(0);
    engine.transfer_sync(seg, Opcode::Read, local, peer.info.addr, 64 << 10).expect("read back");
    assert!(buf[..64 << 10].iter().all(|&b| b == salt), "written bytes did not come back");
    engine.unregister_memory(local).unwrap();
}

fn wait_for_key(conn: &str, key: &str) {
    let store = mooncake::registry::create_metadata(conn).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = rt.block_on(store.get(key)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{key} was not published again within 20 s after the metadata service restarted");
}

fn run(conn: &str, restart: &mut dyn FnMut()) {
    let mut args = PeerArgs::new("tcp", SIZE, SEED);
    args.metadata = conn.to_string();
    args.name = Some(free_name());
    let cmd = PeerCommand::new(env!("CARGO_BIN_EXE_mooncake-conformance"));
    let peer = PeerProcess::spawn(&cmd, &args, Duration::from_secs(30)).expect("peer process");
    assert_eq!(Some(&peer.info.segment), args.name.as_ref());

    let b = engine(conn);
    exchange(&b, &peer, 1);

    restart();
    // Cached descriptors: data keeps moving while the service is empty.
    exchange(&b, &peer, 2);
    let keys = MetadataKeys::from_env();
    wait_for_key(conn, &keys.segment(&peer.info.segment));
    wait_for_key(conn, &keys.rpc_meta(&peer.info.segment));
    wait_for_key(conn, &keys.segment(b.local_segment_name()));

    // A newcomer finds the peer through the restarted service.
    let c = engine(conn);
    exchange(&c, &peer, 3);
    c.shutdown();
    b.shutdown();
}

#[test]
fn http_service() {
    let start = |port: u16| {
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", port))
            .unwrap()
            .spawn()
            .unwrap()
    };
    let mut server = Some(start(0));
    let port = server.as_ref().unwrap().addr().port();
    let conn = server.as_ref().unwrap().url();
    run(&conn, &mut || {
        drop(server.take());
        server = Some(start(port));
    });
}

#[test]
fn etcd_service() {
    let mut etcd = mooncake_testkit::EtcdServer::start().expect("etcd");
    let conn = etcd.conn();
    run(&conn, &mut || etcd.restart(true).expect("etcd restart"));
}

#[test]
fn redis_service() {
    let mut redis = mooncake_testkit::RedisServer::start().expect("redis-server");
    let conn = redis.conn();
    run(&conn, &mut || redis.restart().expect("redis restart"));
}

#[test]
fn cluster_id_separates_key_spaces() {
    mooncake::link_all();
    let server =
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0))
            .unwrap()
            .spawn()
            .unwrap();
    let conn = server.url();
    let in_cluster = |id: &str| {
        let mut config = EngineConfig::new(free_name(), conn.as_str());
        config.cluster_id = Some(id.to_string());
        TransferEngine::new(config).expect("engine")
    };
    let a = in_cluster("prod");
    let b = in_cluster("prod");
    let other = in_cluster("staging");
    let buf = vec![7u8; 4096];
    // SAFETY: `buf` is unregistered before it is dropped and no transfer touches it.
    unsafe { a.register_memory(buf.as_ptr() as u64, 4096, "cpu:0") }.unwrap();
    // Published under mooncake/prod/ram/<name>, not under the default prefix.
    let store = mooncake::registry::create_metadata(&conn).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let name = a.local_segment_name().to_string();
    assert!(rt.block_on(store.get(&format!("mooncake/prod/ram/{name}"))).unwrap().is_some());
    assert!(rt.block_on(store.get(&format!("mooncake/ram/{name}"))).unwrap().is_none());
    assert_eq!(b.first_buffer_address(&name).unwrap(), buf.as_ptr() as u64);
    assert!(matches!(other.open_segment(&name), Err(mooncake::Error::NotFound(_))), "another cluster sees it");
    a.unregister_memory(buf.as_ptr() as u64).unwrap();
}

#[test]
fn registration_while_the_service_is_down_is_published_when_it_returns() {
    let start = |port: u16| {
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", port))
            .unwrap()
            .spawn()
            .unwrap()
    };
    let mut server = start(0);
    let port = server.addr().port();
    let conn = server.url();
    let a = engine(&conn);
    server.stop();
    let buf = vec![1u8; 8192];
    // The service is down: the registration still takes effect locally.
    // SAFETY: `buf` is unregistered before it is dropped and no transfer touches it.
    unsafe { a.register_memory(buf.as_ptr() as u64, 8192, "cpu:0") }.expect("register while the service is down");
    let _server = start(port);
    let reader = engine(&conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if reader.first_buffer_address(a.local_segment_name()).ok() == Some(buf.as_ptr() as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "registration never reached the restarted service");
        std::thread::sleep(Duration::from_millis(100));
    }
    a.unregister_memory(buf.as_ptr() as u64).unwrap();
}
