//! Leased keys: one etcd lease per TTL, renewed by a background task, re-granted (and every key
//! put again) when etcd no longer knows it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use mooncake_core::{Error, Result};
use tokio::time::Instant;

use crate::conn::{fmt_duration, is_lease_not_found};
use crate::store::Inner;

/// Keys this store holds under leases, grouped by TTL (seconds).
#[derive(Default)]
pub(crate) struct Leases {
    groups: BTreeMap<i64, Group>,
}

#[derive(Default)]
struct Group {
    /// The etcd lease, `None` until granted or after it was lost and not yet replaced.
    lease: Option<i64>,
    /// TTL etcd granted (it may raise very small TTLs to its minimum).
    granted_ttl: i64,
    /// Every key put under this lease, with its value, to put again on a new lease.
    keys: BTreeMap<String, Vec<u8>>,
    /// A keep-alive task runs for this group.
    keeper: bool,
}

impl Leases {
    /// Stops tracking `key` (a plain put or a delete replaced it).
    pub(crate) fn forget_key(&mut self, key: &str) {
        for g in self.groups.values_mut() {
            g.keys.remove(key);
        }
    }

    /// Takes every granted lease id, leaving nothing tracked (for `close`).
    pub(crate) fn take_all(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.groups).into_values().filter_map(|g| g.lease).collect()
    }
}

/// The answer to a put under a lease.
enum LeasedPut {
    Done,
    /// etcd does not know the lease (expired, or the server was replaced).
    LeaseGone,
}

/// What ended one keep-alive round.
enum RoundEnd {
    /// The connection or stream failed; retry after a pause.
    Broken(String),
    /// etcd says the lease does not exist any more.
    Lost(i64),
    /// Nothing to keep alive yet (lease not granted); retry after a pause.
    Idle,
}

/// Grows 100 ms, 200 ms, ... up to 1 s between retries.
pub(crate) struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        Backoff(Self::FIRST)
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// How often to renew a lease of `ttl` seconds: a third of it, at least every 100 ms.
pub(crate) fn renew_interval(ttl_secs: i64) -> Duration {
    let ms = u64::try_from(ttl_secs.max(1)).unwrap_or(u64::MAX).saturating_mul(1000) / 3;
    Duration::from_millis(ms.max(100))
}

impl Inner {
    /// Puts `key` under the lease for `ttl_secs`, granting the lease (and starting its
    /// keep-alive) on first use.
    pub(crate) async fn put_with_lease(self: &Arc<Self>, key: String, value: Vec<u8>, ttl_secs: i64) -> Result<()> {
        let deadline = Instant::now() + self.config.timeout;
        let what = format!("put_with_lease {key:?}");
        let mut leases =
            tokio::time::timeout_at(deadline, self.leases.lock()).await.map_err(|_| self.busy_error(&what))?;
        self.check_open()?;
        leases.forget_key(&key);
        let group = leases.groups.entry(ttl_secs).or_default();
        let lease = match group.lease {
            Some(lease) => lease,
            None => {
                let (lease, granted_ttl) = self.grant(ttl_secs, deadline).await?;
                group.lease = Some(lease);
                group.granted_ttl = granted_ttl;
                lease
            }
        };
        match self.put_leased(&key, &value, lease, deadline).await? {
            LeasedPut::Done => {
                group.keys.insert(key, value);
            }
            LeasedPut::LeaseGone => {
                // Every key of this lease is gone too: replace the lease and put them all again.
                tracing::warn!(lease, ttl_secs, "etcd lost the lease; granting a new one");
                group.lease = None;
                group.keys.insert(key, value);
                self.regrant(group, ttl_secs).await?;
            }
        }
        if !group.keeper {
            group.keeper = true;
            let handle = tokio::spawn(Arc::clone(self).keep_alive(ttl_secs));
            self.track(handle);
        }
        Ok(())
    }

    /// Grants a lease of `ttl_secs`; returns its id and the TTL etcd granted.
    async fn grant(&self, ttl_secs: i64, deadline: Instant) -> Result<(i64, i64)> {
        let what = format!("lease grant (ttl {ttl_secs}s)");
        let resp =
            self.endpoints.call(&what, deadline, |mut c| async move { c.lease_grant(ttl_secs, None).await }).await?;
        if !resp.error().is_empty() {
            return Err(Error::Metadata(format!("etcd {what}: {}", resp.error())));
        }
        tracing::debug!(lease = resp.id(), ttl = resp.ttl(), "granted etcd lease");
        Ok((resp.id(), resp.ttl()))
    }

    async fn put_leased(&self, key: &str, value: &[u8], lease: i64, deadline: Instant) -> Result<LeasedPut> {
        let what = format!("put {key:?} under lease {lease:x}");
        self.endpoints
            .call(&what, deadline, |mut c| {
                let (key, value) = (key.to_string(), value.to_vec());
                async move {
                    match c.put(key, value, Some(PutOptions::new().with_lease(lease))).await {
                        Ok(_) => Ok(LeasedPut::Done),
                        Err(e) if is_lease_not_found(&e) => Ok(LeasedPut::LeaseGone),
                        Err(e) => Err(e),
                    }
                }
            })
            .await
    }

    /// Grants a new lease for `group` and puts every key of it again. The group takes the new
    /// lease only once every key is back, so a failed or interrupted attempt leaves it without
    /// one and the next attempt starts over.
    async fn regrant(&self, group: &mut Group, ttl_secs: i64) -> Result<()> {
        group.lease = None;
        let (lease, granted_ttl) = self.grant(ttl_secs, Instant::now() + self.config.timeout).await?;
        for (key, value) in &group.keys {
            match self.put_leased(key, value, lease, Instant::now() + self.config.timeout).await? {
                LeasedPut::Done => {}
                LeasedPut::LeaseGone => {
                    return Err(Error::Metadata(format!(
                        "etcd dropped lease {lease:x} right after granting it (ttl {ttl_secs}s)"
                    )));
                }
            }
        }
        group.lease = Some(lease);
        group.granted_ttl = granted_ttl;
        tracing::info!(lease, ttl_secs, keys = group.keys.len(), "etcd lease replaced; leased keys put again");
        Ok(())
    }

    /// The keep-alive task of the lease for `ttl_secs`: runs until the store closes.
    async fn keep_alive(self: Arc<Self>, ttl_secs: i64) {
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = Backoff::new();
        loop {
            let end = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                end = self.keep_alive_round(ttl_secs, &mut backoff) => end,
            };
            let retry = match end {
                RoundEnd::Lost(lost) => {
                    tracing::warn!(lease = lost, ttl_secs, "etcd no longer knows the lease; granting a new one");
                    let mut leases = tokio::select! {
                        _ = shutdown.wait_for(|closed| *closed) => return,
                        l = self.leases.lock() => l,
                    };
                    let Some(group) = leases.groups.get_mut(&ttl_secs) else { return };
                    // A put_with_lease may have replaced it already.
                    if group.lease.is_none() || group.lease == Some(lost) {
                        match self.regrant(group, ttl_secs).await {
                            Ok(()) => {
                                backoff.reset();
                                false
                            }
                            Err(e) => {
                                tracing::warn!(ttl_secs, error = %e, "re-granting the etcd lease failed; will retry");
                                true
                            }
                        }
                    } else {
                        false
                    }
                }
                RoundEnd::Broken(why) => {
                    tracing::debug!(ttl_secs, reason = %why, "etcd lease keep-alive interrupted; retrying");
                    true
                }
                RoundEnd::Idle => true,
            };
            if retry {
                let pause = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.wait_for(|closed| *closed) => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Opens a keep-alive stream for the current lease of `ttl_secs` and renews it every third of
    /// its TTL until something goes wrong.
    async fn keep_alive_round(&self, ttl_secs: i64, backoff: &mut Backoff) -> RoundEnd {
        let (lease, granted_ttl) = {
            let mut leases = self.leases.lock().await;
            let Some(group) = leases.groups.get_mut(&ttl_secs) else { return RoundEnd::Idle };
            match group.lease {
                Some(id) => (id, group.granted_ttl),
                None if group.keys.is_empty() => return RoundEnd::Idle,
                // Lost earlier and the re-grant failed: try again.
                None => return RoundEnd::Lost(0),
            }
        };
        let opened = self
            .endpoints
            .call("lease keep-alive", Instant::now() + self.config.timeout, |mut c| async move {
                match c.lease_keep_alive(lease).await {
                    Ok(pair) => Ok(Some(pair)),
                    Err(e) if is_lease_not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await;
        let (mut keeper, mut stream) = match opened {
            Ok(Some(pair)) => pair,
            Ok(None) => return RoundEnd::Lost(lease),
            Err(e) => return RoundEnd::Broken(e.to_string()),
        };
        backoff.reset();
        let interval = renew_interval(if granted_ttl > 0 { granted_ttl } else { ttl_secs });
        loop {
            tokio::time::sleep(interval).await;
            if self.leases.lock().await.groups.get(&ttl_secs).and_then(|g| g.lease) != Some(lease) {
                // Replaced by put_with_lease: keep the new one alive instead.
                return RoundEnd::Broken("lease replaced".into());
            }
            if let Err(e) = keeper.keep_alive().await {
                return RoundEnd::Broken(e.to_string());
            }
            match tokio::time::timeout(self.config.timeout, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return RoundEnd::Lost(lease),
                Ok(Ok(None)) => return RoundEnd::Broken("keep-alive stream ended".into()),
                Ok(Err(e)) => return RoundEnd::Broken(e.to_string()),
                Err(_) => {
                    return RoundEnd::Broken(format!(
                        "no keep-alive answer within {}",
                        fmt_duration(self.config.timeout)
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_three_times_per_ttl() {
        assert_eq!(renew_interval(3), Duration::from_secs(1));
        assert_eq!(renew_interval(30), Duration::from_secs(10));
        assert_eq!(renew_interval(1), Duration::from_millis(333));
        assert_eq!(renew_interval(0), Duration::from_millis(333));
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let seq: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn forgetting_keys_and_taking_leases() {
        let mut l = Leases::default();
        l.groups.insert(
            2,
            Group { lease: Some(7), granted_ttl: 2, keys: [("a".to_string(), vec![1])].into(), keeper: true },
        );
        l.groups
            .insert(5, Group { lease: None, granted_ttl: 0, keys: [("b".to_string(), vec![2])].into(), keeper: false });
        l.forget_key("a");
        assert!(l.groups[&2].keys.is_empty());
        assert_eq!(l.groups[&5].keys.len(), 1);
        assert_eq!(l.take_all(), [7]);
        assert!(l.groups.is_empty());
    }
}
