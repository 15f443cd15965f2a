//! Timeouts and limits of the handshake socket, with `MC_*` environment overrides.

use std::time::Duration;

use crate::frame::DEFAULT_MAX_FRAME_LENGTH;

/// Timeouts and limits of [`crate::HandshakeRpc`] and [`crate::HandshakeClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Client: how long to wait for the TCP connection (`MC_HANDSHAKE_CONNECT_TIMEOUT`, seconds, default 3).
    pub connect_timeout: Duration,
    /// Client: how long a whole request may take, connect included (`MC_HANDSHAKE_TIMEOUT`, seconds, default 10).
    pub request_timeout: Duration,
    /// Server: how long a connection may take to deliver its request frame (`MC_HANDSHAKE_READ_TIMEOUT`,
    /// seconds, default 5, as upstream's `SO_RCVTIMEO`). Also bounds the wait for the client to close.
    pub read_timeout: Duration,
    /// Server: how long the engine may take to answer a connection handshake (default 30 s).
    pub handler_timeout: Duration,
    /// Both sides: largest accepted frame (`MC_HANDSHAKE_MAX_LENGTH`, bytes, default 1 MiB).
    pub max_frame_length: u64,
    /// Server: connections served at once; further ones wait in the listen backlog (default 256).
    pub max_connections: usize,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(5),
            handler_timeout: Duration::from_secs(30),
            max_frame_length: DEFAULT_MAX_FRAME_LENGTH,
            max_connections: 256,
        }
    }
}

impl HandshakeConfig {
    /// Defaults overridden by `MC_HANDSHAKE_CONNECT_TIMEOUT`, `MC_HANDSHAKE_TIMEOUT`,
    /// `MC_HANDSHAKE_READ_TIMEOUT` (seconds, fractions allowed) and `MC_HANDSHAKE_MAX_LENGTH` (bytes).
    /// Unparsable or non-positive values keep the default and log a warning.
    pub fn from_env() -> Self {
        let d = HandshakeConfig::default();
        HandshakeConfig {
            connect_timeout: env_secs("MC_HANDSHAKE_CONNECT_TIMEOUT").unwrap_or(d.connect_timeout),
            request_timeout: env_secs("MC_HANDSHAKE_TIMEOUT").unwrap_or(d.request_timeout),
            read_timeout: env_secs("MC_HANDSHAKE_READ_TIMEOUT").unwrap_or(d.read_timeout),
            max_frame_length: env_parse::<u64>("MC_HANDSHAKE_MAX_LENGTH")
                .filter(|n| *n > 0)
                .or_else(|| warn_if_set("MC_HANDSHAKE_MAX_LENGTH"))
                .unwrap_or(d.max_frame_length),
            ..d
        }
    }
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn env_secs(name: &str) -> Option<Duration> {
    env_parse::<f64>(name)
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .or_else(|| warn_if_set(name))
}

fn warn_if_set<T>(name: &str) -> Option<T> {
    if let Ok(v) = std::env::var(name) {
        tracing::warn!(variable = name, value = %v, "ignoring invalid value; using the default");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_upstream() {
        let c = HandshakeConfig::default();
        assert_eq!(c.max_frame_length, 1 << 20);
        assert_eq!(c.read_timeout, Duration::from_secs(5));
    }
}
