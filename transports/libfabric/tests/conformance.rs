//! The conformance transport suite for protocol `libfabric`, once per provider (`tcp;ofi_rxm` and
//! `shm`), with peers in child processes so the cross-process cases move real data between
//! processes.
//!
//! This is a `harness = false` test: the binary is also the suite's peer executable. It runs as
//! - `conformance [libtest args]`: one libtest trial per provider, each running the suite in a
//!   child process of this binary with `MC_LIBFABRIC_PROVIDER` set (the variable every engine and
//!   every peer of that child sees);
//! - `conformance serve-peer ...`: a peer engine for the suite's cross-process cases.

use std::process::{Command, ExitCode};
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use mooncake_conformance::peer::{PeerArgs, PeerProcess};
use mooncake_conformance::{Outcome, PeerCommand, SuiteOptions, checked_in_disabled, pattern, transport_suite};

/// Providers tested, in order.
const PROVIDERS: &[&str] = &["tcp;ofi_rxm", "shm"];
/// `AF_INET` on Linux.
const AF_INET: u16 = 2;
/// Set in the child that runs one provider's suite.
const CHILD: &str = "MC_LIBFABRIC_CONFORMANCE_CHILD";

fn link() {
    mooncake::link_all();
    mooncake_transport_libfabric::link();
}

/// Tests a provider cannot pass, with the reason (printed in the table as disabled).
fn disabled(provider: &str) -> Vec<(String, String)> {
    let mut v = checked_in_disabled("libfabric");
    if provider == "shm" {
        v.push((
            "unregistered_remote_range_rejected".into(),
            "the shm provider moves RMA data with cross-memory attach and checks neither keys nor ranges at the \
             target; only the initiator's check against the published descriptor guards it, and this test uses a \
             stale descriptor on purpose"
                .into(),
        ));
        v.push((
            "cross_process_peer_killed_mid_batch".into(),
            "libfabric 1.17's shm provider posts under a pthread spinlock kept in the target's shared region, which \
             the target takes while it serves commands; a target SIGKILLed while holding it leaves it held, and \
             the next fi_read to that target spins in pthread_spin_lock forever (seen 1 of 31 runs under CPU \
             load, stack in docs/testing.md). Nothing outside the provider can release it: the same-host \
             protocol that survives killed peers is `shm`"
                .into(),
        ));
    }
    v
}

/// Runs the suite for the provider in `MC_LIBFABRIC_PROVIDER` (child side).
fn run_suite() -> ExitCode {
    let provider = std::env::var("MC_LIBFABRIC_PROVIDER").unwrap_or_default();
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot locate this test binary for peers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = SuiteOptions { peer: Some(PeerCommand::new(exe)), disabled: disabled(&provider), ..Default::default() };
    // `MC_CONFORMANCE_FILTER=NAME` runs only the cases whose name contains NAME (to repeat one).
    let filter = std::env::var("MC_CONFORMANCE_FILTER").ok();
    let trials = transport_suite("libfabric", &opts);
    let report = mooncake_conformance::run_trials_with(trials, filter.as_deref(), |r| {
        let tag = match r.outcome {
            Outcome::Passed => "PASS",
            Outcome::Skipped(_) => "SKIP",
            Outcome::Failed(_) => "FAIL",
            Outcome::Disabled(_) => "OFF ",
        };
        println!("{tag}  {}/{}/{}  ({:.0?})", r.kind, r.backend, r.name, r.elapsed);
    });
    println!("provider {provider:?}\n{}", report.render());
    if provider == "shm" {
        remove_stale_shm_regions();
    }
    let mut problems = Vec::new();
    if report.failed() > 0 {
        problems.push(format!("{} failed", report.failed()));
    }
    if report.passed() == 0 {
        problems.push("nothing passed (is the provider available? see the probe line)".into());
    }
    // Cross-process cases must have run: they are what this test is for.
    for r in report.results.iter().filter(|r| r.name.starts_with("cross_process")) {
        if !matches!(r.outcome, Outcome::Passed | Outcome::Disabled(_)) {
            problems.push(format!("{}: {:?}", r.name, r.outcome));
        }
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("libfabric conformance with provider {provider:?}: {}", problems.join("; "));
        ExitCode::FAILURE
    }
}

/// The suite SIGKILLs peers; the shm provider cannot unlink a killed process's region
/// (`/dev/shm/<pid>:<n>:<n>`, 16 MiB each). Remove those of processes that no longer exist and
/// belong to this user.
fn remove_stale_shm_regions() {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return };
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let parts: Vec<&str> = name.split(':').collect();
        let [pid, a, b] = parts[..] else { continue };
        if a.parse::<u32>().is_err() || b.parse::<u32>().is_err() {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else { continue };
        let owned = entry.metadata().is_ok_and(|m| m.uid() == me && m.is_file());
        if pid > 0 && owned && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The TCP port of the first libfabric endpoint an engine publishes (`sockaddr_in`: family in host
/// order, then the port in network order).
fn published_port(desc: &mooncake::SegmentDescriptor) -> Result<u16, String> {
    let hex = desc.fields.get("libfabric_addr").and_then(|v| v.get(0)).and_then(|v| v.as_str());
    let hex = hex.ok_or_else(|| format!("no libfabric_addr in {}", desc.to_json()))?;
    let byte = |i: usize| hex.get(2 * i..2 * i + 2).and_then(|b| u8::from_str_radix(b, 16).ok());
    match (byte(0), byte(1), byte(2), byte(3)) {
        (Some(f0), Some(f1), Some(hi), Some(lo)) if u16::from_ne_bytes([f0, f1]) == AF_INET => {
            Ok(u16::from_be_bytes([hi, lo]))
        }
        _ => Err(format!("libfabric_addr {hex} is not an IPv4 socket address")),
    }
}

/// A libfabric engine of this process on 127.0.0.1 (provider from `MC_LIBFABRIC_PROVIDER`, default
/// `tcp;ofi_rxm`).
fn local_engine() -> Result<mooncake::TransferEngine, String> {
    let config = mooncake::EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["libfabric"]);
    mooncake::TransferEngine::new(config).map_err(|e| format!("starting a libfabric engine: {e}"))
}

/// Regression: socket providers' endpoint addresses are `ip:port`, and once an endpoint of this
/// process closes, another process may bind its port. Such a peer was taken for an endpoint of
/// this process that had closed, and every transfer to it failed with "its endpoint (in this
/// process) was closed". This pins the other process's endpoint to the port this process used.
fn port_taken_by_another_process() -> Result<(), Failed> {
    let first = local_engine()?;
    let port = published_port(&first.local_descriptor())?;
    first.shutdown();
    drop(first);

    // A peer process whose libfabric endpoint must bind exactly that port.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let cmd = PeerCommand {
        program: "env".into(),
        args: vec![
            format!("FI_TCP_PORT_LOW_RANGE={port}"),
            format!("FI_TCP_PORT_HIGH_RANGE={port}"),
            "MC_LIBFABRIC_PROVIDER=tcp;ofi_rxm".into(),
            exe.display().to_string(),
        ],
    };
    let peer = PeerProcess::spawn(&cmd, &PeerArgs::new("libfabric", 65536, 31), Duration::from_secs(30))?;

    let engine = local_engine()?;
    // The address comes from a mutable borrow: the engine writes through it.
    let mut buf = vec![0u8; 65536];
    let addr = buf.as_mut_ptr() as u64;
    // SAFETY: `buf` is dropped only after the engine is shut down below, and read only after the blocking read.
    unsafe { engine.register_memory(addr, 65536, "cpu:0") }.map_err(|e| format!("registering: {e}"))?;
    let result = (|| -> Result<(), String> {
        let h = engine.open_segment(&peer.info.segment).map_err(|e| format!("opening the peer: {e}"))?;
        let seg = engine.segment(h).map_err(|e| format!("the peer's descriptor: {e}"))?;
        let peer_port = published_port(&seg.descriptor)?;
        if peer_port != port {
            return Err(format!("the peer's endpoint is on port {peer_port}, not {port}: FI_TCP_PORT_* ignored?"));
        }
        engine
            .transfer_sync(&peer.info.segment, mooncake::Opcode::Read, addr, peer.info.addr, 65536)
            .map_err(|e| format!("reading from the peer on the reused port: {e}"))?;
        if buf != pattern(31, 65536) {
            return Err("wrong bytes from the peer on the reused port".into());
        }
        Ok(())
    })();
    let _ = engine.unregister_memory(addr);
    engine.shutdown();
    result.map_err(Failed::from)
}

/// Runs one provider's suite in a child process and reports its table.
fn run_child(provider: &str) -> Result<(), Failed> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let out = Command::new(exe)
        .env(CHILD, "1")
        .env("MC_LIBFABRIC_PROVIDER", provider)
        // libfabric's psm providers install crash handlers that turn a crash into a hang.
        .env("IPATH_NO_BACKTRACE", "1")
        .env("HFI_NO_BACKTRACE", "1")
        .output()
        .map_err(|e| format!("starting the suite for {provider}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if out.status.success() {
        Ok(())
    } else {
        let tail: String = stderr.chars().rev().take(4000).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("suite for {provider} failed ({}):\n{stdout}\nstderr tail:\n{tail}", out.status).into())
    }
}

fn main() -> ExitCode {
    link();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(mooncake_conformance::peer::SUBCOMMAND) {
        // A peer of the suite (`serve-peer --protocol libfabric ...`).
        return mooncake_conformance::runner::runner_main();
    }
    if std::env::var_os(CHILD).is_some() {
        return run_suite();
    }
    let mut args = Arguments::from_args();
    // The suites start peers and measure timeouts: one provider at a time unless asked otherwise.
    args.test_threads.get_or_insert(1);
    let mut trials: Vec<Trial> = PROVIDERS
        .iter()
        .map(|p| {
            let name = format!("libfabric_conforms_{}", p.replace(';', "_"));
            Trial::test(name, move || run_child(p))
        })
        .collect();
    trials.push(Trial::test("tcp_port_of_a_closed_endpoint_taken_by_another_process", port_taken_by_another_process));
    libtest_mimic::run(&args, trials).exit_code()
}
