//! Reaching etcd: the private runtime every request runs on, one lazily built client per
//! endpoint, failover between endpoints inside one deadline, and the mapping of etcd-client
//! errors onto [`mooncake_core::Error`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use mooncake_core::{Error, Result, sync};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::EtcdConfig;

/// Client-side gRPC limit for one received message. etcd sends responses up to 2 GiB - 1
/// (`math.MaxInt32`); tonic's default of 4 MiB would fail a `list` or a watch batch of a few
/// large descriptors. Requests are only bounded by etcd's `--max-request-bytes` (1.5 MiB default).
pub(crate) const MAX_RESPONSE_BYTES: usize = (1 << 31) - 1;

/// HTTP/2 ping interval that detects a dead connection under a long-lived watch or keep-alive
/// stream. etcd's default `--grpc-keepalive-min-time` is 5 s; pinging faster gets the
/// connection closed with `too_many_pings`.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// The private runtime and the process it was built in.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// The runtime that runs every etcd request and background task of this crate.
///
/// Callers may drive the store from any executor, including short-lived current-thread runtimes
/// (each conformance case builds one) or none at all; tonic's connection tasks and the lease
/// keep-alive must outlive those, so they live here. Built on first use and never dropped. A
/// forked child (Python multiprocessing) inherits the memory but not the worker threads, so a
/// new runtime is built when the process id changes; clients made before the fork then fail once
/// and are rebuilt on the new runtime.
pub(crate) fn runtime() -> Result<&'static Runtime> {
    let pid = std::process::id();
    let mut slot = sync::lock(&RUNTIME);
    if let Some(rt) = slot.and_then(|(owner, rt)| (owner == pid).then_some(rt)) {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mooncake-etcd")
        .enable_all()
        .build()
        .map_err(|e| Error::unavailable(format!("etcd: cannot start the background runtime: {e}")))?;
    let rt: &'static Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    Ok(rt)
}

/// The runtime if this process has started it (used from `Drop`, which must not start it).
pub(crate) fn started_runtime() -> Option<&'static Runtime> {
    let pid = std::process::id();
    sync::lock(&RUNTIME).and_then(|(owner, rt)| (owner == pid).then_some(rt))
}

/// Runs `fut` on the private runtime and waits for it from whatever executor polls the returned
/// future. Dropping the returned future cancels the work.
pub(crate) async fn on_runtime<T: Send + 'static>(fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    let task = AbortOnDrop(runtime()?.spawn(fut));
    match task.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Err(Error::Canceled),
        Err(e) => Err(Error::Metadata(format!("etcd: internal task failed: {e}"))),
    }
}

/// A join handle that aborts its task when dropped before completion.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a failed etcd call is reported.
pub(crate) enum Failure {
    /// The endpoint could not be reached or did not answer: try the next one.
    Unreachable(String),
    /// etcd answered with an error: report it.
    Service(String),
}

/// Sorts an etcd-client error into "cannot reach" and "etcd said no".
pub(crate) fn classify(e: &etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::TransportError(t) => Failure::Unreachable(error_chain(t)),
        E::IoError(io) => Failure::Unreachable(io.to_string()),
        E::GRpcStatus(s) => {
            let mut msg = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
            if let Some(source) = std::error::Error::source(s) {
                append_chain(&mut msg, source);
            }
            match s.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted => {
                    Failure::Unreachable(msg)
                }
                _ => Failure::Service(msg),
            }
        }
        other => Failure::Service(other.to_string()),
    }
}

/// `e` and its causes, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    append_chain(&mut s, e);
    s
}

/// Appends `e` and its causes to `out`, skipping any that only repeat what is already there
/// (tonic nests the same "tcp connect error" several times).
fn append_chain(out: &mut String, e: &dyn std::error::Error) {
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = err.source();
    }
}

/// True for etcd's answer about a lease it does not have (expired, revoked, or a new server).
pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound || s.message().contains("requested lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// One client per endpoint, created on first use and dropped after a failure so the next call
/// reconnects from scratch.
pub(crate) struct Endpoints {
    endpoints: Vec<String>,
    clients: Vec<Mutex<Option<Client>>>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    options: ConnectOptions,
}

impl Endpoints {
    pub(crate) fn new(config: &EtcdConfig) -> Self {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(HTTP2_PING_INTERVAL, config.timeout);
        Endpoints {
            endpoints: config.endpoints.clone(),
            clients: config.endpoints.iter().map(|_| Mutex::new(None)).collect(),
            preferred: AtomicUsize::new(0),
            options,
        }
    }

    /// `h1:2379,h2:2379`, for messages.
    pub(crate) fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    async fn client(&self, i: usize) -> std::result::Result<Client, etcd_client::Error> {
        if let Some(c) = sync::lock(&self.clients[i]).as_ref() {
            return Ok(c.clone());
        }
        // Building a client does no I/O: tonic connects on the first request.
        let url = format!("http://{}", self.endpoints[i]);
        let fresh = Client::connect([url], Some(self.options.clone())).await?;
        Ok(sync::lock(&self.clients[i]).get_or_insert(fresh).clone())
    }

    fn forget(&self, i: usize) {
        sync::lock(&self.clients[i]).take();
    }

    /// Drops every client (their connections close once in-flight streams end).
    pub(crate) fn forget_all(&self) {
        for i in 0..self.clients.len() {
            self.forget(i);
        }
    }

    /// Runs `f` against the preferred endpoint, failing over to the others in order, all before
    /// `deadline`. Each attempt gets an equal share of the time left, so one silent endpoint
    /// cannot use up the whole budget. `what` names the operation in error messages.
    ///
    /// Unreachable endpoints give [`Error::Unavailable`] naming every endpoint; an error answer
    /// from etcd gives [`Error::Metadata`] at once.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, deadline: Instant, mut f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut failures = Vec::new();
        for attempt in 0..n {
            let i = (first + attempt) % n;
            let endpoint = &self.endpoints[i];
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let tries_left = u32::try_from(n - attempt).unwrap_or(u32::MAX);
            let share = (deadline - now) / tries_left;
            let client = match self.client(i).await {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{endpoint}: {e}"));
                    continue;
                }
            };
            match tokio::time::timeout(share, f(client)).await {
                Ok(Ok(v)) => {
                    if attempt > 0 {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Ok(Err(e)) => match classify(&e) {
                    Failure::Unreachable(why) => {
                        self.forget(i);
                        failures.push(format!("{endpoint}: {why}"));
                    }
                    Failure::Service(why) => return Err(service_error(what, &why)),
                },
                Err(_) => {
                    self.forget(i);
                    failures.push(format!("{endpoint}: no answer within {}", fmt_duration(share)));
                }
            }
        }
        if failures.is_empty() {
            failures.push("the request timed out before it could be sent".to_string());
        }
        Err(Error::unavailable(format!(
            "etcd {what}: cannot reach etcd at {} ({}); check that etcd is running and reachable, or raise \
             MC_METADATA_TIMEOUT_MS",
            self.describe(),
            failures.join("; ")
        )))
    }
}

/// [`Error::Metadata`] for an error answer from etcd, with a hint for the usual size limit.
pub(crate) fn service_error(what: &str, why: &str) -> Error {
    let hint = if why.contains("too large") || why.contains("larger than max") {
        " (etcd limits one request to --max-request-bytes, 1.5 MiB by default)"
    } else {
        ""
    };
    Error::Metadata(format!("etcd {what}: {why}{hint}"))
}

/// `3s`, `1.5s`, `250ms`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_millis() >= 1000 && d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_millis() >= 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_secs(3)), "3s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn error_chains_skip_repeats() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let refused = E("Connection refused", None);
        let e = E("tcp connect error", Some(Box::new(E("tcp connect error", Some(Box::new(refused))))));
        assert_eq!(error_chain(&e), "tcp connect error: Connection refused");
    }

    #[test]
    fn errors_are_sorted() {
        let unavailable = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("connection refused"));
        assert!(matches!(classify(&unavailable), Failure::Unreachable(m) if m == "connection refused"));
        let too_big =
            etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument("etcdserver: request is too large"));
        assert!(matches!(classify(&too_big), Failure::Service(_)));
        let e = service_error("put \"k\"", "etcdserver: request is too large");
        assert!(e.to_string().contains("--max-request-bytes"), "{e}");
        let gone = etcd_client::Error::GRpcStatus(tonic::Status::not_found("etcdserver: requested lease not found"));
        assert!(is_lease_not_found(&gone));
        assert!(is_lease_not_found(&etcd_client::Error::LeaseKeepAliveError("lease not found".into())));
        assert!(!is_lease_not_found(&unavailable));
    }
}
