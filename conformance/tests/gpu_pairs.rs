//! The GPU memory pairs of the Transport suite, run for real on a machine without a GPU: this binary registers
//! a test-only non-host device, `far` (`common::far::FarDevice`, of kind `MemoryKind::Cuda`, whose addresses
//! are mapped nowhere, so a CPU dereference would crash), through the registry as a GPU driver would. The
//! suite then finds a cuda device here and runs its data cases under `cuda->host`, `host->cuda` and
//! `cuda->cuda` for every transport that declares cuda memory, and the MemoryDevice suite runs its GPU cases
//! on it. Machines with real GPUs run the same pairs through the runner (`scripts/gpu-check.sh`).

mod common;

use std::sync::{Arc, LazyLock};

use common::far::FarDevice;
use mooncake_conformance::{
    MemoryPair, Outcome, Report, SuiteOptions, TrialResult, checked_in_disabled, device_suite, run_trials,
    transport_suite,
};
use mooncake_core::MemoryDevice;
use mooncake_core::registry::{Availability, DeviceFactory};

/// The one `far` device of this process: every engine and the suite see the same allocations.
static FAR: LazyLock<Arc<FarDevice>> = LazyLock::new(|| Arc::new(FarDevice::default()));

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: "far",
        summary: "test-only GPU stand-in: bytes in host vectors behind addresses mapped nowhere",
        probe: || Availability::Available,
        create: || Ok(FAR.clone() as Arc<dyn MemoryDevice>),
    }
}

fn link() {
    mooncake::link_all();
    mooncake_example_loopback::link();
}

/// The suite for `protocol` with every memory pair but host/host (which `tests/suites.rs` runs), sweeping
/// up to 4 MiB: large enough for tcp's striping (from 512 KiB) and its chunked staging, small enough for a
/// debug build.
fn gpu_pairs(protocol: &str) -> Report {
    link();
    let opts = SuiteOptions { disabled: checked_in_disabled(protocol), max_size: 4 << 20, ..SuiteOptions::default() };
    // Trial names of the non-host pairs carry the pair in brackets: `write_read_4KiB[cuda->host]`.
    let report = run_trials(transport_suite(protocol, &opts), Some("["));
    println!("{}", report.render());
    assert!(!report.results.is_empty(), "no GPU pair listed for {protocol}");
    for r in &report.results {
        match &r.outcome {
            Outcome::Passed | Outcome::Disabled(_) => {}
            Outcome::Skipped(why) => assert!(!why.trim().is_empty(), "{}: skipped without a reason", r.name),
            Outcome::Failed(why) => panic!("{}: {why}\n{}", r.name, report.render()),
        }
    }
    report
}

fn of_pair<'a>(report: &'a Report, pair: &str) -> Vec<&'a TrialResult> {
    report.results.iter().filter(|r| r.name.ends_with(&format!("[{pair}]"))).collect()
}

#[test]
fn the_far_device_is_a_cuda_device_here() {
    link();
    let devices = mooncake_core::registry::available_devices();
    assert!(devices.iter().any(|d| d.name() == "far" && d.kind() == mooncake_core::MemoryKind::Cuda));
    assert_eq!(MemoryPair::with_device(mooncake_core::MemoryKind::Cuda)[0].suffix(), "[cuda->host]");
    assert_eq!(MemoryPair::HOST.suffix(), "");
}

/// tcp stages GPU memory through the device on both ends: every pair runs, and every data case passes.
#[test]
fn tcp_moves_every_gpu_pair() {
    let report = gpu_pairs("tcp");
    for pair in ["cuda->host", "host->cuda", "cuda->cuda"] {
        let trials = of_pair(&report, pair);
        assert!(trials.len() >= 10, "{pair}: only {} trials", trials.len());
        for r in trials {
            assert_eq!(r.outcome, Outcome::Passed, "tcp {}", r.name);
        }
        for case in ["write_read_4MiB", "large_batch_1024x4KiB", "out_of_bounds_remote_rejected"] {
            let name = format!("{case}[{pair}]");
            assert!(report.results.iter().any(|r| r.name == name), "{name} did not run");
        }
    }
    assert!(FAR.copies.load(std::sync::atomic::Ordering::Relaxed) > 0, "nothing was copied through the device");
    // The kinds no device here provides are listed, skipped with the probe's reason.
    let rocm = report.results.iter().find(|r| r.name == "memory_pair[rocm->host]").expect("rocm pair listed");
    assert!(matches!(&rocm.outcome, Outcome::Skipped(why) if why.starts_with("no rocm device here")), "{rocm:?}");
}

/// shm stages local GPU memory, but publishes only host memory: the pairs with a GPU remote skip (no route),
/// with the reason; the GPU-local pair runs.
#[test]
fn shm_moves_local_gpu_memory_and_skips_gpu_remotes() {
    link();
    if !mooncake_core::registry::transport("shm").is_ok_and(|f| (f.probe)().is_available()) {
        println!("shm unavailable here; skipped");
        return;
    }
    let report = gpu_pairs("shm");
    for r in of_pair(&report, "cuda->host") {
        assert_eq!(r.outcome, Outcome::Passed, "shm {}", r.name);
    }
    for pair in ["host->cuda", "cuda->cuda"] {
        let trials = of_pair(&report, pair);
        assert!(!trials.is_empty(), "{pair} not listed");
        for r in trials {
            assert!(
                matches!(&r.outcome, Outcome::Skipped(why) if why.contains("can_reach_buffer") && why.contains("no route")),
                "shm {}: {:?}",
                r.name,
                r.outcome
            );
        }
    }
}

/// The example plugin declares host memory only: its GPU pairs are listed as skipped, saying so.
#[test]
fn loopback_skips_gpu_pairs_it_does_not_declare() {
    let report = gpu_pairs("loopback");
    let names: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["memory_pair[cuda->host]", "memory_pair[host->cuda]", "memory_pair[cuda->cuda]"]);
    for r in &report.results {
        assert!(matches!(&r.outcome, Outcome::Skipped(why) if why.contains("does not declare cuda memory")), "{r:?}");
    }
}

/// The MemoryDevice suite runs on every device that probes available, this one included, and its GPU cases
/// (exported handles, device-to-device copies) run on it.
#[test]
fn far_device_conforms() {
    link();
    let report = run_trials(device_suite("far", &SuiteOptions::default()), None);
    println!("{}", report.render());
    assert_eq!(report.failed(), 0, "{}", report.render());
    for case in ["sharing_handles", "copy_between_and_imported_handles", "copy_round_trip"] {
        let r = report.results.iter().find(|r| r.name == case).expect("case present");
        assert_eq!(r.outcome, Outcome::Passed, "{case}");
    }
}
