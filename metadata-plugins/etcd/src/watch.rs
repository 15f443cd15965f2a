//! Prefix watches that survive an etcd restart: the stream is re-opened from the revision after
//! the last event delivered, so nothing is seen twice or missed while etcd keeps its history.

use std::sync::Arc;

use etcd_client::{GetOptions, WatchOptions, WatchStream};
use mooncake_core::{Error, Result, WatchEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::conn::MAX_RESPONSE_BYTES;
use crate::lease::Backoff;
use crate::store::Inner;

/// Events buffered for a slow consumer before the watch task waits for it.
pub(crate) const WATCH_CHANNEL_CAPACITY: usize = 1024;

/// etcd's numbering of event types (mvccpb.Event.EventType).
const EVENT_PUT: i32 = 0;
const EVENT_DELETE: i32 = 1;

/// The [`WatchEvent`] for an etcd event, `None` for an event type this crate does not know.
fn to_watch_event(event: &etcd_client::Event) -> Option<WatchEvent> {
    let kv = event.kv()?;
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    match event.0.r#type {
        EVENT_PUT => Some(WatchEvent::Put(key, kv.value().to_vec())),
        EVENT_DELETE => Some(WatchEvent::Delete(key)),
        _ => None,
    }
}

/// Where to resume a watch whose last delivered revision is `last` on a server now at `current`.
///
/// A server whose revision is behind what we saw is a replacement with a fresh history (etcd
/// wiped and restarted): replay that history from its start.
fn resume_revision(last: i64, current: i64) -> i64 {
    if current < last { 1 } else { last + 1 }
}

/// Why a watch stream stopped delivering.
enum StreamEnd {
    /// The store closed or the receiver was dropped: stop for good.
    Done,
    /// The stream broke; re-open it from `last_seen + 1`.
    Broken(String),
    /// etcd compacted the history we wanted; re-open from this revision.
    Compacted(i64),
}

impl Inner {
    /// Starts watching `prefix`; returns once etcd has confirmed the watch, so every change made
    /// after this returns is delivered.
    pub(crate) async fn watch(self: &Arc<Self>, prefix: String) -> Result<mpsc::Receiver<WatchEvent>> {
        let deadline = Instant::now() + self.config.timeout;
        let (stream, revision) = self.open_watch(&prefix, None, deadline).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let handle = tokio::spawn(Arc::clone(self).run_watch(prefix, stream, revision, tx));
        self.track(handle);
        Ok(rx)
    }

    /// Opens a watch on `prefix` from `start` (or from now) and waits for etcd's confirmation.
    /// Returns the stream and the revision it starts after.
    async fn open_watch(&self, prefix: &str, start: Option<i64>, deadline: Instant) -> Result<(WatchStream, i64)> {
        let what = format!("watch {prefix:?}");
        self.endpoints
            .call(&what, deadline, |c| {
                let prefix = prefix.to_string();
                async move {
                    let mut options = WatchOptions::new().with_prefix();
                    if let Some(rev) = start {
                        options = options.with_start_revision(rev);
                    }
                    let mut watcher = c.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
                    let mut stream = watcher.watch(prefix, Some(options)).await?;
                    match stream.message().await? {
                        Some(resp) if resp.created() && !resp.canceled() => {
                            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                            Ok((stream, start.map_or(revision, |s| s - 1)))
                        }
                        Some(resp) => Err(etcd_client::Error::WatchError(format!(
                            "etcd refused the watch: {}",
                            if resp.cancel_reason().is_empty() { "no reason given" } else { resp.cancel_reason() }
                        ))),
                        None => Err(etcd_client::Error::WatchError("watch stream closed before it started".into())),
                    }
                }
            })
            .await
    }

    /// The current revision of the cluster.
    async fn current_revision(&self, prefix: &str) -> Result<i64> {
        let resp = self
            .endpoints
            .call("revision check", Instant::now() + self.config.timeout, |mut c| {
                let prefix = prefix.to_string();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await }
            })
            .await?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| Error::Metadata("etcd answered a range request without a header".into()))
    }

    /// Delivers events until the store closes or the receiver goes away, re-opening the stream
    /// whenever it breaks.
    async fn run_watch(
        self: Arc<Self>,
        prefix: String,
        mut stream: WatchStream,
        mut last: i64,
        tx: mpsc::Sender<WatchEvent>,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = Backoff::new();
        loop {
            let end = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => StreamEnd::Done,
                _ = tx.closed() => StreamEnd::Done,
                end = deliver(&mut stream, &mut last, &tx) => end,
            };
            let mut start = match end {
                StreamEnd::Done => return,
                StreamEnd::Compacted(rev) => {
                    tracing::warn!(prefix, compacted_to = rev, "etcd compacted past the watch position; events missed");
                    Some(rev)
                }
                StreamEnd::Broken(why) => {
                    tracing::debug!(prefix, reason = %why, last_revision = last, "etcd watch interrupted; re-opening");
                    None
                }
            };
            // Re-open, retrying until it works or the watch is no longer wanted.
            loop {
                let pause = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.wait_for(|closed| *closed) => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                let reopened = async {
                    let from = match start {
                        Some(rev) => rev,
                        None => {
                            let current = self.current_revision(&prefix).await?;
                            if current < last {
                                tracing::warn!(
                                    prefix,
                                    current,
                                    last,
                                    "etcd history restarted (new server?); replaying it"
                                );
                            }
                            resume_revision(last, current)
                        }
                    };
                    self.open_watch(&prefix, Some(from), Instant::now() + self.config.timeout).await
                };
                let result = tokio::select! {
                    _ = shutdown.wait_for(|closed| *closed) => return,
                    _ = tx.closed() => return,
                    r = reopened => r,
                };
                match result {
                    Ok((s, after)) => {
                        stream = s;
                        last = after;
                        backoff.reset();
                        tracing::debug!(prefix, from = after + 1, "etcd watch re-opened");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(prefix, error = %e, "re-opening the etcd watch failed; retrying");
                        // A compaction target is only good once; fall back to the revision check.
                        start = None;
                    }
                }
            }
        }
    }
}

/// Forwards events from `stream` to `tx` in order, tracking the last revision delivered.
async fn deliver(stream: &mut WatchStream, last: &mut i64, tx: &mpsc::Sender<WatchEvent>) -> StreamEnd {
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return StreamEnd::Broken("stream ended".into()),
            Err(e) => return StreamEnd::Broken(e.to_string()),
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return StreamEnd::Compacted(resp.compact_revision());
            }
            return StreamEnd::Broken(format!("etcd canceled the watch: {}", resp.cancel_reason()));
        }
        for event in resp.events() {
            let revision = event.kv().map_or(0, |kv| kv.mod_revision());
            let Some(ev) = to_watch_event(event) else {
                tracing::debug!(event_type = event.0.r#type, "skipping an etcd event of unknown type");
                continue;
            };
            if tx.send(ev).await.is_err() {
                return StreamEnd::Done;
            }
            *last = (*last).max(revision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_after_the_last_revision_or_replays_a_new_history() {
        assert_eq!(resume_revision(10, 10), 11);
        assert_eq!(resume_revision(10, 25), 11);
        assert_eq!(resume_revision(10, 3), 1);
    }
}
