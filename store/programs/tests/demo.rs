//! The README's main job: the store demo runs on a bare machine and its checks pass.

#[test]
fn store_demo_runs_and_its_checks_pass() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mooncake_store_demo")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("store demo: all checks passed"), "{stdout}");
    assert!(stdout.contains("get greeting -> \"hello from mooncake-rs\""), "{stdout}");
}
