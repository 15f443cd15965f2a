//! The Transport and MemoryDevice suites for `cxl` over a file-backed region: a sparse file on tmpfs (or the temp
//! directory) named by `MC_CXL_DEV_PATH`, set once for this binary. The peer's buffers live in the region
//! (`host->cxl` and `cxl->cxl`; see the suite's docs on region-offset protocols). And the runner binary: it skips
//! cxl with the probe's reason when `MC_CXL_DEV_PATH` is unset, and runs it when it is set.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use mooncake_conformance::{
    Outcome, PeerCommand, Report, SuiteOptions, checked_in_disabled, device_suite, run_trials, transport_suite,
};

/// Tests in this file: the last one to finish removes the region.
const TESTS: usize = 3;

/// Creates the region file and points `MC_CXL_DEV_PATH` at it (once; every test calls this first and holds the
/// returned guard). Regions of earlier runs whose process is gone are removed first.
fn region() -> (&'static Path, Done) {
    static R: OnceLock<PathBuf> = OnceLock::new();
    let path = R.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        for old in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = old.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("mc-cxl-conformance-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(old.path());
                }
            }
        }
        let dir = base.join(format!("mc-cxl-conformance-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("region directory");
        let path = dir.join("region");
        std::fs::File::create(&path).and_then(|f| f.set_len(512 << 20)).expect("region file");
        // SAFETY: set before any engine, device or probe of this binary reads the environment (every test calls
        // region() first; the OnceLock makes the others wait).
        unsafe { std::env::set_var("MC_CXL_DEV_PATH", &path) };
        mooncake::link_all();
        path
    });
    (path, Done(path))
}

/// Counts finished tests; the last removes the region's directory.
struct Done(&'static Path);

impl Drop for Done {
    fn drop(&mut self) {
        static FINISHED: AtomicUsize = AtomicUsize::new(0);
        if FINISHED.fetch_add(1, Ordering::AcqRel) + 1 == TESTS {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn assert_clean(report: &Report) {
    let table = report.render();
    println!("{table}");
    assert!(!report.results.is_empty(), "no trials ran");
    assert_eq!(report.failed(), 0, "conformance failures:\n{table}");
    assert!(report.passed() > 0, "nothing passed:\n{table}");
}

#[test]
fn cxl_transport_conforms_with_buffers_in_the_region() {
    let _done = region();
    let opts = SuiteOptions {
        disabled: checked_in_disabled("cxl"),
        peer: Some(PeerCommand::new(env!("CARGO_BIN_EXE_mooncake-conformance"))),
        ..SuiteOptions::default()
    };
    let report = run_trials(transport_suite("cxl", &opts), None);
    assert_clean(&report);
    let outcome = |name: &str| {
        report.results.iter().find(|r| r.name == name).map(|r| r.outcome.clone()).unwrap_or_else(|| {
            panic!("{name} not in the report:\n{}", report.render());
        })
    };
    // Every case ran against a peer buffer in the region, the data cases also from region memory.
    for name in [
        "write_read_64MiB[host->cxl]",
        "unregistered_remote_range_rejected[host->cxl]",
        "peer_shutdown_reported[host->cxl]",
        "descriptor_published[host->cxl]",
        "large_batch_1024x4KiB[cxl->cxl]",
        "sync_batch_stale_range_fails_alone[cxl->cxl]",
    ] {
        assert_eq!(outcome(name), Outcome::Passed, "{name}");
    }
    for name in ["memory_pair", "memory_pair[cxl->host]"] {
        assert!(matches!(outcome(name), Outcome::Skipped(why) if why.contains("shared region")), "{name}");
    }
    assert!(
        matches!(outcome("cross_process_read_write[host->cxl]"), Outcome::Skipped(why) if why.contains("serve-peer")),
        "cross-process cases skip with the reason"
    );
}

#[test]
fn cxl_device_conforms() {
    let _done = region();
    let opts = SuiteOptions { disabled: checked_in_disabled("cxl"), ..SuiteOptions::default() };
    assert_clean(&run_trials(device_suite("cxl", &opts), None));
}

fn runner() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mooncake-conformance"))
}

#[test]
fn runner_skips_cxl_without_a_region_and_runs_it_with_one() {
    let (path, _done) = region();
    let out = runner()
        .args(["--backend", "cxl", "--kind", "transport"])
        .env_remove("MC_CXL_DEV_PATH")
        .env_remove("CXL_DEV_PATH")
        .output()
        .expect("running the runner");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SKIP  transport/cxl/probe"), "{text}");
    assert!(text.contains("MC_CXL_DEV_PATH"), "the skip names what to set:\n{text}");

    let out = runner()
        .args(["--backend", "cxl", "--kind", "transport", "--filter", "write_read_4KiB"])
        .env("MC_CXL_DEV_PATH", path)
        .output()
        .expect("running the runner");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("PASS  transport/cxl/write_read_4KiB[host->cxl]"), "{text}");
    assert!(text.contains("PASS  transport/cxl/write_read_4KiB[cxl->cxl]"), "{text}");
}
