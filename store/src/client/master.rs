//! The client's link to the master, called synchronously from user threads: each call runs on the calling
//! thread over a pooled connection ([`BlockingClient`]), so no runtime thread is woken to send or to receive.

use std::time::{Duration, Instant};

use mooncake_store_rpc::{BlockingClient, ClientOptions, RpcError, ServiceId};

use super::errors;
use crate::error::{Cause, Error, Result, from_codes};
use crate::protocol::{PROTOCOL_VERSION, Request, Response, SERVICE_NAME};
use crate::types::PingOutcome;
use crate::types::{ClientId, ErrorCode};

/// The master's RPC client.
pub(crate) struct Master {
    rpc: BlockingClient<Request, Response>,
    timeout: Duration,
}

impl Master {
    /// Connects to `addr`, retrying refused or failed connections until `setup_timeout` has passed. A master
    /// that never answers gives `RpcFail` (or `RpcTimeout`) within `setup_timeout`.
    pub(crate) fn connect(
        addr: &str,
        client: ClientId,
        setup_timeout: Duration,
        rpc_timeout: Duration,
    ) -> Result<Master> {
        let deadline = Instant::now() + setup_timeout;
        let options = ClientOptions {
            connect_timeout: rpc_timeout.min(Duration::from_secs(1)).min(setup_timeout),
            request_timeout: rpc_timeout,
            ..Default::default()
        };
        let rpc = BlockingClient::new(addr, ServiceId::new(SERVICE_NAME, PROTOCOL_VERSION), options);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match rpc.call_with_timeout(&Request::Ping { client }, left.max(Duration::from_millis(1))) {
                Ok(Response::Ping(_)) => return Ok(Master { rpc, timeout: rpc_timeout }),
                Ok(other) => {
                    tracing::warn!(addr, reply = ?other, "the master answered a ping with the wrong kind");
                    return Err(ErrorCode::RpcFail.into());
                }
                Err(e @ (RpcError::VersionMismatch { .. } | RpcError::Rejected(_))) => {
                    return Err(errors::rpc("connect", &e));
                }
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(addr, attempts, error = %error, ?setup_timeout, "cannot reach the store master");
                let request = format!("ping {addr} ({attempts} attempts in {setup_timeout:?})");
                return Err(Error::with_cause(ErrorCode::RpcFail, Cause::Master { request, source: error }));
            }
            tracing::debug!(addr, error = %error, "master not reachable yet; retrying");
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    /// One request with the default timeout.
    pub(crate) fn call(&self, req: &Request) -> Result<Response> {
        self.call_with(req, self.timeout)
    }

    /// One request with `timeout`.
    pub(crate) fn call_with(&self, req: &Request, timeout: Duration) -> Result<Response> {
        self.rpc.call_with_timeout(req, timeout).map_err(|e| errors::rpc(req.name(), &e))
    }

    /// Sends `req` from a short-lived thread without waiting for the answer (failures are logged at debug level).
    pub(crate) fn fire_and_forget(&self, req: Request) {
        let rpc = self.rpc.clone();
        let timeout = self.timeout;
        let spawned = std::thread::Builder::new().name("mooncake-store-report".into()).spawn(move || {
            if let Err(e) = rpc.call_with_timeout(&req, timeout) {
                tracing::debug!(request = req.name(), error = %e, "fire-and-forget master RPC failed");
            }
        });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot start a thread for a fire-and-forget master RPC");
        }
    }

    /// Pings the master with `timeout`.
    pub(crate) fn ping(&self, client: ClientId, timeout: Duration) -> Result<PingOutcome> {
        match self.call_with(&Request::Ping { client }, timeout)? {
            Response::Ping(outcome) => Ok(outcome),
            other => Err(wrong_kind("ping", &other)),
        }
    }
}

/// The master answered with a response kind that does not belong to the request: `Internal`.
pub(crate) fn wrong_kind(request: &str, response: &Response) -> Error {
    tracing::error!(request, ?response, "the master answered with the wrong response kind");
    ErrorCode::Internal.into()
}

/// Checks that a per-key answer has one entry per key; `Internal` (logged) otherwise.
pub(crate) fn per_key<T>(request: &str, expected: usize, v: Vec<std::result::Result<T, ErrorCode>>) -> Vec<Result<T>> {
    if v.len() == expected {
        from_codes(v)
    } else {
        tracing::error!(request, expected, got = v.len(), "the master answered with the wrong number of results");
        (0..expected).map(|_| Err(ErrorCode::Internal.into())).collect()
    }
}
