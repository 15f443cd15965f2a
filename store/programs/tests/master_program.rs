//! `mooncake_master` as users run it: upstream's flags, the embedded HTTP metadata server, the admin
//! endpoints, clean exit on SIGTERM, and usage errors with exit code 2.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use mooncake_testkit::free_port;

fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn serves_rpc_admin_and_http_metadata_then_stops_on_sigterm() {
    let (rpc, admin, meta) = (free_port(), free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .args([
            format!("--rpc_port={rpc}"),
            "--rpc_address".into(),
            "127.0.0.1".into(),
            format!("-metrics_port={admin}"),
            "--enable_http_metadata_server".into(),
            "--http_metadata_server_host=127.0.0.1".into(),
            format!("--http_metadata_server_port={meta}"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, format!("http_metadata_server http://127.0.0.1:{meta}/metadata"));
    let second = lines.next().unwrap().unwrap();
    assert_eq!(second, format!("mooncake_master rpc 127.0.0.1:{rpc} admin 127.0.0.1:{admin}"));

    let (status, body) = http(&format!("127.0.0.1:{admin}"), "GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(&format!("127.0.0.1:{admin}"), "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(status == 200 && body.contains("master_key_count 0"), "{body}");
    let put = "PUT /metadata?key=k HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(http(&format!("127.0.0.1:{meta}"), put).0, 200);
    assert_eq!(http(&format!("127.0.0.1:{meta}"), "GET /metadata?key=k HTTP/1.0\r\n\r\n"), (200, "{}".into()));

    // SIGTERM through kill(1), then a clean exit.
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "mooncake_master did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_mooncake_master")).args(args).output().unwrap();
    for (args, expect) in [
        (&["--no_such_flag=1"][..], "unknown flag --no_such_flag"),
        (&["--rpc_port=abc"][..], "not a valid integer"),
        (&["--allocation_strategy=best"][..], "allocation_strategy"),
        (&["--config_path=/nonexistent/master.json"][..], "config file"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let help = run(&["--help"]);
    assert!(help.status.success() && String::from_utf8_lossy(&help.stdout).contains("--eviction_high_watermark_ratio"));
}

#[test]
fn a_busy_port_is_a_clear_startup_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .args([
            format!("--rpc_port={port}"),
            "--rpc_address=127.0.0.1".into(),
            format!("--metrics_port={}", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot serve RPC"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
