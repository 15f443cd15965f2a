//! Connection settings: a `redis://` connection string merged with the `MC_REDIS_*` environment.

use std::fmt;
use std::time::Duration;

use mooncake_core::{Error, Result, join_host_port, split_host_port};

/// Port used when the connection string names none.
pub const DEFAULT_PORT: u16 = 6379;
/// Connect and per-command timeout when `MC_METADATA_TIMEOUT_MS` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Environment variable with the user name for `AUTH` (upstream's name).
pub const ENV_USERNAME: &str = "MC_REDIS_USERNAME";
/// Environment variable with the password for `AUTH` (upstream's name).
pub const ENV_PASSWORD: &str = "MC_REDIS_PASSWORD";
/// Environment variable with the logical database index for `SELECT` (upstream's name).
pub const ENV_DB_INDEX: &str = "MC_REDIS_DB_INDEX";
/// Environment variable with the connect and per-command timeout in milliseconds.
pub const ENV_TIMEOUT_MS: &str = "MC_METADATA_TIMEOUT_MS";

/// Where the Redis server is and how to log in.
///
/// Built from a connection string with [`RedisConfig::from_conn`] (or
/// [`RedisConfig::from_conn_and_env`] with an explicit environment), or field by field from
/// [`RedisConfig::new`]. `Debug` never prints the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name for `AUTH` (Redis 6 ACLs); used only together with a password.
    pub username: Option<String>,
    /// Password for `AUTH`; `None` connects without authenticating.
    pub password: Option<String>,
    /// Logical database selected after connecting (`SELECT`), 0 by default.
    pub db: u32,
    /// Bound on connecting (including `AUTH` and `SELECT`) and on each command.
    pub timeout: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConfig {
    /// `host:port`, no credentials, database 0, the default timeout.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        RedisConfig { host: host.into(), port, username: None, password: None, db: 0, timeout: DEFAULT_TIMEOUT }
    }

    /// Parses `conn` and fills what it leaves out from the process environment
    /// (see [`RedisConfig::from_conn_and_env`]).
    pub fn from_conn(conn: &str) -> Result<Self> {
        Self::from_conn_and_env(conn, |name| std::env::var(name).ok())
    }

    /// Parses `redis://[user[:password]@]host[:port][/db]`, reading the environment through `env`.
    ///
    /// - The port defaults to 6379; an IPv6 host goes in brackets (`redis://[::1]:6379`).
    /// - User name and password may be percent-encoded; `redis://:password@host` gives a password
    ///   without a user name.
    /// - Values in the connection string win; what it leaves out comes from `MC_REDIS_USERNAME`,
    ///   `MC_REDIS_PASSWORD` and `MC_REDIS_DB_INDEX` (upstream passes them only this way). Empty
    ///   variables count as unset.
    /// - `MC_METADATA_TIMEOUT_MS` (a positive number of milliseconds) replaces the 3 s timeout.
    ///
    /// A malformed string, port, database index or timeout is [`Error::InvalidArgument`];
    /// `rediss://` (TLS) is rejected the same way because this build has no TLS support.
    pub fn from_conn_and_env(conn: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let url = parse_url(conn)?;
        let username = url.username.or_else(|| env(ENV_USERNAME));
        let password = url.password.or_else(|| env(ENV_PASSWORD));
        let db = match url.db {
            Some(db) => db,
            None => match env(ENV_DB_INDEX) {
                Some(v) => parse_db(v.trim()).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{ENV_DB_INDEX}={v:?} is not a database index (a non-negative integer such as 0 or 1)"
                    ))
                })?,
                None => 0,
            },
        };
        let timeout = match env(ENV_TIMEOUT_MS) {
            Some(v) => {
                v.trim().parse::<u64>().ok().filter(|ms| *ms > 0).map(Duration::from_millis).ok_or_else(|| {
                    Error::InvalidArgument(format!("{ENV_TIMEOUT_MS}={v:?} is not a positive number of milliseconds"))
                })?
            }
            None => DEFAULT_TIMEOUT,
        };
        let config = RedisConfig { host: url.host, port: url.port, username, password, db, timeout };
        config.validate()?;
        Ok(config)
    }

    /// `host:port` (IPv6 hosts in brackets), as used in error messages.
    pub fn address(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// Checks the fields of a hand-built config: a host, a non-zero port, a non-zero timeout.
    pub fn validate(&self) -> Result<()> {
        if self.host.trim().is_empty() {
            return Err(Error::InvalidArgument("redis host is empty".into()));
        }
        if self.port == 0 {
            return Err(Error::InvalidArgument(format!("redis port of {:?} is 0", self.host)));
        }
        if self.timeout.is_zero() {
            return Err(Error::InvalidArgument("redis timeout is zero".into()));
        }
        Ok(())
    }
}

/// True for connection strings of this backend: `redis://...` (and `rediss://...`, which
/// [`RedisConfig::from_conn`] then rejects with a message saying TLS is not supported).
pub fn accepts(conn: &str) -> bool {
    let Some((scheme, _)) = conn.trim().split_once("://") else {
        return false;
    };
    scheme.eq_ignore_ascii_case("redis") || scheme.eq_ignore_ascii_case("rediss")
}

/// The parts of a connection string.
#[derive(Debug, PartialEq, Eq)]
struct ParsedUrl {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: Option<u32>,
}

fn parse_url(conn: &str) -> Result<ParsedUrl> {
    let shown = redact(conn);
    let bad = |what: String| Error::InvalidArgument(format!("redis connection string {shown:?}: {what}"));
    let trimmed = conn.trim();
    let Some((scheme, rest)) = trimmed.split_once("://") else {
        return Err(bad("expected redis://host:port".into()));
    };
    if scheme.eq_ignore_ascii_case("rediss") {
        return Err(bad(
            "rediss:// (TLS) is not supported by this build; use redis:// (e.g. through a TLS tunnel such as stunnel)"
                .into(),
        ));
    }
    if !scheme.eq_ignore_ascii_case("redis") {
        return Err(bad(format!("scheme {scheme:?} is not redis://")));
    }
    if rest.contains(['?', '#']) {
        return Err(bad(
            "query parameters and fragments are not supported; set MC_REDIS_USERNAME, MC_REDIS_PASSWORD or \
             MC_REDIS_DB_INDEX instead"
                .into(),
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            let user = percent_decode(user).map_err(|e| bad(format!("user name: {e}")))?;
            let pass = pass.map(percent_decode).transpose().map_err(|e| bad(format!("password: {e}")))?;
            (Some(user).filter(|u| !u.is_empty()), pass.filter(|p| !p.is_empty()))
        }
    };
    if hostport.is_empty() {
        return Err(bad("no host".into()));
    }
    let (host, port) = split_host_port(hostport).map_err(|e| match e {
        Error::InvalidArgument(m) => bad(m),
        other => other,
    })?;
    if host.contains(':') && !hostport.starts_with('[') {
        return Err(bad(format!("IPv6 address {host:?} must be written in brackets: redis://[{host}]:6379")));
    }
    let path = path.trim_end_matches('/');
    let db = if path.is_empty() {
        None
    } else {
        Some(parse_db(path).ok_or_else(|| {
            bad(format!("database index {path:?} is not a non-negative integer (redis://host:port/<db>)"))
        })?)
    };
    Ok(ParsedUrl { host, port: port.unwrap_or(DEFAULT_PORT), username, password, db })
}

fn parse_db(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Decodes `%XX` escapes; the result must be UTF-8.
fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i} (expected %XX with two hex digits)"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not decode to UTF-8".to_string())
}

/// `conn` with any password replaced by `***`, for error messages.
pub(crate) fn redact(conn: &str) -> String {
    let conn = conn.trim();
    let Some((scheme, rest)) = conn.split_once("://") else {
        return conn.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((info, host)) => match info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => conn.to_string(),
        },
        None => conn.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    fn invalid(r: Result<RedisConfig>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn upstream_form() {
        let c = RedisConfig::from_conn_and_env("redis://10.0.0.1:6380", no_env).unwrap();
        assert_eq!(c, RedisConfig::new("10.0.0.1", 6380));
        assert_eq!(c.address(), "10.0.0.1:6380");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        let c = RedisConfig::from_conn_and_env("  REDIS://node1  ", no_env).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("node1", DEFAULT_PORT));
        let c = RedisConfig::from_conn_and_env("redis://[::1]:7000/", no_env).unwrap();
        assert_eq!((c.host.as_str(), c.port, c.address().as_str()), ("::1", 7000, "[::1]:7000"));
    }

    #[test]
    fn credentials_and_db_in_the_url() {
        let c = RedisConfig::from_conn_and_env("redis://alice:s%40cret:x@h:1/5", no_env).unwrap();
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some("s@cret:x"));
        assert_eq!(c.db, 5);
        let c = RedisConfig::from_conn_and_env("redis://:pw@h:1", no_env).unwrap();
        assert_eq!((c.username, c.password.as_deref()), (None, Some("pw")));
        let c = RedisConfig::from_conn_and_env("redis://bob@h:1", no_env).unwrap();
        assert_eq!((c.username.as_deref(), c.password), (Some("bob"), None));
    }

    #[test]
    fn environment_fills_what_the_url_leaves_out() {
        let env = env_of(&[
            (ENV_USERNAME, "envuser"),
            (ENV_PASSWORD, "envpass"),
            (ENV_DB_INDEX, " 3 "),
            (ENV_TIMEOUT_MS, "250"),
        ]);
        let c = RedisConfig::from_conn_and_env("redis://h:1", &env).unwrap();
        assert_eq!(c.username.as_deref(), Some("envuser"));
        assert_eq!(c.password.as_deref(), Some("envpass"));
        assert_eq!(c.db, 3);
        assert_eq!(c.timeout, Duration::from_millis(250));
        // The connection string wins.
        let c = RedisConfig::from_conn_and_env("redis://u:p@h:1/7", &env).unwrap();
        assert_eq!((c.username.as_deref(), c.password.as_deref(), c.db), (Some("u"), Some("p"), 7));
        // Empty variables are unset.
        let empty = env_of(&[(ENV_PASSWORD, ""), (ENV_DB_INDEX, " "), (ENV_TIMEOUT_MS, "")]);
        let c = RedisConfig::from_conn_and_env("redis://h:1", empty).unwrap();
        assert_eq!((c.password, c.db, c.timeout), (None, 0, DEFAULT_TIMEOUT));
    }

    #[test]
    fn bad_db_index() {
        for db in ["-1", "x", "1.5", "99999999999", "+1"] {
            let m = invalid(RedisConfig::from_conn_and_env("redis://h:1", env_of(&[(ENV_DB_INDEX, db)])));
            assert!(m.contains(ENV_DB_INDEX), "{m}");
            let m = invalid(RedisConfig::from_conn_and_env(&format!("redis://h:1/{db}"), no_env));
            assert!(m.contains("database index"), "{m}");
        }
    }

    #[test]
    fn bad_port_host_and_timeout() {
        for conn in ["redis://h:0", "redis://h:70000", "redis://h:abc", "redis://:6379", "redis://", "redis://[::1"] {
            invalid(RedisConfig::from_conn_and_env(conn, no_env));
        }
        let m = invalid(RedisConfig::from_conn_and_env("redis://::1", no_env));
        assert!(m.contains("brackets"), "{m}");
        for t in ["0", "-5", "3s"] {
            let m = invalid(RedisConfig::from_conn_and_env("redis://h:1", env_of(&[(ENV_TIMEOUT_MS, t)])));
            assert!(m.contains(ENV_TIMEOUT_MS), "{m}");
        }
        assert!(RedisConfig { timeout: Duration::ZERO, ..RedisConfig::new("h", 1) }.validate().is_err());
        assert!(RedisConfig::new("", 1).validate().is_err());
    }

    #[test]
    fn other_schemes_and_shapes_are_rejected() {
        let m = invalid(RedisConfig::from_conn_and_env("rediss://h:1", no_env));
        assert!(m.contains("TLS"), "{m}");
        for conn in ["http://h:1", "h:1", "redis://h:1?db=2", "redis://h:1#x", "redis://a:%zz@h:1", "redis://%ff@h"] {
            invalid(RedisConfig::from_conn_and_env(conn, no_env));
        }
    }

    #[test]
    fn errors_do_not_show_the_password() {
        let m = invalid(RedisConfig::from_conn_and_env("redis://u:topsecret@h:1/x", no_env));
        assert!(!m.contains("topsecret") && m.contains("u:***@h:1"), "{m}");
        let c = RedisConfig::from_conn_and_env("redis://u:topsecret@h:1", no_env).unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn accepted_connection_strings() {
        for yes in ["redis://127.0.0.1:6379", " Redis://h", "rediss://h:1"] {
            assert!(accepts(yes), "{yes}");
        }
        for no in ["P2PHANDSHAKE", "http://h:8080/metadata", "etcd://h:2379", "127.0.0.1:2379", "redis", ""] {
            assert!(!accepts(no), "{no}");
        }
    }
}
