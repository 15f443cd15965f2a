//! The etcd store against a real etcd (started by `mooncake-testkit`): data shapes, leases,
//! list/watch, restarts, unreachable services and failover.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use mooncake_core::{Error, MetadataStore, WatchEvent};
use mooncake_metadata_etcd::{EtcdConfig, EtcdMetadataStore};
use mooncake_testkit::EtcdServer;
use tokio::sync::mpsc::Receiver;

/// Upper bound for any one test step: a step that takes longer is a hang.
const HANG: Duration = Duration::from_secs(60);

fn etcd() -> EtcdServer {
    EtcdServer::start().expect("starting etcd (apt-get install etcd-server)")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Runs `fut` on a fresh runtime, failing the test if it hangs.
fn block<F: Future>(fut: F) -> F::Output {
    runtime().block_on(async { tokio::time::timeout(HANG, fut).await.expect("test step hung") })
}

fn store(conn: &str) -> EtcdMetadataStore {
    EtcdMetadataStore::new(conn).expect("creating the store")
}

/// Polls `get(key)` until it equals `want` or `within` passes; returns the last value seen.
async fn wait_for_value(
    store: &EtcdMetadataStore,
    key: &str,
    want: Option<&[u8]>,
    within: Duration,
) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = store.get(key).await.ok().flatten();
        if got.as_deref() == want || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn next_event(rx: &mut Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("no watch event within 15 s")
        .expect("watch stream ended")
}

fn assert_unavailable<T: std::fmt::Debug>(r: mooncake_core::Result<T>, endpoint: &str, what: &str) {
    match r {
        Err(Error::Unavailable { reason }) => {
            assert!(reason.contains(endpoint), "{what}: reason does not name {endpoint}: {reason}")
        }
        other => panic!("{what}: {other:?}, expected Unavailable"),
    }
}

#[test]
fn round_trip_and_overwrite() {
    let server = etcd();
    let s = store(&server.conn());
    block(async {
        assert_eq!(s.name(), "etcd");
        let caps = s.capabilities();
        assert!(caps.shared && caps.lease && caps.list && caps.watch);
        assert_eq!(s.get("t/a").await.unwrap(), None);
        s.put("t/a", b"one").await.unwrap();
        assert_eq!(s.get("t/a").await.unwrap().as_deref(), Some(&b"one"[..]));
        s.put("t/a", b"two").await.unwrap();
        assert_eq!(s.get("t/a").await.unwrap().as_deref(), Some(&b"two"[..]));
        let binary: Vec<u8> = (0..=255u8).collect();
        s.put("t/bin", &binary).await.unwrap();
        assert_eq!(s.get("t/bin").await.unwrap(), Some(binary));
        s.put("t/empty", b"").await.unwrap();
        assert_eq!(s.get("t/empty").await.unwrap(), Some(Vec::new()));
        assert!(s.delete("t/a").await.unwrap());
        assert!(!s.delete("t/a").await.unwrap());
        assert_eq!(s.get("t/a").await.unwrap(), None);
        s.close().await;
    });
}

#[test]
fn bare_host_port_is_etcd_too() {
    let server = etcd();
    assert!(mooncake_metadata_etcd::accepts(&server.endpoint()));
    let s = store(&server.endpoint());
    block(async {
        s.put("bare", b"v").await.unwrap();
        assert_eq!(s.get("bare").await.unwrap().as_deref(), Some(&b"v"[..]));
        s.close().await;
    });
}

#[test]
fn one_mebibyte_values_and_large_lists() {
    let server = etcd();
    let s = store(&server.conn());
    let value = |seed: u8| -> Vec<u8> { (0..(1 << 20) + 4096).map(|i: usize| (i as u8) ^ seed).collect() };
    block(async {
        let big = value(7);
        s.put("big/one", &big).await.unwrap();
        assert_eq!(s.get("big/one").await.unwrap().as_deref(), Some(&big[..]));
        // Five such values in one list answer exceed tonic's default 4 MiB message limit.
        for i in 0..4u8 {
            s.put(&format!("big/more{i}"), &value(i)).await.unwrap();
        }
        let mut all = s.list("big/").await.unwrap();
        all.sort();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0], ("big/more0".to_string(), value(0)));
        assert_eq!(all[4], ("big/one".to_string(), big));
        s.close().await;
    });
}

#[test]
fn keys_are_stored_byte_for_byte() {
    let server = etcd();
    let s = store(&server.conn());
    let keys = [
        "mooncake/ram/10.0.0.1:15123",
        "mooncake/rpc_meta/10.0.0.1:15123",
        "mooncake/nvmeof/x",
        "k/unicode/\u{043A}\u{043B}\u{044E}\u{0447}/\u{952E}/\u{1F511}",
        "k//double//slash/",
        "k/spaces and ?query=1&x=%20#frag",
    ];
    block(async {
        for (i, k) in keys.iter().enumerate() {
            s.put(k, format!("v{i}").as_bytes()).await.unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(s.get(k).await.unwrap(), Some(format!("v{i}").into_bytes()), "{k}");
        }
        // A plain etcd client (what upstream Mooncake uses) sees the very same keys and values.
        let mut raw = etcd_client::Client::connect([format!("http://{}", server.endpoint())], None).await.unwrap();
        for (i, k) in keys.iter().enumerate() {
            let resp = raw.get(k.as_bytes(), None).await.unwrap();
            assert_eq!(resp.kvs().len(), 1, "{k}");
            assert_eq!(resp.kvs()[0].key(), k.as_bytes());
            assert_eq!(resp.kvs()[0].value(), format!("v{i}").as_bytes());
        }
        raw.put("mooncake/ram/upstream", b"{\"name\":\"upstream\"}".to_vec(), None).await.unwrap();
        assert_eq!(s.get("mooncake/ram/upstream").await.unwrap().as_deref(), Some(&b"{\"name\":\"upstream\"}"[..]));
        let mut listed: Vec<String> = s.list("k/").await.unwrap().into_iter().map(|(k, _)| k).collect();
        listed.sort();
        let mut want: Vec<String> = keys.iter().filter(|k| k.starts_with("k/")).map(|k| k.to_string()).collect();
        want.sort();
        assert_eq!(listed, want);
        for k in keys {
            assert!(s.delete(k).await.unwrap(), "{k}");
        }
        s.close().await;
    });
}

#[test]
fn list_prefix_and_watch_in_order() {
    let server = etcd();
    let s = store(&server.conn());
    block(async {
        for k in ["d/x", "d/y", "d/sub/z", "dx", "e/x"] {
            s.put(k, k.as_bytes()).await.unwrap();
        }
        let mut got = s.list("d/").await.unwrap();
        got.sort();
        let want: Vec<(String, Vec<u8>)> =
            ["d/sub/z", "d/x", "d/y"].iter().map(|k| (k.to_string(), k.as_bytes().to_vec())).collect();
        assert_eq!(got, want);
        assert!(s.list("nothing/").await.unwrap().is_empty());

        let mut rx = s.watch("w/").await.unwrap();
        s.put("w/a", b"1").await.unwrap();
        s.put("other", b"ignored").await.unwrap();
        s.put("w/a", b"2").await.unwrap();
        s.put_with_lease("w/leased", b"3", Duration::from_secs(30)).await.unwrap();
        s.delete("w/a").await.unwrap();
        assert_eq!(next_event(&mut rx).await, WatchEvent::Put("w/a".into(), b"1".to_vec()));
        assert_eq!(next_event(&mut rx).await, WatchEvent::Put("w/a".into(), b"2".to_vec()));
        assert_eq!(next_event(&mut rx).await, WatchEvent::Put("w/leased".into(), b"3".to_vec()));
        assert_eq!(next_event(&mut rx).await, WatchEvent::Delete("w/a".into()));
        s.close().await;
        // Closing revokes the lease (a Delete may arrive first), then the stream ends.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("watch did not end") {
                None => break,
                Some(WatchEvent::Delete(k)) if k == "w/leased" => {}
                Some(other) => panic!("unexpected event after close: {other:?}"),
            }
        }
    });
}

#[test]
fn watch_follows_a_restart_without_repeats() {
    let mut server = etcd();
    let s = store(&server.conn());
    let mut rx = block(async {
        let mut rx = s.watch("r/").await.unwrap();
        s.put("r/before", b"1").await.unwrap();
        assert_eq!(next_event(&mut rx).await, WatchEvent::Put("r/before".into(), b"1".to_vec()));
        rx
    });
    server.restart(false).expect("restarting etcd");
    block(async {
        // Writes through a second client, right away: the watch must catch up on its own.
        let other = store(&server.conn());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while other.put("r/after", b"2").await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "etcd did not come back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        other.delete("r/before").await.unwrap();
        assert_eq!(next_event(&mut rx).await, WatchEvent::Put("r/after".into(), b"2".to_vec()));
        assert_eq!(next_event(&mut rx).await, WatchEvent::Delete("r/before".into()));
        other.close().await;
        s.close().await;
        assert!(tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("watch did not end").is_none());
    });
}

#[test]
fn lease_is_renewed_while_alive_and_revoked_on_close() {
    let server = etcd();
    let owner = store(&server.conn());
    let observer = store(&server.conn());
    block(async {
        owner.put_with_lease("l/k", b"alive", Duration::from_millis(1500)).await.unwrap();
        // Well past two TTLs (etcd's own minimum TTL is 2 s): still there thanks to renewals.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(observer.get("l/k").await.unwrap().as_deref(), Some(&b"alive"[..]));
        owner.close().await;
        // Revoked, not merely left to expire: gone right after close returns.
        assert_eq!(observer.get("l/k").await.unwrap(), None);
        owner.close().await; // idempotent
        assert_unavailable(owner.get("l/k").await, &server.endpoint(), "get after close");
        assert_unavailable(
            owner.put_with_lease("l/k", b"x", Duration::from_secs(5)).await,
            &server.endpoint(),
            "put_with_lease after close",
        );
        observer.close().await;
    });
}

#[test]
fn dropping_the_store_releases_its_leases() {
    let server = etcd();
    let observer = store(&server.conn());
    block(async {
        let owner = store(&server.conn());
        owner.put_with_lease("drop/k", b"v", Duration::from_secs(30)).await.unwrap();
        drop(owner);
        // Far sooner than the 30 s TTL.
        assert_eq!(wait_for_value(&observer, "drop/k", None, Duration::from_secs(10)).await, None);
        observer.close().await;
    });
}

#[test]
fn keep_alive_outlives_the_callers_runtime() {
    let server = etcd();
    let owner = store(&server.conn());
    let observer = store(&server.conn());
    // A current-thread runtime that is gone once the call returns.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(owner.put_with_lease("rt/k", b"v", Duration::from_secs(2)))
        .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    block(async {
        assert_eq!(observer.get("rt/k").await.unwrap().as_deref(), Some(&b"v"[..]));
        owner.close().await;
        observer.close().await;
    });
}

#[test]
fn plain_put_and_delete_end_a_lease_on_that_key() {
    let server = etcd();
    let s = store(&server.conn());
    let observer = store(&server.conn());
    block(async {
        s.put_with_lease("pl/k", b"leased", Duration::from_secs(30)).await.unwrap();
        s.put("pl/k", b"plain").await.unwrap();
        s.put_with_lease("pl/gone", b"leased", Duration::from_secs(30)).await.unwrap();
        assert!(s.delete("pl/gone").await.unwrap());
        s.close().await;
        // The lease revoked by close no longer covers the plain key, and the deleted key stays gone.
        assert_eq!(observer.get("pl/k").await.unwrap().as_deref(), Some(&b"plain"[..]));
        assert_eq!(observer.get("pl/gone").await.unwrap(), None);
        observer.close().await;
    });
}

#[test]
fn leased_keys_come_back_after_etcd_is_wiped() {
    let mut server = etcd();
    let owner = store(&server.conn());
    let watcher = store(&server.conn());
    let mut rx = block(async {
        let mut rx = watcher.watch("wipe/").await.unwrap();
        // Push the old server's revision well past what the new one will reach.
        for i in 0..10 {
            watcher.put(&format!("wipe/filler{i}"), b"x").await.unwrap();
            assert!(matches!(next_event(&mut rx).await, WatchEvent::Put(..)));
        }
        owner.put_with_lease("wipe/a", b"A", Duration::from_secs(2)).await.unwrap();
        owner.put_with_lease("wipe/b", b"B", Duration::from_secs(10)).await.unwrap();
        owner.put_with_lease("wipe/plain", b"leased", Duration::from_secs(2)).await.unwrap();
        owner.put("wipe/plain", b"plain").await.unwrap();
        for _ in 0..4 {
            assert!(matches!(next_event(&mut rx).await, WatchEvent::Put(..)));
        }
        rx
    });
    server.restart(true).expect("restarting etcd with an empty data dir");
    let observer = store(&server.conn());
    block(async {
        for (k, v) in [("wipe/a", &b"A"[..]), ("wipe/b", &b"B"[..])] {
            let got = wait_for_value(&observer, k, Some(v), Duration::from_secs(15)).await;
            assert_eq!(got.as_deref(), Some(v), "{k} was not put again after the wipe");
        }
        // The watch noticed the new server's fresh history and delivered the re-puts.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match next_event(&mut rx).await {
                WatchEvent::Put(k, v) => seen.push((k, v)),
                other => panic!("unexpected event after the wipe: {other:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, [("wipe/a".to_string(), b"A".to_vec()), ("wipe/b".to_string(), b"B".to_vec())]);
        watcher.close().await;
        // The wipe did wipe, and a key that was put plainly after its leased put is no longer
        // this store's to restore.
        assert_eq!(observer.get("wipe/plain").await.unwrap(), None);
        // And the new leases are renewed: still there after more than two TTLs.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(observer.get("wipe/a").await.unwrap().as_deref(), Some(&b"A"[..]));
        owner.close().await;
        assert_eq!(observer.get("wipe/a").await.unwrap(), None);
        assert_eq!(observer.get("wipe/b").await.unwrap(), None);
        observer.close().await;
    });
}

#[test]
fn same_store_works_again_after_a_restart() {
    let mut server = etcd();
    let s = store(&server.conn());
    block(async {
        s.put("re/k", b"v").await.unwrap();
    });
    server.stop();
    block(async {
        assert_unavailable(s.get("re/k").await, &server.endpoint(), "get while etcd is down");
    });
    server.restart(false).expect("restarting etcd");
    block(async {
        let got = wait_for_value(&s, "re/k", Some(b"v"), Duration::from_secs(15)).await;
        assert_eq!(got.as_deref(), Some(&b"v"[..]));
        s.put("re/k2", b"w").await.unwrap();
        assert!(s.delete("re/k2").await.unwrap());
        s.close().await;
    });
}

#[test]
fn refused_and_silent_services_are_unavailable() {
    let refused_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    for port in [refused_port, silent_port] {
        let endpoint = format!("127.0.0.1:{port}");
        let config = EtcdConfig::new([endpoint.clone()]).with_timeout(Duration::from_millis(700));
        let s = EtcdMetadataStore::with_config(config).unwrap();
        block(async {
            assert_unavailable(s.get("k").await, &endpoint, "get");
            assert_unavailable(s.put("k", b"v").await, &endpoint, "put");
            assert_unavailable(s.delete("k").await, &endpoint, "delete");
            assert_unavailable(s.list("k").await, &endpoint, "list");
            assert_unavailable(s.put_with_lease("k", b"v", Duration::from_secs(5)).await, &endpoint, "lease");
            assert_unavailable(s.watch("k").await, &endpoint, "watch");
            s.close().await;
        });
    }
    drop(silent);
}

#[test]
fn a_dead_first_endpoint_is_skipped() {
    let server = etcd();
    let refused_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    for dead in [refused_port, silent_port] {
        let conn = format!("etcd://127.0.0.1:{dead},{}", server.endpoint());
        let s = store(&conn);
        block(async {
            s.put("multi/k", b"v").await.unwrap();
            assert_eq!(s.get("multi/k").await.unwrap().as_deref(), Some(&b"v"[..]));
            let mut rx = s.watch("multi/").await.unwrap();
            s.put_with_lease("multi/l", b"l", Duration::from_secs(2)).await.unwrap();
            assert_eq!(next_event(&mut rx).await, WatchEvent::Put("multi/l".into(), b"l".to_vec()));
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(s.get("multi/l").await.unwrap().as_deref(), Some(&b"l"[..]));
            assert!(s.delete("multi/k").await.unwrap());
            s.close().await;
        });
    }
    drop(silent);
}

#[test]
fn bad_connection_strings_are_invalid_arguments() {
    for bad in ["etcd://", "etcd://host", "etcd://h:1,,h:2", "etcd://h:70000"] {
        match EtcdMetadataStore::new(bad) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("etcd"), "{bad}: {msg}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(matches!(
        EtcdMetadataStore::with_config(EtcdConfig::new(Vec::<String>::new())),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn registered_as_etcd() {
    mooncake_metadata_etcd::link();
    let factory = mooncake_core::registry::metadata_stores()
        .into_iter()
        .find(|f| f.name == "etcd")
        .expect("etcd metadata store registered");
    assert!(!factory.summary.is_empty());
    for conn in ["etcd://h1:2379,h2:2379", "h1:2379"] {
        assert!((factory.accepts)(conn), "{conn}");
    }
    for conn in ["P2PHANDSHAKE", "http://h:8080/metadata", "https://h/metadata", "redis://h:6379", ""] {
        assert!(!(factory.accepts)(conn), "{conn}");
    }
    assert!(matches!((factory.create)("etcd://nohost"), Err(Error::InvalidArgument(_))));
    // Creating does not connect: a store for an address nobody listens on is created fine.
    let s = (factory.create)("etcd://127.0.0.1:1").expect("create does no I/O");
    assert_eq!(s.name(), "etcd");
    // And works without a tokio runtime on the calling side.
    let closed = std::thread::spawn(move || {
        let fut = s.close();
        block_on_plain(fut);
    });
    closed.join().unwrap();
}

/// A minimal executor (no tokio) for checking that the store's futures do not need one.
fn block_on_plain<F: Future>(fut: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = std::time::Instant::now() + HANG;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "future hung without a runtime");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[test]
fn usable_without_a_tokio_runtime() {
    let server = etcd();
    let s = store(&server.conn());
    block_on_plain(async {
        s.put("plain/k", b"v").await.unwrap();
        assert_eq!(s.get("plain/k").await.unwrap().as_deref(), Some(&b"v"[..]));
        s.close().await;
    });
}
