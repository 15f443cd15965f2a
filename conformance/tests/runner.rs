//! The `mooncake-conformance` binary: listing, filtering, the table, and its exit status.

use std::process::Command;

fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mooncake-conformance"))
}

#[test]
fn lists_every_linked_backend() {
    let out = runner().arg("--list").output().expect("running the runner");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["loopback", "tcp", "host", "p2p"] {
        assert!(text.contains(name), "--list does not show {name}:\n{text}");
    }
}

#[test]
fn filtered_run_prints_the_table_and_exits_zero() {
    let out = runner()
        .args(["--backend", "loopback", "--backend", "tcp", "--filter", "write_read_4KiB"])
        .output()
        .expect("running the runner");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "runner failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("KIND") && text.contains("PASSED") && text.contains("SKIPPED"), "{text}");
    assert!(text.contains("PASS  transport/loopback/write_read_4KiB"), "{text}");
    assert!(text.contains("PASS  transport/tcp/write_read_4KiB"), "{text}");
    assert!(text.contains("conformance: 2 passed, 0 failed, 0 skipped"), "{text}");
}

#[test]
fn unknown_backend_fails_the_run() {
    let out = runner().args(["--backend", "no-such-backend", "-q"]).output().expect("running the runner");
    assert!(!out.status.success(), "an unknown backend must fail the run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not linked"), "{text}");
}

#[test]
fn serve_peer_rejects_bad_arguments() {
    let out = runner().args(["serve-peer", "--size", "10"]).output().expect("running the runner");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--protocol"));
}

#[test]
fn disabled_file_is_applied_and_printed() {
    let dir = std::env::temp_dir().join(format!("mooncake-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("disabled.txt");
    std::fs::write(&file, "# comment\nloopback write_read_7B kept off for this check\n").expect("writing");
    let out = runner()
        .args(["--backend", "loopback", "--filter", "write_read_7B", "--disabled"])
        .arg(&file)
        .output()
        .expect("running the runner");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("transport/loopback/write_read_7B: kept off for this check"), "{text}");
}
