//! Settings of the libfabric transports, from engine options or `MC_LIBFABRIC_*` environment.

use std::time::Duration;

use mooncake_core::BackendConfig;

/// Provider of the `libfabric` protocol when none is configured.
pub const DEFAULT_PROVIDER: &str = "tcp;ofi_rxm";

/// Provider of the `efa` protocol.
pub const EFA_PROVIDER: &str = "efa";

/// Tunables of one libfabric transport instance.
///
/// Every field can be set through the engine's backend options (key in parentheses) or the
/// environment variable named; options win over the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricConfig {
    /// libfabric provider (`provider` / `MC_LIBFABRIC_PROVIDER`; fixed to `efa` for the `efa`
    /// protocol), e.g. `tcp;ofi_rxm`, `shm`, `verbs;ofi_rxm`.
    pub provider: String,
    /// Only use these domains (NICs or interfaces) as rails (`domains` / `MC_LIBFABRIC_DOMAINS`,
    /// comma separated); empty = every domain of the provider (socket providers: the one that
    /// serves the engine's bind address).
    pub domains: Vec<String>,
    /// At most this many rails (`max_rails` / `MC_LIBFABRIC_MAX_RAILS`, default 8).
    pub max_rails: usize,
    /// Requests of at least twice this size are striped across rails in pieces of at least this
    /// size (`stripe_min` / `MC_LIBFABRIC_STRIPE_MIN`, default 1 MiB).
    pub stripe_min: u64,
    /// Largest single RMA operation; larger requests are split (`max_msg` / `MC_LIBFABRIC_MAX_MSG`;
    /// 0 = the provider's `max_msg_size`).
    pub max_msg: u64,
    /// A peer that completes nothing for this long while operations to it are outstanding is
    /// declared gone (`timeout_ms` / `MC_LIBFABRIC_TIMEOUT_MS`, default 5000).
    pub timeout: Duration,
    /// After a connection error, operations are re-posted for this long while the provider
    /// reconnects before they fail as disconnected (`reconnect_ms` / `MC_LIBFABRIC_RECONNECT_MS`,
    /// default 1000).
    pub reconnect: Duration,
    /// The progress thread busy-polls this long after the last activity before it sleeps
    /// (`spin_us` / `MC_LIBFABRIC_SPIN_US`, default 200).
    pub spin: Duration,
    /// Longest sleep of an idle progress thread on providers without a wait object; bounds the
    /// latency of the first request after a quiet period (`idle_us` / `MC_LIBFABRIC_IDLE_US`,
    /// default 200; 0 = never sleep: busy-poll a core for the lowest latency).
    pub idle_sleep: Duration,
    /// Operations in flight per rail (`depth` / `MC_LIBFABRIC_DEPTH`; 0 = the provider's
    /// transmit queue size, at most 4096).
    pub depth: usize,
    /// Override the memory-registration mode offered to the provider (`mr_mode` /
    /// `MC_LIBFABRIC_MR_MODE`: a number of `FI_MR_*` bits, or `basic` / `scalable`); `None` =
    /// offer every mode this transport handles and let the provider choose.
    pub mr_mode: Option<u32>,
    /// Sleep on the completion queue's file descriptor when idle, where the provider has one
    /// (`wait_fd` / `MC_LIBFABRIC_WAIT_FD`, default 1).
    pub wait_fd: bool,
    /// Count peers' accesses to our memory (`FI_RMA_EVENT`) so that a passive target keeps
    /// polling while it is served (`rma_event` / `MC_LIBFABRIC_RMA_EVENT`; default on for
    /// shared-memory providers, which have no wait object; ignored where unsupported).
    pub rma_event: bool,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            provider: DEFAULT_PROVIDER.into(),
            domains: Vec::new(),
            max_rails: 8,
            stripe_min: 1 << 20,
            max_msg: 0,
            timeout: Duration::from_secs(5),
            reconnect: Duration::from_secs(1),
            spin: Duration::from_micros(200),
            idle_sleep: Duration::from_micros(200),
            depth: 0,
            mr_mode: None,
            wait_fd: true,
            rma_event: false,
        }
    }
}

/// Parses `basic`, `scalable` or a number (decimal or `0x` hex) of `FI_MR_*` bits.
pub(crate) fn parse_mr_mode(s: &str) -> Option<u32> {
    let s = s.trim();
    match s {
        "basic" => Some(
            mooncake_libfabric_sys::FI_MR_VIRT_ADDR
                | mooncake_libfabric_sys::FI_MR_ALLOCATED
                | mooncake_libfabric_sys::FI_MR_PROV_KEY,
        ),
        "scalable" => Some(0),
        _ => match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        },
    }
}

impl FabricConfig {
    /// Reads options and environment for the protocol `protocol` (`efa` pins the provider).
    pub fn from_backend(protocol: &str, config: &BackendConfig) -> Self {
        let d = FabricConfig::default();
        let provider = if protocol == crate::EFA {
            EFA_PROVIDER.to_string()
        } else {
            config
                .get::<String>("provider", "MC_LIBFABRIC_PROVIDER")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or(d.provider)
        };
        let domains = config
            .get::<String>("domains", "MC_LIBFABRIC_DOMAINS")
            .map(|s| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let ms = |key: &str, env: &str, default: Duration| {
            config.get::<u64>(key, env).map(Duration::from_millis).unwrap_or(default)
        };
        let us = |key: &str, env: &str, default: Duration| {
            config.get::<u64>(key, env).map(Duration::from_micros).unwrap_or(default)
        };
        FabricConfig {
            provider,
            domains,
            max_rails: config.get::<usize>("max_rails", "MC_LIBFABRIC_MAX_RAILS").unwrap_or(d.max_rails).clamp(1, 64),
            stripe_min: config.get::<u64>("stripe_min", "MC_LIBFABRIC_STRIPE_MIN").unwrap_or(d.stripe_min).max(4096),
            max_msg: config.get::<u64>("max_msg", "MC_LIBFABRIC_MAX_MSG").unwrap_or(d.max_msg),
            timeout: ms("timeout_ms", "MC_LIBFABRIC_TIMEOUT_MS", d.timeout).max(Duration::from_millis(10)),
            reconnect: ms("reconnect_ms", "MC_LIBFABRIC_RECONNECT_MS", d.reconnect),
            spin: us("spin_us", "MC_LIBFABRIC_SPIN_US", d.spin),
            idle_sleep: us("idle_us", "MC_LIBFABRIC_IDLE_US", d.idle_sleep),
            depth: config.get::<usize>("depth", "MC_LIBFABRIC_DEPTH").unwrap_or(d.depth).min(1 << 16),
            mr_mode: config.get::<String>("mr_mode", "MC_LIBFABRIC_MR_MODE").and_then(|s| parse_mr_mode(&s)),
            wait_fd: config.get::<u32>("wait_fd", "MC_LIBFABRIC_WAIT_FD") != Some(0),
            rma_event: false,
        }
        .with_rma_event(config.get::<u32>("rma_event", "MC_LIBFABRIC_RMA_EVENT"))
    }

    fn with_rma_event(mut self, setting: Option<u32>) -> Self {
        self.rma_event = match setting {
            Some(v) => v != 0,
            None => self.same_host_only(),
        };
        self
    }

    /// True for providers whose endpoints only reach the same host.
    pub fn same_host_only(&self) -> bool {
        self.provider.split(';').next().is_some_and(|p| p == "shm" || p == "sm2")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BackendConfig {
        BackendConfig { options: kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn options_parse_and_efa_pins_its_provider() {
        let c = FabricConfig::from_backend(
            "libfabric",
            &opts(&[("provider", "shm"), ("domains", "a, b,,"), ("stripe_min", "10"), ("timeout_ms", "250")]),
        );
        assert_eq!(c.provider, "shm");
        assert!(c.same_host_only());
        assert!(c.rma_event, "shared memory counts remote accesses by default");
        assert_eq!(c.domains, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(c.stripe_min, 4096, "clamped to one page");
        assert_eq!(c.timeout, Duration::from_millis(250));
        let e = FabricConfig::from_backend("efa", &opts(&[("provider", "shm")]));
        assert_eq!(e.provider, "efa");
        assert!(!e.same_host_only());
    }

    #[test]
    fn mr_modes() {
        assert_eq!(parse_mr_mode("scalable"), Some(0));
        assert_eq!(parse_mr_mode("0x10"), Some(16));
        assert_eq!(parse_mr_mode("16"), Some(16));
        assert!(parse_mr_mode("basic").is_some_and(|m| m & mooncake_libfabric_sys::FI_MR_VIRT_ADDR != 0));
        assert_eq!(parse_mr_mode("nonsense"), None);
    }
}
