//! Admin HTTP on the metrics port, with upstream's paths and formats: `/metrics` (Prometheus text,
//! upstream's metric names), `/health` (JSON), `/get_all_segments` (one segment name per line) and
//! `/query_key?key=` (JSON; 404 with `{"success":false,"error_code":-704,...}` when absent).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::task::JoinHandle;

use super::{Counters, Shared};
use mooncake_store_core::master::MasterStats;
use mooncake_store_core::types::ErrorCode;

/// Binds `addr` and serves the admin routes until the task is aborted.
pub(super) async fn serve(addr: &str, shared: Arc<Shared>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/get_all_segments", get(all_segments))
        .route("/query_key", get(query_key))
        .with_state(shared);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin HTTP server stopped");
        }
    });
    Ok((local, task))
}

/// Prometheus text for the given totals and request counters.
pub fn render_metrics(stats: &MasterStats, rpcs: &[(&'static str, u64, u64)]) -> String {
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
    };
    gauge(
        "master_allocated_bytes",
        "Total memory bytes currently allocated across all segments",
        stats.allocated_bytes,
    );
    gauge(
        "master_total_capacity_bytes",
        "Total memory capacity across all mounted segments",
        stats.total_capacity_bytes,
    );
    gauge("master_key_count", "Total number of keys managed by the master", stats.key_count);
    gauge("master_active_clients", "Total number of active clients", stats.active_clients);
    gauge("master_mounted_segments", "Mounted segments", stats.mounted_segments);
    gauge(
        "master_suspect_segments",
        "Mounted segments whose owner missed pings or was reported unreachable",
        stats.suspect_segments,
    );
    let _ = write!(
        out,
        "# HELP master_evicted_key_count Objects evicted since start\n# TYPE master_evicted_key_count counter\nmaster_evicted_key_count {}\n",
        stats.evicted_key_count
    );
    for (name, requests, failures) in rpcs {
        let _ = write!(
            out,
            "# TYPE master_{name}_requests_total counter\nmaster_{name}_requests_total {requests}\n\
             # TYPE master_{name}_failures_total counter\nmaster_{name}_failures_total {failures}\n"
        );
    }
    out
}

/// Every request kind, so that counters exist (at 0) before the first request of their kind.
const RPC_NAMES: &[&str] = &[
    "ping",
    "mount_segment",
    "unmount_segment",
    "report_unreachable",
    "exist_key",
    "batch_exist_key",
    "get_replica_list",
    "batch_get_replica_list",
    "get_size",
    "put_start",
    "batch_put_start",
    "put_end",
    "batch_put_end",
    "put_revoke",
    "batch_put_revoke",
    "remove",
    "remove_by_regex",
    "remove_all",
];

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let (stats, counters) = {
        let g = shared.lock();
        (g.core.stats(), g.counters.clone())
    };
    let mut rpcs: Vec<(&'static str, u64, u64)> = RPC_NAMES.iter().map(|n| (*n, 0, 0)).collect();
    let Counters { rpcs: seen } = counters;
    for (name, requests, failures) in seen {
        match rpcs.iter_mut().find(|(n, ..)| *n == name) {
            Some(slot) => *slot = (name, requests, failures),
            None => rpcs.push((name, requests, failures)),
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render_metrics(&stats, &rpcs)).into_response()
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let stats = shared.lock().core.stats();
    axum::Json(json!({
        "status": "ok",
        "role": "leader",
        "service_ready": true,
        "active_clients": stats.active_clients,
        "mounted_segments": stats.mounted_segments,
        "suspect_segments": stats.suspect_segments,
    }))
    .into_response()
}

async fn all_segments(State(shared): State<Arc<Shared>>) -> Response {
    let segments = shared.lock().core.segments();
    let mut body = String::new();
    for s in segments {
        body.push_str(&s.name);
        body.push('\n');
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `OBJECT_NOT_FOUND` style name of an error code, as upstream's JSON replies carry.
fn upstream_name(e: ErrorCode) -> String {
    let mut out = String::new();
    for (i, c) in format!("{e:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn error_reply(status: StatusCode, e: ErrorCode) -> Response {
    let body = json!({ "success": false, "error_code": e.code(), "error_message": upstream_name(e) });
    (status, axum::Json(body)).into_response()
}

async fn query_key(State(shared): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(key) = q.get("key").filter(|k| !k.is_empty()) else {
        return error_reply(StatusCode::BAD_REQUEST, ErrorCode::InvalidParams);
    };
    let info = shared.lock().core.query_key(key);
    match info {
        Ok(info) => {
            let mut v = serde_json::to_value(&info).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("success".into(), json!(true));
                o.insert("key".into(), json!(key));
            }
            axum::Json(v).into_response()
        }
        Err(ErrorCode::ObjectNotFound) => error_reply(StatusCode::NOT_FOUND, ErrorCode::ObjectNotFound),
        Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_follow_upstream() {
        assert_eq!(upstream_name(ErrorCode::ObjectNotFound), "OBJECT_NOT_FOUND");
        assert_eq!(upstream_name(ErrorCode::NoAvailableHandle), "NO_AVAILABLE_HANDLE");
    }

    #[test]
    fn metrics_text_has_upstream_names() {
        let stats = MasterStats { key_count: 3, allocated_bytes: 4096, ..Default::default() };
        let text = render_metrics(&stats, &[("put_start", 5, 1)]);
        assert!(text.contains("master_key_count 3\n"));
        assert!(text.contains("master_allocated_bytes 4096\n"));
        assert!(text.contains("master_put_start_requests_total 5\n"));
        assert!(text.contains("master_put_start_failures_total 1\n"));
    }
}
