//! End-to-end tests over real loopback sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mooncake_store_rpc::{ClientOptions, PeerInfo, RpcClient, RpcError, RpcServer, ServerOptions, ServiceId};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Req {
    Echo { tag: u64, payload: ByteBuf },
    Sleep { ms: u64 },
    Bytes { len: usize },
    Panic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Resp {
    Echo { tag: u64, payload: ByteBuf },
    Slept,
    Bytes(ByteBuf),
}

type Client = RpcClient<Req, Resp>;

fn service() -> ServiceId {
    ServiceId::new("test-echo", 1)
}

/// Counts handler invocations of `Sleep`, so tests know when calls reached the server.
#[derive(Clone, Default)]
struct Started(Arc<AtomicUsize>);

impl Started {
    async fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} calls reached the server",
                self.0.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn start_with(addr: &str, options: ServerOptions, started: Started) -> RpcServer {
    let handler = move |req: Req, _peer: PeerInfo| {
        let started = started.clone();
        async move {
            match req {
                Req::Echo { tag, payload } => Resp::Echo { tag, payload },
                Req::Sleep { ms } => {
                    started.0.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Resp::Slept
                }
                Req::Bytes { len } => Resp::Bytes(ByteBuf::from(vec![7u8; len])),
                Req::Panic => panic!("handler asked to panic"),
            }
        }
    };
    RpcServer::bind_with_options(addr, service(), options, handler).await.expect("bind")
}

async fn start(started: Started) -> RpcServer {
    start_with("127.0.0.1:0", ServerOptions::default(), started).await
}

async fn connect(server: &RpcServer) -> Client {
    Client::connect(server.local_addr(), service(), ClientOptions::default()).await.expect("connect")
}

fn echo(tag: u64, len: usize) -> Req {
    let payload: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_add(tag) as u8).collect();
    Req::Echo { tag, payload: ByteBuf::from(payload) }
}

async fn check_echo(client: &Client, tag: u64, len: usize) {
    let req = echo(tag, len);
    let resp = client.call(&req).await.expect("echo call");
    let Req::Echo { payload, .. } = req else { unreachable!() };
    assert_eq!(resp, Resp::Echo { tag, payload });
}

#[tokio::test]
async fn echo_round_trip() {
    let server = start(Started::default()).await;
    let client = connect(&server).await;
    assert!(client.is_connected());
    check_echo(&client, 1, 100).await;
    check_echo(&client, 2, 0).await;
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(server.open_connections(), 1);
    server.shutdown().await;
}

async fn concurrent_calls(tasks: u64) {
    let server = start(Started::default()).await;
    let client = connect(&server).await;
    let mut handles = Vec::new();
    for tag in 0..tasks {
        let client = client.clone();
        handles.push(tokio::spawn(async move { check_echo(&client, tag, 64 + (tag as usize % 200)).await }));
    }
    for handle in handles {
        handle.await.expect("task");
    }
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(server.open_connections(), 1, "all calls share one connection");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_calls_match_their_replies() {
    concurrent_calls(16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_calls_match_their_replies() {
    concurrent_calls(1000).await;
}

#[tokio::test]
async fn slow_handler_times_out_and_the_pending_entry_is_removed() {
    let started = Started::default();
    let server = start(started.clone()).await;
    let client = connect(&server).await;

    let t0 = Instant::now();
    let err = client.call_with_timeout(&Req::Sleep { ms: 300 }, Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(err, RpcError::Timeout { after: Duration::from_millis(50) });
    assert!(err.may_have_executed());
    assert!(t0.elapsed() < Duration::from_millis(250), "timed out after {:?}", t0.elapsed());
    assert_eq!(client.pending_calls(), 0);

    // A call whose future is dropped (cancelled by the caller) is removed too.
    let cancelled = tokio::time::timeout(Duration::from_millis(30), client.call(&Req::Sleep { ms: 300 })).await;
    assert!(cancelled.is_err());
    assert_eq!(client.pending_calls(), 0);

    // The late replies arrive and are dropped; the connection keeps working.
    started.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    check_echo(&client, 9, 10).await;
    assert!(client.is_connected());
    assert_eq!(client.pending_calls(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_pending_calls_promptly_and_new_calls_fast() {
    let started = Started::default();
    let server = start(started.clone()).await;
    let options = ClientOptions { connect_timeout: Duration::from_secs(2), ..ClientOptions::default() };
    let client = Client::connect(server.local_addr(), service(), options).await.expect("connect");

    let calls: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.call(&Req::Sleep { ms: 10_000 }).await })
        })
        .collect();
    started.wait_for(8).await;
    assert_eq!(client.pending_calls(), 8);

    let t0 = Instant::now();
    server.shutdown().await;
    for call in calls {
        let err = call.await.expect("task").unwrap_err();
        assert!(matches!(err, RpcError::Disconnected { .. }), "{err:?}");
        assert!(err.may_have_executed());
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "pending calls failed after {:?}", t0.elapsed());
    assert_eq!(client.pending_calls(), 0);
    assert!(!client.is_connected());

    let t1 = Instant::now();
    let err = client.call(&echo(1, 1)).await.unwrap_err();
    assert!(matches!(err, RpcError::ConnectFailed { .. }), "{err:?}");
    assert!(!err.may_have_executed());
    assert!(t1.elapsed() < Duration::from_millis(500), "new call took {:?}", t1.elapsed());
    println!("after shutdown: {err}");
}

#[tokio::test]
async fn same_client_reconnects_to_a_restarted_server() {
    let server = start(Started::default()).await;
    let addr = server.local_addr();
    let client = connect(&server).await;
    check_echo(&client, 1, 10).await;

    server.shutdown().await;
    assert!(client.call(&echo(2, 10)).await.is_err());

    let server = start_with(&addr.to_string(), ServerOptions::default(), Started::default()).await;
    check_echo(&client, 3, 10).await;
    assert!(client.is_connected());
    server.shutdown().await;
}

#[tokio::test]
async fn dropping_the_server_also_stops_it() {
    let server = start(Started::default()).await;
    let client = connect(&server).await;
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match client.call(&echo(1, 1)).await {
            Err(RpcError::Disconnected { .. } | RpcError::ConnectFailed { .. }) => break,
            other => assert!(Instant::now() < deadline, "server still answering: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn lazy_client_connects_on_first_call() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = Client::new_lazy(addr, service(), ClientOptions::default());
    assert!(!client.is_connected());
    let err = client.call(&echo(1, 1)).await.unwrap_err();
    assert!(matches!(&err, RpcError::ConnectFailed { reason, .. } if reason.contains("refused")), "{err:?}");

    let server = start_with(&addr.to_string(), ServerOptions::default(), Started::default()).await;
    check_echo(&client, 2, 5).await;
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_service_name_or_version_is_a_version_mismatch() {
    let server = start(Started::default()).await;
    for ours in [ServiceId::new("test-echo", 2), ServiceId::new("other", 1)] {
        let err = Client::connect(server.local_addr(), ours.clone(), ClientOptions::default()).await.unwrap_err();
        assert_eq!(err, RpcError::VersionMismatch { ours, theirs: service() });
        assert!(!err.may_have_executed());
        println!("{err}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn silent_tcp_listener_fails_within_the_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let keep = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let options = ClientOptions { connect_timeout: Duration::from_millis(300), ..ClientOptions::default() };
    let t0 = Instant::now();
    let err = Client::connect(addr, service(), options).await.unwrap_err();
    assert!(matches!(err, RpcError::Handshake { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "took {:?}", t0.elapsed());
    println!("{err}");
    keep.abort();
}

#[tokio::test]
async fn http_server_gives_a_clear_handshake_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let http = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
        }
    });
    let options = ClientOptions { connect_timeout: Duration::from_secs(5), ..ClientOptions::default() };
    let t0 = Instant::now();
    let err = Client::connect(addr, service(), options).await.unwrap_err();
    assert!(matches!(&err, RpcError::Handshake { reason, .. } if reason.contains("length prefix")), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "took {:?}", t0.elapsed());
    println!("{err}");
    http.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_payload_round_trip() {
    let server = start(Started::default()).await;
    let client = connect(&server).await;
    check_echo(&client, 42, 8 << 20).await;
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_are_refused_without_closing_the_connection() {
    // Our own limit.
    let server = start(Started::default()).await;
    let small = ClientOptions { max_frame: 1 << 20, ..ClientOptions::default() };
    let client = Client::connect(server.local_addr(), service(), small).await.expect("connect");
    let err = client.call(&echo(1, 2 << 20)).await.unwrap_err();
    assert!(matches!(err, RpcError::FrameTooLarge { max, .. } if max == 1 << 20), "{err:?}");
    assert!(!err.may_have_executed());
    // A response above the client's limit is turned into an error by the server.
    let err = client.call(&Req::Bytes { len: 2 << 20 }).await.unwrap_err();
    assert!(matches!(&err, RpcError::Remote(msg) if msg.contains("exceeds")), "{err:?}");
    check_echo(&client, 2, 100).await;
    server.shutdown().await;

    // The server's limit, learned in the handshake.
    let options = ServerOptions { max_frame: 1 << 20, ..ServerOptions::default() };
    let server = start_with("127.0.0.1:0", options, Started::default()).await;
    let client = connect(&server).await;
    let err = client.call(&echo(3, 2 << 20)).await.unwrap_err();
    assert!(matches!(err, RpcError::FrameTooLarge { max, .. } if max == 1 << 20), "{err:?}");
    check_echo(&client, 4, 100).await;
    server.shutdown().await;
}

#[tokio::test]
async fn handler_panic_is_a_remote_error_and_the_connection_survives() {
    let server = start(Started::default()).await;
    let client = connect(&server).await;
    let err = client.call(&Req::Panic).await.unwrap_err();
    assert!(matches!(&err, RpcError::Remote(msg) if msg.contains("panicked")), "{err:?}");
    check_echo(&client, 1, 10).await;
    server.shutdown().await;
}

#[tokio::test]
async fn schema_disagreements_give_typed_errors() {
    #[derive(Serialize, Deserialize)]
    enum NewerReq {
        _A,
        _B,
        _C,
        _D,
        _E,
        Unknown,
    }
    let server = start(Started::default()).await;

    // The server cannot decode the request: error response, connection stays up.
    let newer: RpcClient<NewerReq, Resp> =
        RpcClient::connect(server.local_addr(), service(), ClientOptions::default()).await.expect("connect");
    let err = newer.call(&NewerReq::Unknown).await.unwrap_err();
    assert!(matches!(&err, RpcError::Remote(msg) if msg.contains("decode")), "{err:?}");
    assert!(newer.is_connected());

    // We cannot decode the response.
    let wrong: RpcClient<Req, u64> =
        RpcClient::connect(server.local_addr(), service(), ClientOptions::default()).await.expect("connect");
    let err = wrong.call(&Req::Bytes { len: 3 }).await.unwrap_err();
    assert!(matches!(err, RpcError::Decode(_)), "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn ipv6_loopback() {
    let server = match RpcServer::bind("[::1]:0", service(), |req: Req, _peer: PeerInfo| async move {
        match req {
            Req::Echo { tag, payload } => Resp::Echo { tag, payload },
            _ => Resp::Slept,
        }
    })
    .await
    {
        Ok(server) => server,
        Err(e) => {
            eprintln!("skipping ipv6_loopback: cannot bind [::1]: {e}");
            return;
        }
    };
    assert!(server.local_addr().is_ipv6());
    let client = connect(&server).await;
    check_echo(&client, 6, 100).await;
    server.shutdown().await;
}

#[tokio::test]
async fn peer_info_reports_the_client_address() {
    let server = RpcServer::bind("127.0.0.1:0", service(), |_req: u8, peer: PeerInfo| async move {
        (peer.addr.to_string(), peer.conn_id)
    })
    .await
    .expect("bind");
    let client: RpcClient<u8, (String, u64)> =
        RpcClient::connect(server.local_addr(), service(), ClientOptions::default()).await.expect("connect");
    let (addr, conn_id) = client.call(&0).await.expect("call");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(conn_id, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn binding_a_busy_port_is_a_bind_error() {
    let server = start(Started::default()).await;
    let err = RpcServer::bind(server.local_addr(), service(), |req: u8, _peer: PeerInfo| async move { req })
        .await
        .unwrap_err();
    assert!(matches!(&err, RpcError::Bind { reason, .. } if reason.contains("in use")), "{err:?}");
    server.shutdown().await;
}

#[test]
fn client_and_server_are_shareable_across_tasks() {
    fn assert_shareable<T: Send + Sync + 'static>() {}
    assert_shareable::<Client>();
    assert_shareable::<RpcServer>();
    assert_shareable::<RpcError>();
}
