//! Multiplexed request/response RPC over TCP for the store master.
//!
//! One TCP connection per client carries many concurrent calls, matched by request id ([`RpcClient`], async).
//! Plain threads that wait for each reply use [`BlockingClient`] instead: each call runs on the calling thread
//! over a pooled connection that carries one call at a time, which saves two thread wake-ups per call. The
//! server serves both kinds of connection alike, and answers handlers that finish without waiting from the task
//! that read the request. The crate is generic:
//! a service picks its own `Req` and `Resp` types (any serde types, encoded with postcard) and a [`ServiceId`]
//! that both sides must agree on.
//!
//! ```
//! use mooncake_store_rpc::{ClientOptions, PeerInfo, RpcClient, RpcServer, ServiceId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), mooncake_store_rpc::RpcError> {
//! let service = ServiceId::new("echo", 1);
//! let server = RpcServer::bind("127.0.0.1:0", service.clone(), |req: String, _peer: PeerInfo| async move {
//!     req.len()
//! })
//! .await?;
//! let client: RpcClient<String, usize> =
//!     RpcClient::connect(server.local_addr(), service, ClientOptions::default()).await?;
//! assert_eq!(client.call(&"hello".to_string()).await?, 5);
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Wire format
//! Every frame is a u32 big-endian length followed by that many bytes (tokio-util `LengthDelimitedCodec`);
//! frames above the receiver's `max_frame` close the connection.
//! - Hello (client → server, first frame): `b"MCRPC\0"`, wire version (u16 BE, currently 1), postcard
//!   `{ service: ServiceId, max_frame: u32 }`.
//! - Hello reply (server → client): the same 8-byte prefix, postcard `Accept { max_frame } | Mismatch { theirs }
//!   | Reject { reason }`.
//! - Then message frames: request id (u64 BE), kind (u8: 0 request, 1 response, 2 error response with a postcard
//!   `String`), postcard body. Responses may come in any order.
//!
//! A frame that breaks these rules closes that connection (logged with the reason); nothing panics. A request
//! body that does not decode gets an error response and the connection stays up.
//!
//! Byte payloads should use `serde_bytes` (`#[serde(with = "serde_bytes")]` or `serde_bytes::ByteBuf`): plain
//! `Vec<u8>` is encoded element by element, which is much slower for large payloads.
#![forbid(unsafe_code)]

mod blocking;
mod client;
mod error;
mod server;
mod wire;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use blocking::BlockingClient;
pub use client::RpcClient;
pub use error::RpcError;
pub use server::{Handler, PeerInfo, RpcServer};

/// Default limit on one frame: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Names a service and its version; a client only talks to a server with the identical id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceId {
    /// Service name, e.g. `"mooncake-master"`.
    pub name: String,
    /// Protocol version of the service's request/response types; bump it on every incompatible change.
    pub version: u32,
}

impl ServiceId {
    /// A service id from a name and a version.
    pub fn new(name: impl Into<String>, version: u32) -> Self {
        ServiceId { name: name.into(), version }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bound on TCP connect plus handshake, for the first connection and for every reconnection (default 1 s).
    pub connect_timeout: Duration,
    /// Default per-call timeout, from sending to the reply (default 5 s); see [`RpcClient::call_with_timeout`].
    pub request_timeout: Duration,
    /// Largest frame this client sends or accepts (default [`DEFAULT_MAX_FRAME`]).
    pub max_frame: usize,
    /// While calls are pending, poll the socket this long before sleeping (default 200 us; zero = never):
    /// a reply that arrives meanwhile skips a thread wake-up, which costs tens of microseconds on VMs. The
    /// blocking client yields the CPU between polls, so a server woken on the same CPU runs first.
    pub poll_for_reply: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            poll_for_reply: Duration::from_micros(200),
        }
    }
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest frame the server accepts or sends (default [`DEFAULT_MAX_FRAME`]).
    pub max_frame: usize,
    /// Requests one connection may have in its handlers at once; beyond it the server stops reading that
    /// connection until one finishes (default 1024).
    pub max_in_flight_per_conn: usize,
    /// Time a new connection has to send its hello (default 5 s).
    pub handshake_timeout: Duration,
    /// After each request, poll the connection this long before sleeping (default zero = never): clients
    /// often send the next request right away (a put's end after its data transfer), but on a host with few
    /// cores the polling takes CPU from the clients themselves (measured on 2 vCPUs: slower with 100 us).
    pub poll_after_request: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight_per_conn: 1024,
            handshake_timeout: Duration::from_secs(5),
            poll_after_request: Duration::ZERO,
        }
    }
}
