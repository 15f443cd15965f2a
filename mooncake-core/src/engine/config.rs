//! Engine configuration with upstream's `MC_*` environment defaults.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::transport::BackendConfig;

/// Transports an engine installs next to its protocols when they are linked and usable here.
pub const DEFAULT_AUTO_PROTOCOLS: &str = "shm,nvlink,hip,musa";

/// How to start a [`crate::TransferEngine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `host` or `host:port`; in P2P mode the segment name becomes `host:<rpc port>`.
    pub local_server_name: String,
    /// `P2PHANDSHAKE`, `http://host:port/metadata`, `etcd://...`, `redis://...`.
    pub metadata_conn: String,
    /// Transports to install, primary first (published as the descriptor's `protocol`).
    pub protocols: Vec<String>,
    /// Options passed to every transport factory.
    pub backend: BackendConfig,
    /// Range the handshake port is picked from (`MC_MIN_RPC_PORT`, `MC_MAX_RPC_PORT`).
    pub rpc_port_range: (u16, u16),
    /// Address every listener binds (`MC_TCP_BIND_ADDRESS`; else the host of the server name).
    pub bind_host: Option<String>,
    /// Engine runtime threads (`MC_ENGINE_THREADS`, default 2).
    pub worker_threads: usize,
    /// Base timeout of the sync helpers (`MC_TRANSFER_TIMEOUT` seconds, default 30) plus 1 ns/byte.
    pub transfer_timeout: Duration,
    /// How long unregistering waits for in-flight remote accesses.
    pub unregister_wait: Duration,
    /// Key prefix cluster id (`MC_METADATA_CLUSTER_ID`).
    pub cluster_id: Option<String>,
    /// Protocol order for segments reachable by several transports (`MC_PROTOCOL_PRIORITY`,
    /// comma-separated); empty = rank by the transports' cost models.
    pub protocol_priority: Vec<String>,
    /// How often a metadata-mode engine checks that its keys are still published and puts them
    /// back after the metadata service lost them (`MC_METADATA_REPUBLISH_MS`, default 2000;
    /// 0 turns the check off). P2P mode has nothing to check.
    pub republish_interval: Duration,
    /// Transports installed next to `protocols` whenever they are linked and their probe passes
    /// (`MC_AUTO_PROTOCOLS`, comma-separated, default `shm,nvlink,hip,musa`; empty turns it off). Peers that
    /// publish them too (same-host engines of ours) are then reached through them when the cost
    /// model says so (the GPU IPC transports only for GPU buffers); everyone else keeps using the primary
    /// protocol.
    pub auto_protocols: Vec<String>,
    /// Name the segment `host:<rpc port>` in metadata mode too when `local_server_name` has no port
    /// (default false: the name is used as given, as upstream's engine does). Upstream's store
    /// client names its engine this way, so several clients set up with the same `"localhost"`
    /// get segments of their own.
    pub name_with_rpc_port: bool,
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Comma-separated names, blanks dropped.
fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
}

impl EngineConfig {
    /// A config with environment defaults and the `tcp` transport (`MC_FORCE_TCP` is implied).
    pub fn new(local_server_name: impl Into<String>, metadata_conn: impl Into<String>) -> Self {
        EngineConfig {
            local_server_name: local_server_name.into(),
            metadata_conn: metadata_conn.into(),
            protocols: vec!["tcp".to_string()],
            backend: BackendConfig::default(),
            rpc_port_range: (env("MC_MIN_RPC_PORT").unwrap_or(15000), env("MC_MAX_RPC_PORT").unwrap_or(17000)),
            bind_host: std::env::var("MC_TCP_BIND_ADDRESS").ok().filter(|s| !s.trim().is_empty()),
            worker_threads: env("MC_ENGINE_THREADS").unwrap_or(2).max(1),
            transfer_timeout: Duration::from_secs(env("MC_TRANSFER_TIMEOUT").unwrap_or(30)),
            unregister_wait: Duration::from_secs(30),
            cluster_id: std::env::var("MC_METADATA_CLUSTER_ID").ok(),
            protocol_priority: split_list(&std::env::var("MC_PROTOCOL_PRIORITY").unwrap_or_default()),
            republish_interval: Duration::from_millis(env("MC_METADATA_REPUBLISH_MS").unwrap_or(2000)),
            auto_protocols: split_list(
                &std::env::var("MC_AUTO_PROTOCOLS").unwrap_or_else(|_| DEFAULT_AUTO_PROTOCOLS.into()),
            ),
            name_with_rpc_port: false,
        }
    }

    /// Replaces the transport list (primary first). An explicit list is exactly what gets
    /// installed: it also clears [`EngineConfig::auto_protocols`].
    pub fn with_protocols<I: IntoIterator<Item = S>, S: Into<String>>(mut self, protocols: I) -> Self {
        self.protocols = protocols.into_iter().map(Into::into).collect();
        self.auto_protocols.clear();
        self
    }

    /// Replaces the optional transports installed when linked and available.
    pub fn with_auto_protocols<I: IntoIterator<Item = S>, S: Into<String>>(mut self, protocols: I) -> Self {
        self.auto_protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// True in P2PHANDSHAKE mode.
    pub fn is_p2p(&self) -> bool {
        self.metadata_conn.trim().eq_ignore_ascii_case("P2PHANDSHAKE")
    }
}

/// Splits `host:port`, `[v6]:port`, `host`, `v6` into host and optional port.
pub fn split_host_port(s: &str) -> Result<(String, Option<u16>)> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::InvalidArgument("empty host name".into()));
    }
    let bad_port = |p: &str| Error::InvalidArgument(format!("{s:?}: port {p:?} is not a number in 1..=65535"));
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| Error::InvalidArgument(format!("{s:?}: unclosed '[' in IPv6 address")))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), Some(p.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad_port(p))?))),
            None if after.is_empty() => Ok((host.to_string(), None)),
            None => Err(Error::InvalidArgument(format!("{s:?}: junk after ']'"))),
        };
    }
    match s.matches(':').count() {
        0 => Ok((s.to_string(), None)),
        1 => {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            if h.is_empty() {
                return Err(Error::InvalidArgument(format!("{s:?}: empty host")));
            }
            Ok((h.to_string(), Some(p.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad_port(p))?)))
        }
        _ => Ok((s.to_string(), None)), // bare IPv6 address
    }
}

/// Joins host and port, bracketing IPv6 hosts.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("10.0.0.1:80").unwrap(), ("10.0.0.1".into(), Some(80)));
        assert_eq!(split_host_port("node1").unwrap(), ("node1".into(), None));
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1".into(), Some(9)));
        assert_eq!(split_host_port("[::1]").unwrap(), ("::1".into(), None));
        assert_eq!(split_host_port("fe80::1").unwrap(), ("fe80::1".into(), None));
        for bad in ["", "a:b", "a:0", "a:70000", ":80", "[::1", "[::1]x"] {
            assert!(matches!(split_host_port(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
        assert_eq!(join_host_port("h", 5), "h:5");
    }
}
