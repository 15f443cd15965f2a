//! The HTTP metadata server over real sockets: upstream's status codes, bad input, floods,
//! persistence across restarts and crashes, and the standalone program.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mooncake_core::{Error, MetadataStore};
use mooncake_metadata_http::{HttpMetadataServer, HttpMetadataStore, ServerConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn server(config: ServerConfig) -> mooncake_metadata_http::BackgroundServer {
    HttpMetadataServer::new(config).unwrap().spawn().unwrap()
}

fn local() -> ServerConfig {
    ServerConfig::new("127.0.0.1", 0)
}

/// Status and body of a raw request (bypassing the client's escaping).
async fn raw(method: reqwest::Method, url: &str, body: Vec<u8>) -> (u16, String) {
    let resp = reqwest::Client::new().request(method, url).body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[test]
fn upstream_status_codes() {
    let srv = server(local());
    let base = srv.url();
    runtime().block_on(async {
        use reqwest::Method;
        assert_eq!(raw(Method::GET, &base, vec![]).await, (400, "metadata key is required".into()));
        assert_eq!(raw(Method::GET, &format!("{base}?key="), vec![]).await.0, 400);
        assert_eq!(raw(Method::GET, &format!("{base}?key=absent"), vec![]).await, (404, "metadata not found".into()));
        assert_eq!(raw(Method::PUT, &format!("{base}?key=a%2Fb"), b"{}".to_vec()).await.0, 200);
        assert_eq!(raw(Method::GET, &format!("{base}?key=a%2Fb"), vec![]).await, (200, "{}".into()));
        assert_eq!(raw(Method::POST, &format!("{base}?key=a%2Fb"), vec![]).await.0, 405);
        assert_eq!(raw(Method::DELETE, &format!("{base}?key=a%2Fb"), vec![]).await.0, 200);
        assert_eq!(raw(Method::DELETE, &format!("{base}?key=a%2Fb"), vec![]).await.0, 404);
        let health = base.replace("/metadata", "/health");
        assert_eq!(raw(Method::GET, &health, vec![]).await, (200, "OK".into()));
        // rpc_meta keys: same body again is fine, a different one is refused.
        let rpc = format!("{base}?key=mooncake%2Frpc_meta%2Fn");
        assert_eq!(raw(Method::PUT, &rpc, b"{\"rpc_port\":1}".to_vec()).await.0, 200);
        assert_eq!(raw(Method::PUT, &rpc, b"{\"rpc_port\":1}".to_vec()).await.0, 200);
        assert_eq!(
            raw(Method::PUT, &rpc, b"{\"rpc_port\":2}".to_vec()).await,
            (400, "Duplicate rpc_meta key not allowed".into())
        );
        // Through the client that is a typed error.
        let client = HttpMetadataStore::new(&base).unwrap();
        match client.put("mooncake/rpc_meta/n", b"{\"rpc_port\":3}").await {
            Err(Error::AlreadyExists(msg)) => assert!(msg.contains("rpc_meta"), "{msg}"),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
    });
}

#[test]
fn bad_input_gets_a_status_and_the_server_keeps_serving() {
    let srv = server(ServerConfig { max_body_bytes: 1 << 20, ..local() });
    let base = srv.url();
    runtime().block_on(async {
        use reqwest::Method;
        let client = HttpMetadataStore::new(&base).unwrap();
        client.put("survivor", b"still here").await.unwrap();
        // Oversized body: 413, and the typed error through the client.
        let (status, _) = raw(Method::PUT, &format!("{base}?key=big"), vec![7; (1 << 20) + 1]).await;
        assert_eq!(status, 413);
        match client.put("big", &vec![7; 2 << 20]).await {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("413"), "{msg}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        // Exactly at the limit is fine.
        client.put("big", &vec![7; 1 << 20]).await.unwrap();
        // Keys that are not UTF-8.
        let (status, body) = raw(Method::PUT, &format!("{base}?key=%ff%fe"), b"x".to_vec()).await;
        assert_eq!((status, body.as_str()), (400, "metadata key is not valid UTF-8"));
        assert_eq!(raw(Method::GET, &format!("{base}?key=%C3%28"), vec![]).await.0, 400);
        // Blank key.
        assert_eq!(raw(Method::DELETE, &format!("{base}?key=+"), vec![]).await.0, 400);
        assert_eq!(client.get("survivor").await.unwrap().as_deref(), Some(&b"still here"[..]));
    });
}

#[test]
fn a_flood_of_puts_is_answered_and_the_limit_is_507() {
    let srv = server(ServerConfig { max_total_bytes: 256 << 10, ..local() });
    let base = srv.url();
    runtime().block_on(async {
        let client = std::sync::Arc::new(HttpMetadataStore::new(&base).unwrap());
        let mut tasks = Vec::new();
        for t in 0..32 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut full) = (0, 0);
                for i in 0..200 {
                    match client.put(&format!("flood/{t}/{i}"), &[b'x'; 100]).await {
                        Ok(()) => ok += 1,
                        Err(Error::NoSpace(_)) => full += 1,
                        Err(e) => panic!("put {t}/{i}: {e:?}"),
                    }
                }
                (ok, full)
            }));
        }
        let (mut ok, mut full) = (0, 0);
        for t in tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            full += f;
        }
        assert_eq!(ok + full, 32 * 200);
        assert!(ok > 1000 && full > 1000, "ok {ok}, full {full}: the 256 KiB limit should admit about 2,300 keys");
        // Still serving: reads, deletes, and puts once there is room again.
        assert!(client.get("flood/0/0").await.unwrap().is_some());
        for i in 0..200 {
            client.delete(&format!("flood/0/{i}")).await.unwrap();
        }
        client.put("after", b"room again").await.unwrap();
        assert_eq!(client.get("after").await.unwrap().as_deref(), Some(&b"room again"[..]));
    });
}

#[test]
fn persisted_keys_survive_a_restart_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.log");
    let rt = runtime();
    {
        let srv = server(local().with_persist(&path));
        let client = HttpMetadataStore::new(&srv.url()).unwrap();
        rt.block_on(async {
            for i in 0..100 {
                client.put(&format!("k/{i}"), format!("v{i}").as_bytes()).await.unwrap();
            }
            for i in 0..50 {
                assert!(client.delete(&format!("k/{i}")).await.unwrap());
            }
            client.put("ключ/✓", &vec![9; 1 << 20]).await.unwrap();
        });
    }
    let srv = server(local().with_persist(&path));
    let client = HttpMetadataStore::new(&srv.url()).unwrap();
    rt.block_on(async {
        assert!(client.get("k/0").await.unwrap().is_none());
        assert_eq!(client.get("k/99").await.unwrap().as_deref(), Some(&b"v99"[..]));
        assert_eq!(client.get("ключ/✓").await.unwrap().map(|v| v.len()), Some(1 << 20));
    });
}

struct Program(Child);

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the program and waits for its "listening on" line.
fn program(args: &[&str]) -> (Program, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_http_metadata_server"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "program said {line:?}");
    (Program(child), port)
}

#[test]
fn program_keeps_acknowledged_keys_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.log");
    let p = path.to_str().unwrap();
    let rt = runtime();
    let (srv, port) = program(&["--persist", p]);
    let url = format!("http://127.0.0.1:{port}/metadata");
    let client = HttpMetadataStore::new(&url).unwrap();
    rt.block_on(async {
        for i in 0..200 {
            client.put(&format!("mooncake/ram/node-{i}"), format!("{{\"n\":{i}}}").as_bytes()).await.unwrap();
        }
    });
    drop(srv); // SIGKILL: no chance to flush anything that was not already on disk
    let (_srv, port) = program(&["--persist", p]);
    let client = HttpMetadataStore::new(&format!("http://127.0.0.1:{port}/metadata")).unwrap();
    rt.block_on(async {
        for i in 0..200 {
            let got = client.get(&format!("mooncake/ram/node-{i}")).await.unwrap();
            assert_eq!(got, Some(format!("{{\"n\":{i}}}").into_bytes()), "key {i} after the crash");
        }
    });
}

#[test]
fn program_refuses_a_corrupt_persist_file_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.log");
    let garbage = b"MCMDLOG1\x05\x00\x00\x00\xde\xad\xbe\xef\x01\x00\x00\x00\x00 and more bytes".to_vec();
    std::fs::write(&path, &garbage).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mooncake_http_metadata_server"))
        .args(["--host", "127.0.0.1", "--port", "0", "--persist", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corrupt at byte 8") && stderr.contains("checksum"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "the corrupt file must not be rewritten");
}

#[test]
fn client_of_a_stopped_server_is_unavailable_quickly() {
    let mut srv = server(local());
    let url = srv.url();
    srv.stop();
    let client = HttpMetadataStore::new(&url).unwrap();
    let r = runtime().block_on(async { tokio::time::timeout(Duration::from_secs(10), client.get("k")).await });
    assert!(matches!(r, Ok(Err(Error::Unavailable { .. }))), "{r:?}");
}
