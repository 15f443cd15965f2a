//! End-to-end tests of the synchronous `BlockingClient` over real loopback sockets.
//!
//! The server side is the async `RpcServer` on a tokio runtime owned by the test ([`TestServer`]); the client
//! is always called from the test thread or plain std threads, never from inside the runtime. Misbehaving
//! peers (not an RPC server at all, or an RPC server that breaks the protocol) are plain std `TcpListener`s.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mooncake_store_rpc::{BlockingClient, ClientOptions, PeerInfo, RpcError, RpcServer, ServerOptions, ServiceId};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::runtime::Runtime;

// ---------------------------------------------------------------------------------------------------------------
// The test service
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Req {
    /// Answered with `Resp::Echo` of the same value.
    Echo(u64),
    /// Sleeps `ms`, then answers `Resp::Slept(tag)`.
    Sleep { ms: u64, tag: u64 },
    /// Answered with `len` bytes.
    Bytes { len: usize },
    /// Answered with the same bytes.
    Blob(ByteBuf),
    /// The handler panics.
    Panic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Resp {
    Echo(u64),
    Slept(u64),
    Bytes(ByteBuf),
}

type Client = BlockingClient<Req, Resp>;

/// Upper bound for anything that should fail or finish "promptly"; generous so a loaded machine does not flake.
const PROMPTLY: Duration = Duration::from_secs(5);

fn service() -> ServiceId {
    ServiceId::new("test", 1)
}

/// Client options with a short connect timeout.
fn options() -> ClientOptions {
    ClientOptions { connect_timeout: Duration::from_secs(1), ..ClientOptions::default() }
}

/// What the handler counts, so tests can tell what reached the server.
#[derive(Default)]
struct Counters {
    /// Requests the handler started.
    requests: AtomicUsize,
    /// `Sleep` requests that finished sleeping (their reply is sent, or dropped, right after).
    sleeps_done: AtomicUsize,
}

/// Waits (up to [`PROMPTLY`]) until `counter` reaches `n`.
fn wait_for(counter: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + PROMPTLY;
    while counter.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "counter stuck at {} (waiting for {n})", counter.load(Ordering::SeqCst));
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` and returns its result with the time it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let out = f();
    (out, t0.elapsed())
}

// ---------------------------------------------------------------------------------------------------------------
// An async RpcServer on its own runtime
// ---------------------------------------------------------------------------------------------------------------

/// An `RpcServer` running on a runtime owned by the test. Dropping it shuts the server down and stops the
/// runtime, so nothing outlives the test.
struct TestServer {
    server: Option<RpcServer>,
    addr: SocketAddr,
    counters: Arc<Counters>,
    // Declared last: dropped after `Drop::drop` has shut the server down on it.
    rt: Runtime,
}

impl TestServer {
    /// The test service on 127.0.0.1 (any port) with default options.
    fn start() -> Self {
        Self::start_with(service(), ServerOptions::default())
    }

    /// A server for `service` with `options` on 127.0.0.1 (any port).
    fn start_with(service: ServiceId, options: ServerOptions) -> Self {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
        let counters = Arc::new(Counters::default());
        let server = rt.block_on(bind("127.0.0.1:0", service, options, counters.clone()));
        let addr = server.local_addr();
        TestServer { server: Some(server), addr, counters, rt }
    }

    /// Shuts the server down (waiting until its sockets are closed) and binds a fresh one on the same address.
    fn restart(&mut self) {
        self.stop();
        let server = self.rt.block_on(bind(self.addr, service(), ServerOptions::default(), self.counters.clone()));
        assert_eq!(server.local_addr(), self.addr);
        self.server = Some(server);
    }

    /// Shuts the server down, waiting until its sockets are closed.
    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.shutdown());
        }
    }

    /// Connections the server has open (after their handshake).
    fn open_connections(&self) -> usize {
        self.server.as_ref().map_or(0, RpcServer::open_connections)
    }

    /// A blocking client for this server with [`options`].
    fn client(&self) -> Client {
        self.client_with(options())
    }

    /// A blocking client for this server with the given options.
    fn client_with(&self, options: ClientOptions) -> Client {
        Client::new(self.addr, service(), options)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the test service's server on `addr`.
async fn bind(addr: impl ToString, service: ServiceId, options: ServerOptions, counters: Arc<Counters>) -> RpcServer {
    let handler = move |req: Req, _peer: PeerInfo| {
        let counters = counters.clone();
        async move {
            counters.requests.fetch_add(1, Ordering::SeqCst);
            match req {
                Req::Echo(value) => Resp::Echo(value),
                Req::Sleep { ms, tag } => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    counters.sleeps_done.fetch_add(1, Ordering::SeqCst);
                    Resp::Slept(tag)
                }
                Req::Bytes { len } => Resp::Bytes(ByteBuf::from(vec![7u8; len])),
                Req::Blob(bytes) => Resp::Bytes(bytes),
                Req::Panic => panic!("handler asked to panic"),
            }
        }
    };
    RpcServer::bind_with_options(addr, service, options, handler).await.expect("bind")
}

/// Calls `Echo(value)` and checks the reply.
fn check_echo(client: &Client, value: u64) {
    match client.call(&Req::Echo(value)) {
        Ok(resp) => assert_eq!(resp, Resp::Echo(value)),
        Err(e) => panic!("echo {value} failed: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Raw peers: plain TCP listeners in std threads
// ---------------------------------------------------------------------------------------------------------------

/// A TCP listener on 127.0.0.1 that accepts one connection (within [`PROMPTLY`]) and hands it to `script` on
/// its own thread. Join the handle to make sure the thread is gone.
fn raw_peer(script: impl FnOnce(TcpStream) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    listener.set_nonblocking(true).expect("nonblocking listener");
    let handle = thread::spawn(move || {
        let deadline = Instant::now() + PROMPTLY;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("raw peer: no connection: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking stream");
        stream.set_read_timeout(Some(PROMPTLY)).expect("read timeout");
        script(stream);
    });
    (addr, handle)
}

/// Keeps `stream` open until the client closes it (or [`PROMPTLY`] passes), discarding what it sends.
fn hold_until_closed(mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Reads one length-prefixed frame.
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("read length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).expect("read body");
    body
}

/// Writes `body` with its length prefix.
fn write_frame(stream: &mut TcpStream, body: &[u8]) {
    let mut out = u32::try_from(body.len()).expect("small frame").to_be_bytes().to_vec();
    out.extend_from_slice(body);
    stream.write_all(&out).expect("write frame");
}

/// Appends `value` as a postcard varint.
fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A fake RPC server: [`raw_peer`] that answers the hello with `Accept { max_frame: 1 MiB }`, then hands the
/// connection to `script`. Its clients are `BlockingClient<u64, u64>` (postcard bodies are single varints).
fn fake_rpc_server(script: impl FnOnce(TcpStream) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    raw_peer(move |mut stream| {
        let hello = read_frame(&mut stream);
        assert!(hello.starts_with(b"MCRPC\0\x00\x01"), "not a hello: {hello:?}");
        let mut reply = b"MCRPC\0\x00\x01".to_vec();
        push_varint(&mut reply, 0); // HelloReply::Accept
        push_varint(&mut reply, 1 << 20); // max_frame
        write_frame(&mut stream, &reply);
        script(stream);
    })
}

/// Reads a request frame from a fake server's connection and returns its id and postcard body.
fn read_request(stream: &mut TcpStream) -> (u64, Vec<u8>) {
    let frame = read_frame(stream);
    assert!(frame.len() >= 9, "short request frame: {frame:?}");
    assert_eq!(frame[8], 0, "not a request frame");
    let id = u64::from_be_bytes(frame[..8].try_into().expect("8 bytes"));
    (id, frame[9..].to_vec())
}

/// A response frame for request `id` whose body is the postcard `u64` `value`.
fn response_frame(id: u64, value: u64) -> Vec<u8> {
    let mut frame = id.to_be_bytes().to_vec();
    frame.push(1); // Kind::Response
    push_varint(&mut frame, value);
    frame
}

// ---------------------------------------------------------------------------------------------------------------
// Calls and replies
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn echo_and_call_with_timeout() {
    let server = TestServer::start();
    let client = server.client();
    assert_eq!(client.addr(), server.addr.to_string());
    assert_eq!(client.idle_connections(), 0, "connects on the first call only");

    check_echo(&client, 1);
    assert_eq!(client.call_with_timeout(&Req::Echo(2), Duration::from_secs(2)), Ok(Resp::Echo(2)));
    let slept = client.call_with_timeout(&Req::Sleep { ms: 20, tag: 3 }, Duration::from_secs(2));
    assert_eq!(slept, Ok(Resp::Slept(3)));
    for value in 4..20 {
        check_echo(&client, value);
    }
    assert_eq!(client.idle_connections(), 1, "sequential calls reuse one connection");
    assert_eq!(server.open_connections(), 1);
    assert_eq!(server.counters.requests.load(Ordering::SeqCst), 19);
}

#[test]
fn eight_threads_share_one_cloned_client() {
    const THREADS: u64 = 8;
    const CALLS: u64 = 200;
    let server = TestServer::start();
    let client = server.client();
    thread::scope(|scope| {
        for t in 0..THREADS {
            let client = client.clone();
            scope.spawn(move || {
                for i in 0..CALLS {
                    check_echo(&client, t * 1_000_000 + i);
                }
            });
        }
    });
    let idle = client.idle_connections();
    assert!((1..=16).contains(&idle), "{idle} idle connections");
    assert_eq!(server.counters.requests.load(Ordering::SeqCst), (THREADS * CALLS) as usize);
    // Every connection the threads opened is back in the pool (fewer than 16, so none was dropped).
    assert_eq!(server.open_connections(), idle);
}

#[test]
fn large_payloads_round_trip() {
    let server = TestServer::start();
    let client = server.client();
    let blob: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let reply = client.call(&Req::Blob(ByteBuf::from(blob.clone()))).expect("8 MiB echo");
    assert_eq!(reply, Resp::Bytes(ByteBuf::from(blob)));
    // The connection is clean after a reply that took many reads.
    check_echo(&client, 1);
    assert_eq!(client.idle_connections(), 1);
}

#[test]
fn undecodable_reply_is_a_decode_error_and_the_connection_is_kept() {
    let server = TestServer::start();
    let wrong: BlockingClient<Req, String> = BlockingClient::new(server.addr, service(), options());
    let err = wrong.call(&Req::Echo(1)).unwrap_err();
    assert!(matches!(err, RpcError::Decode(_)), "{err:?}");
    assert!(err.may_have_executed());
    assert_eq!(wrong.idle_connections(), 1, "the whole reply was read: the connection stays usable");
}

// ---------------------------------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn slow_handler_times_out_and_the_late_reply_never_answers_a_later_call() {
    let server = TestServer::start();
    let client = server.client();
    check_echo(&client, 1);

    let timeout = Duration::from_millis(100);
    let (result, took) = timed(|| client.call_with_timeout(&Req::Sleep { ms: 400, tag: 2 }, timeout));
    let err = result.unwrap_err();
    assert_eq!(err, RpcError::Timeout { after: timeout });
    assert!(err.may_have_executed());
    assert!(took < PROMPTLY, "timed out after {took:?}");
    assert_eq!(client.idle_connections(), 0, "the timed-out connection is closed, not pooled");

    // Right away, while the slow handler is still sleeping.
    check_echo(&client, 3);
    // After the late reply to the timed-out call has been produced: it must not answer this call.
    wait_for(&server.counters.sleeps_done, 1);
    thread::sleep(Duration::from_millis(50));
    check_echo(&client, 4);
    check_echo(&client, 5);
    assert_eq!(client.idle_connections(), 1);
}

#[test]
fn call_uses_the_request_timeout_from_the_options() {
    let server = TestServer::start();
    let timeout = Duration::from_millis(100);
    let client = server.client_with(ClientOptions { request_timeout: timeout, ..options() });
    let (result, took) = timed(|| client.call(&Req::Sleep { ms: 400, tag: 1 }));
    assert_eq!(result, Err(RpcError::Timeout { after: timeout }));
    assert!(took < PROMPTLY, "timed out after {took:?}");
    wait_for(&server.counters.sleeps_done, 1);
    check_echo(&client, 2);
}

#[test]
fn timeouts_on_several_threads_leave_the_pool_usable() {
    let server = TestServer::start();
    let client = server.client();
    let timeout = Duration::from_millis(50);
    thread::scope(|scope| {
        for t in 0..4u64 {
            let client = client.clone();
            scope.spawn(move || {
                let err = client.call_with_timeout(&Req::Sleep { ms: 300, tag: t }, timeout).unwrap_err();
                assert_eq!(err, RpcError::Timeout { after: timeout });
                check_echo(&client, 100 + t);
            });
        }
    });
    wait_for(&server.counters.sleeps_done, 4);
    thread::sleep(Duration::from_millis(50));
    for value in 0..8 {
        check_echo(&client, value);
    }
}

/// `Duration::MAX` reads as "no timeout" (the async client's `call_with_timeout` accepts it); it must not panic.
#[test]
fn call_with_timeout_accepts_duration_max() {
    let server = TestServer::start();
    let client = server.client();
    assert_eq!(client.call_with_timeout(&Req::Echo(1), Duration::MAX), Ok(Resp::Echo(1)));
}

// ---------------------------------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn no_server_listening_is_connect_failed_until_one_starts() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);

    let client = Client::new(addr, service(), options());
    let (result, took) = timed(|| client.call(&Req::Echo(1)));
    let err = result.unwrap_err();
    assert!(
        matches!(&err, RpcError::ConnectFailed { addr: a, reason } if *a == addr.to_string() && !reason.is_empty()),
        "{err:?}"
    );
    assert!(!err.may_have_executed());
    assert!(took < PROMPTLY, "took {took:?}");
    assert_eq!(client.idle_connections(), 0);

    // The same client connects once a server listens there.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let server = rt.block_on(bind(addr, service(), ServerOptions::default(), Arc::default()));
    check_echo(&client, 2);
    rt.block_on(server.shutdown());
}

#[test]
fn unresolvable_address_is_connect_failed() {
    let client = Client::new("no port here", service(), options());
    let err = client.call(&Req::Echo(1)).unwrap_err();
    assert!(matches!(&err, RpcError::ConnectFailed { addr, .. } if addr == "no port here"), "{err:?}");
}

#[test]
fn another_service_is_a_version_mismatch() {
    for theirs in [ServiceId::new("test", 2), ServiceId::new("other", 1)] {
        let server = TestServer::start_with(theirs.clone(), ServerOptions::default());
        let client = server.client();
        let err = client.call(&Req::Echo(1)).unwrap_err();
        assert_eq!(err, RpcError::VersionMismatch { ours: service(), theirs });
        assert!(!err.may_have_executed());
        assert_eq!(client.idle_connections(), 0);
        assert_eq!(server.counters.requests.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn restarted_server_replaces_stale_pooled_connections_without_an_error() {
    let mut server = TestServer::start();
    let client = server.client();
    // Several pooled connections: four calls that overlap on the server.
    thread::scope(|scope| {
        for t in 0..4u64 {
            let client = client.clone();
            scope.spawn(move || assert_eq!(client.call(&Req::Sleep { ms: 100, tag: t }), Ok(Resp::Slept(t))));
        }
    });
    check_echo(&client, 1);
    assert!(client.idle_connections() >= 1);

    server.restart();
    // Every pooled connection is now closed by the old server; the call must not see it.
    check_echo(&client, 2);
    assert_eq!(client.idle_connections(), 1, "the stale connections are dropped, one new one is pooled");
    assert_eq!(server.open_connections(), 1);

    // And once more, from several threads at once.
    server.restart();
    thread::scope(|scope| {
        for t in 0..4u64 {
            let client = client.clone();
            scope.spawn(move || check_echo(&client, 10 + t));
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Errors from the server
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn handler_panic_is_a_remote_error_and_the_client_keeps_working() {
    let server = TestServer::start();
    let client = server.client();
    let err = client.call(&Req::Panic).unwrap_err();
    assert!(matches!(&err, RpcError::Remote(msg) if msg.contains("panicked")), "{err:?}");
    assert!(err.may_have_executed());
    check_echo(&client, 1);
    assert_eq!(client.idle_connections(), 1, "an error response leaves the connection usable");
    assert_eq!(server.open_connections(), 1);
}

#[test]
fn reply_above_the_client_limit_is_an_error_not_a_hang() {
    let server = TestServer::start();
    let client = server.client_with(ClientOptions { max_frame: 1024, ..options() });
    let (result, took) = timed(|| client.call(&Req::Bytes { len: 4096 }));
    let err = result.unwrap_err();
    // The server learned our limit in the handshake and answers with an error instead.
    assert!(matches!(&err, RpcError::Remote(msg) if msg.contains("exceeds")), "{err:?}");
    assert!(took < PROMPTLY, "took {took:?}");
    assert_eq!(client.call(&Req::Bytes { len: 100 }), Ok(Resp::Bytes(ByteBuf::from(vec![7u8; 100]))));
}

#[test]
fn request_above_the_client_limit_is_refused_before_sending() {
    let server = TestServer::start();
    let client = server.client_with(ClientOptions { max_frame: 1024, ..options() });
    let err = client.call(&Req::Blob(ByteBuf::from(vec![1u8; 4096]))).unwrap_err();
    assert!(matches!(err, RpcError::FrameTooLarge { len, max: 1024 } if len > 4096), "{err:?}");
    assert!(!err.may_have_executed());
    assert_eq!(client.idle_connections(), 0, "refused before even connecting");
    assert_eq!(server.counters.requests.load(Ordering::SeqCst), 0);

    check_echo(&client, 1);
    let err = client.call(&Req::Blob(ByteBuf::from(vec![1u8; 4096]))).unwrap_err();
    assert!(matches!(err, RpcError::FrameTooLarge { max: 1024, .. }), "{err:?}");
    assert_eq!(server.counters.requests.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle_connections(), 1, "the connection stays pooled");
    check_echo(&client, 2);
}

#[test]
fn request_above_the_server_limit_is_refused_before_sending() {
    let server = TestServer::start_with(service(), ServerOptions { max_frame: 1024, ..ServerOptions::default() });
    let client = server.client();
    check_echo(&client, 1);
    let err = client.call(&Req::Blob(ByteBuf::from(vec![1u8; 4096]))).unwrap_err();
    assert!(matches!(err, RpcError::FrameTooLarge { max: 1024, .. }), "{err:?}");
    assert!(!err.may_have_executed());
    assert_eq!(server.counters.requests.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle_connections(), 1, "the connection stays pooled");
    check_echo(&client, 2);
    assert_eq!(server.open_connections(), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Peers that are not (well-behaved) RPC servers
// ---------------------------------------------------------------------------------------------------------------

/// Connects a client with a 1 s connect timeout to `addr`, expects a `Handshake` error (promptly) and returns
/// its reason.
fn expect_handshake_error(addr: SocketAddr) -> String {
    let client: BlockingClient<u64, u64> = BlockingClient::new(addr, service(), options());
    let (result, took) = timed(|| client.call(&1));
    let err = result.unwrap_err();
    assert!(took < PROMPTLY, "took {took:?}");
    assert!(!err.may_have_executed());
    assert_eq!(client.idle_connections(), 0);
    match err {
        RpcError::Handshake { addr: a, reason } => {
            assert_eq!(a, addr.to_string());
            reason
        }
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[test]
fn http_peer_that_keeps_the_socket_open_is_a_handshake_error() {
    let (addr, peer) = raw_peer(|mut stream| {
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").expect("write");
        hold_until_closed(stream);
    });
    let reason = expect_handshake_error(addr);
    assert!(reason.contains("limit"), "{reason}");
    peer.join().expect("peer thread");
}

#[test]
fn http_peer_that_closes_is_a_handshake_error() {
    let (addr, peer) = raw_peer(|mut stream| {
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").expect("write");
    });
    expect_handshake_error(addr);
    peer.join().expect("peer thread");
}

#[test]
fn well_framed_garbage_is_a_handshake_error() {
    let (addr, peer) = raw_peer(|mut stream| {
        write_frame(&mut stream, b"hello, world");
        hold_until_closed(stream);
    });
    let reason = expect_handshake_error(addr);
    assert!(reason.contains("not a mooncake RPC hello"), "{reason}");
    peer.join().expect("peer thread");
}

#[test]
fn silent_peer_is_a_handshake_error_after_the_connect_timeout() {
    let (addr, peer) = raw_peer(hold_until_closed);
    let client: BlockingClient<u64, u64> = BlockingClient::new(
        addr,
        service(),
        ClientOptions { connect_timeout: Duration::from_millis(200), ..options() },
    );
    let (result, took) = timed(|| client.call(&1));
    let err = result.unwrap_err();
    assert!(matches!(&err, RpcError::Handshake { reason, .. } if reason.contains("no handshake reply")), "{err:?}");
    assert!(took < PROMPTLY, "took {took:?}");
    drop(client);
    peer.join().expect("peer thread");
}

#[test]
fn fake_server_round_trip() {
    // Checks the fake server itself, so the tests below fail for the reason they name.
    let (addr, peer) = fake_rpc_server(|mut stream| {
        let (id, body) = read_request(&mut stream);
        assert_eq!(body, [42]);
        write_frame(&mut stream, &response_frame(id, 43));
        hold_until_closed(stream);
    });
    let client: BlockingClient<u64, u64> = BlockingClient::new(addr, service(), options());
    assert_eq!(client.call(&42), Ok(43));
    drop(client);
    peer.join().expect("peer thread");
}

#[test]
fn oversized_reply_frame_is_disconnected_not_a_hang() {
    let (addr, peer) = fake_rpc_server(|mut stream| {
        let (id, _) = read_request(&mut stream);
        // A length prefix far above the client's limit, then part of a frame; the socket stays open.
        let mut out = (64u32 << 20).to_be_bytes().to_vec();
        out.extend_from_slice(&response_frame(id, 1));
        stream.write_all(&out).expect("write");
        hold_until_closed(stream);
    });
    let client: BlockingClient<u64, u64> =
        BlockingClient::new(addr, service(), ClientOptions { max_frame: 1024, ..options() });
    let (result, took) = timed(|| client.call(&1));
    let err = result.unwrap_err();
    assert!(matches!(&err, RpcError::Disconnected { reason } if reason.contains("limit")), "{err:?}");
    assert!(took < PROMPTLY, "took {took:?}");
    assert_eq!(client.idle_connections(), 0);
    drop(client);
    peer.join().expect("peer thread");
}

#[test]
fn server_closing_mid_call_is_disconnected() {
    let (addr, peer) = fake_rpc_server(|mut stream| {
        read_request(&mut stream);
    });
    let client: BlockingClient<u64, u64> = BlockingClient::new(addr, service(), options());
    let err = client.call(&1).unwrap_err();
    assert!(matches!(err, RpcError::Disconnected { .. }), "{err:?}");
    assert!(err.may_have_executed());
    assert_eq!(client.idle_connections(), 0);
    peer.join().expect("peer thread");
}

/// A reply to another request id is a protocol violation: `Disconnected`, whose contract (and the crate docs:
/// "a frame that breaks these rules closes that connection") is that the connection is closed and the next
/// call reconnects.
#[test]
fn wrong_reply_id_closes_the_connection() {
    let (addr, peer) = fake_rpc_server(|mut stream| {
        let (id, _) = read_request(&mut stream);
        write_frame(&mut stream, &response_frame(id + 1000, 1));
        hold_until_closed(stream);
    });
    let client: BlockingClient<u64, u64> = BlockingClient::new(addr, service(), options());
    let err = client.call(&1).unwrap_err();
    assert!(matches!(&err, RpcError::Disconnected { reason } if reason.contains("reply id")), "{err:?}");
    assert_eq!(client.idle_connections(), 0, "a connection that broke the protocol went back into the pool");
    drop(client);
    peer.join().expect("peer thread");
}

#[test]
fn client_is_send_sync_clone_and_debug() {
    fn assert_shareable<T: Send + Sync + Clone + std::fmt::Debug + 'static>() {}
    assert_shareable::<Client>();
    let client = Client::new("127.0.0.1:1", service(), options());
    let debug = format!("{client:?}");
    assert!(debug.contains("127.0.0.1:1") && debug.contains("test"), "{debug}");
}
