//! The HTTP metadata client: `http://host:port/metadata` as upstream's engines use it.

use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{Error, MetadataCapabilities, MetadataStore, Result};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;

/// Characters escaped in the `key` parameter: everything but unreserved ones (as curl_easy_escape).
const KEY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Upstream's total request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);

/// Client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpClientConfig {
    /// `http://host:port/metadata` (the path is the one the server serves; upstream uses `/metadata`).
    pub url: String,
    /// Whole-request timeout (3 s, or `MC_METADATA_TIMEOUT_MS`).
    pub timeout: Duration,
    /// Connect timeout (half the request timeout: upstream's 1.5 s).
    pub connect_timeout: Duration,
}

impl HttpClientConfig {
    /// Settings for `conn`, with the timeout from `timeout_ms` (the `MC_METADATA_TIMEOUT_MS` value).
    pub fn parse(conn: &str, timeout_ms: Option<&str>) -> Result<Self> {
        let url = conn.trim().to_string();
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            Error::InvalidArgument(format!("HTTP metadata connection string {conn:?} must start with http://"))
        })?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(Error::InvalidArgument(format!("HTTP metadata connection string {conn:?} names no host")));
        }
        if url.contains('?') {
            return Err(Error::InvalidArgument(format!(
                "HTTP metadata connection string {conn:?} must not carry a query (the client adds ?key=...)"
            )));
        }
        let timeout = match timeout_ms.map(str::trim).filter(|s| !s.is_empty()) {
            None => DEFAULT_TIMEOUT,
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "MC_METADATA_TIMEOUT_MS must be a positive number of milliseconds, got {ms:?}"
                    )));
                }
            },
        };
        Ok(HttpClientConfig { url, timeout, connect_timeout: timeout / 2 })
    }

    /// Settings for `conn` with `MC_METADATA_TIMEOUT_MS` from the environment.
    pub fn from_env(conn: &str) -> Result<Self> {
        Self::parse(conn, std::env::var("MC_METADATA_TIMEOUT_MS").ok().as_deref())
    }
}

/// A client of an HTTP metadata server (ours or upstream's).
pub struct HttpMetadataStore {
    config: HttpClientConfig,
    client: reqwest::Client,
}

impl HttpMetadataStore {
    /// A client for `conn` (`http://host:port/metadata`); does not connect yet.
    pub fn new(conn: &str) -> Result<Self> {
        Self::with_config(HttpClientConfig::from_env(conn)?)
    }

    /// A client with explicit settings.
    pub fn with_config(config: HttpClientConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("HTTP metadata client for {}: {e}", config.url)))?;
        Ok(HttpMetadataStore { config, client })
    }

    /// The settings in use.
    pub fn config(&self) -> &HttpClientConfig {
        &self.config
    }

    fn url(&self, key: &str) -> String {
        format!("{}?key={}", self.config.url, utf8_percent_encode(key, KEY_ESCAPE))
    }

    /// Sends a request, once more if a pooled connection turned out to be dead (the server
    /// restarted, or closed it after refusing a body). Every request here is idempotent.
    async fn send(
        &self,
        req: impl Fn() -> reqwest::RequestBuilder,
        op: &str,
        key: &str,
    ) -> Result<(StatusCode, bytes::Bytes)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match req().send().await {
                Ok(resp) => {
                    let status = resp.status();
                    resp.bytes().await.map(|body| (status, body))
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => return Ok(r),
                Err(e) if attempt < 2 && !e.is_timeout() && !e.is_connect() => {
                    tracing::debug!(op, key, error = %error_chain(&e), "retrying on a fresh connection");
                }
                Err(e) => {
                    let what = if e.is_timeout() { "timed out" } else { "failed" };
                    return Err(Error::unavailable(format!(
                        "HTTP metadata {op} of {key:?} at {} {what} (timeout {:?}): {}",
                        self.config.url,
                        self.config.timeout,
                        error_chain(&e)
                    )));
                }
            }
        }
    }

    fn unexpected(&self, op: &str, key: &str, status: StatusCode, body: &[u8]) -> Error {
        let msg = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
        let what = format!("HTTP metadata {op} of {key:?} at {}: {status} {msg}", self.config.url);
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Error::InvalidArgument(what),
            StatusCode::INSUFFICIENT_STORAGE => Error::NoSpace(what),
            StatusCode::BAD_REQUEST if msg.contains("rpc_meta") => Error::AlreadyExists(what),
            s if s == StatusCode::SERVICE_UNAVAILABLE || s == StatusCode::BAD_GATEWAY => Error::unavailable(what),
            _ => Error::Metadata(what),
        }
    }
}

/// An error with its causes (reqwest's own message hides them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[async_trait]
impl MetadataStore for HttpMetadataStore {
    fn name(&self) -> &str {
        "http"
    }

    fn capabilities(&self) -> MetadataCapabilities {
        MetadataCapabilities { shared: true, ..Default::default() }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let url = self.url(key);
        let (status, body) = self.send(|| self.client.get(&url), "get", key).await?;
        match status {
            StatusCode::OK => Ok(Some(body.to_vec())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.unexpected("get", key, s, &body)),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let url = self.url(key);
        let value = bytes::Bytes::copy_from_slice(value);
        let (status, body) = self.send(|| self.client.put(&url).body(value.clone()), "put", key).await?;
        match status {
            StatusCode::OK => Ok(()),
            s => Err(self.unexpected("put", key, s, &body)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let url = self.url(key);
        let (status, body) = self.send(|| self.client.delete(&url), "delete", key).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.unexpected("delete", key, s, &body)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connection_strings_and_timeouts() {
        let c = HttpClientConfig::parse("http://10.0.0.1:8080/metadata", None).unwrap();
        assert_eq!(c.url, "http://10.0.0.1:8080/metadata");
        assert_eq!((c.timeout, c.connect_timeout), (Duration::from_secs(3), Duration::from_millis(1500)));
        let c = HttpClientConfig::parse(" http://h:1/metadata ", Some("500")).unwrap();
        assert_eq!((c.url.as_str(), c.timeout), ("http://h:1/metadata", Duration::from_millis(500)));
        for bad in ["https://h:1/metadata", "http:///metadata", "etcd://h:1", "http://h:1/metadata?x=1"] {
            assert!(matches!(HttpClientConfig::parse(bad, None), Err(Error::InvalidArgument(_))), "{bad}");
        }
        for bad in ["0", "-1", "soon"] {
            assert!(HttpClientConfig::parse("http://h:1/metadata", Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_escaped_like_curl() {
        let s = HttpMetadataStore::new("http://h:1/metadata").unwrap();
        assert_eq!(s.url("mooncake/ram/10.0.0.1:15123"), "http://h:1/metadata?key=mooncake%2Fram%2F10.0.0.1%3A15123");
        assert_eq!(s.url("a b+c&d"), "http://h:1/metadata?key=a%20b%2Bc%26d");
        assert_eq!(s.url("ключ"), "http://h:1/metadata?key=%D0%BA%D0%BB%D1%8E%D1%87");
        let url = s.url("a b+c&d=✓");
        let query = url.split_once('?').map(|(_, q)| q);
        assert_eq!(crate::server::key_param(query).unwrap(), "a b+c&d=✓");
    }
}
