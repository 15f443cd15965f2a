//! The server: an accept loop and, per connection, a reader that runs handlers concurrently and a writer that
//! batches their responses.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::wire::{self, Hello, HelloError, HelloReply, Kind};
use crate::{RpcError, ServerOptions, ServiceId};

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Who sent a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The client's address.
    pub addr: SocketAddr,
    /// Identifies the connection within this server (increasing from 1).
    pub conn_id: u64,
}

/// Serves requests. Implemented for every `Fn(Req, PeerInfo) -> impl Future<Output = Resp>` closure; a service
/// struct can implement it directly. Each request runs in its own task, so handlers run concurrently; a handler
/// keeps running to completion even if its client goes away (its response is then dropped).
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    /// Handles one request from `peer`.
    fn handle(self: Arc<Self>, req: Req, peer: PeerInfo) -> impl Future<Output = Resp> + Send + 'static;
}

impl<Req, Resp, F, Fut> Handler<Req, Resp> for F
where
    F: Fn(Req, PeerInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    fn handle(self: Arc<Self>, req: Req, peer: PeerInfo) -> impl Future<Output = Resp> + Send + 'static {
        (*self)(req, peer)
    }
}

/// A running RPC server. [`RpcServer::shutdown`] stops it; so does dropping it (without waiting).
pub struct RpcServer {
    local_addr: SocketAddr,
    service: ServiceId,
    stop: CancellationToken,
    tasks: TaskTracker,
    open_connections: Arc<AtomicUsize>,
}

impl fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcServer").field("local_addr", &self.local_addr).field("service", &self.service).finish()
    }
}

/// What every connection of one server shares.
struct Context<Req, Resp, H> {
    handler: Arc<H>,
    service: ServiceId,
    options: ServerOptions,
    stop: CancellationToken,
    tasks: TaskTracker,
    open_connections: Arc<AtomicUsize>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl RpcServer {
    /// Listens on `addr` (e.g. `"127.0.0.1:0"`, `"[::]:7000"`) with default [`ServerOptions`] and serves
    /// `service` with `handler`.
    pub async fn bind<Req, Resp, H>(addr: impl ToString, service: ServiceId, handler: H) -> Result<RpcServer, RpcError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Handler<Req, Resp>,
    {
        Self::bind_with_options(addr, service, ServerOptions::default(), handler).await
    }

    /// Like [`RpcServer::bind`], with explicit options.
    pub async fn bind_with_options<Req, Resp, H>(
        addr: impl ToString,
        service: ServiceId,
        options: ServerOptions,
        handler: H,
    ) -> Result<RpcServer, RpcError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Handler<Req, Resp>,
    {
        let addr = addr.to_string();
        let bind_error = |e: std::io::Error| RpcError::Bind { addr: addr.clone(), reason: e.to_string() };
        let listener = TcpListener::bind(addr.as_str()).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let open_connections = Arc::new(AtomicUsize::new(0));
        let context = Arc::new(Context {
            handler: Arc::new(handler),
            service: service.clone(),
            options,
            stop: stop.clone(),
            tasks: tasks.clone(),
            open_connections: open_connections.clone(),
            _types: PhantomData,
        });
        tasks.spawn(accept_loop(listener, context));
        debug!(%local_addr, %service, "RPC server listening");
        Ok(RpcServer { local_addr, service, stop, tasks, open_connections })
    }

    /// The address the server listens on (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections that completed the handshake and are still open.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection now and waits until the sockets are closed (the port can be
    /// bound again when this returns). Calls in flight fail on their clients with `Disconnected`; handlers
    /// already running finish in the background and their responses are dropped.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        debug!(local_addr = %self.local_addr, "RPC server stopped");
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop<Req, Resp, H>(listener: TcpListener, context: Arc<Context<Req, Resp, H>>)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    let next_conn_id = AtomicU64::new(1);
    loop {
        let Some(accepted) = context.stop.run_until_cancelled(listener.accept()).await else { return };
        match accepted {
            Ok((stream, addr)) => {
                let peer = PeerInfo { addr, conn_id: next_conn_id.fetch_add(1, Ordering::Relaxed) };
                context.tasks.spawn(serve_connection(stream, peer, context.clone()));
            }
            Err(e) => {
                warn!("accept failed: {e}");
                if context.stop.run_until_cancelled(tokio::time::sleep(ACCEPT_ERROR_PAUSE)).await.is_none() {
                    return;
                }
            }
        }
    }
}

async fn serve_connection<Req, Resp, H>(stream: TcpStream, peer: PeerInfo, context: Arc<Context<Req, Resp, H>>)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    if let Err(e) = stream.set_nodelay(true) {
        debug!(peer = %peer.addr, "cannot set TCP_NODELAY: {e}");
    }
    let max_frame = context.options.max_frame;
    let (read_half, write_half) = stream.into_split();
    let (mut reader, mut writer) = wire::framed(read_half, write_half, max_frame);

    let handshake = timeout(context.options.handshake_timeout, accept_hello(&mut reader, &mut writer, &context));
    let client_max = match context.stop.run_until_cancelled(handshake).await {
        None => return,
        Some(Ok(Ok(client_max))) => client_max,
        Some(Ok(Err(reason))) => {
            warn!(peer = %peer.addr, "closing connection: {reason}");
            return;
        }
        Some(Err(_)) => {
            let after = context.options.handshake_timeout;
            warn!(peer = %peer.addr, "closing connection: no hello within {after:?}");
            return;
        }
    };
    let _open = OpenGuard::new(&context.open_connections);
    debug!(peer = %peer.addr, conn_id = peer.conn_id, "connection accepted");

    let closed = context.stop.child_token();
    // Unbounded is safe: the in-flight limit also bounds the responses waiting here.
    let (queue, queue_rx) = mpsc::unbounded_channel();
    let writer_closed = closed.clone();
    context.tasks.spawn(async move {
        if let Err(e) = wire::write_loop(writer, queue_rx, writer_closed.clone()).await {
            debug!(peer = %peer.addr, "write failed: {e}");
            writer_closed.cancel();
        }
    });
    let max_send = max_frame.min(usize::try_from(client_max).unwrap_or(usize::MAX));
    let reason = match closed.run_until_cancelled(read_loop(reader, queue, peer, &context, max_send)).await {
        Some(Ok(reason)) => {
            debug!(peer = %peer.addr, "connection ended: {reason}");
            return; // the writer finishes the responses still being computed, then closes
        }
        Some(Err(violation)) => violation,
        None => {
            // Shutdown, or the writer failed (already logged): nothing the operator must act on.
            closed.cancel();
            debug!(peer = %peer.addr, "closing connection: server shutting down or write failed");
            return;
        }
    };
    // Dropping the read half here and the write half in the cancelled writer closes the socket.
    closed.cancel();
    warn!(peer = %peer.addr, "closing connection: {reason}");
}

/// Reads the client's hello and answers it; `Ok` carries the client's frame limit, `Err` why we hung up.
async fn accept_hello<Req, Resp, H>(
    reader: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    writer: &mut FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    context: &Context<Req, Resp, H>,
) -> Result<u32, String> {
    let frame = match reader.next().await {
        None => return Err("closed before sending a hello".into()),
        Some(Err(e)) => return Err(wire::describe_read_error(&e, context.options.max_frame)),
        Some(Ok(frame)) => frame,
    };
    let service = &context.service;
    let (reply, outcome) = match wire::decode_hello::<Hello>(&frame) {
        Err(HelloError::NotRpc) => return Err("the first frame is not a mooncake RPC hello".into()),
        Err(HelloError::WireVersion(v)) => {
            let reason = format!("wire version {v} is not supported (this server speaks {})", wire::WIRE_VERSION);
            (HelloReply::Reject { reason: reason.clone() }, Err(reason))
        }
        Err(HelloError::Body(e)) => {
            let reason = format!("malformed hello: {e}");
            (HelloReply::Reject { reason: reason.clone() }, Err(reason))
        }
        Ok(hello) if hello.service != *service => {
            let reason = format!("client wants {}, this server serves {service}", hello.service);
            (HelloReply::Mismatch { theirs: service.clone() }, Err(reason))
        }
        Ok(hello) => {
            (HelloReply::Accept { max_frame: wire::max_frame_on_wire(context.options.max_frame) }, Ok(hello.max_frame))
        }
    };
    writer.send(wire::encode_hello(&reply)).await.map_err(|e| format!("cannot answer the hello: {e}"))?;
    outcome
}

/// Reads requests and spawns their handlers, at most `max_in_flight_per_conn` at once. `Ok` is an orderly end
/// (the client closed), `Err` a protocol violation.
async fn read_loop<Req, Resp, H>(
    mut reader: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    queue: mpsc::UnboundedSender<Bytes>,
    peer: PeerInfo,
    context: &Context<Req, Resp, H>,
    max_send: usize,
) -> Result<String, String>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    let in_flight = Arc::new(Semaphore::new(context.options.max_in_flight_per_conn.max(1)));
    loop {
        // Backpressure: no permit, no further reading from this connection.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return Ok("in-flight limiter closed".into());
        };
        let frame = match wire::next_frame(&mut reader, context.options.poll_after_request, || true).await {
            None => return Ok("the client closed the connection".into()),
            Some(Err(e)) => return Err(wire::describe_read_error(&e, context.options.max_frame)),
            Some(Ok(frame)) => wire::decode(frame)?,
        };
        if frame.kind != Kind::Request {
            return Err(format!("expected a request frame, got {:?} (id {})", frame.kind, frame.id));
        }
        let id = frame.id;
        let req = match wire::decode_body::<Req>(&frame.body) {
            Ok(req) => req,
            Err(e) => {
                debug!(peer = %peer.addr, id, "undecodable request: {e}");
                let reply = wire::encode_error(id, &format!("cannot decode the request: {e}"));
                if queue.send(reply).is_err() {
                    return Ok("writer stopped".into());
                }
                continue;
            }
        };
        // Run the handler here first: most finish without waiting (the store master's all do), and answering
        // from this task saves spawning one per request. A handler that has to wait continues in its own task.
        let mut handling = Box::pin(AssertUnwindSafe(context.handler.clone().handle(req, peer)).catch_unwind());
        if let Some(outcome) = (&mut handling).now_or_never() {
            if queue.send(reply_frame(id, outcome, max_send)).is_err() {
                return Ok("writer stopped".into());
            }
            drop(permit);
            continue;
        }
        let queue = queue.clone();
        tokio::spawn(async move {
            let outcome = handling.await;
            // The connection may be gone; then the response is dropped.
            let _ = queue.send(reply_frame(id, outcome, max_send));
            drop(permit);
        });
    }
}

/// The frame answering request `id` with a handler's outcome (a response, or the handler's panic).
fn reply_frame<Resp: Serialize>(id: u64, outcome: std::thread::Result<Resp>, max_send: usize) -> Bytes {
    match outcome {
        Ok(resp) => wire::encode(Kind::Response, id, &resp, max_send)
            .unwrap_or_else(|e| wire::encode_error(id, &format!("cannot send the response: {e}"))),
        Err(_) => wire::encode_error(id, "the request handler panicked"),
    }
}

/// Counts a connection as open while alive.
struct OpenGuard<'a>(&'a AtomicUsize);

impl<'a> OpenGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        OpenGuard(counter)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{ClientOptions, RpcClient};

    fn service() -> ServiceId {
        ServiceId::new("raw", 1)
    }

    async fn echo_server() -> RpcServer {
        RpcServer::bind("127.0.0.1:0", service(), |req: String, _peer: PeerInfo| async move { req })
            .await
            .expect("bind")
    }

    async fn write_frame(stream: &mut TcpStream, payload: &[u8]) {
        let len = u32::try_from(payload.len()).expect("small frame");
        stream.write_all(&len.to_be_bytes()).await.expect("write length");
        stream.write_all(payload).await.expect("write payload");
    }

    async fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await.expect("read length");
        let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
        stream.read_exact(&mut payload).await.expect("read payload");
        payload
    }

    /// A raw connection that has completed the handshake.
    async fn raw_connection(server: &RpcServer) -> TcpStream {
        let mut stream = TcpStream::connect(server.local_addr()).await.expect("connect");
        let hello = Hello { service: service(), max_frame: 1 << 20 };
        write_frame(&mut stream, &wire::encode_hello(&hello)).await;
        let reply: HelloReply = wire::decode_hello(&read_frame(&mut stream).await).expect("hello reply");
        assert!(matches!(reply, HelloReply::Accept { .. }), "{reply:?}");
        stream
    }

    /// Asserts that the server closes `stream` promptly (EOF or reset).
    async fn assert_closed(mut stream: TcpStream) {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => panic!("connection still open: {other:?}"),
        }
    }

    async fn assert_serving(client: &RpcClient<String, String>) {
        let reply = client.call(&"still here".to_string()).await.expect("call");
        assert_eq!(reply, "still here");
    }

    #[tokio::test]
    async fn malformed_frames_close_only_their_connection() {
        let server = echo_server().await;
        let client = RpcClient::<String, String>::connect(server.local_addr(), service(), ClientOptions::default())
            .await
            .expect("connect");

        // Garbage instead of a hello.
        let mut stream = TcpStream::connect(server.local_addr()).await.expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert_closed(stream).await;
        assert_serving(&client).await;

        // A well-framed hello with the wrong magic.
        let mut stream = TcpStream::connect(server.local_addr()).await.expect("connect");
        write_frame(&mut stream, b"NOT-A-HELLO").await;
        assert_closed(stream).await;
        assert_serving(&client).await;

        // After the handshake: a frame shorter than the header.
        let mut stream = raw_connection(&server).await;
        write_frame(&mut stream, &[1, 2, 3]).await;
        assert_closed(stream).await;

        // An unknown frame kind.
        let mut stream = raw_connection(&server).await;
        let mut frame = 7u64.to_be_bytes().to_vec();
        frame.push(200);
        write_frame(&mut stream, &frame).await;
        assert_closed(stream).await;

        // A response frame sent to the server.
        let mut stream = raw_connection(&server).await;
        write_frame(&mut stream, &wire::encode(Kind::Response, 1, "x", 1024).expect("encode")).await;
        assert_closed(stream).await;

        // An oversized length prefix.
        let mut stream = raw_connection(&server).await;
        stream.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
        stream.write_all(b"trailing garbage").await.expect("write");
        assert_closed(stream).await;

        assert_serving(&client).await;
        assert_eq!(server.open_connections(), 1, "only the good client remains");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn undecodable_request_body_gets_an_error_response() {
        let server = echo_server().await;
        let mut stream = raw_connection(&server).await;
        let mut frame = 11u64.to_be_bytes().to_vec();
        frame.push(Kind::Request as u8);
        frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]); // a string length that overflows
        write_frame(&mut stream, &frame).await;
        let reply = wire::decode(bytes::BytesMut::from(&read_frame(&mut stream).await[..])).expect("reply");
        assert_eq!((reply.id, reply.kind), (11, Kind::Error));

        // The connection still serves well-formed requests.
        write_frame(&mut stream, &wire::encode(Kind::Request, 12, "ok", 1024).expect("encode")).await;
        let reply = wire::decode(bytes::BytesMut::from(&read_frame(&mut stream).await[..])).expect("reply");
        assert_eq!((reply.id, reply.kind), (12, Kind::Response));
        assert_eq!(postcard::from_bytes::<String>(&reply.body).expect("body"), "ok");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn silent_client_is_dropped_after_the_handshake_timeout() {
        let options = ServerOptions { handshake_timeout: Duration::from_millis(100), ..ServerOptions::default() };
        let server = RpcServer::bind_with_options(
            "127.0.0.1:0",
            service(),
            options,
            |req: String, _: PeerInfo| async move { req },
        )
        .await
        .expect("bind");
        let stream = TcpStream::connect(server.local_addr()).await.expect("connect");
        assert_closed(stream).await;
        server.shutdown().await;
    }

    #[tokio::test]
    async fn in_flight_limit_applies_backpressure() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (running2, peak2) = (running.clone(), peak.clone());
        let options = ServerOptions { max_in_flight_per_conn: 4, ..ServerOptions::default() };
        let server =
            RpcServer::bind_with_options("127.0.0.1:0", service(), options, move |req: String, _: PeerInfo| {
                let (running, peak) = (running2.clone(), peak2.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    req
                }
            })
            .await
            .expect("bind");
        let client = RpcClient::<String, String>::connect(server.local_addr(), service(), ClientOptions::default())
            .await
            .expect("connect");
        let calls: Vec<_> = (0..16)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.call(&i.to_string()).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.expect("task").expect("call"), i.to_string());
        }
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        server.shutdown().await;
    }
}
