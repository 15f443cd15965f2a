//! Runs the conformance suites against the backends linked into this workspace, so `cargo test`
//! covers them: the example `loopback` plugin, `tcp` (with child-process peers from the runner
//! binary), the `host` memory device and the `p2p`, `http`, `etcd` and `redis` metadata stores
//! (against real servers started on free 127.0.0.1 ports by `mooncake-testkit`).

use mooncake_conformance::{
    Outcome, PeerCommand, Report, SuiteOptions, checked_in_disabled, device_suite, metadata_suite, run_trials,
    transport_suite,
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
    for want in [
        ("transport", "loopback"),
        ("transport", "tcp"),
        ("transport", "rdma"),
        ("transport", "shm"),
        ("transport", "libfabric"),
        ("transport", "efa"),
        ("device", "host"),
        ("metadata", "p2p"),
        ("metadata", "http"),
        ("metadata", "etcd"),
        ("metadata", "redis"),
    ] {
        assert!(names.contains(&want), "{want:?} missing from the registry: {names:?}");
    }
}

#[test]
fn loopback_transport_conforms() {
    link();
    assert_clean(&run_trials(transport_suite("loopback", &options("loopback")), None));
}

/// The GPU memory pairs a transport declares but no device here provides are listed as skipped, with the
/// device probe's reason (`tests/gpu_pairs.rs` runs them against a stand-in GPU).
fn check_gpu_pairs_listed(report: &Report) {
    for r in report.results.iter().filter(|r| r.name.contains('[')) {
        assert!(r.name.starts_with("memory_pair["), "{}: a GPU pair ran without a GPU device: {:?}", r.name, r.outcome);
    }
    for (driver, kind) in [("cuda", "cuda"), ("rocm", "rocm"), ("musa", "musa")] {
        let probe = mooncake_core::registry::devices().into_iter().find(|f| f.name == driver).map(|f| (f.probe)());
        let Some(mooncake_core::registry::Availability::Unavailable(why)) = probe else { continue };
        for pair in [format!("{kind}->host"), format!("host->{kind}"), format!("{kind}->{kind}")] {
            let name = format!("memory_pair[{pair}]");
            let r = report.results.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name} not listed"));
            let want = format!("no {kind} device here: {why}");
            assert!(
                matches!(&r.outcome, Outcome::Skipped(w) if *w == want),
                "{name}: {:?}, expected {want:?}",
                r.outcome
            );
        }
    }
}

#[test]
fn tcp_transport_conforms() {
    link();
    let report = run_trials(transport_suite("tcp", &options("tcp")), None);
    assert_clean(&report);
    check_gpu_pairs_listed(&report);
    // Host memory on both ends moves: the data cases ran (a transport that cannot reach a remote's memory
    // skips its cases; tcp reaches host memory).
    for r in report.results.iter().filter(|r| r.name.starts_with("write_read_")) {
        assert_eq!(r.outcome, Outcome::Passed, "{}", r.name);
    }
    // tcp is cross-process: the child-process cases must have run, not skipped.
    for r in report.results.iter().filter(|r| r.name.starts_with("cross_process")) {
        assert!(matches!(r.outcome, Outcome::Passed | Outcome::Disabled(_)), "{}: {:?}", r.name, r.outcome);
    }
}

#[test]
fn shm_transport_conforms() {
    link();
    let report = run_trials(transport_suite("shm", &options("shm")), None);
    assert_clean(&report);
    check_gpu_pairs_listed(&report);
    for r in report.results.iter().filter(|r| r.name.starts_with("write_read_")) {
        assert_eq!(r.outcome, Outcome::Passed, "{}", r.name);
    }
    // Same-host cross-process transfers are what shm is for: those cases must have run.
    let cross = report.results.iter().filter(|r| r.name.starts_with("cross_process")).count();
    assert!(cross >= 4, "expected 4 cross-process cases, found {cross}");
    for r in report.results.iter().filter(|r| r.name.starts_with("cross_process")) {
        assert!(matches!(r.outcome, Outcome::Passed), "{}: {:?}", r.name, r.outcome);
    }
}

/// Runs wherever an RDMA device exists; elsewhere the suite is one trial skipped with the probe's reason.
#[test]
fn rdma_transport_conforms_where_a_device_exists() {
    link();
    let report = run_trials(transport_suite("rdma", &options("rdma")), None);
    println!("{}", report.render());
    assert_eq!(report.failed(), 0, "{}", report.render());
    assert!(!report.results.is_empty());
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

fn metadata_conforms(backend: &str, conn: String) -> Report {
    link();
    let opts = SuiteOptions { metadata_conn: Some(conn), ..options(backend) };
    let report = run_trials(metadata_suite(backend, &opts), None);
    assert_clean(&report);
    // A shared service must run the cases a local store skips.
    for r in report
        .results
        .iter()
        .filter(|r| ["shared_visibility", "service_down_is_unavailable"].contains(&r.name.as_str()))
    {
        assert!(matches!(r.outcome, Outcome::Passed), "{}: {:?}", r.name, r.outcome);
    }
    report
}

#[test]
fn http_metadata_conforms() {
    let server =
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0))
            .expect("http metadata server")
            .spawn()
            .expect("http metadata server");
    metadata_conforms("http", server.url());
}

#[test]
fn etcd_metadata_conforms() {
    let etcd = mooncake_testkit::EtcdServer::start().expect("etcd");
    let report = metadata_conforms("etcd", etcd.conn());
    for r in report.results.iter().filter(|r| r.name.starts_with("lease") || r.name.starts_with("watch")) {
        assert!(matches!(r.outcome, Outcome::Passed), "{}: {:?}", r.name, r.outcome);
    }
}

#[test]
fn redis_metadata_conforms() {
    let redis = mooncake_testkit::RedisServer::start().expect("redis-server");
    metadata_conforms("redis", redis.conn());
}

#[test]
fn unknown_backend_is_one_failed_trial() {
    link();
    let report = run_trials(transport_suite("no-such-transport", &SuiteOptions::default()), None);
    assert_eq!(report.results.len(), 1);
    assert_eq!(report.failed(), 1);
}
