//! `mooncake-conformance`: runs every conformance suite against every linked backend whose
//! `probe()` passes on this machine, prints a table, and exits non-zero on any failure.
//!
//! ```text
//! mooncake-conformance                      # everything linked
//! mooncake-conformance --list               # what is linked, what works here, disabled tests
//! mooncake-conformance --backend tcp --filter write_read
//! ```
//! The hidden `serve-peer` subcommand runs a peer engine for the cross-process tests.
#![forbid(unsafe_code)]

use std::process::ExitCode;

// The backends under test. Referencing them (and calling their `link`) keeps their
// `inventory` registrations in this binary.
use mooncake as _;
use mooncake_example_loopback as _;

fn main() -> ExitCode {
    mooncake::link_all();
    mooncake_example_loopback::link();
    mooncake_conformance::runner::runner_main()
}
