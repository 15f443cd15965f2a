//! Runs the conformance suites against the backends linked into this workspace, so `cargo test`
//! covers them: the example `loopback` plugin, `tcp` (with child-process peers from the runner
//! binary), the `host` memory device and the `p2p` metadata store.

use mooncake_conformance::{
    PeerCommand, Report, SuiteOptions, checked_in_disabled, device_suite, metadata_suite, run_trials, transport_suite,
};

fn link() {
    mooncake::link_all();
    mooncake_example_loopback::link();
}

fn options(backend: &str) -> SuiteOptions {
    SuiteOptions {
        disabled: checked_in_disabled(backend),
        peer: Some(PeerCommand::new(env!("CARGO_BIN_EXE_mooncake-conformance"))),
        ..SuiteOptions::default()
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
fn every_backend_is_registered() {
    link();
    let names: Vec<_> = mooncake_core::registry::probe_all().iter().map(|r| (r.kind, r.name)).collect();
    for want in [("transport", "loopback"), ("transport", "tcp"), ("device", "host"), ("metadata", "p2p")] {
        assert!(names.contains(&want), "{want:?} missing from the registry: {names:?}");
    }
}

#[test]
fn loopback_transport_conforms() {
    link();
    assert_clean(&run_trials(transport_suite("loopback", &options("loopback")), None));
}

#[test]
fn tcp_transport_conforms() {
    link();
    let report = run_trials(transport_suite("tcp", &options("tcp")), None);
    assert_clean(&report);
    // tcp is cross-process: the child-process cases must have run, not skipped.
    for r in report.results.iter().filter(|r| r.name.starts_with("cross_process")) {
        assert!(
            matches!(r.outcome, mooncake_conformance::Outcome::Passed | mooncake_conformance::Outcome::Disabled(_)),
            "{}: {:?}",
            r.name,
            r.outcome
        );
    }
}

#[test]
fn host_device_conforms() {
    link();
    assert_clean(&run_trials(device_suite("host", &options("host")), None));
}

#[test]
fn p2p_metadata_conforms() {
    link();
    assert_clean(&run_trials(metadata_suite("p2p", &options("p2p")), None));
}

#[test]
fn unknown_backend_is_one_failed_trial() {
    link();
    let report = run_trials(transport_suite("no-such-transport", &SuiteOptions::default()), None);
    assert_eq!(report.results.len(), 1);
    assert_eq!(report.failed(), 1);
}
