//! The transport conformance suite on `shm`, with cross-process peers.
//!
//! This test has its own `main` (`harness = false`): started as `<exe> serve-peer ...` it is the
//! child-process peer engine the suite spawns (so the peer links shm without a runner binary that
//! knows about it); started by `cargo test` it runs the suite and fails on any failed case. The
//! cross-process cases (a read/write round trip, a peer killed before a post and in the middle of a
//! batch, a peer restarted on the same port) must run, not skip.

use std::process::ExitCode;

use mooncake_conformance::{Outcome, PeerCommand, SuiteOptions, checked_in_disabled, run_trials_with, transport_suite};
use mooncake_core::{EngineConfig, Opcode, TransferEngine};

type Check = fn() -> Result<String, String>;

const TESTS: [(&str, Check); 2] =
    [("shm_transport_conforms", conforms), ("engine_routes_same_host_peers", prefers_shm)];

fn main() -> ExitCode {
    mooncake::link_all();
    mooncake_transport_shm::link();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(mooncake_conformance::peer::SUBCOMMAND) {
        // The child peer: `runner_main` handles `serve-peer`.
        return mooncake_conformance::runner::runner_main();
    }
    // libtest-style options a test runner may pass: `--list` (nextest discovery), name filters.
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for (name, _) in TESTS {
                println!("{name}: test");
            }
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut failed = 0;
    for (name, check) in TESTS {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match check() {
            Ok(out) => println!("{out}\ntest {name} ... ok"),
            Err(why) => {
                eprintln!("{why}\ntest {name} ... FAILED");
                failed += 1;
            }
        }
    }
    if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn conforms() -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating this test executable: {e}"))?;
    let opts =
        SuiteOptions { disabled: checked_in_disabled("shm"), peer: Some(PeerCommand::new(exe)), ..Default::default() };
    let report = run_trials_with(transport_suite("shm", &opts), None, |r| {
        let tag = match r.outcome {
            Outcome::Passed => "PASS",
            Outcome::Skipped(_) => "SKIP",
            Outcome::Failed(_) => "FAIL",
            Outcome::Disabled(_) => "OFF ",
        };
        println!("{tag}  {}/{}/{}  ({:.0?})", r.kind, r.backend, r.name, r.elapsed);
    });
    let table = report.render();
    if report.results.is_empty() || report.passed() == 0 {
        return Err(format!("nothing ran or nothing passed:\n{table}"));
    }
    if report.failed() > 0 {
        return Err(format!("{} conformance failures:\n{table}", report.failed()));
    }
    // Same-host cross-process transfers are what shm is for: those cases must have run.
    let cross: Vec<_> = report.results.iter().filter(|r| r.name.starts_with("cross_process")).collect();
    if cross.len() < 4 {
        return Err(format!("expected 4 cross-process cases, found {}:\n{table}", cross.len()));
    }
    for r in cross {
        if !matches!(r.outcome, Outcome::Passed | Outcome::Disabled(_)) {
            return Err(format!("{}: {:?} (cross-process cases must run)\n{table}", r.name, r.outcome));
        }
    }
    Ok(table)
}

/// Two engines offering tcp and shm on this host: the engine's cost model must pick shm. shm is
/// the one of the two that requires registered local memory, which makes the choice observable.
fn prefers_shm() -> Result<String, String> {
    let engine = |protocols: [&str; 2]| {
        TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(protocols))
            .map_err(|e| format!("starting an engine with {protocols:?}: {e}"))
    };
    let a = engine(["tcp", "shm"])?;
    let b = engine(["tcp", "shm"])?;
    let mut local = vec![7u8; 8192];
    let mut remote = vec![0u8; 4096];
    let (l, r) = (local.as_mut_ptr() as u64, remote.as_mut_ptr() as u64);
    let result = (|| {
        a.register_memory(l, 4096, "cpu:0").map_err(|e| format!("registering: {e}"))?;
        b.register_memory(r, 4096, "cpu:0").map_err(|e| format!("registering: {e}"))?;
        let peer = b.local_segment_name().to_string();
        a.transfer_sync(&peer, Opcode::Write, l, r, 4096).map_err(|e| format!("write to a same-host peer: {e}"))?;
        if remote.iter().any(|x| *x != 7) {
            return Err("the write did not arrive".to_string());
        }
        // The second half of `local` is not registered: shm cannot send it, so the engine routes
        // that request to tcp, which can.
        local[4096..].fill(9);
        a.transfer_sync(&peer, Opcode::Write, l + 4096, r, 4096)
            .map_err(|e| format!("unregistered source to a same-host peer did not fall back to tcp: {e}"))?;
        if remote.iter().any(|x| *x != 9) {
            return Err("the write from unregistered memory did not arrive".to_string());
        }
        Ok("same-host peer offering tcp and shm: registered memory and a tcp fallback both work".to_string())
    })();
    let _ = a.unregister_memory(l);
    let _ = b.unregister_memory(r);
    a.shutdown();
    b.shutdown();
    result
}
