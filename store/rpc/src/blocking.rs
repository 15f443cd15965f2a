//! The blocking client: each call runs on the calling thread over a pooled connection that carries one call at
//! a time.
//!
//! The multiplexed [`RpcClient`](crate::RpcClient) hands every request to a writer task and every reply back
//! from a reader task. For a plain thread waiting on one call, those hand-offs are two thread wake-ups per call,
//! and on virtual machines a wake-up of an idle vCPU costs tens of microseconds. Here the caller writes the
//! frame itself and polls the socket for the reply (yielding the CPU between polls) before it sleeps in `read`.
//! Threads calling at the same time use separate connections; the server sees ordinary client connections.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::marker::PhantomData;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{self, Hello, Kind};
use crate::{ClientOptions, RpcError, ServiceId};

/// Idle connections kept for reuse; more may be open while more threads call at once.
const MAX_IDLE: usize = 16;
/// Largest receive buffer an idle connection keeps.
const RETAINED_BUFFER: usize = 1 << 20;

/// A synchronous RPC client for one server address. Cheap to clone; clones share the connection pool and may
/// be called from many threads at once.
///
/// Connections are made on demand, each bounded by [`ClientOptions::connect_timeout`]; an idle connection the
/// server closed is noticed before reuse and replaced. A call that times out or breaks closes its connection
/// (a late reply would otherwise answer the next call).
pub struct BlockingClient<Req, Resp> {
    inner: Arc<Inner>,
    _types: PhantomData<fn(&Req) -> Resp>,
}

struct Inner {
    addr: String,
    service: ServiceId,
    options: ClientOptions,
    next_id: AtomicU64,
    idle: Mutex<Vec<Conn>>,
}

/// One connection after the handshake.
struct Conn {
    stream: TcpStream,
    /// Smaller of our and the server's frame limit.
    max_send: usize,
    /// Bytes received and not yet consumed (one reply at most: a connection carries one call at a time).
    buf: Vec<u8>,
}

impl<Req, Resp> Clone for BlockingClient<Req, Resp> {
    fn clone(&self) -> Self {
        BlockingClient { inner: self.inner.clone(), _types: PhantomData }
    }
}

impl<Req, Resp> fmt::Debug for BlockingClient<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingClient")
            .field("addr", &self.inner.addr)
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl<Req, Resp> BlockingClient<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    /// A client for `addr` (`"host:port"`, `"[::1]:port"`); it connects on its first call.
    pub fn new(addr: impl ToString, service: ServiceId, options: ClientOptions) -> Self {
        let inner = Inner {
            addr: addr.to_string(),
            service,
            options,
            next_id: AtomicU64::new(1),
            idle: Mutex::new(Vec::new()),
        };
        BlockingClient { inner: Arc::new(inner), _types: PhantomData }
    }

    /// Calls the server with the default timeout ([`ClientOptions::request_timeout`]).
    pub fn call(&self, req: &Req) -> Result<Resp, RpcError> {
        self.call_with_timeout(req, self.inner.options.request_timeout)
    }

    /// Calls the server; `timeout_after` bounds the time from sending the request to its reply. Connecting
    /// first, if no idle connection is at hand, is bounded separately by the connect timeout.
    pub fn call_with_timeout(&self, req: &Req, timeout_after: Duration) -> Result<Resp, RpcError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(Kind::Request, id, req, inner.options.max_frame)?;
        let mut conn = inner.checkout()?;
        if let Err(e) = wire::check_len(frame.len(), conn.max_send) {
            inner.checkin(conn);
            return Err(e);
        }
        let deadline = deadline_after(timeout_after);
        let reply = conn.exchange(&frame, deadline, &inner.options).map_err(|e| match e {
            Failure::Timeout => RpcError::Timeout { after: timeout_after },
            Failure::Broken(reason) => RpcError::Disconnected { reason },
        })?;
        let violation =
            |what: String| RpcError::Disconnected { reason: format!("protocol violation by the server: {what}") };
        // A reply that breaks the protocol closes the connection (dropped here); a good one leaves it clean
        // (one request, its whole reply) for the next call.
        let (reply_id, kind, body) = wire::split(reply).map_err(violation)?;
        if reply_id != id {
            return Err(violation(format!("reply id {reply_id} to request {id}")));
        }
        let result = match kind {
            Kind::Response => wire::decode_body(body).map_err(RpcError::Decode),
            Kind::Error => Err(RpcError::Remote(
                wire::decode_body::<String>(body).unwrap_or_else(|e| format!("(undecodable error message: {e})")),
            )),
            Kind::Request => return Err(violation(format!("a request frame (id {reply_id})"))),
        };
        inner.checkin(conn);
        result
    }
}

impl<Req, Resp> BlockingClient<Req, Resp> {
    /// The server address as given.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Idle pooled connections (for tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Inner {
    /// An idle connection that is still open, or a new one.
    fn checkout(&self) -> Result<Conn, RpcError> {
        loop {
            let next = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            match next {
                Some(conn) if conn.still_open() => return Ok(conn),
                Some(_) => continue, // closed by the server while idle (e.g. it restarted): drop it
                None => return self.open(),
            }
        }
    }

    fn checkin(&self, mut conn: Conn) {
        if conn.buf.len() > RETAINED_BUFFER {
            conn.buf = Vec::new(); // an idle connection keeps no large reply buffer
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Connects and shakes hands, within the connect timeout.
    fn open(&self) -> Result<Conn, RpcError> {
        let limit = self.options.connect_timeout;
        let deadline = deadline_after(limit);
        let failed = |reason: String| RpcError::ConnectFailed { addr: self.addr.clone(), reason };
        let addrs = self.addr.to_socket_addrs().map_err(|e| failed(e.to_string()))?;
        let mut last = format!("{:?} resolves to no address", self.addr);
        let mut stream = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = format!("no TCP connection within {limit:?}");
                break;
            }
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => last = format!("no TCP connection within {limit:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        let stream = stream.ok_or_else(|| failed(last))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn { stream, max_send: 0, buf: Vec::with_capacity(4096) };
        let hello = Hello { service: self.service.clone(), max_frame: wire::max_frame_on_wire(self.options.max_frame) };
        let handshake = |reason: String| RpcError::Handshake { addr: self.addr.clone(), reason };
        let reply = conn.exchange(&wire::encode_hello(&hello), deadline, &self.options).map_err(|e| match e {
            Failure::Timeout => handshake(format!("no handshake reply within {limit:?}")),
            Failure::Broken(reason) => handshake(reason),
        })?;
        let server_max = wire::accepted_limit(wire::read_hello_reply(reply).map_err(handshake)?, &self.service)?;
        conn.max_send = self.options.max_frame.min(usize::try_from(server_max).unwrap_or(usize::MAX));
        tracing::debug!(addr = %self.addr, service = %self.service, "connected (blocking)");
        Ok(conn)
    }
}

/// `timeout` from now; a timeout too large to represent (`Duration::MAX` for "no limit") gives a deadline a
/// century away.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Why an exchange failed; the connection is unusable either way.
enum Failure {
    Timeout,
    Broken(String),
}

impl Conn {
    /// False when the server closed the connection (or sent something unasked) while it was idle.
    fn still_open(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.peek(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// Sends `frame` (length prefix added here) and returns the body of the next frame received, before
    /// `deadline`.
    fn exchange(&mut self, frame: &[u8], deadline: Instant, options: &ClientOptions) -> Result<&[u8], Failure> {
        let broken = |what: &str, e: io::Error| Failure::Broken(format!("{what} failed: {e}"));
        let len = u32::try_from(frame.len()).map_err(|_| Failure::Broken("frame too long".into()))?;
        self.stream.set_nonblocking(false).map_err(|e| broken("set_nonblocking", e))?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.stream.set_write_timeout(Some(left)).map_err(|e| broken("set_write_timeout", e))?;
        let mut out = Vec::with_capacity(4 + frame.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(frame);
        match self.stream.write_all(&out) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(Failure::Timeout),
            Err(e) => return Err(broken("write", e)),
        }
        // `buf[..filled]` holds what arrived; `buf` only grows (no zero-filling per read).
        let mut filled = 0usize;
        if self.buf.len() < 4096 {
            self.buf.resize(4096, 0);
        }
        let mut want = 4usize;
        let mut body_len = None;
        let spin_until = deadline_after(options.poll_for_reply).min(deadline);
        let mut blocking = false;
        self.stream.set_nonblocking(true).map_err(|e| broken("set_nonblocking", e))?;
        loop {
            if filled >= want {
                match body_len {
                    None => {
                        let n = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                        if n > options.max_frame {
                            return Err(Failure::Broken(format!(
                                "the server sent a frame of {n} bytes, above the {}-byte limit",
                                options.max_frame
                            )));
                        }
                        body_len = Some(n);
                        want = 4 + n;
                        continue;
                    }
                    Some(_) if filled > want => {
                        return Err(Failure::Broken("protocol violation by the server: bytes after the reply".into()));
                    }
                    Some(_) => return Ok(&self.buf[4..want]),
                }
            }
            if blocking {
                // Each sleeping read gets the time left, so the whole call stays within the deadline.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Failure::Timeout);
                }
                self.stream.set_read_timeout(Some(left)).map_err(|e| broken("set_read_timeout", e))?;
            }
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            match self.stream.read(&mut self.buf[filled..]) {
                Ok(0) => return Err(Failure::Broken("the server closed the connection".into())),
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock && !blocking => {
                    if Instant::now() < spin_until {
                        // Let a thread woken on this CPU (the server, when it runs here) go first.
                        std::thread::yield_now();
                        continue;
                    }
                    self.stream.set_nonblocking(false).map_err(|e| broken("set_nonblocking", e))?;
                    blocking = true;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(Failure::Timeout);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(broken("read", e)),
            }
        }
    }
}
