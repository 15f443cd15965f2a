//! The client side of the handshake socket: one TCP connection per request, as upstream.

use std::net::SocketAddr;
use std::time::Duration;

use mooncake_core::{Error, Notification, Result, split_host_port};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::config::HandshakeConfig;
use crate::frame::{Frame, FrameType, io_error, read_frame, write_frame};

/// Sends handshake requests to peers (ours or upstream Mooncake).
///
/// Every call opens a connection, sends one frame, reads one reply frame and closes, bounded by
/// [`HandshakeConfig::connect_timeout`] and [`HandshakeConfig::request_timeout`].
#[derive(Debug, Clone, Default)]
pub struct HandshakeClient {
    config: HandshakeConfig,
}

impl HandshakeClient {
    /// A client with the given timeouts and limits.
    pub fn new(config: HandshakeConfig) -> Self {
        HandshakeClient { config }
    }

    /// The timeouts and limits in use.
    pub fn config(&self) -> &HandshakeConfig {
        &self.config
    }

    /// Asks peer `addr` (`host:port`, `[v6]:port`) for its segment descriptor JSON (metadata frame).
    pub async fn fetch_descriptor(&self, addr: &str) -> Result<Vec<u8>> {
        let reply = self.request(addr, FrameType::Metadata, b"{}\n").await?;
        let value = reply.parse_json()?;
        if !value.is_object() {
            return Err(Error::Protocol(format!("peer {addr} answered a metadata request with non-object JSON")));
        }
        let mut json = reply.json;
        while json.last().is_some_and(u8::is_ascii_whitespace) {
            json.pop();
        }
        Ok(json)
    }

    /// Delivers a notification to peer `addr` (notify frame `{"name","notify_msg"}`).
    pub async fn notify(&self, addr: &str, notification: &Notification) -> Result<()> {
        let body = serde_json::json!({ "name": notification.name, "notify_msg": notification.message });
        let reply = self.request(addr, FrameType::Notify, &to_line(&body)?).await?;
        reply.parse_json()?;
        Ok(())
    }

    /// Checks that peer `addr` answers a probe frame with `{"status":"success"}`.
    pub async fn probe(&self, addr: &str) -> Result<()> {
        let reply = self.request(addr, FrameType::Probe, b"{}\n").await?;
        let value = reply.parse_json()?;
        match value.get("status").and_then(Value::as_str) {
            Some("success") | None => Ok(()),
            Some(other) => Err(Error::Protocol(format!("peer {addr} answered the probe with status {other:?}"))),
        }
    }

    /// Sends a transport handshake (connection frame) to peer `addr` and returns its reply.
    ///
    /// A reply carrying a non-empty `reply_msg` is the peer's refusal: [`Error::Protocol`] with
    /// that message.
    pub async fn connect(&self, addr: &str, request: &Value) -> Result<Value> {
        let reply = self.request(addr, FrameType::Connection, &to_line(request)?).await?;
        let value = reply.parse_json()?;
        if let Some(msg) = value.get("reply_msg").and_then(Value::as_str).filter(|m| !m.is_empty()) {
            return Err(Error::Protocol(format!("peer {addr} rejected the handshake: {msg}")));
        }
        Ok(value)
    }

    /// Sends one frame of `frame_type` carrying `json` and returns the reply frame.
    ///
    /// The reply must have the request's type (a legacy reply is accepted for a connection
    /// request, as an old peer sends one).
    pub async fn request(&self, addr: &str, frame_type: FrameType, json: &[u8]) -> Result<Frame> {
        let total = self.config.request_timeout;
        tokio::time::timeout(total, self.request_inner(addr, frame_type, json))
            .await
            .map_err(|_| Error::Timeout(total))?
    }

    async fn request_inner(&self, addr: &str, frame_type: FrameType, json: &[u8]) -> Result<Frame> {
        let mut stream = self.connect_stream(addr).await?;
        write_frame(&mut stream, &Frame::new(frame_type, json), addr).await?;
        let reply = read_frame(&mut stream, self.config.max_frame_length, addr).await?.ok_or_else(|| {
            Error::disconnected(addr, "closed the connection without replying (it may have rejected the request)")
        })?;
        let type_ok =
            reply.frame_type == frame_type || (frame_type.is_connection() && reply.frame_type == FrameType::Legacy);
        if !type_ok {
            return Err(Error::Protocol(format!(
                "peer {addr} answered a {frame_type:?} request with a {:?} frame",
                reply.frame_type
            )));
        }
        Ok(reply)
    }

    /// Resolves `addr` and connects to the first address that accepts, like upstream's
    /// `getaddrinfo` loop.
    async fn connect_stream(&self, addr: &str) -> Result<TcpStream> {
        let targets = resolve(addr).await?;
        let mut last = None;
        for target in targets {
            match connect_one(target, self.config.connect_timeout, addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::unavailable(format!("handshake peer {addr}: no address to connect to"))))
    }
}

async fn connect_one(target: SocketAddr, timeout: Duration, addr: &str) -> Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| Error::Timeout(timeout))?
        .map_err(|e| Error::disconnected(addr, format!("cannot connect to handshake socket {target}: {e}")))?;
    stream.set_nodelay(true).map_err(|e| io_error(addr, e))?;
    Ok(stream)
}

/// `host:port` (or `[v6]:port`) to socket addresses, IPv4 first.
pub(crate) async fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let (host, port) = split_host_port(addr)?;
    let port = port.ok_or_else(|| Error::InvalidArgument(format!("handshake address {addr:?} has no port")))?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let mut v: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| Error::unavailable(format!("cannot resolve handshake peer {addr}: {e}; check DNS or /etc/hosts")))?
        .collect();
    v.sort_by_key(|a| a.is_ipv6());
    v.dedup();
    if v.is_empty() {
        return Err(Error::unavailable(format!("handshake peer {addr} resolves to no address")));
    }
    Ok(v)
}

/// JSON followed by a newline, the way upstream's `Json::FastWriter` writes it.
pub(crate) fn to_line(value: &Value) -> Result<Vec<u8>> {
    let mut v = serde_json::to_vec(value)?;
    v.push(b'\n');
    Ok(v)
}
