//! The MetadataStore suite: get/put/delete semantics, value and key shapes, concurrency, and the
//! optional features gated on [`MetadataCapabilities`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mooncake_core::registry;
use mooncake_core::{Error, MetadataCapabilities, MetadataStore, WatchEvent};

use crate::util::{OrFail, block_on_timeout, ensure, pattern};
use crate::{Outcome, SuiteOptions, TestResult, Trial};

const KIND: &str = "metadata";
const LIMIT: Duration = Duration::from_secs(30);

/// What a test gets: a fresh store, its connection string (to open a second client), and a key
/// prefix unique to this test run.
struct Ctx {
    store: Arc<dyn MetadataStore>,
    conn: String,
    create: fn(&str) -> mooncake_core::Result<Arc<dyn MetadataStore>>,
    prefix: String,
    caps: MetadataCapabilities,
}

impl Ctx {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
}

type Body = fn(&Ctx) -> TestResult;

/// Every MetadataStore test for the linked store `name`, connecting with
/// [`SuiteOptions::metadata_conn`] (`P2PHANDSHAKE` for the `p2p` store when unset).
///
/// Without a connection string the suite is one skipped trial saying what to set.
pub fn metadata_suite(name: &str, opts: &SuiteOptions) -> Vec<Trial> {
    let Some(factory) = registry::metadata_stores().into_iter().find(|f| f.name == name) else {
        return vec![Trial::fixed(
            KIND,
            name,
            "linked",
            Outcome::Failed(format!("metadata store {name:?} is not linked")),
        )];
    };
    let conn = match (&opts.metadata_conn, name) {
        (Some(c), _) => c.clone(),
        (None, "p2p") => "P2PHANDSHAKE".to_string(),
        (None, _) => {
            return vec![Trial::fixed(
                KIND,
                name,
                "connect",
                Outcome::Skipped(format!(
                    "no connection string for {name:?}: set SuiteOptions::metadata_conn (runner: --metadata-conn)"
                )),
            )];
        }
    };
    if !(factory.accepts)(&conn) {
        return vec![Trial::fixed(
            KIND,
            name,
            "accepts",
            Outcome::Failed(format!("{name:?} does not accept connection string {conn:?}")),
        )];
    }
    let cases: [(&str, Body); 15] = [
        ("put_get_delete_round_trip", round_trip),
        ("get_missing_is_none", get_missing),
        ("delete_absent_is_false", delete_absent),
        ("overwrite_replaces", overwrite),
        ("empty_and_binary_values", binary_values),
        ("value_1MiB", large_value),
        ("key_shapes", key_shapes),
        ("concurrent_writers", concurrent),
        ("shared_visibility", shared_visibility),
        ("lease", lease),
        ("lease_expires_after_close", lease_expiry),
        ("list_prefix", list),
        ("watch_prefix", watch),
        ("close_is_idempotent", close),
        ("service_down_is_unavailable", service_down),
    ];
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    cases
        .into_iter()
        .map(|(test, body)| {
            if let Some(reason) = opts.disabled_reason(test) {
                return Trial::fixed(KIND, name, test, Outcome::Disabled(reason.to_string()));
            }
            let (create, conn) = (factory.create, conn.clone());
            let prefix = format!("conformance/{nonce:x}-{}/{test}/", std::process::id());
            Trial::new(KIND, name, test, opts.timeout, move || {
                let store = create(&conn).or_fail(&format!("creating a client for {conn:?}"))?;
                let caps = store.capabilities();
                let ctx = Ctx { store, conn, create, prefix, caps };
                let r = body(&ctx);
                let _ = block_on_timeout(LIMIT, "close", ctx.store.close());
                r
            })
        })
        .collect()
}

fn round_trip(c: &Ctx) -> TestResult {
    let k = c.key("a");
    block_on_timeout(LIMIT, "round trip", async {
        c.store.put(&k, b"value-1").await.or_fail("put")?;
        let got = c.store.get(&k).await.or_fail("get")?;
        ensure!(got.as_deref() == Some(&b"value-1"[..]), "get after put: {got:?}");
        ensure!(c.store.delete(&k).await.or_fail("delete")?, "delete of a present key returned false");
        let got = c.store.get(&k).await.or_fail("get after delete")?;
        ensure!(got.is_none(), "get after delete: {got:?}");
        ensure!(!c.store.delete(&k).await.or_fail("second delete")?, "second delete returned true");
        Ok(Outcome::Passed)
    })?
}

fn get_missing(c: &Ctx) -> TestResult {
    let got = block_on_timeout(LIMIT, "get", c.store.get(&c.key("never-put")))?.or_fail("get of a missing key")?;
    ensure!(got.is_none(), "get of a key never put: {got:?}");
    Ok(Outcome::Passed)
}

fn delete_absent(c: &Ctx) -> TestResult {
    let r =
        block_on_timeout(LIMIT, "delete", c.store.delete(&c.key("never-put")))?.or_fail("delete of a missing key")?;
    ensure!(!r, "delete of a key never put returned true");
    Ok(Outcome::Passed)
}

fn overwrite(c: &Ctx) -> TestResult {
    let k = c.key("o");
    block_on_timeout(LIMIT, "overwrite", async {
        c.store.put(&k, b"first, and longer").await.or_fail("put")?;
        c.store.put(&k, b"second").await.or_fail("put again")?;
        let got = c.store.get(&k).await.or_fail("get")?;
        ensure!(got.as_deref() == Some(&b"second"[..]), "after overwrite: {got:?}");
        c.store.delete(&k).await.or_fail("delete")?;
        Ok(Outcome::Passed)
    })?
}

fn binary_values(c: &Ctx) -> TestResult {
    let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    block_on_timeout(LIMIT, "values", async {
        for (name, v) in [("empty", Vec::new()), ("binary", all.clone()), ("nul", vec![0u8; 17])] {
            let k = c.key(name);
            c.store.put(&k, &v).await.or_fail(&format!("put {name}"))?;
            let got = c.store.get(&k).await.or_fail(&format!("get {name}"))?;
            ensure!(got.as_deref() == Some(&v[..]), "{name} value came back as {got:?}");
            c.store.delete(&k).await.or_fail("delete")?;
        }
        Ok(Outcome::Passed)
    })?
}

fn large_value(c: &Ctx) -> TestResult {
    let v = pattern(1, 1 << 20);
    let k = c.key("big");
    block_on_timeout(LIMIT, "1 MiB value", async {
        c.store.put(&k, &v).await.or_fail("put 1 MiB")?;
        let got = c.store.get(&k).await.or_fail("get 1 MiB")?.or_fail("1 MiB value missing")?;
        ensure!(got == v, "1 MiB value came back different ({} bytes)", got.len());
        c.store.delete(&k).await.or_fail("delete")?;
        Ok(Outcome::Passed)
    })?
}

fn key_shapes(c: &Ctx) -> TestResult {
    let keys = [
        "a/b/c/d",
        "trailing/",
        "//double//slash",
        "unicode/\u{043A}\u{043B}\u{044E}\u{0447}/\u{952E}/\u{1F511}",
        "spaces and ?query=1&x=%20#frag",
        "mooncake/ram/10.0.0.1:15123",
    ];
    block_on_timeout(LIMIT, "key shapes", async {
        for (i, k) in keys.iter().enumerate() {
            let key = c.key(k);
            let v = format!("value {i}");
            c.store.put(&key, v.as_bytes()).await.or_fail(&format!("put {key:?}"))?;
        }
        for (i, k) in keys.iter().enumerate() {
            let key = c.key(k);
            let got = c.store.get(&key).await.or_fail(&format!("get {key:?}"))?;
            let want = format!("value {i}");
            ensure!(got.as_deref() == Some(want.as_bytes()), "key {key:?}: {got:?}, expected {want:?}");
        }
        for k in keys {
            let key = c.key(k);
            ensure!(c.store.delete(&key).await.or_fail("delete")?, "delete of {key:?} returned false");
        }
        Ok(Outcome::Passed)
    })?
}

fn concurrent(c: &Ctx) -> TestResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .or_fail("building a runtime")?;
    let shared_key = c.key("contended");
    let r: Result<(), String> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..8u32 {
            let store = c.store.clone();
            let prefix = c.prefix.clone();
            let shared_key = shared_key.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..32u32 {
                    let k = format!("{prefix}w{w}/k{i}");
                    store.put(&k, format!("{w}:{i}").as_bytes()).await.map_err(|e| format!("put {k}: {e}"))?;
                    store.put(&shared_key, format!("{w}").as_bytes()).await.map_err(|e| format!("put shared: {e}"))?;
                }
                Ok::<(), String>(())
            }));
        }
        let all = tokio::time::timeout(LIMIT, async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await);
            }
            out
        })
        .await
        .map_err(|_| format!("concurrent writers did not finish within {LIMIT:?}"))?;
        for r in all {
            r.map_err(|e| format!("writer task: {e}"))??;
        }
        for w in 0..8u32 {
            for i in 0..32u32 {
                let k = c.key(&format!("w{w}/k{i}"));
                let got = c.store.get(&k).await.or_fail("get")?;
                let want = format!("{w}:{i}");
                ensure!(got.as_deref() == Some(want.as_bytes()), "{k}: {got:?}, expected {want:?}");
                c.store.delete(&k).await.or_fail("delete")?;
            }
        }
        let last = c.store.get(&shared_key).await.or_fail("get contended")?.or_fail("contended key missing")?;
        let last = String::from_utf8_lossy(&last).to_string();
        ensure!(
            last.parse::<u32>().is_ok_and(|w| w < 8),
            "contended key holds {last:?}, which no writer wrote (torn write?)"
        );
        c.store.delete(&shared_key).await.or_fail("delete contended")?;
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    r.map(|()| Outcome::Passed)
}

fn shared_visibility(c: &Ctx) -> TestResult {
    if !c.caps.shared {
        return Ok(Outcome::Skipped(
            "store is local-only (capabilities.shared = false): other clients cannot see its keys".into(),
        ));
    }
    let other = (c.create)(&c.conn).or_fail("creating a second client")?;
    let k = c.key("seen");
    block_on_timeout(LIMIT, "shared visibility", async {
        c.store.put(&k, b"from-1").await.or_fail("put through client 1")?;
        let got = other.get(&k).await.or_fail("get through client 2")?;
        ensure!(got.as_deref() == Some(&b"from-1"[..]), "client 2 sees {got:?}");
        ensure!(other.delete(&k).await.or_fail("delete through client 2")?, "client 2 could not delete");
        let got = c.store.get(&k).await.or_fail("get through client 1")?;
        ensure!(got.is_none(), "client 1 still sees {got:?} after client 2 deleted it");
        other.close().await;
        Ok(Outcome::Passed)
    })?
}

fn expect_unsupported<T: std::fmt::Debug>(r: mooncake_core::Result<T>, op: &str) -> TestResult {
    match r {
        Err(Error::Unsupported { .. }) => Ok(Outcome::Passed),
        other => Err(format!("{op} on a store that does not declare it: {other:?}, expected Unsupported")),
    }
}

fn lease(c: &Ctx) -> TestResult {
    let k = c.key("leased");
    block_on_timeout(LIMIT, "lease", async {
        let r = c.store.put_with_lease(&k, b"v", Duration::from_secs(30)).await;
        if !c.caps.lease {
            return expect_unsupported(r, "put_with_lease");
        }
        r.or_fail("put_with_lease")?;
        let got = c.store.get(&k).await.or_fail("get")?;
        ensure!(got.as_deref() == Some(&b"v"[..]), "leased key: {got:?}");
        c.store.delete(&k).await.or_fail("delete")?;
        Ok(Outcome::Passed)
    })?
}

fn list(c: &Ctx) -> TestResult {
    let p = c.key("dir/");
    block_on_timeout(LIMIT, "list", async {
        if !c.caps.list {
            return expect_unsupported(c.store.list(&p).await, "list");
        }
        for k in ["x", "y", "sub/z"] {
            c.store.put(&format!("{p}{k}"), k.as_bytes()).await.or_fail("put")?;
        }
        c.store.put(&c.key("dirx"), b"outside").await.or_fail("put")?;
        let mut got = c.store.list(&p).await.or_fail("list")?;
        got.sort();
        let want: Vec<(String, Vec<u8>)> =
            ["sub/z", "x", "y"].iter().map(|k| (format!("{p}{k}"), k.as_bytes().to_vec())).collect();
        ensure!(got == want, "list({p:?}) = {got:?}, expected {want:?}");
        for k in ["x", "y", "sub/z"] {
            c.store.delete(&format!("{p}{k}")).await.or_fail("delete")?;
        }
        c.store.delete(&c.key("dirx")).await.or_fail("delete")?;
        Ok(Outcome::Passed)
    })?
}

fn watch(c: &Ctx) -> TestResult {
    let p = c.key("watched/");
    block_on_timeout(LIMIT, "watch", async {
        if !c.caps.watch {
            return expect_unsupported(c.store.watch(&p).await.map(|_| ()), "watch");
        }
        let mut rx = c.store.watch(&p).await.or_fail("watch")?;
        let k = format!("{p}k");
        c.store.put(&k, b"v").await.or_fail("put")?;
        c.store.delete(&k).await.or_fail("delete")?;
        let first = rx.recv().await.or_fail("watch stream ended")?;
        ensure!(first == WatchEvent::Put(k.clone(), b"v".to_vec()), "first event {first:?}");
        let second = rx.recv().await.or_fail("watch stream ended")?;
        ensure!(second == WatchEvent::Delete(k.clone()), "second event {second:?}");
        Ok(Outcome::Passed)
    })?
}

fn close(c: &Ctx) -> TestResult {
    let other = (c.create)(&c.conn).or_fail("creating a client")?;
    block_on_timeout(LIMIT, "close twice", async {
        other.close().await;
        other.close().await;
    })?;
    Ok(Outcome::Passed)
}

fn lease_expiry(c: &Ctx) -> TestResult {
    if !c.caps.lease {
        return Ok(Outcome::Skipped("store does not declare leases".into()));
    }
    if !c.caps.shared {
        return Ok(Outcome::Skipped("a local-only store cannot show a key outliving its owner".into()));
    }
    let owner = (c.create)(&c.conn).or_fail("creating the owning client")?;
    let k = c.key("expiring");
    block_on_timeout(LIMIT, "lease expiry", async {
        owner.put_with_lease(&k, b"alive", Duration::from_secs(2)).await.or_fail("put_with_lease")?;
        // Renewed while the owner lives: still there after more than one TTL.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let got = c.store.get(&k).await.or_fail("get while the owner lives")?;
        ensure!(got.as_deref() == Some(&b"alive"[..]), "leased key vanished while its owner was alive: {got:?}");
        owner.close().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if c.store.get(&k).await.or_fail("get after the owner closed")?.is_none() {
                return Ok(Outcome::Passed);
            }
            ensure!(tokio::time::Instant::now() < deadline, "leased key still present 15 s after its owner closed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })?
}

/// `conn` with its first `host:port` pointed at `port`, or `None` when it names no network
/// address (`P2PHANDSHAKE`).
fn with_port(conn: &str, port: u16) -> Option<String> {
    let (scheme, rest) = match conn.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), conn),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let first = authority.split(',').next()?;
    let (host, p) = first.rsplit_once(':')?;
    p.parse::<u16>().ok()?;
    Some(format!("{scheme}{host}:{port}{path}"))
}

/// A client of a service that refuses connections, and one of a service that accepts them but
/// never answers, must both fail with `Unavailable`, without hanging.
fn service_down(c: &Ctx) -> TestResult {
    let refused_port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).or_fail("finding a free port")?.port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").or_fail("binding a silent listener")?;
    let silent_port = silent.local_addr().or_fail("silent listener address")?.port();
    let (Some(refused), Some(mute)) = (with_port(&c.conn, refused_port), with_port(&c.conn, silent_port)) else {
        return Ok(Outcome::Skipped(format!("connection string {:?} names no network service", c.conn)));
    };
    let bound = Duration::from_secs(15);
    for (what, conn) in [("refusing", refused), ("silent", mute)] {
        let store = match (c.create)(&conn) {
            Ok(s) => s,
            Err(Error::Unavailable { .. }) => continue,
            Err(e) => return Err(format!("creating a client of a {what} service: {e:?}, expected Unavailable")),
        };
        let k = c.key("down");
        let started = std::time::Instant::now();
        let results = block_on_timeout(bound + Duration::from_secs(1), &format!("calls to a {what} service"), async {
            let get = tokio::time::timeout(bound, store.get(&k)).await.map(|r| r.map(|_| ()));
            let put = tokio::time::timeout(bound, store.put(&k, b"v")).await;
            let del = tokio::time::timeout(bound, store.delete(&k)).await.map(|r| r.map(|_| ()));
            store.close().await;
            [("get", get), ("put", put), ("delete", del)]
        })?;
        for (op, r) in results {
            match r {
                Err(_) => return Err(format!("{op} to a {what} service hung for more than {bound:?}")),
                Ok(Err(Error::Unavailable { .. })) => {}
                Ok(other) => return Err(format!("{op} to a {what} service gave {other:?}, expected Unavailable")),
            }
        }
        let took = started.elapsed();
        ensure!(took < bound * 3, "three calls to a {what} service took {took:?}");
    }
    drop(silent);
    Ok(Outcome::Passed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn with_port_rewrites_the_first_address() {
        use super::with_port;
        assert_eq!(with_port("http://127.0.0.1:8080/metadata", 9).as_deref(), Some("http://127.0.0.1:9/metadata"));
        assert_eq!(with_port("etcd://a:2379,b:2379", 9).as_deref(), Some("etcd://a:9"));
        assert_eq!(with_port("127.0.0.1:2379", 9).as_deref(), Some("127.0.0.1:9"));
        assert_eq!(with_port("redis://127.0.0.1:6379", 9).as_deref(), Some("redis://127.0.0.1:9"));
        assert_eq!(with_port("P2PHANDSHAKE", 9), None);
    }
}
