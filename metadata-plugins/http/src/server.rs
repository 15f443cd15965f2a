//! The HTTP metadata server: `GET|PUT|DELETE /metadata?key=<url-escaped key>` and `GET /health`.
//!
//! Status codes follow upstream (docs/wire-formats.md section 5): missing or blank key 400, absent key 404 on
//! GET and DELETE, a changed `rpc_meta` key 400. Beyond upstream: a key that is not UTF-8 gets
//! 400, a body over the limit 413, a full key space 507, and a persist failure 500 (503 for later
//! changes until restart). The server keeps serving after every one of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use crate::keyspace::{KeySpace, PersistError, PutOutcome};
use crate::persist::LoadError;

/// Default largest PUT body (a segment descriptor with thousands of buffers fits easily).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// Default limit on the bytes of all keys and values together.
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 1 << 30;

/// How to run a metadata server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind (`0.0.0.0` by default, as upstream).
    pub host: String,
    /// Port (8080 by default; 0 picks a free one).
    pub port: u16,
    /// Append-only log that makes keys survive a restart (`--persist`); `None` keeps them in memory.
    pub persist: Option<PathBuf>,
    /// Largest PUT body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest total size of keys and values; PUTs past it get 507.
    pub max_total_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "0.0.0.0".into(),
            port: 8080,
            persist: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
        }
    }
}

impl ServerConfig {
    /// A server on `host:port`, other settings default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        ServerConfig { host: host.into(), port, ..Self::default() }
    }

    /// Persists keys to `path`.
    pub fn with_persist(mut self, path: impl Into<PathBuf>) -> Self {
        self.persist = Some(path.into());
        self
    }
}

/// A metadata server's state and routes, ready to serve or to embed in another axum app.
#[derive(Clone)]
pub struct HttpMetadataServer {
    keys: Arc<KeySpace>,
    config: ServerConfig,
}

impl HttpMetadataServer {
    /// Loads the persist file (if configured). A corrupt file is an error that names the offset.
    pub fn new(config: ServerConfig) -> Result<Self, LoadError> {
        let keys = match &config.persist {
            Some(path) => KeySpace::persistent(path.clone(), config.max_total_bytes)?,
            None => KeySpace::in_memory(config.max_total_bytes),
        };
        Ok(HttpMetadataServer { keys: Arc::new(keys), config })
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The routes (`/metadata`, `/health`), to merge into another router (the store master does).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metadata", any(metadata))
            .route("/health", get(|| async { "OK" }))
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(self.keys.clone())
    }

    /// Binds `host:port` and serves on the current tokio runtime until [`RunningServer::shutdown`].
    pub async fn serve(self) -> std::io::Result<RunningServer> {
        let listener = tokio::net::TcpListener::bind((self.config.host.as_str(), self.config.port)).await?;
        let addr = listener.local_addr()?;
        let app = self.router();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http metadata server stopped");
            }
        });
        tracing::info!(%addr, persist = ?self.config.persist, "http metadata server listening");
        Ok(RunningServer { addr, stop: Some(stop), task })
    }

    /// Starts the server on a thread of its own (for programs and tests without a runtime).
    pub fn spawn(self) -> std::io::Result<BackgroundServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mc-http-metadata")
            .enable_all()
            .build()?;
        let running = runtime.block_on(self.serve())?;
        Ok(BackgroundServer { running: Some(running), runtime: Some(runtime) })
    }
}

/// A server serving on the runtime it was started on.
pub struct RunningServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connection string clients use (`http://127.0.0.1:PORT/metadata` for a wildcard bind).
    pub fn url(&self) -> String {
        url_for(self.addr)
    }

    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server with its own runtime; dropping it stops the server.
pub struct BackgroundServer {
    running: Option<RunningServer>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl BackgroundServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().map(RunningServer::addr).unwrap_or_else(|| ([0, 0, 0, 0], 0).into())
    }

    /// The connection string clients use.
    pub fn url(&self) -> String {
        url_for(self.addr())
    }

    /// Stops the server and its runtime.
    pub fn stop(&mut self) {
        if let (Some(running), Some(rt)) = (self.running.take(), self.runtime.as_ref()) {
            rt.block_on(running.shutdown());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{ip}:{}/metadata", addr.port())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

/// Whitespace as Python's `str.isspace` sees it (Unicode white space plus the separators U+001C..U+001F).
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The `key` query parameter, form-decoded (`+` is a space, as aiohttp and curl clients expect), with
/// surrounding white space removed as upstream's server does (`key.strip()`): `" a "` and `"a"` are one key.
pub(crate) fn key_param(query: Option<&str>) -> Result<String, &'static str> {
    let raw = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .ok_or("metadata key is required")?;
    let plus_decoded = raw.replace('+', " ");
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(&plus_decoded).collect();
    let key = String::from_utf8(bytes).map_err(|_| "metadata key is not valid UTF-8")?;
    let key = key.trim_matches(python_space);
    if key.is_empty() {
        return Err("metadata key is required");
    }
    Ok(key.to_string())
}

async fn metadata(
    State(keys): State<Arc<KeySpace>>,
    method: Method,
    RawQuery(query): RawQuery,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let key = match key_param(query.as_deref()) {
        Ok(k) => k,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    match method {
        Method::GET => match keys.get(&key) {
            Some(v) => ([(header::CONTENT_TYPE, "application/json")], v).into_response(),
            None => text(StatusCode::NOT_FOUND, "metadata not found"),
        },
        Method::PUT => {
            let body = match body {
                Ok(b) => b,
                Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    return text(StatusCode::PAYLOAD_TOO_LARGE, "metadata value exceeds the server's body limit");
                }
                Err(rejection) => return text(rejection.status(), rejection.body_text()),
            };
            match keys.put(&key, body).await {
                Ok(PutOutcome::Stored) => text(StatusCode::OK, "metadata updated"),
                Ok(PutOutcome::DuplicateRpcMeta) => text(StatusCode::BAD_REQUEST, "Duplicate rpc_meta key not allowed"),
                Ok(PutOutcome::Full) => text(StatusCode::INSUFFICIENT_STORAGE, "metadata store is full"),
                Err(e) => persist_failure(e),
            }
        }
        Method::DELETE => match keys.delete(&key).await {
            Ok(true) => text(StatusCode::OK, "metadata deleted"),
            Ok(false) => text(StatusCode::NOT_FOUND, "metadata not found"),
            Err(e) => persist_failure(e),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
    }
}

fn persist_failure(e: PersistError) -> Response {
    let status = match e {
        PersistError::Write(_) => StatusCode::INTERNAL_SERVER_ERROR,
        PersistError::Broken => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parameter_decoding() {
        assert_eq!(key_param(Some("key=mooncake%2Fram%2Fa%3A1")).unwrap(), "mooncake/ram/a:1");
        assert_eq!(key_param(Some("x=1&key=a+b%2Bc")).unwrap(), "a b+c");
        assert_eq!(key_param(Some("key=%E2%9C%93")).unwrap(), "✓");
        assert_eq!(key_param(None), Err("metadata key is required"));
        assert_eq!(key_param(Some("key=")), Err("metadata key is required"));
        assert_eq!(key_param(Some("key=%20")), Err("metadata key is required"));
        assert_eq!(key_param(Some("key=%09%1F+")), Err("metadata key is required"), "tab, U+001F, space");
        assert_eq!(key_param(Some("key=+a+b%0A")).unwrap(), "a b", "stripped as upstream's key.strip()");
        assert_eq!(key_param(Some("key=%ff%fe")), Err("metadata key is not valid UTF-8"));
    }

    #[test]
    fn urls_for_wildcard_binds_use_loopback() {
        assert_eq!(url_for("0.0.0.0:8080".parse().unwrap()), "http://127.0.0.1:8080/metadata");
        assert_eq!(url_for("[::]:8080".parse().unwrap()), "http://[::1]:8080/metadata");
        assert_eq!(url_for("10.0.0.2:1".parse().unwrap()), "http://10.0.0.2:1/metadata");
    }
}
