//! A C program (tests/c/mooncake_c_test.c) built with the system `cc` against include/mooncake_c.h and
//! libmooncake_c.so: the engine between two processes over TCP (P2P handshake), the store against a master
//! started here, and bad input. Skipped, with a message, where `cc` is missing.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mooncake_store_master::{MasterService, ServiceConfig};

/// Compiles the program once per test binary; `None` (skip) without `cc` or without the cdylib.
fn program() -> Option<PathBuf> {
    static BUILT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            // The cdylib `cargo test` built with this test sits next to the test binary, in `deps/`.
            let lib_dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
            if !lib_dir.join("libmooncake_c.so").exists() {
                eprintln!("SKIP: libmooncake_c.so not found in {}", lib_dir.display());
                return None;
            }
            if Command::new("cc").arg("--version").output().is_err() {
                eprintln!("SKIP: no system C compiler (`cc`) on this machine");
                return None;
            }
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mooncake_c_test");
            let status = Command::new("cc")
                .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I"])
                .arg(dir.join("include"))
                .arg(dir.join("tests/c/mooncake_c_test.c"))
                .arg("-L")
                .arg(&lib_dir)
                // RPATH, not RUNPATH: cargo's LD_LIBRARY_PATH names target/debug, whose uplifted copy of the
                // library may be older than the one this test was built with; RPATH is searched before it.
                .arg("-Wl,--disable-new-dtags")
                .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
                .args(["-lmooncake_c", "-o"])
                .arg(&out)
                .status()
                .expect("run cc");
            assert!(status.success(), "cc failed to build the C test program");
            Some(out)
        })
        .clone()
}

/// Waits for `child` up to `limit`, killing it (by its own handle) when it overruns.
fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

fn assert_ok(out: &Output, mode: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("OK {mode}")),
        "{mode}: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn c_bad_input() {
    let Some(prog) = program() else { return };
    let out = finish(
        Command::new(prog).arg("bad-input").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(),
        Duration::from_secs(60),
    );
    assert_ok(&out, "bad-input");
}

#[test]
fn c_engine_between_two_processes() {
    let Some(prog) = program() else { return };
    let mut target =
        Command::new(&prog).arg("engine-target").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("target printed a line").expect("read target");
    let f: Vec<&str> = ready.split_whitespace().collect();
    assert!(f.len() == 3 && f[0] == "READY", "target said {ready:?}");
    let initiator = Command::new(&prog)
        .args(["engine-initiator", f[1], f[2]])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(initiator, Duration::from_secs(60));
    assert_ok(&out, "engine-initiator");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let target_out = finish(target, Duration::from_secs(30));
    assert!(
        target_out.status.success() && rest.iter().any(|l| l == "OK engine-target"),
        "target: {:?} {rest:?}\n{}",
        target_out.status,
        String::from_utf8_lossy(&target_out.stderr)
    );
}

#[test]
fn c_store_against_a_master() {
    let Some(prog) = program() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let master = rt
        .block_on(MasterService::start(ServiceConfig {
            rpc_addr: "127.0.0.1:0".into(),
            admin_addr: None,
            tick_interval: Duration::from_millis(50),
            ..Default::default()
        }))
        .unwrap();
    let addr = master.rpc_addr().to_string();
    let child =
        Command::new(prog).args(["store", &addr]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = finish(child, Duration::from_secs(60));
    rt.block_on(master.shutdown());
    assert_ok(&out, "store");
}
