//! Wire-level tests of the server and the lane client, without an engine.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{
    Batch, BlockingRequest, Error, LocalRange, Location, Opcode, PeerEvents, PieceDone, RegionTable, TransferState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{LaneConfig, PeerInfo, PeerPool, Piece};
use crate::wire::{self, Header};
use crate::{server, wire::HEADER_LEN};

struct Quiet;
impl PeerEvents for Quiet {
    fn peer_failed(&self, _: &str) {}
}

/// A registered heap buffer that outlives the test's server.
struct Registered {
    buf: Vec<u8>,
}

impl Registered {
    fn new(len: usize, regions: &RegionTable) -> Self {
        let buf: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        // SAFETY: the vector's heap block stays allocated (and is only read by the test while no request
        // writes it) for as long as the test's server serves this table: each test keeps `Registered` alive
        // until its last request finished.
        unsafe { regions.insert(buf.as_ptr() as u64, len as u64, Location::Cpu(Some(0))) }.unwrap();
        Registered { buf }
    }
    fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }
}

/// The local side of a request in these tests: a test buffer, unregistered, vouched for.
fn vouched(addr: u64, len: u64) -> LocalRange {
    // SAFETY: every test keeps its local buffers alive, and reads them only after the requests using them
    // finished (it waits for each batch or blocking call before looking at or dropping the buffer).
    unsafe { LocalRange::vouched(addr, len) }
}

async fn start_server(regions: Arc<RegionTable>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = server::bind("127.0.0.1").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (port, tokio::spawn(server::serve(listener, regions)))
}

async fn raw(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

async fn status(s: &mut TcpStream) -> u32 {
    let mut w = [0u8; 8];
    s.read_exact(&mut w).await.unwrap();
    wire::decode_status(w).unwrap()
}

/// A v2 read of 16 bytes through a fresh raw connection: proves the server still serves.
async fn still_serves(port: u16, mem: &Registered) {
    let mut s = raw(port).await;
    s.write_all(&Header { size: 16, addr: mem.addr(), opcode: Opcode::Read, v2: true }.encode()).await.unwrap();
    assert_eq!(status(&mut s).await, wire::STATUS_OK);
    let mut got = [0u8; 16];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, &mem.buf[..16]);
}

async fn expect_closed(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.expect("server must close, not hang");
    assert!(matches!(r, Ok(0) | Err(_)), "connection should be closed, got {r:?}");
}

#[tokio::test]
async fn server_binds_exactly_the_given_host() {
    let listener = server::bind("127.0.0.1").await.unwrap();
    assert_eq!(listener.local_addr().unwrap().ip().to_string(), "127.0.0.1");
    assert!(matches!(server::bind("no-such-host.invalid").await, Err(Error::InvalidArgument(_))));
}

#[tokio::test]
async fn v1_and_v2_reads_and_writes_pipelined_on_one_connection() {
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(1 << 16, &regions);
    let (port, _srv) = start_server(regions.clone()).await;
    let mut s = raw(port).await;
    // Pipeline: v2 write, v1 write, v2 read, v1 read, all sent before reading anything.
    let mut out = Vec::new();
    out.extend_from_slice(&Header { size: 4, addr: mem.addr(), opcode: Opcode::Write, v2: true }.encode());
    out.extend_from_slice(b"ABCD");
    out.extend_from_slice(&Header { size: 2, addr: mem.addr() + 4, opcode: Opcode::Write, v2: false }.encode());
    out.extend_from_slice(b"EF");
    out.extend_from_slice(&Header { size: 6, addr: mem.addr(), opcode: Opcode::Read, v2: true }.encode());
    out.extend_from_slice(&Header { size: 3, addr: mem.addr() + 1, opcode: Opcode::Read, v2: false }.encode());
    s.write_all(&out).await.unwrap();
    assert_eq!(status(&mut s).await, wire::STATUS_OK); // write v2
    assert_eq!(status(&mut s).await, wire::STATUS_OK); // read v2
    let mut six = [0u8; 6];
    s.read_exact(&mut six).await.unwrap();
    assert_eq!(&six, b"ABCDEF");
    let mut three = [0u8; 3];
    s.read_exact(&mut three).await.unwrap();
    assert_eq!(&three, b"BCD");
}

#[tokio::test]
async fn bad_requests_close_only_their_connection() {
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(4096, &regions);
    let (port, _srv) = start_server(regions.clone()).await;
    let before = mem.buf.clone();

    // Malformed opcode.
    let mut s = raw(port).await;
    let mut h = Header { size: 8, addr: mem.addr(), opcode: Opcode::Read, v2: true }.encode();
    h[16] = 0x05;
    s.write_all(&h).await.unwrap();
    expect_closed(&mut s).await;
    still_serves(port, &mem).await;

    // Out-of-range read v2: rejection status, connection stays usable.
    let mut s = raw(port).await;
    s.write_all(&Header { size: 4097, addr: mem.addr(), opcode: Opcode::Read, v2: true }.encode()).await.unwrap();
    assert_eq!(status(&mut s).await, wire::STATUS_REJECTED);
    s.write_all(&Header { size: 1, addr: mem.addr(), opcode: Opcode::Read, v2: true }.encode()).await.unwrap();
    assert_eq!(status(&mut s).await, wire::STATUS_OK);

    // Out-of-range write v2: payload drained, rejected, memory untouched, connection usable.
    let mut s = raw(port).await;
    s.write_all(&Header { size: 8, addr: mem.addr() + 4092, opcode: Opcode::Write, v2: true }.encode()).await.unwrap();
    s.write_all(&[0xEE; 8]).await.unwrap();
    assert_eq!(status(&mut s).await, wire::STATUS_REJECTED);
    assert_eq!(mem.buf, before);

    // Overflowing address, zero size, address below the buffer: rejected.
    for (addr, size) in [(u64::MAX - 3, 8), (mem.addr(), 0), (mem.addr() - 1, 2), (8, 8)] {
        let mut s = raw(port).await;
        s.write_all(&Header { size, addr, opcode: Opcode::Read, v2: true }.encode()).await.unwrap();
        assert_eq!(status(&mut s).await, wire::STATUS_REJECTED, "{addr:#x}+{size}");
    }

    // v1 rejection has no status: the connection is closed.
    let mut s = raw(port).await;
    s.write_all(&Header { size: 8, addr: 8, opcode: Opcode::Read, v2: false }.encode()).await.unwrap();
    expect_closed(&mut s).await;

    // Huge rejected write: not drained, status then close.
    let mut s = raw(port).await;
    s.write_all(&Header { size: 1 << 40, addr: 8, opcode: Opcode::Write, v2: true }.encode()).await.unwrap();
    assert_eq!(status(&mut s).await, wire::STATUS_REJECTED);
    expect_closed(&mut s).await;

    // Peer disconnects mid-payload and mid-header.
    let mut s = raw(port).await;
    s.write_all(&Header { size: 1024, addr: mem.addr(), opcode: Opcode::Write, v2: true }.encode()).await.unwrap();
    s.write_all(&[1; 100]).await.unwrap();
    drop(s);
    let mut s = raw(port).await;
    s.write_all(&[0u8; HEADER_LEN / 2]).await.unwrap();
    drop(s);
    // A stray HTTP request is a bad opcode or a rejected range: never served memory.
    let mut s = raw(port).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut any = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut any)).await;
    assert!(any.len() <= 8, "no memory may be served to garbage: got {} bytes", any.len());

    still_serves(port, &mem).await;
    assert_eq!(&mem.buf[100..], &before[100..], "only the partially written prefix may change");
}

fn pool(port: u16, v2: bool, lanes: usize) -> PeerPool {
    PeerPool::new(
        PeerInfo { name: format!("127.0.0.1:{port}"), host: "127.0.0.1".into(), port, v2 },
        lanes,
        &LaneConfig { connect_timeout: Duration::from_secs(5) },
        &tokio::runtime::Handle::current(),
        Arc::new(Quiet),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_pipeline_many_requests_both_framings() {
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(1 << 20, &regions);
    let (port, _srv) = start_server(regions.clone()).await;
    for v2 in [true, false] {
        // v1 writes are never acknowledged: only requests on the same connection are ordered after
        // them, so v1 uses one lane here; v2 spreads over three.
        let p = pool(port, v2, if v2 { 3 } else { 1 });
        let src: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 251) as u8 ^ u8::from(v2)).collect();
        let n = 256;
        let chunk = (1 << 20) / n;
        let batch = Batch::new(n);
        batch.reserve(n).unwrap();
        for i in 0..n {
            let off = (i * chunk) as u64;
            let piece = Piece {
                opcode: Opcode::Write,
                local: vouched(src.as_ptr() as u64 + off, chunk as u64),
                remote: mem.addr() + off,
                len: chunk as u64,
                done: PieceDone::Whole(batch.completion(i)),
                attempts: 0,
            };
            p.send(piece, None);
        }
        tokio::time::timeout(Duration::from_secs(30), batch.wait()).await.unwrap();
        assert_eq!(batch.overall().state, TransferState::Completed);
        let mut back = vec![0u8; 1 << 20];
        let rb = Batch::new(n);
        rb.reserve(n).unwrap();
        for i in 0..n {
            let off = (i * chunk) as u64;
            p.send(
                Piece {
                    opcode: Opcode::Read,
                    local: vouched(back.as_mut_ptr() as u64 + off, chunk as u64),
                    remote: mem.addr() + off,
                    len: chunk as u64,
                    done: PieceDone::Whole(rb.completion(i)),
                    attempts: 0,
                },
                None,
            );
        }
        tokio::time::timeout(Duration::from_secs(30), rb.wait()).await.unwrap();
        assert_eq!(rb.overall().state, TransferState::Completed);
        assert!(back == src, "v2={v2}: read-back differs");
        assert!(mem.buf == src, "v2={v2}: remote memory differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_fails_one_request_and_the_lane_goes_on() {
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(4096, &regions);
    let (port, _srv) = start_server(regions.clone()).await;
    let p = pool(port, true, 1);
    let mut local = vec![0u8; 4096];
    let batch = Batch::new(3);
    batch.reserve(3).unwrap();
    let reqs = [(mem.addr(), 16u64), (mem.addr() + 4090, 16), (mem.addr() + 16, 16)];
    for (i, (remote, len)) in reqs.into_iter().enumerate() {
        p.send(
            Piece {
                opcode: Opcode::Read,
                local: vouched(local.as_mut_ptr() as u64 + (i as u64) * 16, len),
                remote,
                len,
                done: PieceDone::Whole(batch.completion(i)),
                attempts: 0,
            },
            None,
        );
    }
    tokio::time::timeout(Duration::from_secs(10), batch.wait()).await.unwrap();
    assert_eq!(batch.status(0).unwrap().state, TransferState::Completed);
    assert!(matches!(batch.status(1).unwrap().error, Some(Error::RemoteRejected { .. })));
    assert_eq!(batch.status(2).unwrap().state, TransferState::Completed);
    assert_eq!(&local[32..48], &mem.buf[16..32]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_fails_requests_without_hanging_and_reconnects_after_restart() {
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(1 << 20, &regions);
    let (port, srv) = start_server(regions.clone()).await;
    let p = pool(port, true, 2);
    let mut local = vec![0u8; 1 << 20];
    let one = |p: &PeerPool, local: &mut Vec<u8>| {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        p.send(
            Piece {
                opcode: Opcode::Read,
                local: vouched(local.as_mut_ptr() as u64, 1 << 20),
                remote: mem.addr(),
                len: 1 << 20,
                done: PieceDone::Whole(b.completion(0)),
                attempts: 0,
            },
            None,
        );
        b
    };
    let b = one(&p, &mut local);
    tokio::time::timeout(Duration::from_secs(10), b.wait()).await.unwrap();
    assert_eq!(b.overall().state, TransferState::Completed);
    // Kill the server (listener and every connection).
    srv.abort();
    let _ = srv.await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = one(&p, &mut local);
    tokio::time::timeout(Duration::from_secs(10), b.wait()).await.expect("must not hang");
    assert!(b.overall().error.is_some_and(|e| e.is_disconnect()), "{:?}", b.overall());
    // Restart on the same port: the pool reconnects.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _srv2 = tokio::spawn(server::serve(listener, regions.clone()));
    let b = one(&p, &mut local);
    tokio::time::timeout(Duration::from_secs(10), b.wait()).await.unwrap();
    assert_eq!(b.overall().state, TransferState::Completed, "{:?}", b.overall());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_path_round_trips_rejects_and_survives_a_restart() {
    use crate::direct::{DirectPool, Request};
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(8192, &regions);
    let (port, srv) = start_server(regions.clone()).await;
    let info = PeerInfo { name: format!("127.0.0.1:{port}"), host: "127.0.0.1".into(), port, v2: true };
    let pool = Arc::new(DirectPool::default());
    let t = Duration::from_secs(5);
    let src: Vec<u8> = (0..4096).map(|i| (i % 13) as u8).collect();
    let mut back = vec![0u8; 4096];
    let (s, b) = (src.as_ptr() as u64, back.as_mut_ptr() as u64);
    let remote = mem.addr();
    // One request on a blocking thread.
    let run = |op: Opcode, local: u64, remote: u64| {
        let (p, i) = (pool.clone(), info.clone());
        tokio::task::spawn_blocking(move || {
            let local = vouched(local, 4096);
            p.transfer(&i, Request { op, local: &local, remote }, t, t)
        })
    };
    run(Opcode::Write, s, remote).await.unwrap().unwrap();
    run(Opcode::Read, b, remote).await.unwrap().unwrap();
    assert_eq!(back, src);
    let e = run(Opcode::Read, b, remote + 8000).await.unwrap();
    assert!(matches!(e, Err(Error::RemoteRejected { .. })), "{e:?}");
    // Kill the server: a typed error, no hang.
    srv.abort();
    let _ = srv.await;
    let e = run(Opcode::Read, b, remote).await.unwrap();
    assert!(matches!(e, Err(Error::RemoteDisconnected { .. })), "{e:?}");
    // Restart on the same port: the stale pooled connection is replaced transparently.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _srv2 = tokio::spawn(server::serve(listener, regions.clone()));
    run(Opcode::Read, b, remote).await.unwrap().unwrap();
    assert_eq!(back, src);
}

/// Runs `DirectPool::transfer_many` on a blocking thread.
async fn many(
    pool: &Arc<crate::direct::DirectPool>,
    info: &PeerInfo,
    op: Opcode,
    requests: Vec<(u64, u64, u64)>,
) -> Vec<mooncake_core::Result<u64>> {
    let requests: Vec<BlockingRequest> = requests
        .into_iter()
        .map(|(local_addr, remote_addr, length)| BlockingRequest { local: vouched(local_addr, length), remote_addr })
        .collect();
    let (pool, info) = (pool.clone(), info.clone());
    let t = Duration::from_secs(5);
    tokio::task::spawn_blocking(move || pool.transfer_many(&info, op, &requests, t, t)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_batches_pipeline_both_framings_and_fail_only_bad_requests() {
    use crate::direct::DirectPool;
    let regions = Arc::new(RegionTable::new());
    let mem = Registered::new(64 << 10, &regions);
    let (port, srv) = start_server(regions.clone()).await;
    let pool = Arc::new(DirectPool::default());
    for v2 in [true, false] {
        let info = PeerInfo { name: format!("127.0.0.1:{port}"), host: "127.0.0.1".into(), port, v2 };
        // 32 distinct 1 KiB pieces written, then read back into another buffer.
        let src: Vec<u8> = (0..32 * 1024).map(|i| (i % 251) as u8 ^ u8::from(v2)).collect();
        let mut back = vec![0u8; src.len()];
        let piece = |base: u64, k: usize| (base + (k as u64) * 1024, mem.addr() + (k as u64) * 2048, 1024);
        let writes: Vec<_> = (0..32).map(|k| piece(src.as_ptr() as u64, k)).collect();
        let reads: Vec<_> = (0..32).map(|k| piece(back.as_mut_ptr() as u64, k)).collect();
        let results = many(&pool, &info, Opcode::Write, writes).await;
        assert!(results.iter().all(|r| matches!(r, Ok(1024))), "{results:?}");
        let results = many(&pool, &info, Opcode::Read, reads.clone()).await;
        assert!(results.iter().all(|r| matches!(r, Ok(1024))), "{results:?}");
        assert_eq!(back, src);
        if v2 {
            // One piece outside the registered range fails alone; its neighbours are read.
            back.fill(0);
            let mut with_bad = reads.clone();
            with_bad[5].1 = mem.addr() + (64 << 10) - 100;
            let results = many(&pool, &info, Opcode::Read, with_bad).await;
            assert!(matches!(results[5], Err(Error::RemoteRejected { .. })), "{:?}", results[5]);
            for (k, r) in results.iter().enumerate().filter(|(k, _)| *k != 5) {
                assert!(matches!(r, Ok(1024)), "piece {k}: {r:?}");
                assert_eq!(&back[k * 1024..(k + 1) * 1024], &src[k * 1024..(k + 1) * 1024]);
            }
        }
    }
    // The server dies: every piece fails with a typed error, no hang; after a restart on the same port the
    // stale pooled connections are replaced without an error.
    srv.abort();
    let _ = srv.await;
    let info = PeerInfo { name: format!("127.0.0.1:{port}"), host: "127.0.0.1".into(), port, v2: true };
    let mut back = vec![0u8; 4 * 1024];
    let reads: Vec<_> = (0..4).map(|k| (back.as_mut_ptr() as u64 + k * 1024, mem.addr() + k * 1024, 1024)).collect();
    let results = many(&pool, &info, Opcode::Read, reads.clone()).await;
    assert!(results.iter().all(|r| matches!(r, Err(Error::RemoteDisconnected { .. }))), "{results:?}");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _srv2 = tokio::spawn(server::serve(listener, regions.clone()));
    let results = many(&pool, &info, Opcode::Read, reads).await;
    assert!(results.iter().all(|r| matches!(r, Ok(1024))), "{results:?}");
    assert_eq!(&back[..], &mem.buf[..4 * 1024]);
}

/// Where the client connects: upstream's usable `tcp_data_host`, else the engine's host for the
/// segment; a segment without `tcp_data_port` does not serve tcp, a malformed one is a typed error.
#[test]
fn peer_info_comes_from_the_tcp_section() {
    use mooncake_core::{RemoteSegment, SegmentDescriptor};

    let t = crate::TcpTransport::new(crate::TcpConfig::from_backend(&Default::default()));
    let target = |json: &str| RemoteSegment {
        handle: 1,
        name: "peer:1".into(),
        host: "engine-host".into(),
        descriptor: SegmentDescriptor::from_json(json.as_bytes()).unwrap(),
    };
    let info = t
        .peer_info(&target(r#"{"name":"peer:1","protocol":"tcp","tcp_data_port":9,"tcp_data_host":" 10.0.0.5 ","tcp_proto_version":2,"buffers":[]}"#))
        .unwrap();
    assert_eq!((info.host.as_str(), info.port, info.v2), ("10.0.0.5", 9, t.config.proto_version >= 2));
    let info = t
        .peer_info(&target(
            r#"{"name":"peer:1","protocol":"tcp","tcp_data_port":9,"tcp_data_host":"0.0.0.0","buffers":[]}"#,
        ))
        .unwrap();
    assert_eq!((info.host.as_str(), info.v2), ("engine-host", false), "wildcard host, v1 when no version");
    let e = t.peer_info(&target(r#"{"name":"peer:1","protocol":"rdma","buffers":[]}"#)).unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    let e = t.peer_info(&target(r#"{"name":"peer:1","protocol":"tcp","tcp_data_port":-9,"buffers":[]}"#)).unwrap_err();
    assert!(matches!(&e, Error::MalformedJson(m) if m.contains("tcp_data_port")), "{e}");
}
