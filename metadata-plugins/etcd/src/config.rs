//! Connection strings, timeouts and lease TTLs: pure parsing, no I/O.

use std::time::Duration;

use mooncake_core::{Error, Result};

/// Connect and per-request timeout when `MC_METADATA_TIMEOUT_MS` is not set (upstream's HTTP
/// client uses the same 3 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Environment variable that overrides [`DEFAULT_TIMEOUT`], in milliseconds.
pub const TIMEOUT_ENV: &str = "MC_METADATA_TIMEOUT_MS";

/// The scheme prefix of an etcd connection string.
const SCHEME: &str = "etcd://";

/// How to reach an etcd cluster.
///
/// Build one with [`EtcdConfig::parse`] (default timeouts), [`EtcdConfig::from_conn`]
/// (timeouts from `MC_METADATA_TIMEOUT_MS`), or [`EtcdConfig::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client endpoints as `host:port` (IPv6 hosts in brackets), tried in order with failover.
    pub endpoints: Vec<String>,
    /// Upper bound for one request (get, put, delete, list, lease grant, watch setup), including
    /// connecting and failing over to the next endpoint.
    pub timeout: Duration,
    /// Upper bound for opening the TCP connection to one endpoint.
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration for `endpoints` with the default 3 s timeouts.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Parses `etcd://h1:2379,h2:2379` or a bare `h1:2379[,h2:2379...]`, with default timeouts.
    pub fn parse(conn: &str) -> Result<Self> {
        Ok(EtcdConfig::new(parse_endpoints(conn)?))
    }

    /// Parses a connection string and applies `MC_METADATA_TIMEOUT_MS` (both timeouts) when set.
    pub fn from_conn(conn: &str) -> Result<Self> {
        let timeout = timeout_from_env(std::env::var(TIMEOUT_ENV).ok().as_deref())?;
        Ok(EtcdConfig::parse(conn)?.with_timeout(timeout).with_connect_timeout(timeout))
    }

    /// Checks that there is at least one well-formed endpoint and that timeouts are non-zero.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidArgument("etcd: no endpoints given (expected host:port)".into()));
        }
        for e in &self.endpoints {
            check_endpoint(e)?;
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::InvalidArgument("etcd: timeouts must be greater than zero".into()));
        }
        Ok(())
    }
}

/// True when `conn` is an etcd connection string: `etcd://...` (any case), or a bare
/// comma-separated list of `host:port`.
pub(crate) fn accepts(conn: &str) -> bool {
    let conn = conn.trim();
    if strip_scheme(conn).is_some() {
        return true;
    }
    !conn.contains("://") && parse_endpoints(conn).is_ok()
}

fn strip_scheme(conn: &str) -> Option<&str> {
    let head = conn.get(..SCHEME.len())?;
    head.eq_ignore_ascii_case(SCHEME).then(|| &conn[SCHEME.len()..])
}

/// The `host:port` endpoints of a connection string.
pub(crate) fn parse_endpoints(conn: &str) -> Result<Vec<String>> {
    let trimmed = conn.trim();
    let list = match strip_scheme(trimmed) {
        Some(rest) => rest,
        None if trimmed.contains("://") => {
            return Err(Error::InvalidArgument(format!(
                "etcd: connection string {conn:?} has another scheme; expected etcd://host:port[,host:port...]"
            )));
        }
        None => trimmed,
    };
    // Tolerate one trailing slash (`etcd://h:2379/`).
    let list = list.strip_suffix('/').unwrap_or(list);
    if list.trim().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "etcd: connection string {conn:?} names no endpoint; expected etcd://host:port[,host:port...]"
        )));
    }
    let mut out = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "etcd: connection string {conn:?} has an empty endpoint (stray comma?)"
            )));
        }
        check_endpoint(item)?;
        out.push(item.to_string());
    }
    Ok(out)
}

/// Checks one `host:port` (or `[v6]:port`).
fn check_endpoint(ep: &str) -> Result<()> {
    let bad = |why: &str| Error::InvalidArgument(format!("etcd: endpoint {ep:?} {why}; expected host:port"));
    let (host, port) = ep.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    if port.is_empty() {
        return Err(bad("has no port"));
    }
    match port.parse::<u16>() {
        Ok(0) => return Err(bad("has port 0")),
        Ok(_) => {}
        Err(_) => return Err(bad("has a port that is not a number from 1 to 65535")),
    }
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let v6 = inner.strip_suffix(']').ok_or_else(|| bad("has an unclosed '['"))?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad("has a bracketed host that is not an IPv6 address"))?;
    } else if host.contains(':') {
        return Err(bad("has an IPv6 host without brackets"));
    } else if host.chars().any(|c| c.is_whitespace() || "/?#@[]".contains(c)) {
        return Err(bad("has characters not allowed in a host name"));
    }
    Ok(())
}

/// The timeout for an optional `MC_METADATA_TIMEOUT_MS` value: [`DEFAULT_TIMEOUT`] when unset
/// or blank, otherwise a positive number of milliseconds.
pub(crate) fn timeout_from_env(value: Option<&str>) -> Result<Duration> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match v.parse::<u64>() {
        Ok(0) | Err(_) => {
            Err(Error::InvalidArgument(format!("{TIMEOUT_ENV}={v:?} is not a positive number of milliseconds")))
        }
        Ok(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// etcd lease TTL in whole seconds for a requested `ttl`: rounded up, at least 1.
pub(crate) fn lease_ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0)).max(1);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_etcd_and_bare_host_port() {
        for ok in [
            "etcd://127.0.0.1:2379",
            "etcd://h1:2379,h2:2379",
            "ETCD://h1:2379",
            "  etcd://h:1  ",
            "etcd://h:2379/",
            "127.0.0.1:2379",
            "h1:2379,h2:2380",
            "[::1]:2379",
            "localhost:2379",
            // Accepted so that create() explains what is wrong instead of "no backend".
            "etcd://",
            "etcd://nohost",
        ] {
            assert!(accepts(ok), "{ok:?} should be accepted");
        }
        for no in [
            "",
            "   ",
            "P2PHANDSHAKE",
            "p2phandshake",
            "http://127.0.0.1:8080/metadata",
            "https://h:443/metadata",
            "redis://127.0.0.1:6379",
            "rediss://h:1",
            "foo://h:1",
            "127.0.0.1",
            "h:notaport",
            "h:2379,",
            "h:0",
            ":2379",
            "::1:2379",
        ] {
            assert!(!accepts(no), "{no:?} should not be accepted");
        }
    }

    #[test]
    fn parses_endpoint_lists() {
        assert_eq!(parse_endpoints("etcd://h1:2379,h2:2379").unwrap(), ["h1:2379", "h2:2379"]);
        assert_eq!(parse_endpoints(" etcd://h1:2379 , h2:1 ").unwrap(), ["h1:2379", "h2:1"]);
        assert_eq!(parse_endpoints("10.0.0.1:2379").unwrap(), ["10.0.0.1:2379"]);
        assert_eq!(parse_endpoints("etcd://[::1]:2379/").unwrap(), ["[::1]:2379"]);
    }

    #[test]
    fn bad_strings_are_invalid_arguments() {
        for (bad, needle) in [
            ("etcd://", "names no endpoint"),
            ("etcd:///", "names no endpoint"),
            ("", "names no endpoint"),
            ("etcd://h1", "has no port"),
            ("etcd://h1:", "has no port"),
            ("etcd://h1:2379,,h2:1", "empty endpoint"),
            ("etcd://h1:99999", "not a number"),
            ("etcd://h1:0", "port 0"),
            ("etcd://:2379", "no host"),
            ("etcd://[::1:2379", "unclosed"),
            ("etcd://[zz]:2379", "not an IPv6"),
            ("etcd://fe80::1:2379", "without brackets"),
            ("etcd://a b:1", "not allowed"),
            ("http://h:1", "another scheme"),
        ] {
            match parse_endpoints(bad) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(needle), "{bad:?}: {msg}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn config_validation() {
        assert!(EtcdConfig::new(Vec::<String>::new()).validate().is_err());
        assert!(EtcdConfig::new(["h:1"]).validate().is_ok());
        assert!(EtcdConfig::new(["h"]).validate().is_err());
        assert!(EtcdConfig::new(["h:1"]).with_timeout(Duration::ZERO).validate().is_err());
        assert!(EtcdConfig::new(["h:1"]).with_connect_timeout(Duration::ZERO).validate().is_err());
        let c = EtcdConfig::parse("etcd://a:1,b:2").unwrap();
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.connect_timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn timeout_env_values() {
        assert_eq!(timeout_from_env(None).unwrap(), Duration::from_secs(3));
        assert_eq!(timeout_from_env(Some("")).unwrap(), Duration::from_secs(3));
        assert_eq!(timeout_from_env(Some(" 1500 ")).unwrap(), Duration::from_millis(1500));
        assert_eq!(timeout_from_env(Some("1")).unwrap(), Duration::from_millis(1));
        for bad in ["0", "-5", "1.5", "3s", "abc", "99999999999999999999999"] {
            match timeout_from_env(Some(bad)) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(TIMEOUT_ENV), "{msg}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn lease_ttl_rounds_up_to_whole_seconds() {
        assert_eq!(lease_ttl_secs(Duration::ZERO), 1);
        assert_eq!(lease_ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(lease_ttl_secs(Duration::from_millis(999)), 1);
        assert_eq!(lease_ttl_secs(Duration::from_secs(1)), 1);
        assert_eq!(lease_ttl_secs(Duration::from_millis(1001)), 2);
        assert_eq!(lease_ttl_secs(Duration::from_millis(2500)), 3);
        assert_eq!(lease_ttl_secs(Duration::from_secs(30)), 30);
        assert_eq!(lease_ttl_secs(Duration::from_nanos(30_000_000_001)), 31);
        assert_eq!(lease_ttl_secs(Duration::MAX), i64::MAX);
    }
}
