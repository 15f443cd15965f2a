//! `mooncake_p2p_store` as separate processes against a real etcd: one source process, four reader processes
//! (the first alone, then three at once while it serves), bytes checked by each reader against the synthetic
//! pattern. Skipped, saying so, when `etcd` is not installed.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mooncake_testkit::EtcdServer;

const BIN: &str = env!("CARGO_BIN_EXE_mooncake_p2p_store");

/// Kills the child by PID when dropped (a failing test leaves nothing running).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(etcd: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--etcd").arg(etcd).args(args);
    c
}

fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {}\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn help_lists_subcommands() {
    let out = ok(Command::new(BIN).arg("--help").output().unwrap(), "--help");
    for sub in ["register", "list", "get", "delete", "unregister"] {
        assert!(out.contains(sub), "{sub} missing from --help:\n{out}");
    }
}

#[test]
fn one_source_four_reader_processes() {
    if mooncake_testkit::which("etcd").is_none() {
        eprintln!("SKIPPED: `etcd` is not installed (apt-get install etcd-server)");
        return;
    }
    let server = EtcdServer::start().expect("starting etcd");
    let etcd = server.endpoint();
    let t = Instant::now();
    let _source = Guard(
        cli(&etcd, &["register", "mp/ckpt", "--synthetic", "256MiB", "--seed", "9", "--shard-size", "16MiB"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ok(cli(&etcd, &["list", "mp/"]).output().unwrap(), "list");
        if out.contains("mp/ckpt") {
            assert!(out.contains("268435456 bytes") && out.contains("16 shards"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "the source did not register within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let reader = |hold: &str| {
        cli(&etcd, &["get", "mp/ckpt", "--verify-seed", "9", "--hold-secs", hold])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The first reader holds its replica while the other three fetch.
    let first = reader("4");
    std::thread::sleep(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(cli(&etcd, &["list", "mp/"]).output().unwrap(), "list").contains(">= 1 replicas") {
        assert!(Instant::now() < deadline, "the first reader did not become a holder within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let others: Vec<Child> = (0..3).map(|_| reader("0")).collect();
    let mut outs: Vec<String> = others.into_iter().map(|c| ok(c.wait_with_output().unwrap(), "reader")).collect();
    outs.push(ok(first.wait_with_output().unwrap(), "first reader"));
    for o in &outs {
        assert!(o.contains("verified 268435456 bytes"), "{o}");
    }
    let from_replicas = outs.iter().filter(|o| !o.contains(" 0 of 16 shards from replicas")).count();
    assert!(from_replicas >= 1, "no reader read from another reader:\n{}", outs.join(""));
    eprintln!("{}total {:?}", outs.join(""), t.elapsed());
    // All readers left; the source still serves.
    let out = ok(cli(&etcd, &["list", "mp/", "--json"]).output().unwrap(), "list --json");
    let p: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let shard = &p["shards"][0];
    assert_eq!(shard["replica_list"].as_array().map(Vec::len), Some(0), "{out}");
    assert_eq!(shard["gold"].as_array().map(Vec::len), Some(1), "{out}");
}
