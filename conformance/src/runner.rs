//! The `mooncake-conformance` command line, as a library function so that a third-party plugin
//! can build the same runner with its own backend linked in (see the example plugin's README).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mooncake_core::registry;

use crate::peer::{self, PeerArgs};
use crate::{
    Outcome, PeerCommand, Report, SuiteOptions, Trial, checked_in_disabled, device_suite, metadata_suite,
    parse_disabled, run_trials_with, transport_suite,
};

/// Conformance runner for mooncake-rs backends (transports, memory devices, metadata stores).
#[derive(Debug, Parser)]
#[command(name = "mooncake-conformance", version)]
struct Cli {
    /// Only test these backends (repeatable), e.g. `--backend tcp --backend host`.
    #[arg(long = "backend", value_name = "NAME")]
    backends: Vec<String>,
    /// Only run tests whose `kind/backend/test` name contains this.
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
    /// Only run these suites (repeatable): transport, device, metadata.
    #[arg(long = "kind", value_parser = ["transport", "device", "metadata"])]
    kinds: Vec<String>,
    /// List linked backends, their probe results and disabled tests, and exit.
    #[arg(long)]
    list: bool,
    /// Seconds one test may run before it counts as hung.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Connection string for metadata stores other than p2p (e.g. `http://127.0.0.1:8080/metadata`).
    #[arg(long, value_name = "CONN")]
    metadata_conn: Option<String>,
    /// Extra disabled-tests file (lines `<backend> <test> <reason...>`), added to the checked-in list.
    #[arg(long = "disabled", value_name = "FILE")]
    disabled_files: Vec<std::path::PathBuf>,
    /// Print only the table, not one line per test.
    #[arg(long, short)]
    quiet: bool,
}

/// The runner's `main`: call it from a binary that links the backends to test (after their
/// `link()` functions). Handles the hidden `serve-peer` subcommand, `--list`, and the suites.
pub fn runner_main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(peer::SUBCOMMAND) {
        return serve_peer(args.into_iter().skip(2));
    }
    let cli = Cli::parse();
    let mut extra = String::new();
    for f in &cli.disabled_files {
        match std::fs::read_to_string(f) {
            Ok(text) => {
                extra.push_str(&text);
                extra.push('\n');
            }
            Err(e) => {
                eprintln!("mooncake-conformance: reading {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    let disabled = |backend: &str| {
        let mut v = checked_in_disabled(backend);
        v.extend(parse_disabled(&extra, backend));
        v
    };
    if cli.list {
        list(&disabled);
        return ExitCode::SUCCESS;
    }
    let report = run(&cli, &disabled);
    print!("{}", report.render());
    if report.failed() > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn serve_peer(args: impl Iterator<Item = String>) -> ExitCode {
    let r = PeerArgs::parse(args).and_then(|a| peer::serve_peer(&a));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn list(disabled: &dyn Fn(&str) -> Vec<(String, String)>) {
    let reports = registry::probe_all();
    let w = reports.iter().map(|r| r.name.len()).chain([4]).max().unwrap_or(4);
    println!("{:<9}  {:<w$}  {:<11}  SUMMARY", "KIND", "NAME", "STATUS");
    for r in reports {
        let (status, why) = match &r.availability {
            registry::Availability::Available => ("available", None),
            registry::Availability::Unavailable(why) => ("unavailable", Some(why.clone())),
        };
        println!("{:<9}  {:<w$}  {status:<11}  {}", r.kind, r.name, r.summary);
        if let Some(why) = why {
            println!("{:<9}  {:<w$}    why: {why}", "", "");
        }
        for (test, reason) in disabled(r.name) {
            println!("{:<9}  {:<w$}    disabled {test}: {reason}", "", "");
        }
    }
}

fn run(cli: &Cli, disabled: &dyn Fn(&str) -> Vec<(String, String)>) -> Report {
    let wanted = |kind: &str, name: &str| {
        (cli.kinds.is_empty() || cli.kinds.iter().any(|k| k == kind))
            && (cli.backends.is_empty() || cli.backends.iter().any(|b| b == name))
    };
    let base = SuiteOptions {
        timeout: Duration::from_secs(cli.timeout.max(1)),
        metadata_conn: cli.metadata_conn.clone(),
        peer: std::env::current_exe().ok().map(PeerCommand::new),
        ..SuiteOptions::default()
    };
    let opts_for = |name: &str| SuiteOptions { disabled: disabled(name), ..base.clone() };
    let mut trials: Vec<Trial> = Vec::new();
    for f in registry::transports() {
        if wanted("transport", f.name) {
            trials.extend(transport_suite(f.name, &opts_for(f.name)));
        }
    }
    for f in registry::devices() {
        if wanted("device", f.name) {
            trials.extend(device_suite(f.name, &opts_for(f.name)));
        }
    }
    for f in registry::metadata_stores() {
        if wanted("metadata", f.name) {
            trials.extend(metadata_suite(f.name, &opts_for(f.name)));
        }
    }
    if !cli.backends.is_empty() {
        let linked: Vec<&str> = registry::probe_all().iter().map(|r| r.name).collect();
        for b in cli.backends.iter().filter(|b| !linked.contains(&b.as_str())) {
            trials.push(Trial::fixed(
                "runner",
                b.clone(),
                "linked",
                Outcome::Failed(format!(
                    "backend {b:?} is not linked into this runner (linked: {})",
                    linked.join(", ")
                )),
            ));
        }
    }
    let quiet = cli.quiet;
    run_trials_with(trials, cli.filter.as_deref(), |r| {
        if quiet {
            return;
        }
        let tag = match r.outcome {
            Outcome::Passed => "PASS",
            Outcome::Skipped(_) => "SKIP",
            Outcome::Failed(_) => "FAIL",
            Outcome::Disabled(_) => "OFF ",
        };
        println!("{tag}  {}/{}/{}  ({:.0?})", r.kind, r.backend, r.name, r.elapsed);
    })
}
