//! [`RedisMetadataStore`]: the `MetadataStore` trait over plain `SET`/`GET`/`DEL`, leases as
//! `PX` expiries kept alive by a background task, `list` as `SCAN MATCH` + `MGET`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{Error, MetadataCapabilities, MetadataStore, Result, sync};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::RedisConfig;
use crate::connection::Connector;

/// Keys asked for per `SCAN` round trip (a hint to the server).
const SCAN_COUNT: usize = 1000;
/// Keys fetched per `MGET` (bounds the size of one reply when values are large).
const MGET_CHUNK: usize = 64;
/// Keys deleted per `DEL` on close.
const DEL_CHUNK: usize = 256;
/// Longest pause before retrying a lease refresh that failed.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// Largest lease accepted (Redis keeps expiry times as 64-bit milliseconds since the epoch).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The Redis metadata store (`redis://host:port`).
///
/// Keys are stored exactly as given with plain `SET`/`GET`/`DEL` and values are the raw bytes,
/// the layout upstream Mooncake uses, so engines of both kinds can share one Redis.
///
/// - Nothing is connected on construction: the first operation connects, and a connection that
///   breaks is replaced on the next operation (a server restart is survived by the same store).
/// - Every command, connecting included, is bounded by [`RedisConfig::timeout`]; a server that
///   refuses or does not answer gives [`Error::Unavailable`] naming its `host:port`.
/// - `put_with_lease` sets the key with a `PX` expiry and renews it about every third of the TTL
///   while the store lives; a leased key found missing (the server restarted empty) is written
///   again. A plain `put` or `delete` of the key ends its lease. [`MetadataStore::close`]
///   stops renewing and deletes the leased keys; a store dropped without `close` (or a crashed
///   process) leaves them to expire after their TTL.
/// - `list` walks the keyspace with `SCAN MATCH <escaped prefix>*`, then `MGET`s the values.
/// - `watch` is not offered: keyspace notifications need `CONFIG SET notify-keyspace-events`,
///   which managed Redis services often forbid, are dropped while a subscriber is disconnected,
///   and carry no value (a `GET` afterwards can race with the next write), so a watch could
///   silently miss or misreport changes.
/// - Redis Cluster is not supported (`SCAN` would only see one node); use a standalone server.
///
/// The store runs its connection and lease renewal on a private single-threaded tokio runtime,
/// so it may be called from any runtime (or none) and keeps renewing leases regardless of the
/// caller's runtime. After `close`, `get`/`put`/`delete`/`list` still work (they reconnect) but
/// `put_with_lease` is refused.
pub struct RedisMetadataStore {
    shared: Arc<Shared>,
    worker: Worker,
}

impl std::fmt::Debug for RedisMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMetadataStore").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

/// What the public methods and the lease task share.
struct Shared {
    config: RedisConfig,
    connector: Connector,
    leases: Mutex<HashMap<String, Lease>>,
    /// Serializes writes of leased keys with lease renewals, so a renewal never brings back a value
    /// that a `put`, `delete` or `close` has just replaced or removed.
    lease_writes: tokio::sync::Mutex<()>,
    /// Wakes the lease task when the lease set changes or the store closes.
    changed: tokio::sync::Notify,
    closed: AtomicBool,
    /// The last renewal failed (so repeated failures are logged once, not every retry).
    renew_failing: AtomicBool,
}

/// One leased key.
struct Lease {
    value: Arc<Vec<u8>>,
    ttl: Duration,
    /// When to renew next.
    due: Instant,
}

/// A single-threaded tokio runtime on its own thread; stops when dropped.
struct Worker {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl Worker {
    fn start(name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new().name(name.to_string()).spawn(move || {
            // Returns when the sender is used or dropped; dropping the runtime then ends its tasks.
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
        Ok(Worker { handle, stop: Some(stop) })
    }

    /// Runs `fut` on the worker and waits for it from whatever context the caller is in.
    async fn run<T: Send + 'static>(&self, fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        match self.handle.spawn(fut).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => Err(Error::Metadata(format!("redis client task panicked: {e}"))),
            Err(_) => Err(Error::unavailable("the redis client's runtime has stopped")),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl RedisMetadataStore {
    /// A store for `config`. Does not connect (the first operation does), so it never blocks and
    /// may be called inside or outside an async runtime.
    pub fn new(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let connector = Connector::new(&config)?;
        let worker = Worker::start("mooncake-redis")?;
        let shared = Arc::new(Shared {
            config,
            connector,
            leases: Mutex::new(HashMap::new()),
            lease_writes: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            renew_failing: AtomicBool::new(false),
        });
        worker.handle.spawn(renew_leases(shared.clone()));
        Ok(RedisMetadataStore { shared, worker })
    }

    /// A store for a `redis://` connection string, completed from the process environment
    /// (see [`RedisConfig::from_conn_and_env`]).
    pub fn from_conn(conn: &str) -> Result<Self> {
        Self::new(RedisConfig::from_conn(conn)?)
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }
}

#[async_trait]
impl MetadataStore for RedisMetadataStore {
    fn name(&self) -> &str {
        "redis"
    }

    fn capabilities(&self) -> MetadataCapabilities {
        MetadataCapabilities { shared: true, lease: true, list: true, watch: false }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let shared = self.shared.clone();
        let cmd = redis::cmd("GET").arg(key).to_owned();
        self.worker.run(async move { shared.connector.query("GET", &cmd).await }).await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let (shared, key, value) = (self.shared.clone(), key.to_string(), value.to_vec());
        self.worker
            .run(async move {
                let cmd = redis::cmd("SET").arg(&key).arg(value).to_owned();
                shared.write_ending_lease(&key, "SET", &cmd).await
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let (shared, key) = (self.shared.clone(), key.to_string());
        self.worker
            .run(async move {
                let cmd = redis::cmd("DEL").arg(&key).to_owned();
                let removed: i64 = shared.write_ending_lease(&key, "DEL", &cmd).await?;
                Ok(removed > 0)
            })
            .await
    }

    async fn put_with_lease(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let ms = lease_millis(ttl)?;
        let (shared, key, value) = (self.shared.clone(), key.to_string(), Arc::new(value.to_vec()));
        self.worker
            .run(async move {
                let _writes = shared.lease_writes.lock().await;
                if shared.closed.load(Ordering::SeqCst) {
                    return Err(Error::NotInitialized(
                        "the redis metadata store was closed; create a new one to hold leases".into(),
                    ));
                }
                let cmd = redis::cmd("SET").arg(&key).arg(value.as_slice()).arg("PX").arg(ms).to_owned();
                shared.connector.query::<()>("SET PX", &cmd).await?;
                sync::lock(&shared.leases).insert(key, Lease { value, ttl, due: Instant::now() + renew_interval(ttl) });
                shared.changed.notify_one();
                Ok(())
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let (shared, prefix) = (self.shared.clone(), prefix.to_string());
        self.worker.run(async move { shared.list(&prefix).await }).await
    }

    async fn close(&self) {
        let shared = self.shared.clone();
        let _ = self
            .worker
            .run(async move {
                shared.close().await;
                Ok(())
            })
            .await;
    }
}

impl Shared {
    /// Runs a plain write of `key`; when the key is leased, ends the lease first, in step with renewals.
    async fn write_ending_lease<T: redis::FromRedisValue>(&self, key: &str, what: &str, cmd: &redis::Cmd) -> Result<T> {
        if !sync::lock(&self.leases).contains_key(key) {
            return self.connector.query(what, cmd).await;
        }
        let _writes = self.lease_writes.lock().await;
        if sync::lock(&self.leases).remove(key).is_some() {
            self.changed.notify_one();
        }
        self.connector.query(what, cmd).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut keys = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let cmd = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT).to_owned();
            let (next, batch): (u64, Vec<Vec<u8>>) = self.connector.query("SCAN", &cmd).await?;
            // The pattern is exact for the prefix; the check only guards against a server
            // matching differently.
            keys.extend(batch.into_iter().filter(|k| k.starts_with(prefix.as_bytes())));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let keys: Vec<Vec<u8>> = keys.into_iter().collect();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MGET_CHUNK) {
            let cmd = redis::cmd("MGET").arg(chunk).to_owned();
            let values: Vec<Option<Vec<u8>>> = self.connector.query("MGET", &cmd).await?;
            if values.len() != chunk.len() {
                return Err(Error::Metadata(format!(
                    "redis at {}: MGET of {} keys returned {} values",
                    self.config.address(),
                    chunk.len(),
                    values.len()
                )));
            }
            for (key, value) in chunk.iter().zip(values) {
                // A key deleted between SCAN and MGET is simply not listed.
                let Some(value) = value else { continue };
                match String::from_utf8(key.clone()) {
                    Ok(key) => out.push((key, value)),
                    Err(_) => {
                        tracing::warn!(key = ?String::from_utf8_lossy(key), "skipping a redis key that is not UTF-8")
                    }
                }
            }
        }
        Ok(out)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_one();
        let _writes = self.lease_writes.lock().await;
        let keys: Vec<String> = sync::lock(&self.leases).drain().map(|(k, _)| k).collect();
        for chunk in keys.chunks(DEL_CHUNK) {
            let cmd = redis::cmd("DEL").arg(chunk).to_owned();
            if let Err(e) = self.connector.query::<i64>("DEL", &cmd).await {
                tracing::warn!(error = %e, keys = chunk.len(), "could not delete leased keys on close; they expire after their TTL");
            }
        }
        self.connector.disconnect();
    }

    /// Renews every lease that is due; returns when the next one is.
    async fn renew_due(&self) {
        let _writes = self.lease_writes.lock().await;
        let now = Instant::now();
        let due: Vec<(String, Arc<Vec<u8>>, Duration)> = sync::lock(&self.leases)
            .iter()
            .filter(|(_, l)| l.due <= now)
            .map(|(k, l)| (k.clone(), l.value.clone(), l.ttl))
            .collect();
        let mut unreachable = false;
        for (key, value, ttl) in due {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let retry = renew_interval(ttl).min(RETRY_AFTER_FAILURE);
            // Once the server is unreachable, the rest of this round is only rescheduled: each
            // attempt could take the full timeout while plain writes of leased keys wait.
            let next = if unreachable {
                retry
            } else {
                match self.renew(&key, &value, ttl).await {
                    Ok(()) => {
                        if self.renew_failing.swap(false, Ordering::Relaxed) {
                            tracing::info!(%key, "redis lease renewal works again");
                        }
                        renew_interval(ttl)
                    }
                    Err(e) => {
                        if self.renew_failing.swap(true, Ordering::Relaxed) {
                            tracing::debug!(%key, error = %e, "redis lease renewal still failing; retrying");
                        } else {
                            tracing::warn!(%key, error = %e, "could not renew a redis lease; retrying until it works");
                        }
                        unreachable = matches!(e, Error::Unavailable { .. });
                        retry
                    }
                }
            };
            if let Some(lease) = sync::lock(&self.leases).get_mut(&key) {
                lease.due = Instant::now() + next;
            }
        }
    }

    /// Pushes the expiry of `key` out by `ttl`, writing the value again if the key is gone.
    async fn renew(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let ms = lease_millis(ttl)?;
        let cmd = redis::cmd("PEXPIRE").arg(key).arg(ms).to_owned();
        let kept: i64 = self.connector.query("PEXPIRE", &cmd).await?;
        if kept == 0 {
            tracing::info!(%key, "leased key was missing from redis (server restarted?); writing it again");
            let cmd = redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ms).to_owned();
            self.connector.query::<()>("SET PX", &cmd).await?;
        }
        Ok(())
    }
}

/// The lease task: sleeps until the next renewal is due (or the lease set changes), renews,
/// and ends when the store closes (or with the worker runtime).
async fn renew_leases(shared: Arc<Shared>) {
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let next = sync::lock(&shared.leases).values().map(|l| l.due).min();
        match next {
            None => shared.changed.notified().await,
            Some(due) if due > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = shared.changed.notified() => continue,
                }
            }
            Some(_) => {}
        }
        shared.renew_due().await;
    }
}

/// How often a lease of `ttl` is renewed: a third of it, so two renewals may fail before expiry.
fn renew_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(1))
}

/// `ttl` in whole milliseconds for `PX`/`PEXPIRE`, or why it cannot be one.
fn lease_millis(ttl: Duration) -> Result<u64> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::InvalidArgument(format!("lease TTL {ttl:?} is shorter than the 1 ms Redis can keep")));
    }
    if ttl > MAX_TTL {
        return Err(Error::InvalidArgument(format!("lease TTL {ttl:?} is longer than 100 years")));
    }
    u64::try_from(ttl.as_millis()).map_err(|_| Error::InvalidArgument(format!("lease TTL {ttl:?} is too long")))
}

/// `s` with the glob metacharacters of `SCAN MATCH` (`*`, `?`, `[`, `]`, `\`) escaped, so the
/// pattern matches `s` literally.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("mooncake/ram/"), "mooncake/ram/");
        assert_eq!(glob_escape(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
        assert_eq!(glob_escape("ключ/🔑^-!"), "ключ/🔑^-!");
        assert_eq!(glob_escape(""), "");
    }

    #[test]
    fn lease_ttl_bounds() {
        assert_eq!(lease_millis(Duration::from_secs(2)).unwrap(), 2000);
        assert_eq!(lease_millis(Duration::from_micros(1500)).unwrap(), 1);
        assert!(matches!(lease_millis(Duration::ZERO), Err(Error::InvalidArgument(_))));
        assert!(matches!(lease_millis(Duration::from_micros(999)), Err(Error::InvalidArgument(_))));
        assert!(matches!(lease_millis(Duration::MAX), Err(Error::InvalidArgument(_))));
        assert_eq!(renew_interval(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(renew_interval(Duration::from_millis(2)), Duration::from_millis(1));
    }

    #[test]
    fn creating_a_store_does_not_connect() {
        // Nothing listens on port 1; construction must still succeed, outside any runtime.
        let store = RedisMetadataStore::new(RedisConfig::new("127.0.0.1", 1)).unwrap();
        assert_eq!(store.name(), "redis");
        let caps = store.capabilities();
        assert!(caps.shared && caps.lease && caps.list && !caps.watch);
        let bad = RedisConfig { port: 0, ..RedisConfig::new("h", 1) };
        assert!(matches!(RedisMetadataStore::new(bad), Err(Error::InvalidArgument(_))));
    }
}
