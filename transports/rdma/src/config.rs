//! Tunables of the RDMA transport, read from engine options first and `MC_*` environment
//! variables second, with upstream Mooncake's names, defaults and accepted ranges.

use std::path::PathBuf;
use std::time::Duration;

use mooncake_core::BackendConfig;

/// Settings of the RDMA transport. Out-of-range values are ignored with a warning (as upstream)
/// and the default is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct RdmaConfig {
    /// Physical port of every NIC (`ib_port` / `MC_IB_PORT`, default 1).
    pub ib_port: u8,
    /// Fixed GID index (`gid_index` / `MC_GID_INDEX`, then `NCCL_IB_GID_INDEX`); `None` = automatic
    /// selection (see [`crate::gid::select_gid`]).
    pub gid_index: Option<u32>,
    /// Completion queue entries per NIC (`max_cqe` / `MC_MAX_CQE_PER_CTX`, default 4096, at most 65535).
    pub max_cqe: u32,
    /// Connected endpoints kept per NIC before idle ones are evicted (`max_ep` / `MC_MAX_EP_PER_CTX`,
    /// default 256).
    pub max_ep_per_ctx: usize,
    /// Queue pairs per endpoint (`qp_per_ep` / `MC_NUM_QP_PER_EP`, default 2, 1..=255). Both peers
    /// must use the same value: the handshake rejects a mismatch.
    pub qp_per_ep: usize,
    /// Scatter/gather entries per work request (`max_sge` / `MC_MAX_SGE`, default 4).
    pub max_sge: u32,
    /// Work requests per queue pair (`max_wr` / `MC_MAX_WR`, default 256).
    pub max_wr: u32,
    /// Inline bytes per work request (`max_inline` / `MC_MAX_INLINE`, default 64).
    pub max_inline: u32,
    /// Largest path MTU in bytes (`mtu` / `MC_MTU`: 512, 1024, 2048 or 4096; default 4096). The
    /// path MTU is the smaller of this and the port's active MTU.
    pub mtu: u32,
    /// Traffic class of the global route header (`traffic_class` / `MC_IB_TC`, default 0).
    pub traffic_class: u8,
    /// Service level (`service_level` / `MC_IB_SL`, default 0, 0..=15).
    pub service_level: u8,
    /// Local ACK timeout exponent: 4.096 us * 2^n (`ib_timeout` / `MC_IB_TIMEOUT`, default 14, 0..=31).
    pub ib_timeout: u8,
    /// Transport retries before a work request fails (`ib_retry_cnt` / `MC_IB_RETRY_CNT`, default 7, 0..=7).
    pub ib_retry_cnt: u8,
    /// Receiver-not-ready retries (`rnr_retry` / `MC_IB_RNR_RETRY`, default 7 = infinite, 0..=7).
    pub rnr_retry: u8,
    /// Slice size in bytes (`slice_size` / `MC_SLICE_SIZE`, default 64 KiB, at least 4 KiB).
    pub slice_size: u64,
    /// Attempts per slice on other rails after a failure (`retry_cnt` / `MC_RETRY_CNT`, default 9).
    pub retry_cnt: u32,
    /// Use only these NICs (`devices` / `MC_MS_FILTERS`, comma-separated names; empty = all).
    pub device_filter: Vec<String>,
    /// Register memory with relaxed PCIe ordering (`relaxed_ordering` / `MC_IB_PCI_RELAXED_ORDERING`).
    pub relaxed_ordering: bool,
    /// Bound on one connection handshake (`handshake_timeout_ms` / `MC_RDMA_HANDSHAKE_TIMEOUT_MS`,
    /// default 10 s).
    pub handshake_timeout: Duration,
    /// Root of the sysfs tree used for topology discovery (`sysfs_root`, default `/sys`).
    pub sysfs_root: PathBuf,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            ib_port: 1,
            gid_index: None,
            max_cqe: 4096,
            max_ep_per_ctx: 256,
            qp_per_ep: 2,
            max_sge: 4,
            max_wr: 256,
            max_inline: 64,
            mtu: 4096,
            traffic_class: 0,
            service_level: 0,
            ib_timeout: 14,
            ib_retry_cnt: 7,
            rnr_retry: 7,
            slice_size: 64 << 10,
            retry_cnt: 9,
            device_filter: Vec::new(),
            relaxed_ordering: false,
            handshake_timeout: Duration::from_secs(10),
            sysfs_root: PathBuf::from("/sys"),
        }
    }
}

impl RdmaConfig {
    /// Reads options and `MC_*` environment variables.
    pub fn from_backend(config: &BackendConfig) -> Self {
        Self::from_lookup(|key, env| {
            config.options.get(key).cloned().or_else(|| env.iter().find_map(|e| std::env::var(e).ok()))
        })
    }

    /// Builds the settings from `lookup(option_key, env_names)`, which returns the raw value of the
    /// first source that is set. Unparsable or out-of-range values keep the default.
    pub fn from_lookup(lookup: impl Fn(&str, &[&str]) -> Option<String>) -> Self {
        let d = RdmaConfig::default();
        let num = |key: &str, env: &[&str], lo: u64, hi: u64| -> Option<u64> {
            let raw = lookup(key, env)?;
            match raw.trim().parse::<u64>() {
                Ok(v) if (lo..=hi).contains(&v) => Some(v),
                _ => {
                    tracing::warn!(option = key, value = %raw, lo, hi, "ignoring out-of-range RDMA setting");
                    None
                }
            }
        };
        let mtu = match num("mtu", &["MC_MTU"], 256, 4096) {
            Some(m @ (512 | 1024 | 2048 | 4096)) => m as u32,
            Some(other) => {
                tracing::warn!(mtu = other, "MC_MTU must be 512, 1024, 2048 or 4096; using 4096");
                d.mtu
            }
            None => d.mtu,
        };
        let device_filter = lookup("devices", &["MC_MS_FILTERS"])
            .map(|s| s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let relaxed_ordering = lookup("relaxed_ordering", &["MC_IB_PCI_RELAXED_ORDERING"])
            .map(|v| matches!(v.trim(), "1" | "true" | "on" | "yes"))
            .unwrap_or(false);
        RdmaConfig {
            ib_port: num("ib_port", &["MC_IB_PORT"], 1, 255).map_or(d.ib_port, |v| v as u8),
            gid_index: num("gid_index", &["MC_GID_INDEX", "NCCL_IB_GID_INDEX"], 0, 255).map(|v| v as u32),
            max_cqe: num("max_cqe", &["MC_MAX_CQE_PER_CTX"], 1, u16::MAX as u64).map_or(d.max_cqe, |v| v as u32),
            max_ep_per_ctx: num("max_ep", &["MC_MAX_EP_PER_CTX"], 1, u32::MAX as u64)
                .map_or(d.max_ep_per_ctx, |v| v as usize),
            qp_per_ep: num("qp_per_ep", &["MC_NUM_QP_PER_EP"], 1, 255).map_or(d.qp_per_ep, |v| v as usize),
            max_sge: num("max_sge", &["MC_MAX_SGE"], 1, u16::MAX as u64).map_or(d.max_sge, |v| v as u32),
            max_wr: num("max_wr", &["MC_MAX_WR"], 1, u16::MAX as u64).map_or(d.max_wr, |v| v as u32),
            max_inline: num("max_inline", &["MC_MAX_INLINE"], 0, u16::MAX as u64).map_or(d.max_inline, |v| v as u32),
            mtu,
            traffic_class: num("traffic_class", &["MC_IB_TC"], 0, 255).map_or(d.traffic_class, |v| v as u8),
            service_level: num("service_level", &["MC_IB_SL"], 0, 15).map_or(d.service_level, |v| v as u8),
            ib_timeout: num("ib_timeout", &["MC_IB_TIMEOUT"], 0, 31).map_or(d.ib_timeout, |v| v as u8),
            ib_retry_cnt: num("ib_retry_cnt", &["MC_IB_RETRY_CNT"], 0, 7).map_or(d.ib_retry_cnt, |v| v as u8),
            rnr_retry: num("rnr_retry", &["MC_IB_RNR_RETRY"], 0, 7).map_or(d.rnr_retry, |v| v as u8),
            slice_size: num("slice_size", &["MC_SLICE_SIZE"], 4096, 1 << 30).map_or(d.slice_size, |v| v),
            retry_cnt: num("retry_cnt", &["MC_RETRY_CNT"], 0, 1024).map_or(d.retry_cnt, |v| v as u32),
            device_filter,
            relaxed_ordering,
            handshake_timeout: num("handshake_timeout_ms", &["MC_RDMA_HANDSHAKE_TIMEOUT_MS"], 1, 3_600_000)
                .map_or(d.handshake_timeout, Duration::from_millis),
            sysfs_root: lookup("sysfs_root", &[]).map(PathBuf::from).unwrap_or(d.sysfs_root),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn from(pairs: &[(&str, &str)]) -> RdmaConfig {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RdmaConfig::from_lookup(|key, env| {
            map.get(key).cloned().or_else(|| env.iter().find_map(|e| map.get(*e).cloned()))
        })
    }

    #[test]
    fn defaults_match_upstream() {
        let c = from(&[]);
        assert_eq!(c, RdmaConfig::default());
        assert_eq!((c.max_cqe, c.qp_per_ep, c.max_wr, c.max_sge, c.max_inline), (4096, 2, 256, 4, 64));
        assert_eq!((c.ib_timeout, c.ib_retry_cnt, c.mtu, c.slice_size), (14, 7, 4096, 65536));
        assert_eq!(c.gid_index, None);
    }

    #[test]
    fn env_names_and_options_are_read() {
        let c = from(&[
            ("MC_MAX_CQE_PER_CTX", "8192"),
            ("MC_NUM_QP_PER_EP", "4"),
            ("MC_IB_TIMEOUT", "18"),
            ("MC_IB_RETRY_CNT", "3"),
            ("MC_GID_INDEX", "3"),
            ("MC_SLICE_SIZE", "131072"),
            ("MC_MTU", "1024"),
            ("MC_MS_FILTERS", "mlx5_0, mlx5_2,,"),
            ("MC_IB_PCI_RELAXED_ORDERING", "1"),
            ("retry_cnt", "2"),
        ]);
        assert_eq!(c.max_cqe, 8192);
        assert_eq!(c.qp_per_ep, 4);
        assert_eq!(c.ib_timeout, 18);
        assert_eq!(c.ib_retry_cnt, 3);
        assert_eq!(c.gid_index, Some(3));
        assert_eq!(c.slice_size, 128 << 10);
        assert_eq!(c.mtu, 1024);
        assert_eq!(c.device_filter, vec!["mlx5_0".to_string(), "mlx5_2".to_string()]);
        assert!(c.relaxed_ordering);
        assert_eq!(c.retry_cnt, 2);
    }

    #[test]
    fn nccl_gid_index_is_a_fallback() {
        assert_eq!(from(&[("NCCL_IB_GID_INDEX", "5")]).gid_index, Some(5));
        assert_eq!(from(&[("NCCL_IB_GID_INDEX", "5"), ("MC_GID_INDEX", "1")]).gid_index, Some(1));
    }

    #[test]
    fn out_of_range_values_keep_defaults() {
        let c = from(&[
            ("MC_MAX_CQE_PER_CTX", "70000"),
            ("MC_NUM_QP_PER_EP", "0"),
            ("MC_IB_TIMEOUT", "32"),
            ("MC_IB_RETRY_CNT", "8"),
            ("MC_GID_INDEX", "-1"),
            ("MC_MTU", "1500"),
            ("MC_SLICE_SIZE", "12"),
            ("MC_IB_SL", "16"),
            ("MC_IB_PORT", "x"),
        ]);
        let d = RdmaConfig::default();
        assert_eq!(c.max_cqe, d.max_cqe);
        assert_eq!(c.qp_per_ep, d.qp_per_ep);
        assert_eq!(c.ib_timeout, d.ib_timeout);
        assert_eq!(c.ib_retry_cnt, d.ib_retry_cnt);
        assert_eq!(c.gid_index, None);
        assert_eq!(c.mtu, 4096);
        assert_eq!(c.slice_size, d.slice_size);
        assert_eq!(c.service_level, 0);
        assert_eq!(c.ib_port, 1);
    }
}
