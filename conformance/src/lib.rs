//! Conformance suites for the three backend traits of mooncake-rs, and the pieces of the
//! `mooncake-conformance` runner.
//!
//! Modelled on OpenDAL's behavior tests: every suite is a list of named test functions, each
//! gated on what the backend declares ([`mooncake_core::Capabilities`],
//! [`mooncake_core::DeviceCapabilities`], [`mooncake_core::MetadataCapabilities`]). A gate that
//! does not hold turns the test into a skip with the reason; sizes are swept from the declared
//! limits. Every test returns pass, skip or fail; panics are caught and hangs are cut off by a
//! per-test timeout, so one broken backend never takes the run down.
//!
//! ```no_run
//! use mooncake_conformance::{run_trials, transport_suite, SuiteOptions};
//! // (the backends under test must be linked into this binary, e.g. `use my_plugin as _;`)
//! let trials = transport_suite("loopback", &SuiteOptions::default());
//! let report = run_trials(trials, None);
//! print!("{}", report.render());
//! assert_eq!(report.failed(), 0);
//! ```
//!
//! Suites: [`transport_suite`] (two engines in one process, plus a peer in a child process for
//! cross-process transports, see [`peer`]; its data cases run under every [`MemoryPair`] of host and
//! device memory that can run here), [`device_suite`], [`metadata_suite`]. A backend may
//! check in disabled tests with a reason ([`SuiteOptions::disabled`], [`checked_in_disabled`]).
#![forbid(unsafe_code)]

mod buffer;
mod device;
mod metadata;
pub mod peer;
mod report;
pub mod runner;
mod transport;
mod util;

pub use util::{pattern, pattern_byte};

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use device::device_suite;
pub use metadata::metadata_suite;
pub use report::Report;
pub use transport::{MemoryPair, kind_name, size_sweep, transport_suite};

/// What one test ended as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything checked held.
    Passed,
    /// Not applicable to this backend (a capability gate), with the reason.
    Skipped(String),
    /// A check failed, the test panicked or hung; the message says what.
    Failed(String),
    /// The backend disabled this test on purpose, with the reason.
    Disabled(String),
}

/// What a test body returns: `Ok(Outcome::Passed)`, `Ok(Outcome::Skipped(..))`, or `Err(message)`.
pub type TestResult = std::result::Result<Outcome, String>;

/// One named test bound to one backend, ready to run.
pub struct Trial {
    /// `transport`, `device` or `metadata`.
    pub kind: &'static str,
    /// Backend name (protocol, device driver or metadata store).
    pub backend: String,
    /// Test name, unique within the suite.
    pub name: String,
    /// How long the body may run before it counts as hung.
    pub timeout: Duration,
    body: Body,
}

enum Body {
    Run(Box<dyn FnOnce() -> TestResult + Send + 'static>),
    Fixed(Outcome),
}

impl std::fmt::Debug for Trial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trial")
            .field("kind", &self.kind)
            .field("backend", &self.backend)
            .field("name", &self.name)
            .finish()
    }
}

impl Trial {
    /// A trial that runs `body`.
    pub fn new(
        kind: &'static str,
        backend: impl Into<String>,
        name: impl Into<String>,
        timeout: Duration,
        body: impl FnOnce() -> TestResult + Send + 'static,
    ) -> Self {
        Trial { kind, backend: backend.into(), name: name.into(), timeout, body: Body::Run(Box::new(body)) }
    }

    /// A trial whose outcome is known without running anything (a capability skip, a disabled test).
    pub fn fixed(kind: &'static str, backend: impl Into<String>, name: impl Into<String>, outcome: Outcome) -> Self {
        Trial { kind, backend: backend.into(), name: name.into(), timeout: Duration::ZERO, body: Body::Fixed(outcome) }
    }

    /// `kind/backend/name`, what `--filter` matches against.
    pub fn full_name(&self) -> String {
        format!("{}/{}/{}", self.kind, self.backend, self.name)
    }

    /// Runs the body on its own thread: panics become failures, and a body still running after
    /// [`Trial::timeout`] is reported as hung (its thread is left behind).
    pub fn run(self) -> TrialResult {
        let started = Instant::now();
        let outcome = match self.body {
            Body::Fixed(o) => o,
            Body::Run(body) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let spawned = std::thread::Builder::new().name(format!("trial-{}", self.name)).spawn(move || {
                    let r = std::panic::catch_unwind(AssertUnwindSafe(body));
                    let _ = tx.send(r);
                });
                match spawned {
                    Err(e) => Outcome::Failed(format!("could not start the test thread: {e}")),
                    Ok(_) => match rx.recv_timeout(self.timeout) {
                        Ok(Ok(Ok(o))) => o,
                        Ok(Ok(Err(msg))) => Outcome::Failed(msg),
                        Ok(Err(payload)) => Outcome::Failed(format!("panicked: {}", panic_message(&payload))),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Outcome::Failed(format!(
                            "did not finish within {:?}: hung (the test thread was abandoned)",
                            self.timeout
                        )),
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            Outcome::Failed("the test thread died without a result".into())
                        }
                    },
                }
            }
        };
        TrialResult { kind: self.kind, backend: self.backend, name: self.name, outcome, elapsed: started.elapsed() }
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// The outcome of one trial.
#[derive(Debug, Clone)]
pub struct TrialResult {
    /// `transport`, `device` or `metadata`.
    pub kind: &'static str,
    /// Backend name.
    pub backend: String,
    /// Test name.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// Wall time (informational only; nothing asserts on it).
    pub elapsed: Duration,
}

/// Runs trials one after another (some kill child processes or bind fixed ports), keeping those
/// whose [`Trial::full_name`] contains `filter`.
pub fn run_trials(trials: Vec<Trial>, filter: Option<&str>) -> Report {
    run_trials_with(trials, filter, |_| {})
}

/// Like [`run_trials`], calling `progress` after each trial (the runner prints a line).
pub fn run_trials_with(trials: Vec<Trial>, filter: Option<&str>, mut progress: impl FnMut(&TrialResult)) -> Report {
    let mut results = Vec::new();
    for t in trials {
        if filter.is_some_and(|f| !t.full_name().contains(f)) {
            continue;
        }
        let r = t.run();
        progress(&r);
        results.push(r);
    }
    Report { results }
}

/// How to start a peer engine in a child process (see [`peer`]).
#[derive(Debug, Clone)]
pub struct PeerCommand {
    /// Executable that understands the `serve-peer` subcommand (the runner binary does).
    pub program: PathBuf,
    /// Arguments placed before `serve-peer`.
    pub args: Vec<String>,
}

impl PeerCommand {
    /// The `mooncake-conformance` runner binary at `program`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        PeerCommand { program: program.into(), args: Vec::new() }
    }
}

/// Options shared by all suites.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Starts cross-process peers; without it, cross-process tests skip with a reason.
    pub peer: Option<PeerCommand>,
    /// Tests this backend disables on purpose: `(test name, reason)`.
    pub disabled: Vec<(String, String)>,
    /// Per-test limit after which a test counts as hung.
    pub timeout: Duration,
    /// Largest request size the sweeps use (also capped by the backend's `max_request_size`).
    pub max_size: u64,
    /// Connection string for metadata stores (`P2PHANDSHAKE`, `http://...`).
    pub metadata_conn: Option<String>,
    /// The (local, remote) memory kinds the transport suite runs its data cases under. `None` (the default):
    /// host/host, and for every non-host memory device available here the pairs `gpu->host`, `host->gpu` and
    /// `gpu->gpu` of each transport that declares that kind (see [`MemoryPair`]).
    pub memory_pairs: Option<Vec<MemoryPair>>,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            peer: None,
            disabled: Vec::new(),
            timeout: Duration::from_secs(120),
            max_size: 64 << 20,
            metadata_conn: None,
            memory_pairs: None,
        }
    }
}

impl SuiteOptions {
    /// Adds disabled tests: `(test name, reason)`.
    pub fn disable<'a>(mut self, tests: impl IntoIterator<Item = &'a (&'a str, &'a str)>) -> Self {
        self.disabled.extend(tests.into_iter().map(|(t, r)| (t.to_string(), r.to_string())));
        self
    }

    /// Uses `peer` to start cross-process peers.
    pub fn with_peer(mut self, peer: PeerCommand) -> Self {
        self.peer = Some(peer);
        self
    }

    pub(crate) fn disabled_reason(&self, test: &str) -> Option<&str> {
        self.disabled.iter().find(|(t, _)| t == test).map(|(_, r)| r.as_str())
    }
}

/// The checked-in list of disabled tests (`conformance/disabled.txt`): lines
/// `<backend> <test> <reason...>`; `#` starts a comment.
pub const DISABLED_FILE: &str = include_str!("../disabled.txt");

/// Entries of [`DISABLED_FILE`] for `backend`, as `(test, reason)`.
pub fn checked_in_disabled(backend: &str) -> Vec<(String, String)> {
    parse_disabled(DISABLED_FILE, backend)
}

/// Parses a disabled-tests list (format of [`DISABLED_FILE`]) for `backend`.
pub fn parse_disabled(text: &str, backend: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| l.split_once('#').map_or(l, |(a, _)| a).trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut it = l.splitn(3, char::is_whitespace);
            let (b, t) = (it.next()?, it.next()?);
            let reason = it.next().unwrap_or("").trim();
            (b == backend || b == "*")
                .then(|| (t.to_string(), if reason.is_empty() { "no reason given".into() } else { reason.to_string() }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trials_catch_panics_and_hangs() {
        let t = Trial::new("transport", "x", "panics", Duration::from_secs(10), || panic!("boom"));
        assert_eq!(t.run().outcome, Outcome::Failed("panicked: boom".into()));
        let t = Trial::new("transport", "x", "hangs", Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(2));
            Ok(Outcome::Passed)
        });
        assert!(matches!(t.run().outcome, Outcome::Failed(m) if m.contains("hung")));
        let t = Trial::new("transport", "x", "fails", Duration::from_secs(10), || Err("nope".into()));
        assert_eq!(t.run().outcome, Outcome::Failed("nope".into()));
    }

    #[test]
    fn disabled_lists_parse() {
        let text = "# comment\nloopback some_test  because reasons # trailing\n* all_test  everyone\ntcp other\n";
        assert_eq!(
            parse_disabled(text, "loopback"),
            vec![
                ("some_test".to_string(), "because reasons".to_string()),
                ("all_test".to_string(), "everyone".to_string())
            ]
        );
        assert_eq!(parse_disabled(text, "tcp")[1], ("other".to_string(), "no reason given".to_string()));
    }

    #[test]
    fn filter_selects_by_full_name() {
        let trials = vec![
            Trial::fixed("transport", "a", "one", Outcome::Passed),
            Trial::fixed("device", "b", "two", Outcome::Skipped("why".into())),
        ];
        let r = run_trials(trials, Some("device/"));
        assert_eq!(r.results.len(), 1);
        assert_eq!(r.results[0].name, "two");
    }
}
