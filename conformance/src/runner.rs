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
    /// Connection string of a metadata service to test, as `NAME=CONN` (e.g.
    /// `etcd=etcd://10.0.0.5:2379`) or a bare CONN for every store that accepts it (repeatable).
    /// Without one the runner starts its own: an in-process HTTP server, and `etcd` / `redis-server`
    /// on free 127.0.0.1 ports when they are installed.
    #[arg(long = "metadata-conn", value_name = "[NAME=]CONN")]
    metadata_conns: Vec<String>,
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

/// Records that a transport's suite runs without the metadata service it wanted.
fn skip_without_metadata(trials: &mut Vec<Trial>, backend: &str, why: String) {
    trials.push(Trial::fixed("transport", backend, "metadata_service", Outcome::Skipped(why)));
}

fn run(cli: &Cli, disabled: &dyn Fn(&str) -> Vec<(String, String)>) -> Report {
    let wanted = |kind: &str, name: &str| {
        (cli.kinds.is_empty() || cli.kinds.iter().any(|k| k == kind))
            && (cli.backends.is_empty() || cli.backends.iter().any(|b| b == name))
    };
    let base = SuiteOptions {
        timeout: Duration::from_secs(cli.timeout.max(1)),
        peer: std::env::current_exe().ok().map(PeerCommand::new),
        ..SuiteOptions::default()
    };
    let opts_for = |name: &str| SuiteOptions { disabled: disabled(name), ..base.clone() };
    let mut services = Services::default();
    let mut trials: Vec<Trial> = Vec::new();
    for f in registry::transports() {
        if !wanted("transport", f.name) {
            continue;
        }
        let mut opts = opts_for(f.name);
        if mooncake_core::Addressing::of(f.name) == mooncake_core::Addressing::Concatenated {
            // File segments are published through a metadata service that every engine reads (not P2P): give the
            // suite the HTTP server the metadata suite uses.
            let http = registry::metadata_stores().into_iter().find(|m| m.name == "http");
            if let Some(http) = http {
                match services.conn_for(http, &cli.metadata_conns) {
                    Ok(conn) => opts.metadata_conn = conn,
                    Err(why) => skip_without_metadata(&mut trials, f.name, why),
                }
            }
        }
        trials.extend(transport_suite(f.name, &opts));
    }
    for f in registry::devices() {
        if wanted("device", f.name) {
            trials.extend(device_suite(f.name, &opts_for(f.name)));
        }
    }
    for f in registry::metadata_stores() {
        if !wanted("metadata", f.name) {
            continue;
        }
        match services.conn_for(f, &cli.metadata_conns) {
            Ok(conn) => {
                trials.extend(metadata_suite(f.name, &SuiteOptions { metadata_conn: conn, ..opts_for(f.name) }))
            }
            Err(why) => trials.push(Trial::fixed("metadata", f.name, "connect", Outcome::Skipped(why))),
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
    let _keep_services_running = services;
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

/// Metadata services the runner started itself; stopped (by PID) when dropped.
#[derive(Default)]
struct Services {
    http: Vec<mooncake::metadata_http::BackgroundServer>,
    etcd: Vec<mooncake_testkit::EtcdServer>,
    redis: Vec<mooncake_testkit::RedisServer>,
}

impl Services {
    /// The connection string to test `store` with: the user's, else one of a service started
    /// here; `Ok(None)` for stores that need none (p2p); `Err` says why the suite is skipped.
    fn conn_for(&mut self, store: &registry::MetadataFactory, given: &[String]) -> Result<Option<String>, String> {
        let named = given.iter().map(|g| split_named(g)).find(|(n, _)| *n == Some(store.name)).map(|(_, c)| c);
        let bare =
            given.iter().map(|g| split_named(g)).find(|(n, c)| n.is_none() && (store.accepts)(c)).map(|(_, c)| c);
        if let Some(conn) = named.or(bare) {
            return Ok(Some(conn.to_string()));
        }
        match store.name {
            "http" => {
                let config = mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0);
                let server = mooncake::metadata_http::HttpMetadataServer::new(config)
                    .map_err(|e| e.to_string())
                    .and_then(|s| s.spawn().map_err(|e| e.to_string()))
                    .map_err(|e| format!("could not start an HTTP metadata server: {e}"))?;
                let url = server.url();
                self.http.push(server);
                Ok(Some(url))
            }
            "etcd" => {
                let etcd = mooncake_testkit::EtcdServer::start()
                    .map_err(|e| format!("{e}; or pass --metadata-conn etcd=etcd://HOST:PORT"))?;
                let conn = etcd.conn();
                self.etcd.push(etcd);
                Ok(Some(conn))
            }
            "redis" => {
                let redis = mooncake_testkit::RedisServer::start()
                    .map_err(|e| format!("{e}; or pass --metadata-conn redis=redis://HOST:PORT"))?;
                let conn = redis.conn();
                self.redis.push(redis);
                Ok(Some(conn))
            }
            _ => Ok(None),
        }
    }
}

/// `NAME=CONN` into its parts; a string without a plain name before `=` is a bare CONN.
fn split_named(given: &str) -> (Option<&str>, &str) {
    match given.split_once('=') {
        Some((n, c)) if !n.is_empty() && n.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') => {
            (Some(n), c)
        }
        _ => (None, given),
    }
}

#[cfg(test)]
mod tests {
    use super::split_named;

    #[test]
    fn metadata_conn_arguments() {
        assert_eq!(split_named("etcd=etcd://h:1"), (Some("etcd"), "etcd://h:1"));
        assert_eq!(split_named("http://h:1/metadata"), (None, "http://h:1/metadata"));
        assert_eq!(split_named("10.0.0.1:2379"), (None, "10.0.0.1:2379"));
        assert_eq!(split_named("redis://u:p=w@h:1"), (None, "redis://u:p=w@h:1"));
    }
}
