//! One multiplexed connection, opened lazily, replaced after failures, every command bounded by
//! the configured timeout, and Redis errors mapped to [`mooncake_core::Error`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mooncake_core::{Error, Result, sync};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, FromRedisValue, IntoConnectionInfo};
use redis::{RedisConnectionInfo, RedisError, ServerErrorKind};

use crate::config::RedisConfig;

/// The current connection and a number telling it apart from the ones it replaced.
#[derive(Clone)]
struct Live {
    id: u64,
    conn: MultiplexedConnection,
}

/// Lazily connecting, self-healing access to one Redis server.
pub(crate) struct Connector {
    client: Client,
    settings: AsyncConnectionConfig,
    address: String,
    timeout: Duration,
    current: Mutex<Option<Live>>,
    /// Held while a connection is being opened, so concurrent callers share one attempt.
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

impl Connector {
    /// Prepares a client for `config` without touching the network.
    pub(crate) fn new(config: &RedisConfig) -> Result<Self> {
        let mut redis = RedisConnectionInfo::default().set_db(i64::from(config.db));
        if let Some(user) = &config.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &config.password {
            redis = redis.set_password(password);
        }
        let info = ConnectionAddr::Tcp(config.host.clone(), config.port)
            .into_connection_info()
            .map_err(|e| Error::InvalidArgument(format!("redis address {}: {e}", config.address())))?
            .set_redis_settings(redis);
        let client = Client::open(info)
            .map_err(|e| Error::InvalidArgument(format!("redis address {}: {e}", config.address())))?;
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout));
        Ok(Connector {
            client,
            settings,
            address: config.address(),
            timeout: config.timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Runs `cmd` and converts its reply, within the timeout (connecting included).
    ///
    /// A command that fails because a previously opened connection broke (the server restarted)
    /// is sent once more on a new connection, so the first call after a restart succeeds.
    /// `what` names the operation in error messages.
    pub(crate) async fn query<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T> {
        let mut used: Option<u64> = None;
        let attempt = async {
            let mut retried = false;
            loop {
                let (live, fresh) = self.connection().await?;
                used = Some(live.id);
                let mut conn = live.conn;
                match cmd.query_async::<T>(&mut conn).await {
                    Ok(v) => return Ok(v),
                    Err(e) if is_transport_failure(&e) => {
                        self.forget(live.id);
                        if fresh || retried {
                            return Err(self.classify(what, &e));
                        }
                        tracing::debug!(address = %self.address, error = %e, "redis connection broke; reconnecting");
                        retried = true;
                    }
                    Err(e) => {
                        if is_auth_failure(&e) {
                            self.forget(live.id);
                        }
                        return Err(self.classify(what, &e));
                    }
                }
            }
        };
        let outcome = tokio::time::timeout(self.timeout, attempt).await;
        match outcome {
            Ok(r) => r,
            Err(_) => {
                if let Some(id) = used {
                    self.forget(id);
                }
                Err(Error::unavailable(format!(
                    "redis at {} did not answer ({what}) within {:?}: is the server up and reachable? \
                     (MC_METADATA_TIMEOUT_MS sets the timeout)",
                    self.address, self.timeout
                )))
            }
        }
    }

    /// Drops the current connection; the next command opens a new one.
    pub(crate) fn disconnect(&self) {
        *sync::lock(&self.current) = None;
    }

    /// The current connection, opening one when there is none; `true` when opened by this call.
    async fn connection(&self) -> Result<(Live, bool)> {
        if let Some(live) = self.current() {
            return Ok((live, false));
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(live) = self.current() {
            return Ok((live, false));
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.settings)
            .await
            .map_err(|e| self.classify("connect", &e))?;
        let live = Live { id: self.next_id.fetch_add(1, Ordering::Relaxed), conn };
        *sync::lock(&self.current) = Some(live.clone());
        tracing::debug!(address = %self.address, "connected to redis");
        Ok((live, true))
    }

    fn current(&self) -> Option<Live> {
        sync::lock(&self.current).clone()
    }

    /// Drops connection `id` if it is still the current one.
    fn forget(&self, id: u64) {
        let mut current = sync::lock(&self.current);
        if current.as_ref().is_some_and(|live| live.id == id) {
            *current = None;
        }
    }

    /// The store error for a Redis error seen while doing `what`.
    fn classify(&self, what: &str, e: &RedisError) -> Error {
        let addr = &self.address;
        if is_auth_failure(e) {
            return Error::Metadata(format!(
                "redis at {addr} rejected the login ({e}): check MC_REDIS_USERNAME / MC_REDIS_PASSWORD \
                 (or user:password in the redis:// connection string)"
            ));
        }
        if e.is_timeout() {
            return Error::unavailable(format!(
                "redis at {addr} did not answer ({what}) within {:?}: is the server up and reachable? \
                 (MC_METADATA_TIMEOUT_MS sets the timeout)",
                self.timeout
            ));
        }
        if is_transport_failure(e) {
            return Error::unavailable(format!("cannot reach redis at {addr} ({what}): {e}"));
        }
        match e.kind() {
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ClusterDown,
            ) => Error::unavailable(format!("redis at {addr} is not serving yet ({what}): {e}")),
            ErrorKind::Server(ServerErrorKind::ReadOnly) => Error::Metadata(format!(
                "redis at {addr} is a read-only replica ({what}: {e}); point the connection string at the primary"
            )),
            ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::CrossSlot) => {
                Error::Metadata(format!(
                    "redis at {addr} is a cluster node ({what}: {e}); Redis Cluster is not supported, use a \
                     standalone server"
                ))
            }
            _ if what == "connect" && e.to_string().contains("DB index") => Error::Metadata(format!(
                "redis at {addr} refused the database index ({e}): check MC_REDIS_DB_INDEX or the /<db> of the \
                 connection string"
            )),
            _ => Error::Metadata(format!("redis at {addr}: {what} failed: {e}")),
        }
    }
}

/// The connection is unusable (refused, reset, closed, timed out, garbled).
fn is_transport_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() || {
        !is_auth_failure(e) && e.is_unrecoverable_error()
    }
}

/// The server turned the credentials down, or wants some it was not given.
fn is_auth_failure(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}
