//! The Redis store against real `redis-server` processes (started on free ports by
//! `mooncake-testkit` and killed when each test ends).

use std::future::Future;
use std::time::Duration;

use mooncake_core::{Error, MetadataStore};
use mooncake_metadata_redis::{RedisConfig, RedisMetadataStore};
use mooncake_testkit::RedisServer;

/// Bound on any one test body: a hang fails the test instead of stalling the run.
const LIMIT: Duration = Duration::from_secs(90);

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut).await.expect("test body hung")
}

fn server() -> RedisServer {
    RedisServer::start().expect("starting redis-server")
}

fn store(conn: &str) -> RedisMetadataStore {
    RedisMetadataStore::from_conn(conn).expect("creating the store")
}

/// A second, independent client (the redis crate directly) to check what the server holds.
async fn raw(port: u16, db: u32) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/{db}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn pttl(port: u16, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(&mut raw(port, 0).await).await.unwrap()
}

/// Polls `cond` every 100 ms until it holds or `limit` passes.
async fn eventually<F: Future<Output = bool>>(limit: Duration, mut cond: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn round_trip() {
    let server = server();
    let s = store(&server.conn());
    bounded(async {
        assert_eq!(s.get("mooncake/ram/a").await.unwrap(), None);
        s.put("mooncake/ram/a", b"one").await.unwrap();
        assert_eq!(s.get("mooncake/ram/a").await.unwrap().as_deref(), Some(&b"one"[..]));
        s.put("mooncake/ram/a", b"two").await.unwrap();
        assert_eq!(s.get("mooncake/ram/a").await.unwrap().as_deref(), Some(&b"two"[..]));
        for v in [Vec::new(), vec![0u8; 9], (0..=255u8).collect()] {
            s.put("bin", &v).await.unwrap();
            assert_eq!(s.get("bin").await.unwrap(), Some(v));
        }
        assert!(s.delete("mooncake/ram/a").await.unwrap());
        assert!(!s.delete("mooncake/ram/a").await.unwrap());
        assert_eq!(s.get("mooncake/ram/a").await.unwrap(), None);
        // Stored exactly as given, readable by any Redis client (upstream's layout).
        s.put("mooncake/rpc_meta/n", br#"{"ip_or_host_name":"h","rpc_port":1}"#).await.unwrap();
        let got: Vec<u8> =
            redis::cmd("GET").arg("mooncake/rpc_meta/n").query_async(&mut raw(server.port(), 0).await).await.unwrap();
        assert_eq!(got, br#"{"ip_or_host_name":"h","rpc_port":1}"#);
        s.close().await;
    })
    .await;
}

#[tokio::test]
async fn large_values() {
    let server = server();
    let s = store(&server.conn());
    bounded(async {
        for len in [1 << 20, (4 << 20) + 3] {
            let v: Vec<u8> = (0..len).map(|i: usize| (i.wrapping_mul(31) ^ (i >> 9)) as u8).collect();
            s.put("big", &v).await.unwrap();
            assert_eq!(s.get("big").await.unwrap().as_deref(), Some(&v[..]), "{len} bytes");
            let listed = s.list("bi").await.unwrap();
            assert_eq!(listed, vec![("big".to_string(), v)]);
        }
    })
    .await;
}

#[tokio::test]
async fn odd_keys_and_list() {
    let server = server();
    let s = store(&server.conn());
    bounded(async {
        let keys = [
            "p/a*b/1",
            "p/a*b/sub/2",
            "p/a*b/\u{043A}\u{043B}\u{044E}\u{0447}/\u{1F511}",
            "p/axb/would-match-an-unescaped-star",
            "p/a*bc/sibling",
            r"q/[x]?\/1",
            "q/x/would-match-an-unescaped-class",
            r"q/[x]!\/no",
            "//double//slash",
        ];
        for (i, k) in keys.iter().enumerate() {
            s.put(k, format!("v{i}").as_bytes()).await.unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(s.get(k).await.unwrap(), Some(format!("v{i}").into_bytes()), "{k}");
        }
        let names = |v: Vec<(String, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        let mut got = names(s.list("p/a*b/").await.unwrap());
        got.sort();
        assert_eq!(got, vec!["p/a*b/1", "p/a*b/sub/2", "p/a*b/\u{043A}\u{043B}\u{044E}\u{0447}/\u{1F511}"]);
        assert_eq!(names(s.list(r"q/[x]?\").await.unwrap()), vec![r"q/[x]?\/1"]);
        assert_eq!(names(s.list("//").await.unwrap()), vec!["//double//slash"]);
        assert!(s.list("nothing/").await.unwrap().is_empty());
        let all = s.list("").await.unwrap();
        assert_eq!(all.len(), keys.len());
        let (k, v) = all.iter().find(|(k, _)| k == "p/a*bc/sibling").unwrap();
        assert_eq!((k.as_str(), v.as_slice()), ("p/a*bc/sibling", &b"v4"[..]));
        for k in keys {
            assert!(s.delete(k).await.unwrap(), "{k}");
        }
    })
    .await;
}

#[tokio::test]
async fn list_walks_many_keys() {
    let server = server();
    let s = store(&server.conn());
    bounded(async {
        for i in 0..2500 {
            s.put(&format!("many/{i:05}"), i.to_string().as_bytes()).await.unwrap();
        }
        s.put("manyx", b"outside").await.unwrap();
        let got = s.list("many/").await.unwrap();
        assert_eq!(got.len(), 2500);
        for (i, (k, v)) in got.iter().enumerate() {
            assert_eq!((k.as_str(), v.as_slice()), (format!("many/{i:05}").as_str(), i.to_string().as_bytes()));
        }
    })
    .await;
}

#[tokio::test]
async fn lease_is_renewed_while_alive_and_deleted_on_close() {
    let server = server();
    let owner = store(&server.conn());
    let other = store(&server.conn());
    bounded(async {
        let ttl = Duration::from_millis(1500);
        owner.put_with_lease("leased", b"alive", ttl).await.unwrap();
        let t = pttl(server.port(), "leased").await;
        assert!(t > 0 && t <= 1500, "PTTL right after put_with_lease: {t}");
        // Past two TTLs: only renewal keeps it.
        tokio::time::sleep(ttl * 2 + Duration::from_millis(500)).await;
        assert_eq!(other.get("leased").await.unwrap().as_deref(), Some(&b"alive"[..]));
        assert!(pttl(server.port(), "leased").await > 0, "leased key lost its expiry");
        owner.close().await;
        assert_eq!(other.get("leased").await.unwrap(), None, "close did not delete the leased key");
        owner.close().await; // idempotent
        let again = owner.put_with_lease("leased", b"x", ttl).await;
        assert!(matches!(again, Err(Error::NotInitialized(_))), "put_with_lease after close: {again:?}");
        // Plain operations still work after close.
        owner.put("plain", b"p").await.unwrap();
        assert_eq!(other.get("plain").await.unwrap().as_deref(), Some(&b"p"[..]));
    })
    .await;
}

#[tokio::test]
async fn lease_of_a_dropped_store_expires() {
    let server = server();
    let watcher = store(&server.conn());
    let owner = store(&server.conn());
    bounded(async {
        owner.put_with_lease("orphan", b"v", Duration::from_millis(600)).await.unwrap();
        drop(owner); // like a crashed process: no close, no renewal
        assert!(
            eventually(Duration::from_secs(10), || async { watcher.get("orphan").await.unwrap().is_none() }).await,
            "leased key of a dropped store never expired"
        );
    })
    .await;
}

#[tokio::test]
async fn plain_put_or_delete_ends_a_lease() {
    let server = server();
    let s = store(&server.conn());
    bounded(async {
        let ttl = Duration::from_millis(600);
        s.put_with_lease("k-put", b"leased", ttl).await.unwrap();
        s.put_with_lease("k-del", b"leased", ttl).await.unwrap();
        s.put("k-put", b"plain").await.unwrap();
        assert!(s.delete("k-del").await.unwrap());
        assert_eq!(pttl(server.port(), "k-put").await, -1, "a plain put must leave no expiry");
        tokio::time::sleep(ttl * 3).await;
        assert_eq!(s.get("k-put").await.unwrap().as_deref(), Some(&b"plain"[..]));
        assert_eq!(s.get("k-del").await.unwrap(), None, "a deleted leased key came back");
        // The lease is over: close must not delete the plain key.
        s.close().await;
        assert_eq!(s.get("k-put").await.unwrap().as_deref(), Some(&b"plain"[..]));
    })
    .await;
}

#[tokio::test]
async fn releasing_with_a_new_lease_replaces_value_and_ttl() {
    let server = server();
    let s = store(&server.conn());
    bounded(async {
        s.put_with_lease("k", b"first", Duration::from_millis(600)).await.unwrap();
        s.put_with_lease("k", b"second", Duration::from_secs(60)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"second"[..]));
        let t = pttl(server.port(), "k").await;
        assert!(t > 30_000, "PTTL {t}: the second lease's TTL was not applied");
        assert!(matches!(s.put_with_lease("z", b"v", Duration::ZERO).await, Err(Error::InvalidArgument(_))));
    })
    .await;
}

#[test]
fn leases_survive_the_callers_runtime() {
    // The conformance suite and the Python binding call from short-lived runtimes: renewal must
    // not depend on the runtime that called put_with_lease.
    let server = server();
    let s = store(&server.conn());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(s.put_with_lease("k", b"v", Duration::from_millis(1000))).unwrap();
    drop(rt);
    std::thread::sleep(Duration::from_millis(2500));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert_eq!(rt.block_on(s.get("k")).unwrap().as_deref(), Some(&b"v"[..]));
    rt.block_on(s.close());
    assert_eq!(rt.block_on(s.get("k")).unwrap(), None);
}

#[tokio::test]
async fn server_restart_is_survived() {
    let mut server = server();
    let s = store(&server.conn());
    bounded(async {
        s.put_with_lease("mooncake/ram/me", b"descriptor", Duration::from_secs(3)).await.unwrap();
        s.put("plain", b"p").await.unwrap();
        server.restart().expect("restarting redis-server"); // comes back empty
        // The first call after the restart reconnects by itself.
        assert_eq!(s.get("plain").await.unwrap(), None, "restart should have lost the plain key");
        s.put("plain", b"again").await.unwrap();
        assert_eq!(s.get("plain").await.unwrap().as_deref(), Some(&b"again"[..]));
        let restored = eventually(Duration::from_secs(8), || async {
            s.get("mooncake/ram/me").await.unwrap().as_deref() == Some(&b"descriptor"[..])
        })
        .await;
        assert!(restored, "leased key was not written again after the restart");
        let t = pttl(server.port(), "mooncake/ram/me").await;
        assert!(t > 0 && t <= 3000, "restored leased key has PTTL {t}");
        s.close().await;
        assert_eq!(s.get("mooncake/ram/me").await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn server_down_then_up() {
    let mut server = server();
    let s = RedisMetadataStore::new(RedisConfig { timeout: Duration::from_millis(500), ..config_of(&server) }).unwrap();
    bounded(async {
        s.put("k", b"v").await.unwrap();
        server.stop();
        let r = s.get("k").await;
        assert!(matches!(&r, Err(Error::Unavailable { reason }) if reason.contains(&format!("127.0.0.1:{}", server.port()))), "{r:?}");
        server.restart().unwrap();
        s.put("k", b"back").await.unwrap();
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"back"[..]));
    })
    .await;
}

fn config_of(server: &RedisServer) -> RedisConfig {
    RedisConfig::new("127.0.0.1", server.port())
}

#[tokio::test]
async fn password_protected_server() {
    let server = RedisServer::start_with_password(Some("s3cret")).expect("redis-server with a password");
    bounded(async {
        let with = |password: Option<&str>, username: Option<&str>| {
            RedisMetadataStore::new(RedisConfig {
                password: password.map(str::to_string),
                username: username.map(str::to_string),
                ..config_of(&server)
            })
            .unwrap()
        };
        let good = with(Some("s3cret"), None);
        good.put("k", b"v").await.unwrap();
        assert_eq!(good.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        // The default ACL user, named explicitly, in the connection string.
        let named = store(&format!("redis://default:s3cret@127.0.0.1:{}", server.port()));
        assert_eq!(named.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        for (what, bad) in [
            ("wrong password", with(Some("nope"), None)),
            ("wrong user", with(Some("s3cret"), Some("mallory"))),
            ("no password", with(None, None)),
        ] {
            let r = bad.get("k").await;
            match &r {
                Err(Error::Metadata(m)) => {
                    assert!(m.contains("MC_REDIS_PASSWORD") && m.contains("MC_REDIS_USERNAME"), "{what}: {m}");
                    assert!(!m.contains("s3cret"), "{what}: error shows the password: {m}");
                }
                other => panic!("{what}: {other:?}, expected a Metadata error about the credentials"),
            }
            assert!(matches!(bad.put("k", b"x").await, Err(Error::Metadata(_))), "{what}: put");
        }
        assert_eq!(good.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    })
    .await;
}

#[tokio::test]
async fn databases_are_isolated() {
    let server = server();
    let db0 = store(&server.conn());
    let db1 = store(&format!("{}/1", server.conn()));
    assert_eq!(db1.config().db, 1);
    bounded(async {
        db0.put("k", b"zero").await.unwrap();
        assert_eq!(db1.get("k").await.unwrap(), None);
        db1.put("k", b"one").await.unwrap();
        assert_eq!(db0.get("k").await.unwrap().as_deref(), Some(&b"zero"[..]));
        assert_eq!(db1.list("").await.unwrap(), vec![("k".to_string(), b"one".to_vec())]);
        let in_db1: Vec<u8> = redis::cmd("GET").arg("k").query_async(&mut raw(server.port(), 1).await).await.unwrap();
        assert_eq!(in_db1, b"one");
        // Redis has 16 databases by default: index 99 is refused by the server.
        let out_of_range = RedisMetadataStore::new(RedisConfig { db: 99, ..config_of(&server) }).unwrap();
        match out_of_range.get("k").await {
            Err(Error::Metadata(m)) => assert!(m.contains("MC_REDIS_DB_INDEX"), "{m}"),
            other => panic!("db 99: {other:?}, expected a Metadata error naming MC_REDIS_DB_INDEX"),
        }
    })
    .await;
}

/// Every operation against a dead address must end with `Unavailable` naming it, not hang.
async fn all_unavailable(s: &RedisMetadataStore, port: u16) {
    let addr = format!("127.0.0.1:{port}");
    let check = |op: &str, r: Result<(), Error>| match r {
        Err(Error::Unavailable { reason }) => assert!(reason.contains(&addr), "{op}: {reason}"),
        other => panic!("{op}: {other:?}, expected Unavailable"),
    };
    check("get", s.get("k").await.map(|_| ()));
    check("put", s.put("k", b"v").await);
    check("delete", s.delete("k").await.map(|_| ()));
    check("list", s.list("k").await.map(|_| ()));
    check("put_with_lease", s.put_with_lease("k", b"v", Duration::from_secs(5)).await);
    s.close().await;
}

#[tokio::test]
async fn refused_port_is_unavailable() {
    let port = mooncake_testkit::free_port();
    let s = store(&format!("redis://127.0.0.1:{port}"));
    bounded(all_unavailable(&s, port)).await;
}

#[tokio::test]
async fn silent_listener_is_unavailable() {
    // Accepts TCP connections (the kernel does, into the backlog) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let s = RedisMetadataStore::new(RedisConfig {
        timeout: Duration::from_millis(700),
        ..RedisConfig::new("127.0.0.1", port)
    })
    .unwrap();
    bounded(all_unavailable(&s, port)).await;
    // The default timeout, from a connection string.
    let s = store(&format!("redis://127.0.0.1:{port}"));
    assert_eq!(s.config().timeout, Duration::from_secs(3));
    let r = bounded(s.get("k")).await;
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    drop(silent);
}

#[test]
fn registered_as_redis() {
    mooncake_metadata_redis::link();
    let factory = mooncake_core::registry::metadata_stores()
        .into_iter()
        .find(|f| f.name == "redis")
        .expect("redis is registered");
    assert!((factory.accepts)("redis://127.0.0.1:6379"));
    assert!(!(factory.accepts)("P2PHANDSHAKE"));
    // Created outside any runtime without connecting.
    let s = mooncake_core::registry::create_metadata("redis://127.0.0.1:1").expect("created lazily");
    assert_eq!(s.name(), "redis");
    assert!(matches!(
        mooncake_core::registry::create_metadata("rediss://127.0.0.1:1"),
        Err(Error::InvalidArgument(m)) if m.contains("TLS")
    ));
}
