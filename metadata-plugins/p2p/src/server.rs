//! The server side of the handshake socket and [`HandshakeRpc`], the engine's [`PeerRpc`].

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{Error, Notification, PeerRpc, Result, RpcHandler, sync};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::client::{HandshakeClient, to_line};
use crate::config::HandshakeConfig;
use crate::frame::{Frame, FrameType, read_frame, write_frame};

/// Reply to a notify frame, byte for byte as upstream writes it.
pub const NOTIFY_REPLY: &[u8] = b"{\"name\":\"\",\"notify_msg\":\"success\"}\n";
/// Reply to a probe frame, byte for byte as upstream writes it.
pub const PROBE_REPLY: &[u8] = b"{\"status\":\"success\"}\n";

/// Listen backlog of the handshake socket.
const BACKLOG: u32 = 1024;

/// The handshake socket of docs/wire-formats.md section 3: server and client in one, registered as the
/// `handshake` [`PeerRpc`].
///
/// The server binds exactly the host it is given (never a wildcard it was not asked for), serves
/// each connection in its own task with a read timeout, and drops a misbehaving connection with
/// one warning while it keeps serving the others.
pub struct HandshakeRpc {
    client: HandshakeClient,
    server: Mutex<Option<Server>>,
}

struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Default for HandshakeRpc {
    fn default() -> Self {
        Self::new(HandshakeConfig::from_env())
    }
}

impl std::fmt::Debug for HandshakeRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeRpc").field("config", self.config()).field("local_addr", &self.local_addr()).finish()
    }
}

impl HandshakeRpc {
    /// A handshake socket with the given timeouts and limits (not serving yet).
    pub fn new(config: HandshakeConfig) -> Self {
        HandshakeRpc { client: HandshakeClient::new(config), server: Mutex::new(None) }
    }

    /// The timeouts and limits in use.
    pub fn config(&self) -> &HandshakeConfig {
        self.client.config()
    }

    /// The client half (what [`PeerRpc::fetch_descriptor`] and friends use).
    pub fn client(&self) -> &HandshakeClient {
        &self.client
    }

    /// The address the server listens on, while it serves.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        sync::lock(&self.server).as_ref().map(|s| s.local_addr)
    }
}

#[async_trait]
impl PeerRpc for HandshakeRpc {
    async fn serve(
        &self,
        bind_host: &str,
        port: u16,
        port_range: (u16, u16),
        handler: Arc<dyn RpcHandler>,
    ) -> Result<u16> {
        if let Some(s) = sync::lock(&self.server).as_ref() {
            return Err(Error::AlreadyExists(format!("handshake server already listening on {}", s.local_addr)));
        }
        let ip = resolve_bind_host(bind_host).await?;
        let listener = bind(ip, port, port_range)?;
        let local_addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, handler, self.config().clone(), stop_rx));
        let mut guard = sync::lock(&self.server);
        if guard.is_some() {
            // Another serve() won the race; stop ours.
            let _ = stop.send(true);
            task.abort();
            return Err(Error::AlreadyExists("handshake server already listening".into()));
        }
        *guard = Some(Server { local_addr, stop, task });
        tracing::debug!(%local_addr, "handshake server listening");
        Ok(local_addr.port())
    }

    async fn fetch_descriptor(&self, addr: &str) -> Result<Vec<u8>> {
        self.client.fetch_descriptor(addr).await
    }

    async fn notify(&self, addr: &str, notification: &Notification) -> Result<()> {
        self.client.notify(addr, notification).await
    }

    async fn probe(&self, addr: &str) -> Result<()> {
        self.client.probe(addr).await
    }

    async fn connect(&self, addr: &str, request: &Value) -> Result<Value> {
        self.client.connect(addr, request).await
    }

    async fn shutdown(&self) {
        let Some(server) = sync::lock(&self.server).take() else { return };
        let _ = server.stop.send(true);
        let mut task = server.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// The IP to bind for `host` (a literal, `[v6]`, or a name resolved with IPv4 preferred).
async fn resolve_bind_host(host: &str) -> Result<IpAddr> {
    let h = host.trim();
    let h = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(h);
    if h.is_empty() {
        return Err(Error::InvalidArgument("empty bind host for the handshake socket".into()));
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(ip);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((h, 0))
        .await
        .map_err(|e| Error::unavailable(format!("cannot resolve bind host {h:?}: {e}; check DNS or /etc/hosts")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .map(SocketAddr::ip)
        .ok_or_else(|| Error::unavailable(format!("bind host {h:?} resolves to no address")))
}

/// Binds `ip:port`; port 0 tries the ports of `range` from a random start, then lets the OS choose.
fn bind(ip: IpAddr, port: u16, range: (u16, u16)) -> Result<TcpListener> {
    if port != 0 {
        return bind_one(ip, port).map_err(|e| bind_error(ip, port, e));
    }
    let (lo, hi) = (range.0.min(range.1).max(1), range.0.max(range.1));
    if hi >= lo {
        let span = u32::from(hi - lo) + 1;
        let start = (random_u64() % u64::from(span)) as u32;
        for i in 0..span {
            let p = lo + ((start + i) % span) as u16;
            match bind_one(ip, p) {
                Ok(l) => return Ok(l),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied) => {}
                Err(e) => return Err(bind_error(ip, p, e)),
            }
        }
    }
    tracing::warn!(%ip, lo, hi, "every port of the handshake port range is busy; letting the OS choose one");
    bind_one(ip, 0).map_err(|e| bind_error(ip, 0, e))
}

fn bind_one(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(ip, port))?;
    socket.listen(BACKLOG)
}

fn bind_error(ip: IpAddr, port: u16, e: std::io::Error) -> Error {
    let addr = SocketAddr::new(ip, port);
    match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::unavailable(format!("handshake port {addr} is already in use")),
        std::io::ErrorKind::AddrNotAvailable => Error::InvalidArgument(format!(
            "cannot bind the handshake socket to {addr}: {ip} is not an address of this machine; \
             use a local address as the server name or set MC_TCP_BIND_ADDRESS"
        )),
        _ => Error::unavailable(format!("cannot bind the handshake socket to {addr}: {e}")),
    }
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

async fn accept_loop(
    listener: TcpListener,
    handler: Arc<dyn RpcHandler>,
    config: HandshakeConfig,
    mut stop: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "handshake accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let config = config.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.changed() => {}
                r = serve_connection(stream, peer, handler.as_ref(), &config) => {
                    if let Err(e) = r {
                        tracing::warn!(%peer, error = %e, "handshake connection dropped");
                    }
                }
            }
        });
    }
    tracing::debug!("handshake server stopped");
}

/// Serves one request on one connection: read a frame, answer it, close.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: &dyn RpcHandler,
    config: &HandshakeConfig,
) -> Result<()> {
    let peer_name = peer.to_string();
    stream.set_nodelay(true)?;
    let read = read_frame(&mut stream, config.max_frame_length, &peer_name);
    let frame = match tokio::time::timeout(config.read_timeout, read).await {
        Err(_) => {
            return Err(Error::Protocol(format!("no complete request within {:?}", config.read_timeout)));
        }
        Ok(r) => match r? {
            Some(f) => f,
            None => {
                tracing::debug!(%peer, "handshake connection closed before sending anything");
                return Ok(());
            }
        },
    };
    let reply = answer(&frame, handler, config).await?;
    let reply = Frame::new(frame.frame_type, reply);
    tokio::time::timeout(config.read_timeout, write_frame(&mut stream, &reply, &peer_name))
        .await
        .map_err(|_| Error::Protocol(format!("reply not taken within {:?}", config.read_timeout)))??;
    // Like upstream: half-close, then let the client close first.
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(config.read_timeout, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

/// The reply JSON (newline-terminated) for a request frame.
async fn answer(frame: &Frame, handler: &dyn RpcHandler, config: &HandshakeConfig) -> Result<Vec<u8>> {
    let request = frame.parse_json()?;
    match frame.frame_type {
        FrameType::Metadata => {
            let mut desc = handler.local_descriptor().into_bytes();
            if desc.last() != Some(&b'\n') {
                desc.push(b'\n');
            }
            Ok(desc)
        }
        FrameType::Notify => {
            let Some(obj) = request.as_object() else {
                return Err(Error::Protocol("notify frame is not a JSON object".into()));
            };
            let field = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            handler.on_notify(Notification { name: field("name"), message: field("notify_msg") });
            Ok(NOTIFY_REPLY.to_vec())
        }
        FrameType::Probe => Ok(PROBE_REPLY.to_vec()),
        FrameType::Connection | FrameType::Legacy => {
            let reply = tokio::time::timeout(config.handler_timeout, handler.on_connection(request))
                .await
                .unwrap_or_else(|_| {
                    serde_json::json!({ "reply_msg": format!("handshake not answered within {:?}", config.handler_timeout) })
                });
            to_line(&reply)
        }
    }
}
