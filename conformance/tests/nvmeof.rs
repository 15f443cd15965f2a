//! The Transport suite against `nvmeof` file segments: files on /tmp (ext4, O_DIRECT) published through an
//! HTTP metadata server on 127.0.0.1; cases that need a live peer engine are skipped with the reason.

use mooncake_conformance::{Outcome, SuiteOptions, checked_in_disabled, run_trials, transport_suite};

#[test]
fn nvmeof_transport_conforms() {
    mooncake::link_all();
    let server =
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0))
            .expect("http metadata server")
            .spawn()
            .expect("http metadata server");
    let opts = SuiteOptions {
        disabled: checked_in_disabled("nvmeof"),
        metadata_conn: Some(server.url()),
        ..SuiteOptions::default()
    };
    let report = run_trials(transport_suite("nvmeof", &opts), None);
    let table = report.render();
    println!("{table}");
    assert_eq!(report.failed(), 0, "conformance failures:\n{table}");
    // The data cases ran (files reached), and the live-peer cases say why they skip.
    for r in &report.results {
        let data = ["write_read_", "large_batch", "mixed_size_batch", "sync_batch_per_request", "out_of_bounds"]
            .iter()
            .any(|p| r.name.starts_with(p))
            && !r.name.contains('[');
        if data {
            assert_eq!(r.outcome, Outcome::Passed, "{}", r.name);
        }
        if r.name.starts_with("cross_process") || r.name == "notifications" || r.name == "peer_shutdown_reported" {
            assert!(
                matches!(&r.outcome, Outcome::Skipped(why) if why.contains("no peer engine serves them")),
                "{}: {:?}",
                r.name,
                r.outcome
            );
        }
    }
    assert!(report.passed() >= 20, "{table}");
}

/// Without a shared metadata service the data cases skip, saying what is missing.
#[test]
fn nvmeof_without_metadata_service_skips_with_the_reason() {
    mooncake::link_all();
    let report = run_trials(transport_suite("nvmeof", &SuiteOptions::default()), Some("write_read_4KiB"));
    assert_eq!(report.results.len(), 1);
    assert!(
        matches!(&report.results[0].outcome, Outcome::Skipped(why) if why.contains("metadata_conn")),
        "{:?}",
        report.results[0].outcome
    );
}
