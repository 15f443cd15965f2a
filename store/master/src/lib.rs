//! The master service: [`MasterCore`] behind the multiplexed RPC (`mooncake-store-rpc`), a timer
//! that calls [`MasterCore::tick`], and the admin HTTP endpoints (`/metrics`, `/health`,
//! `/get_all_segments`, `/query_key?key=`).
//!
//! The core sits behind one mutex; each request holds it only for the in-memory work of one
//! batch (no I/O under the lock), so a batch of 128 keys costs one lock and one round trip.
//!
//! The core, its types and the wire messages are `mooncake-store-core`; the program with upstream's flags is
//! `mooncake_master` in `mooncake-store-programs`. This crate links no transfer engine and no backend.
#![forbid(unsafe_code)]

mod admin;
mod dispatch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mooncake_store_rpc::{PeerInfo, RpcError, RpcServer};
use tokio::task::JoinHandle;

use mooncake_store_core::master::{MasterCore, SystemClock};
use mooncake_store_core::protocol::{PROTOCOL_VERSION, Request, Response, SERVICE_NAME};
use mooncake_store_core::types::MasterConfig;

pub use admin::render_metrics;

/// The RPC identity of the master service (clients check it in the hello).
pub fn service_id() -> mooncake_store_rpc::ServiceId {
    mooncake_store_rpc::ServiceId::new(SERVICE_NAME, PROTOCOL_VERSION)
}

/// How to run the master service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Core settings (leases, eviction, liveness, placement).
    pub master: MasterConfig,
    /// RPC listen address (`0.0.0.0:50051`, `[::]:50051`, `127.0.0.1:0`).
    pub rpc_addr: String,
    /// Admin HTTP listen address (`0.0.0.0:9003`); `None` = no admin server.
    pub admin_addr: Option<String>,
    /// How often the core's timers run (liveness, leases, zombie puts, watermark eviction).
    pub tick_interval: Duration,
    /// Seed of the placement randomness (fixed seeds make placement reproducible).
    pub seed: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            master: MasterConfig::default(),
            rpc_addr: "0.0.0.0:50051".into(),
            admin_addr: Some("0.0.0.0:9003".into()),
            tick_interval: Duration::from_millis(100),
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed),
        }
    }
}

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The master settings are inconsistent.
    #[error("invalid master configuration: {0}")]
    Config(String),
    /// The RPC listener could not bind.
    #[error("cannot serve RPC on {addr}: {source}")]
    Rpc {
        /// Requested address.
        addr: String,
        /// What failed.
        source: RpcError,
    },
    /// The admin HTTP listener could not bind.
    #[error("cannot serve admin HTTP on {addr}: {source}")]
    Admin {
        /// Requested address.
        addr: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// Per-request counters, kept under the core's lock (no extra synchronization).
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    /// `(name, requests, failures)` in first-seen order.
    pub(crate) rpcs: Vec<(&'static str, u64, u64)>,
}

impl Counters {
    fn record(&mut self, name: &'static str, failed: bool) {
        let slot = match self.rpcs.iter().position(|(n, ..)| *n == name) {
            Some(i) => i,
            None => {
                self.rpcs.push((name, 0, 0));
                self.rpcs.len() - 1
            }
        };
        self.rpcs[slot].1 += 1;
        self.rpcs[slot].2 += u64::from(failed);
    }
}

/// The core and its counters.
pub(crate) struct Guarded {
    pub(crate) core: MasterCore,
    pub(crate) counters: Counters,
}

/// State shared by the RPC handler, the timer and the admin server.
pub(crate) struct Shared {
    guarded: Mutex<Guarded>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Guarded> {
        self.guarded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one request against the core and counts it.
    pub(crate) fn handle(&self, request: Request) -> Response {
        let name = request.name();
        let mut g = self.lock();
        let response = dispatch::dispatch(&mut g.core, request);
        g.counters.record(name, response.failed());
        response
    }
}

/// A running master: RPC server, tick timer and (optionally) admin HTTP server.
pub struct MasterService {
    shared: Arc<Shared>,
    rpc: Option<RpcServer>,
    rpc_addr: SocketAddr,
    admin: Option<(SocketAddr, JoinHandle<()>)>,
    ticker: JoinHandle<()>,
}

impl MasterService {
    /// Binds the listeners and starts serving on the current tokio runtime.
    pub async fn start(config: ServiceConfig) -> Result<MasterService, ServiceError> {
        config.master.validate().map_err(|e| ServiceError::Config(e.to_string()))?;
        let core = MasterCore::new(config.master.clone(), Box::new(SystemClock::new()), config.seed)
            .map_err(|e| ServiceError::Config(e.to_string()))?;
        let shared = Arc::new(Shared { guarded: Mutex::new(Guarded { core, counters: Counters::default() }) });
        let handler_state = shared.clone();
        let rpc = RpcServer::bind(&config.rpc_addr, service_id(), move |req: Request, _peer: PeerInfo| {
            let state = handler_state.clone();
            async move { state.handle(req) }
        })
        .await
        .map_err(|source| ServiceError::Rpc { addr: config.rpc_addr.clone(), source })?;
        let rpc_addr = rpc.local_addr();
        let admin = match &config.admin_addr {
            Some(addr) => Some(
                admin::serve(addr, shared.clone())
                    .await
                    .map_err(|source| ServiceError::Admin { addr: addr.clone(), source })?,
            ),
            None => None,
        };
        let weak = Arc::downgrade(&shared);
        let every = config.tick_interval.max(Duration::from_millis(1));
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                let report = shared.lock().core.tick();
                if !report.dropped_clients.is_empty() {
                    tracing::warn!(clients = ?report.dropped_clients, "dropped clients that stopped pinging (client_ttl)");
                }
                if report.evicted_objects > 0 {
                    tracing::info!(objects = report.evicted_objects, "evicted at the high watermark");
                }
            }
        });
        tracing::info!(rpc = %rpc_addr, admin = ?admin.as_ref().map(|a| a.0), "mooncake master serving");
        Ok(MasterService { shared, rpc: Some(rpc), rpc_addr, admin, ticker })
    }

    /// The bound RPC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The bound admin HTTP address, if serving.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.0)
    }

    /// Runs `f` on the core (tests and embedders; holds the lock for the duration).
    pub fn with_core<T>(&self, f: impl FnOnce(&mut MasterCore) -> T) -> T {
        f(&mut self.shared.lock().core)
    }

    /// Stops serving: closes the listeners and connections, stops the timer.
    pub async fn shutdown(mut self) {
        if let Some(rpc) = self.rpc.take() {
            rpc.shutdown().await;
        }
        self.stop_tasks();
    }

    fn stop_tasks(&mut self) {
        self.ticker.abort();
        if let Some((_, task)) = self.admin.take() {
            task.abort();
        }
    }
}

impl Drop for MasterService {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}
