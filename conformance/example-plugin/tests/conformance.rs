//! The plugin passes the shared Transport suite: this is all a third-party plugin needs to test.

use mooncake_conformance::{Outcome, SuiteOptions, run_trials, transport_suite};

#[test]
fn loopback_passes_the_transport_suite() {
    // A test binary is a final binary: reference every crate whose registration it needs.
    mooncake_example_loopback::link(); // the transport under test
    mooncake_metadata_p2p::link(); // P2PHANDSHAKE: every TransferEngine needs the peer RPC
    mooncake_device_host::link(); // classifies host memory

    // Tests this plugin disables on purpose would go here as (test name, reason).
    let disabled: &[(&str, &str)] = &[];
    let opts = SuiteOptions::default().disable(disabled);
    let report = run_trials(transport_suite(mooncake_example_loopback::NAME, &opts), None);
    let table = report.render();
    println!("{table}");
    assert_eq!(report.failed(), 0, "{table}");
    // An in-process transport: the cross-process cases skip, with the reason.
    let cross = report.results.iter().find(|r| r.name == "cross_process_read_write").expect("case present");
    assert!(matches!(&cross.outcome, Outcome::Skipped(why) if why.contains("cross_process")), "{:?}", cross.outcome);
}
