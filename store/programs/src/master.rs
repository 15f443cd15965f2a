//! `mooncake_master`'s flags (upstream's names and defaults) and how they become a
//! [`ServiceConfig`].

use std::time::Duration;

use mooncake_store::types::TaskConfig;
use mooncake_store::types::{AllocationStrategy, CxlPoolConfig, MasterConfig};
use mooncake_store_master::ServiceConfig;

use crate::flags::{Flags, Kind, Spec};

/// Every flag `mooncake_master` accepts.
pub const FLAGS: &[Spec] = &[
    Spec { name: "rpc_port", kind: Kind::Int, default: "50051", help: "RPC port" },
    Spec { name: "port", kind: Kind::Int, default: "0", help: "deprecated alias of --rpc_port (used when not 0)" },
    Spec {
        name: "rpc_address",
        kind: Kind::Text,
        default: "",
        help: "address to bind (default 0.0.0.0, or :: with MC_USE_IPV6=1)",
    },
    Spec {
        name: "rpc_thread_num",
        kind: Kind::Int,
        default: "0",
        help: "RPC worker threads (0 = one per core, at most 4)",
    },
    Spec {
        name: "enable_http_metadata_server",
        kind: Kind::Bool,
        default: "false",
        help: "also serve the transfer engine's HTTP metadata (http://HOST:PORT/metadata)",
    },
    Spec { name: "http_metadata_server_host", kind: Kind::Text, default: "0.0.0.0", help: "HTTP metadata bind host" },
    Spec { name: "http_metadata_server_port", kind: Kind::Int, default: "8080", help: "HTTP metadata port" },
    Spec { name: "metrics_port", kind: Kind::Int, default: "9003", help: "admin HTTP port (/metrics, /health, ...)" },
    Spec {
        name: "metrics_host",
        kind: Kind::Text,
        default: "",
        help: "admin HTTP bind host (default: as --rpc_address)",
    },
    Spec {
        name: "eviction_ratio",
        kind: Kind::Float,
        default: "0.05",
        help: "fraction of objects one eviction pass removes",
    },
    Spec {
        name: "eviction_high_watermark_ratio",
        kind: Kind::Float,
        default: "0.9",
        help: "usage ratio that starts an eviction pass",
    },
    Spec {
        name: "default_kv_lease_ttl",
        kind: Kind::Millis,
        default: "10000",
        help: "lease granted by exist/get (ms, or with ms/s/m/h)",
    },
    Spec { name: "client_ttl", kind: Kind::Int, default: "10", help: "seconds a silent client keeps its segments" },
    Spec {
        name: "client_suspect_ms",
        kind: Kind::Millis,
        default: "3000",
        help: "silence after which a client's segments get no new objects and are not read (beyond upstream)",
    },
    Spec { name: "default_kv_soft_pin_ttl", kind: Kind::Millis, default: "1800000", help: "default soft pin ttl" },
    Spec { name: "max_kv_soft_pin_ttl", kind: Kind::Millis, default: "86400000", help: "cap on soft pin ttls" },
    Spec {
        name: "allow_evict_soft_pinned_objects",
        kind: Kind::Bool,
        default: "true",
        help: "evict soft-pinned objects when nothing else can go",
    },
    Spec {
        name: "allocation_strategy",
        kind: Kind::Text,
        default: "random",
        help: "random | free_ratio_first | local_first | cxl (needs --enable_cxl, which implies it)",
    },
    Spec {
        name: "enable_cxl",
        kind: Kind::Bool,
        default: "false",
        help: "place every object in the shared CXL pool that clients with protocol=cxl map",
    },
    Spec {
        name: "cxl_path",
        kind: Kind::Text,
        default: "/dev/dax0.0",
        help: "the CXL device (informational: clients map MC_CXL_DEV_PATH)",
    },
    Spec {
        name: "cxl_size",
        kind: Kind::Int,
        default: "8589934592",
        help: "most bytes of the CXL pool (clients' shared area caps it)",
    },
    Spec {
        name: "put_start_discard_timeout_sec",
        kind: Kind::Int,
        default: "30",
        help: "unfinished puts are reclaimed after this many seconds",
    },
    Spec {
        name: "max_total_pending_tasks",
        kind: Kind::Int,
        default: "10000",
        help: "copy/move tasks waiting to be fetched; more are refused",
    },
    Spec {
        name: "max_total_processing_tasks",
        kind: Kind::Int,
        default: "10000",
        help: "copy/move tasks running at once",
    },
    Spec {
        name: "max_total_finished_tasks",
        kind: Kind::Int,
        default: "10000",
        help: "finished copy/move tasks kept for query_task",
    },
    Spec {
        name: "pending_task_timeout_sec",
        kind: Kind::Int,
        default: "300",
        help: "a copy/move task still pending after this fails (0: never)",
    },
    Spec {
        name: "processing_task_timeout_sec",
        kind: Kind::Int,
        default: "300",
        help: "a copy/move task running this long without a report fails (0: never)",
    },
    Spec {
        name: "max_retry_attempts",
        kind: Kind::Int,
        default: "10",
        help: "attempts of a failing copy/move task before it fails",
    },
    Spec { name: "cluster_id", kind: Kind::Text, default: "mooncake_cluster", help: "cluster id" },
    Spec { name: "config_path", kind: Kind::Text, default: "", help: "JSON file with any of these flags" },
];

/// What `mooncake_master` runs.
#[derive(Debug, Clone)]
pub struct MasterSettings {
    /// The master service.
    pub service: ServiceConfig,
    /// Runtime worker threads.
    pub threads: usize,
    /// `(host, port)` of the embedded HTTP metadata server, when enabled.
    pub http_metadata: Option<(String, u16)>,
}

fn port(flags: &Flags, name: &str) -> Result<u16, String> {
    u16::try_from(flags.int(name)).map_err(|_| format!("--{name}={} is not a port", flags.int(name)))
}

/// `host:port` with brackets around IPv6 hosts.
fn join(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Turns parsed flags into settings; `ipv6` is `MC_USE_IPV6`.
pub fn settings(flags: &Flags, ipv6: bool) -> Result<MasterSettings, String> {
    let rpc_port = match flags.int("port") {
        0 => port(flags, "rpc_port")?,
        _ if !flags.given("rpc_port") => port(flags, "port")?,
        _ => port(flags, "rpc_port")?,
    };
    let default_host = if ipv6 { "::" } else { "0.0.0.0" };
    let rpc_host = match flags.text("rpc_address") {
        "" => default_host.to_string(),
        h => h.trim_start_matches('[').trim_end_matches(']').to_string(),
    };
    let metrics_host = match flags.text("metrics_host") {
        "" => rpc_host.clone(),
        h => h.to_string(),
    };
    let mut allocation_strategy: AllocationStrategy = flags.text("allocation_strategy").parse().map_err(|_| {
        format!(
            "--allocation_strategy={:?}: use random, free_ratio_first, local_first or cxl",
            flags.text("allocation_strategy")
        )
    })?;
    let cxl = flags
        .bool("enable_cxl")
        .then(|| {
            let size = u64::try_from(flags.int("cxl_size"))
                .ok()
                .filter(|s| *s >= 8)
                .ok_or_else(|| format!("--cxl_size={} must be at least 8 bytes", flags.int("cxl_size")))?;
            Ok::<_, String>(CxlPoolConfig { path: flags.text("cxl_path").to_string(), size })
        })
        .transpose()?;
    match (&cxl, allocation_strategy) {
        (Some(_), _) => allocation_strategy = AllocationStrategy::Cxl,
        (None, AllocationStrategy::Cxl) => {
            return Err("--allocation_strategy=cxl needs --enable_cxl=true (and clients with protocol=cxl)".into());
        }
        (None, _) => {}
    }
    let client_ttl = u64::try_from(flags.int("client_ttl")).map_err(|_| "--client_ttl must be positive".to_string())?;
    let discard = u64::try_from(flags.int("put_start_discard_timeout_sec"))
        .map_err(|_| "--put_start_discard_timeout_sec must be positive")?;
    let count = |name: &str| u64::try_from(flags.int(name)).map_err(|_| format!("--{name} must not be negative"));
    let tasks = TaskConfig {
        max_total_pending_tasks: count("max_total_pending_tasks")? as usize,
        max_total_processing_tasks: count("max_total_processing_tasks")? as usize,
        max_total_finished_tasks: count("max_total_finished_tasks")? as usize,
        pending_task_timeout_ms: count("pending_task_timeout_sec")?.saturating_mul(1000),
        processing_task_timeout_ms: count("processing_task_timeout_sec")?.saturating_mul(1000),
        max_retry_attempts: u32::try_from(count("max_retry_attempts")?).unwrap_or(u32::MAX),
    };
    let master = MasterConfig {
        default_kv_lease_ttl_ms: flags.millis("default_kv_lease_ttl"),
        default_kv_soft_pin_ttl_ms: flags.millis("default_kv_soft_pin_ttl"),
        max_kv_soft_pin_ttl_ms: flags.millis("max_kv_soft_pin_ttl"),
        allow_evict_soft_pinned_objects: flags.bool("allow_evict_soft_pinned_objects"),
        eviction_ratio: flags.float("eviction_ratio"),
        eviction_high_watermark_ratio: flags.float("eviction_high_watermark_ratio"),
        client_ttl_ms: client_ttl.saturating_mul(1000),
        client_suspect_after_ms: flags.millis("client_suspect_ms").min(client_ttl.saturating_mul(1000)),
        put_start_discard_timeout_ms: discard.saturating_mul(1000),
        allocation_strategy,
        cluster_id: flags.text("cluster_id").to_string(),
        tasks,
        cxl,
    };
    master.validate().map_err(|e| format!("invalid settings: {e}"))?;
    let threads = match flags.int("rpc_thread_num") {
        n if n > 0 => n as usize,
        _ => std::thread::available_parallelism().map(|n| n.get().min(4)).unwrap_or(2),
    };
    let http_metadata = flags
        .bool("enable_http_metadata_server")
        .then(|| {
            Ok::<_, String>((
                flags.text("http_metadata_server_host").to_string(),
                port(flags, "http_metadata_server_port")?,
            ))
        })
        .transpose()?;
    let service = ServiceConfig {
        master,
        rpc_addr: join(&rpc_host, rpc_port),
        admin_addr: Some(join(&metrics_host, port(flags, "metrics_port")?)),
        tick_interval: Duration::from_millis(100),
        ..ServiceConfig::default()
    };
    Ok(MasterSettings { service, threads, http_metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<MasterSettings, String> {
        let flags = Flags::parse("mooncake_master", "", FLAGS, args.iter().copied()).map_err(|e| e.to_string())?;
        settings(&flags, false)
    }

    #[test]
    fn enable_cxl_makes_a_pool_with_upstreams_defaults_and_the_cxl_strategy() {
        let s = parse(&["--enable_cxl=true"]).unwrap();
        assert_eq!(s.service.master.cxl, Some(CxlPoolConfig { path: "/dev/dax0.0".into(), size: 8 << 30 }));
        assert_eq!(s.service.master.allocation_strategy, AllocationStrategy::Cxl);
        let s = parse(&["--enable_cxl=true", "--cxl_path=/dev/dax1.0", "--cxl_size=1048576"]).unwrap();
        assert_eq!(s.service.master.cxl, Some(CxlPoolConfig { path: "/dev/dax1.0".into(), size: 1 << 20 }));
        assert_eq!(parse(&[]).unwrap().service.master.cxl, None);
    }

    #[test]
    fn defaults_are_upstreams() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.service.rpc_addr, "0.0.0.0:50051");
        assert_eq!(s.service.admin_addr.as_deref(), Some("0.0.0.0:9003"));
        assert_eq!(s.service.master, MasterConfig { client_suspect_after_ms: 3000, ..MasterConfig::default() });
        assert!(s.http_metadata.is_none());
        let flags = Flags::parse("m", "", FLAGS, Vec::<String>::new()).unwrap();
        assert_eq!(settings(&flags, true).unwrap().service.rpc_addr, "[::]:50051");
    }

    #[test]
    fn flags_map_to_settings() {
        let s = parse(&[
            "--rpc_port=6000",
            "--rpc_address",
            "::1",
            "--enable_http_metadata_server=true",
            "--http_metadata_server_port=8081",
            "--default_kv_lease_ttl=2s",
            "--client_ttl=4",
            "--allocation_strategy=free_ratio_first",
            "--eviction_ratio=0.1",
        ])
        .unwrap();
        assert_eq!(s.service.rpc_addr, "[::1]:6000");
        assert_eq!(s.http_metadata, Some(("0.0.0.0".into(), 8081)));
        assert_eq!(s.service.master.default_kv_lease_ttl_ms, 2000);
        assert_eq!(s.service.master.client_ttl_ms, 4000);
        assert_eq!(s.service.master.allocation_strategy, AllocationStrategy::FreeRatioFirst);
        assert_eq!(s.service.master.eviction_ratio, 0.1);
        assert_eq!(parse(&["--port=7000"]).unwrap().service.rpc_addr, "0.0.0.0:7000");
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        assert!(parse(&["--allocation_strategy=best"]).unwrap_err().contains("allocation_strategy"));
        assert!(parse(&["--allocation_strategy=cxl"]).unwrap_err().contains("--enable_cxl"));
        assert!(parse(&["--enable_cxl=true", "--cxl_size=-1"]).unwrap_err().contains("--cxl_size"));
        assert!(parse(&["--rpc_port=70000"]).unwrap_err().contains("not a port"));
        assert!(parse(&["--eviction_ratio=3"]).unwrap_err().contains("invalid settings"));
        assert!(parse(&["--client_ttl=-1"]).unwrap_err().contains("client_ttl"));
    }
}
