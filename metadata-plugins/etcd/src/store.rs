//! [`EtcdMetadataStore`]: the `MetadataStore` operations on top of [`crate::conn`].

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use etcd_client::GetOptions;
use mooncake_core::{Error, MetadataCapabilities, MetadataStore, Result, WatchEvent, sync};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{EtcdConfig, lease_ttl_secs};
use crate::conn::{Endpoints, MAX_RESPONSE_BYTES, fmt_duration, on_runtime, runtime, started_runtime};
use crate::lease::Leases;

/// A client of an etcd cluster, usable as the engine's metadata store.
///
/// Keys and values are stored exactly as given, so upstream Mooncake engines and this one can
/// share a cluster. Creating a store does no I/O; the first request connects, and a request
/// after a failure connects again. Every request gives up within the configured timeout with
/// [`Error::Unavailable`] naming the endpoints.
///
/// The store may be used from any async runtime (or none): requests and background work run on
/// a small runtime owned by this crate. [`MetadataStore::close`] (or dropping the store) stops
/// lease keep-alives and watches and revokes the leases.
pub struct EtcdMetadataStore {
    inner: Arc<Inner>,
}

/// State shared by the store handle and its background tasks.
pub(crate) struct Inner {
    pub(crate) config: EtcdConfig,
    pub(crate) endpoints: Endpoints,
    pub(crate) leases: tokio::sync::Mutex<Leases>,
    /// `true` once the store is closed; background tasks watch it.
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
    /// Keep-alive and watch tasks, aborted on close.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl EtcdMetadataStore {
    /// A store for a connection string (`etcd://h1:2379,h2:2379` or bare `h1:2379`), with the
    /// timeout from `MC_METADATA_TIMEOUT_MS` (default 3 s). Does not connect.
    ///
    /// A malformed string, or a malformed `MC_METADATA_TIMEOUT_MS`, gives
    /// [`Error::InvalidArgument`].
    pub fn new(conn: &str) -> Result<Self> {
        Self::with_config(EtcdConfig::from_conn(conn)?)
    }

    /// A store for an explicit configuration. Does not connect.
    pub fn with_config(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let inner = Inner {
            endpoints: Endpoints::new(&config),
            config,
            leases: tokio::sync::Mutex::new(Leases::default()),
            shutdown: tokio::sync::watch::Sender::new(false),
            tasks: Mutex::new(Vec::new()),
        };
        Ok(EtcdMetadataStore { inner: Arc::new(inner) })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// Runs `op` on the crate's runtime after checking that the store is open.
    async fn run<T, Fut>(&self, op: impl FnOnce(Arc<Inner>) -> Fut) -> Result<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        self.inner.check_open()?;
        on_runtime(op(Arc::clone(&self.inner))).await
    }
}

impl std::fmt::Debug for EtcdMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMetadataStore")
            .field("endpoints", &self.inner.config.endpoints)
            .field("timeout", &self.inner.config.timeout)
            .field("closed", &self.inner.is_closed())
            .finish()
    }
}

impl Drop for EtcdMetadataStore {
    fn drop(&mut self) {
        if self.inner.is_closed() {
            return;
        }
        match started_runtime() {
            // Stop keep-alives and revoke leases in the background; drop must not block.
            Some(rt) => {
                let inner = Arc::clone(&self.inner);
                rt.spawn(async move { inner.close().await });
            }
            // Never used: nothing runs and nothing is leased.
            None => {
                self.inner.shutdown.send_replace(true);
            }
        }
    }
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::unavailable(format!(
                "the etcd metadata store for {} is closed; create a new one",
                self.endpoints.describe()
            )));
        }
        Ok(())
    }

    /// The error for running out of time while waiting for the lease state, which a re-grant
    /// holds while it talks to an unresponsive etcd.
    pub(crate) fn busy_error(&self, what: &str) -> Error {
        Error::unavailable(format!(
            "etcd {what}: no progress within {}; a lease renewal is waiting for etcd at {}",
            fmt_duration(self.config.timeout),
            self.endpoints.describe()
        ))
    }

    /// Remembers a background task so that `close` can stop it.
    pub(crate) fn track(&self, handle: JoinHandle<()>) {
        let mut tasks = sync::lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// Stops tracking `key` as leased, within `deadline`.
    async fn forget_leased(&self, key: &str, what: &str, deadline: Instant) -> Result<()> {
        let mut leases =
            tokio::time::timeout_at(deadline, self.leases.lock()).await.map_err(|_| self.busy_error(what))?;
        leases.forget_key(key);
        Ok(())
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + self.config.timeout;
        let what = format!("get {key:?}");
        let mut resp = self
            .endpoints
            .call(&what, deadline, |c| {
                let key = key.clone();
                async move { c.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES).get(key, None).await }
            })
            .await?;
        Ok(resp.take_kvs().into_iter().next().map(|kv| kv.into_key_value().1))
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        let deadline = Instant::now() + self.config.timeout;
        let what = format!("put {key:?}");
        self.forget_leased(&key, &what, deadline).await?;
        self.endpoints
            .call(&what, deadline, |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await?;
        Ok(())
    }

    async fn delete(&self, key: String) -> Result<bool> {
        let deadline = Instant::now() + self.config.timeout;
        let what = format!("delete {key:?}");
        self.forget_leased(&key, &what, deadline).await?;
        let resp = self
            .endpoints
            .call(&what, deadline, |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn list(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>> {
        let deadline = Instant::now() + self.config.timeout;
        let what = format!("list {prefix:?}");
        let mut resp = self
            .endpoints
            .call(&what, deadline, |c| {
                let prefix = prefix.clone();
                async move {
                    c.kv_client()
                        .max_decoding_message_size(MAX_RESPONSE_BYTES)
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.into_key_value();
                (String::from_utf8_lossy(&k).into_owned(), v)
            })
            .collect())
    }

    /// Stops background work, revokes every lease (their keys vanish at once) and drops the
    /// connections. Later calls do nothing.
    pub(crate) async fn close(&self) {
        if self.shutdown.send_replace(true) {
            return;
        }
        let tasks = std::mem::take(&mut *sync::lock(&self.tasks));
        for t in tasks {
            t.abort();
        }
        let leases = self.leases.lock().await.take_all();
        let deadline = Instant::now() + self.config.timeout;
        for lease in leases {
            let revoked = self
                .endpoints
                .call(&format!("lease revoke {lease:x}"), deadline, |mut c| async move { c.lease_revoke(lease).await })
                .await;
            match revoked {
                Ok(_) => tracing::debug!(lease, "revoked etcd lease"),
                Err(e) => tracing::debug!(lease, error = %e, "revoking the etcd lease failed; it expires by itself"),
            }
        }
        self.endpoints.forget_all();
    }
}

#[async_trait]
impl MetadataStore for EtcdMetadataStore {
    fn name(&self) -> &str {
        "etcd"
    }

    fn capabilities(&self) -> MetadataCapabilities {
        MetadataCapabilities { shared: true, lease: true, list: true, watch: true }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.run(|inner| async move { inner.get(key).await }).await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.run(|inner| async move { inner.put(key, value).await }).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.run(|inner| async move { inner.delete(key).await }).await
    }

    /// Puts `key` under an etcd lease of `ttl` rounded up to whole seconds (at least 1), renewed
    /// about every third of the TTL while the store lives. If etcd loses the lease (a replaced or
    /// wiped server), a new lease is granted and every leased key of this store is put again.
    async fn put_with_lease(&self, key: &str, value: &[u8], ttl: std::time::Duration) -> Result<()> {
        let (key, value, ttl) = (key.to_string(), value.to_vec(), lease_ttl_secs(ttl));
        self.run(|inner| async move { inner.put_with_lease(key, value, ttl).await }).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = prefix.to_string();
        self.run(|inner| async move { inner.list(prefix).await }).await
    }

    /// Put and Delete events under `prefix`, in order, from the moment this returns. The stream
    /// follows etcd across restarts and ends when the store is closed.
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>> {
        let prefix = prefix.to_string();
        self.run(|inner| async move { inner.watch(prefix).await }).await
    }

    async fn close(&self) {
        if started_runtime().is_none() {
            // Never used: nothing to stop or revoke.
            self.inner.shutdown.send_replace(true);
            return;
        }
        let inner = Arc::clone(&self.inner);
        // Not cancelled with the caller's future: a half-done close would leave leases to expire
        // by themselves instead of being revoked.
        let task = match runtime() {
            Ok(rt) => rt.spawn(async move { inner.close().await }),
            Err(e) => {
                tracing::debug!(error = %e, "closing the etcd metadata store");
                return;
            }
        };
        if let Err(e) = task.await {
            tracing::debug!(error = %e, "closing the etcd metadata store");
        }
    }
}
