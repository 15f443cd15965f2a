//! The client: one lazily (re)connected TCP connection, calls multiplexed by request id.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

use crate::wire::{self, Hello, Kind};
use crate::{ClientOptions, RpcError, ServiceId};

/// An RPC client for one server address. Cheap to clone; clones share the connection and may call from many
/// tasks at once.
///
/// The connection is made by [`RpcClient::connect`] and remade on the next call after it breaks; every (re)connect
/// is bounded by [`ClientOptions::connect_timeout`], and concurrent callers share one attempt. There is no back-off:
/// a dead server makes calls fail at once (or within the connect timeout) with a typed error.
pub struct RpcClient<Req, Resp> {
    inner: Arc<Inner>,
    _types: PhantomData<fn(&Req) -> Resp>,
}

struct Inner {
    addr: String,
    service: ServiceId,
    options: ClientOptions,
    next_id: AtomicU64,
    state: Mutex<State>,
}

enum State {
    Idle,
    Connecting(Shared<BoxFuture<'static, Result<Arc<Conn>, RpcError>>>),
    Connected(Arc<Conn>),
}

/// One live connection. Dropping it stops its reader and writer tasks.
struct Conn {
    /// Frames for the writer task (unbounded: each queued frame belongs to a caller waiting for its reply).
    queue: mpsc::UnboundedSender<Bytes>,
    shared: Arc<ConnShared>,
    /// Smaller of our and the server's frame limit.
    max_send: usize,
}

/// Where the reader task delivers one call's reply.
type ReplySender = oneshot::Sender<Result<Bytes, RpcError>>;

/// State shared between callers and the connection's reader and writer tasks.
struct ConnShared {
    /// Waiting callers by request id; `None` once the connection is closed.
    pending: Mutex<Option<HashMap<u64, ReplySender>>>,
    /// Cancelled when the connection closes for any reason.
    closed: CancellationToken,
}

impl<Req, Resp> Clone for RpcClient<Req, Resp> {
    fn clone(&self) -> Self {
        RpcClient { inner: self.inner.clone(), _types: PhantomData }
    }
}

impl<Req, Resp> fmt::Debug for RpcClient<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient")
            .field("addr", &self.inner.addr)
            .field("service", &self.inner.service)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl<Req, Resp> RpcClient<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    /// Connects to `addr` (`"host:port"`, a `SocketAddr`, `"[::1]:port"`) and checks that it serves `service`.
    pub async fn connect(addr: impl ToString, service: ServiceId, options: ClientOptions) -> Result<Self, RpcError> {
        let client = Self::new_lazy(addr, service, options);
        client.connection().await?;
        Ok(client)
    }

    /// A client that connects on its first call instead of now.
    pub fn new_lazy(addr: impl ToString, service: ServiceId, options: ClientOptions) -> Self {
        let inner = Inner {
            addr: addr.to_string(),
            service,
            options,
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::Idle),
        };
        RpcClient { inner: Arc::new(inner), _types: PhantomData }
    }

    /// Calls the server with the default timeout ([`ClientOptions::request_timeout`]).
    pub async fn call(&self, req: &Req) -> Result<Resp, RpcError> {
        self.call_with_timeout(req, self.inner.options.request_timeout).await
    }

    /// Calls the server; `timeout_after` bounds the time from queueing the request to its reply. (Re)connecting
    /// first, if needed, is bounded separately by the connect timeout.
    pub async fn call_with_timeout(&self, req: &Req, timeout_after: Duration) -> Result<Resp, RpcError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(Kind::Request, id, req, self.inner.options.max_frame)?;
        let conn = self.connection().await?;
        wire::check_len(frame.len(), conn.max_send)?;

        let (reply_tx, reply_rx) = oneshot::channel();
        let mut registration = conn.shared.register(id, reply_tx)?;
        let exchange = async {
            if conn.queue.send(frame).is_err() {
                return Err(RpcError::Disconnected { reason: "the connection's writer stopped".into() });
            }
            let reply = reply_rx.await;
            // Whoever completed or dropped our sender also removed the entry.
            registration.disarm();
            reply.unwrap_or_else(|_| Err(RpcError::Disconnected { reason: "the connection dropped the call".into() }))
        };
        // On timeout (or if this future is dropped) the registration removes the entry; a late reply is dropped.
        let reply = timeout(timeout_after, exchange).await.unwrap_or(Err(RpcError::Timeout { after: timeout_after }));
        let body = reply?;
        wire::decode_body(&body).map_err(RpcError::Decode)
    }
}

impl<Req, Resp> RpcClient<Req, Resp> {
    /// Whether a connection is up right now (no I/O; a broken connection may take a moment to be noticed).
    pub fn is_connected(&self) -> bool {
        matches!(&*lock(&self.inner.state), State::Connected(conn) if conn.is_open())
    }

    /// Calls awaiting a reply on the current connection (for tests and diagnostics).
    pub fn pending_calls(&self) -> usize {
        match &*lock(&self.inner.state) {
            State::Connected(conn) => lock(&conn.shared.pending).as_ref().map_or(0, HashMap::len),
            _ => 0,
        }
    }

    /// The server address as given.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The live connection, connecting first if there is none. Concurrent callers share one attempt.
    async fn connection(&self) -> Result<Arc<Conn>, RpcError> {
        let attempt = {
            let mut state = lock(&self.inner.state);
            match &*state {
                State::Connected(conn) if conn.is_open() => return Ok(conn.clone()),
                State::Connecting(attempt) => attempt.clone(),
                _ => {
                    let inner = &self.inner;
                    let attempt =
                        open(inner.addr.clone(), inner.service.clone(), inner.options.clone()).boxed().shared();
                    *state = State::Connecting(attempt.clone());
                    attempt
                }
            }
        };
        let result = attempt.clone().await;
        let mut state = lock(&self.inner.state);
        if let State::Connecting(current) = &*state {
            if current.ptr_eq(&attempt) {
                *state = match &result {
                    Ok(conn) => State::Connected(conn.clone()),
                    Err(_) => State::Idle,
                };
            }
        }
        result
    }
}

/// Connects, shakes hands and starts the connection's reader and writer tasks.
async fn open(addr: String, service: ServiceId, options: ClientOptions) -> Result<Arc<Conn>, RpcError> {
    let deadline = Instant::now() + options.connect_timeout;
    let stream = match timeout_at(deadline, TcpStream::connect(addr.as_str())).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(RpcError::ConnectFailed { addr, reason: e.to_string() }),
        Err(_) => {
            let reason = format!("no TCP connection within {:?}", options.connect_timeout);
            return Err(RpcError::ConnectFailed { addr, reason });
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%addr, "cannot set TCP_NODELAY: {e}");
    }
    let (read_half, write_half) = stream.into_split();
    let (mut reader, mut writer) = wire::framed(read_half, write_half, options.max_frame);

    let hello = Hello { service: service.clone(), max_frame: wire::max_frame_on_wire(options.max_frame) };
    let handshake = async {
        writer.send(wire::encode_hello(&hello)).await.map_err(|e| format!("cannot send hello: {e}"))?;
        match reader.next().await {
            None => Err("the peer closed the connection without answering".to_string()),
            Some(Err(e)) => Err(wire::describe_read_error(&e, options.max_frame)),
            Some(Ok(frame)) => wire::read_hello_reply(&frame),
        }
    };
    let reply = match timeout_at(deadline, handshake).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(reason)) => return Err(RpcError::Handshake { addr, reason }),
        Err(_) => {
            let reason = format!("no handshake reply within {:?}", options.connect_timeout);
            return Err(RpcError::Handshake { addr, reason });
        }
    };
    let server_max = wire::accepted_limit(reply, &service)?;

    let shared = Arc::new(ConnShared { pending: Mutex::new(Some(HashMap::new())), closed: CancellationToken::new() });
    let (queue, queue_rx) = mpsc::unbounded_channel();
    let writer_shared = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = wire::write_loop(writer, queue_rx, writer_shared.closed.clone()).await {
            writer_shared.close(&format!("write failed: {e}"));
        }
    });
    tokio::spawn(read_loop(reader, shared.clone(), options.max_frame, options.poll_for_reply));
    debug!(%addr, %service, "connected");
    let max_send = options.max_frame.min(usize::try_from(server_max).unwrap_or(usize::MAX));
    Ok(Arc::new(Conn { queue, shared, max_send }))
}

/// Hands replies to their callers until the connection ends, then fails whatever is still pending.
async fn read_loop(
    mut reader: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    shared: Arc<ConnShared>,
    max: usize,
    poll_for_reply: Duration,
) {
    let work = async {
        loop {
            let waiting = || lock(&shared.pending).as_ref().is_some_and(|p| !p.is_empty());
            match wire::next_frame(&mut reader, poll_for_reply, waiting).await {
                None => return "the server closed the connection".to_string(),
                Some(Err(e)) => return wire::describe_read_error(&e, max),
                Some(Ok(frame)) => {
                    if let Err(violation) = shared.complete(frame) {
                        return format!("protocol violation by the server: {violation}");
                    }
                }
            }
        }
    };
    let reason = shared.closed.run_until_cancelled(work).await;
    shared.close(reason.as_deref().unwrap_or("the connection was closed"));
}

impl Conn {
    fn is_open(&self) -> bool {
        !self.shared.closed.is_cancelled()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

impl ConnShared {
    /// Records a caller waiting for `id`; fails if the connection is already closed.
    fn register(&self, id: u64, reply: ReplySender) -> Result<Registration<'_>, RpcError> {
        match lock(&self.pending).as_mut() {
            Some(pending) => {
                pending.insert(id, reply);
                Ok(Registration { shared: self, id, armed: true })
            }
            None => Err(RpcError::Disconnected { reason: "the connection closed before the call was sent".into() }),
        }
    }

    /// Delivers one received frame to its caller; `Err` is a protocol violation that ends the connection.
    fn complete(&self, frame: bytes::BytesMut) -> Result<(), String> {
        let frame = wire::decode(frame)?;
        let reply = match frame.kind {
            Kind::Response => Ok(frame.body),
            Kind::Error => {
                let message = wire::decode_body::<String>(&frame.body)
                    .unwrap_or_else(|e| format!("(undecodable error message: {e})"));
                Err(RpcError::Remote(message))
            }
            Kind::Request => return Err(format!("unexpected request frame (id {})", frame.id)),
        };
        let waiter = lock(&self.pending).as_mut().and_then(|pending| pending.remove(&frame.id));
        match waiter {
            Some(waiter) => {
                // The caller may have given up in the meantime; nothing to do then.
                let _ = waiter.send(reply);
            }
            None => trace!(id = frame.id, "dropping a reply nobody waits for (timed out or cancelled)"),
        }
        Ok(())
    }

    /// Marks the connection closed and fails every pending call with `Disconnected`.
    fn close(&self, reason: &str) {
        self.closed.cancel();
        let pending = lock(&self.pending).take().unwrap_or_default();
        debug!(pending = pending.len(), "connection closed: {reason}");
        for (_, waiter) in pending {
            let _ = waiter.send(Err(RpcError::Disconnected { reason: reason.to_string() }));
        }
    }
}

/// Removes a caller's pending entry when the call gives up (timeout or the caller's future dropped).
struct Registration<'a> {
    shared: &'a ConnShared,
    id: u64,
    armed: bool,
}

impl Registration<'_> {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(pending) = lock(&self.shared.pending).as_mut() {
                pending.remove(&self.id);
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning (the protected maps stay consistent across a panic).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
