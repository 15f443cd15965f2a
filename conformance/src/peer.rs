//! A peer engine in a child process, for cross-process transport tests.
//!
//! The runner binary re-executes itself as
//! `mooncake-conformance serve-peer --protocol tcp --size N [--rpc-port P] [--seed S]`: the child
//! starts an engine, registers `N` bytes filled with pattern `S`, prints one JSON line
//! `{"segment":..,"addr":..,"len":..,"rpc_port":..,"pid":..}` on stdout and serves until its stdin
//! closes. Tests kill it with SIGKILL to check how a transport handles a peer that vanishes.
//!
//! Any binary that links the transport under test can serve peers: parse its arguments with
//! [`PeerArgs::parse`] and call [`serve_peer`].

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::{EngineConfig, TransferEngine, sync};
use serde::{Deserialize, Serialize};

use crate::PeerCommand;
use crate::util::{HostBuf, OrFail};

/// The hidden subcommand name.
pub const SUBCOMMAND: &str = "serve-peer";

/// Arguments of `serve-peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerArgs {
    /// Transport to install.
    pub protocol: String,
    /// Bytes to register.
    pub size: u64,
    /// Handshake port to bind (0 = any).
    pub rpc_port: u16,
    /// Pattern seed of the registered bytes.
    pub seed: u64,
    /// Metadata connection string (`P2PHANDSHAKE` by default; `http://...`, `etcd://...`, ...).
    pub metadata: String,
    /// Segment name in metadata mode (`host:port`; the port is the handshake port).
    pub name: Option<String>,
}

impl PeerArgs {
    /// A P2P peer serving `size` bytes of pattern `seed` over `protocol`.
    pub fn new(protocol: &str, size: u64, seed: u64) -> Self {
        PeerArgs { protocol: protocol.into(), size, rpc_port: 0, seed, metadata: "P2PHANDSHAKE".into(), name: None }
    }
}

impl PeerArgs {
    /// Parses `--protocol P --size N [--rpc-port P] [--seed S] [--metadata CONN --name HOST:PORT]`
    /// (the words after `serve-peer`).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, String> {
        let mut out = PeerArgs::new("", 1 << 20, 0);
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
            match flag.as_str() {
                "--protocol" => out.protocol = value,
                "--size" => out.size = num(&value)?,
                "--rpc-port" => out.rpc_port = u16::try_from(num(&value)?).map_err(|e| format!("{flag}: {e}"))?,
                "--seed" => out.seed = num(&value)?,
                "--metadata" => out.metadata = value,
                "--name" => out.name = Some(value),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if out.protocol.is_empty() {
            return Err("--protocol is required".into());
        }
        if out.size == 0 {
            return Err("--size must be at least 1".into());
        }
        Ok(out)
    }

    fn to_args(&self) -> Vec<String> {
        vec![
            SUBCOMMAND.into(),
            "--protocol".into(),
            self.protocol.clone(),
            "--size".into(),
            self.size.to_string(),
            "--rpc-port".into(),
            self.rpc_port.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--metadata".into(),
            self.metadata.clone(),
        ]
        .into_iter()
        .chain(self.name.iter().flat_map(|n| ["--name".to_string(), n.clone()]))
        .collect()
    }
}

/// The line a peer prints once it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Segment name to open.
    pub segment: String,
    /// Absolute address of the registered buffer in the child.
    pub addr: u64,
    /// Its length.
    pub len: u64,
    /// The child's handshake port.
    pub rpc_port: u16,
    /// The child's process id.
    pub pid: u32,
}

/// Serves a peer until stdin closes (the body of `serve-peer`). Prints the [`PeerInfo`] line.
pub fn serve_peer(args: &PeerArgs) -> Result<(), String> {
    let host = match (&args.name, args.rpc_port) {
        (Some(name), _) => name.clone(),
        (None, 0) => "127.0.0.1".to_string(),
        (None, port) => format!("127.0.0.1:{port}"),
    };
    let config = EngineConfig::new(host, args.metadata.as_str()).with_protocols([args.protocol.as_str()]);
    let engine = TransferEngine::new(config).or_fail("starting the peer engine")?;
    let size = usize::try_from(args.size).or_fail("buffer size")?;
    let buf = HostBuf::with_pattern(args.seed, size);
    engine.register_owned(buf.owned(), "cpu:0").or_fail("registering the peer buffer")?;
    let info = PeerInfo {
        segment: engine.local_segment_name().to_string(),
        addr: buf.addr(),
        len: buf.len(),
        rpc_port: engine.rpc_port(),
        pid: std::process::id(),
    };
    let line = serde_json::to_string(&info).or_fail("encoding the peer line")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").or_fail("printing the peer line")?;
        out.flush().or_fail("flushing stdout")?;
    }
    // Serve until the parent closes our stdin (or kills us).
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
    let _ = engine.unregister_memory(buf.addr());
    engine.shutdown();
    drop(buf);
    Ok(())
}

/// A running child peer; killed (SIGKILL) and reaped on drop.
pub struct PeerProcess {
    child: Child,
    _stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<String>>,
    /// What the child printed.
    pub info: PeerInfo,
}

impl std::fmt::Debug for PeerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerProcess").field("info", &self.info).finish_non_exhaustive()
    }
}

impl PeerProcess {
    /// Starts a child peer and waits (up to `limit`) for its line.
    pub fn spawn(cmd: &PeerCommand, args: &PeerArgs, limit: Duration) -> Result<Self, String> {
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting peer {}: {e}", cmd.program.display()))?;
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                sync::lock(&sink).push_str(&s);
            });
        }
        let stdout = child.stdout.take().ok_or("peer stdout was not captured")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
        });
        let mut peer = PeerProcess {
            child,
            _stdin: stdin,
            stderr,
            info: PeerInfo { segment: String::new(), addr: 0, len: 0, rpc_port: 0, pid: 0 },
        };
        let line = match rx.recv_timeout(limit) {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            Ok(Ok(_)) => return Err(format!("peer exited before serving; stderr: {}", peer.stderr_tail())),
            Ok(Err(e)) => return Err(format!("reading the peer line: {e}")),
            Err(_) => return Err(format!("peer did not start within {limit:?}; stderr: {}", peer.stderr_tail())),
        };
        peer.info = serde_json::from_str(line.trim()).map_err(|e| format!("peer line {line:?}: {e}"))?;
        Ok(peer)
    }

    /// Sends SIGKILL and reaps the child.
    pub fn kill(&mut self) -> Result<(), String> {
        self.child.kill().or_fail("killing the peer")?;
        self.child.wait().or_fail("reaping the peer")?;
        Ok(())
    }

    /// The end of what the child wrote to stderr (for failure messages).
    pub fn stderr_tail(&self) -> String {
        // Give the reader thread a moment to collect what a dying child wrote.
        std::thread::sleep(Duration::from_millis(20));
        let s = sync::lock(&self.stderr);
        let start = s.len().saturating_sub(2000);
        let start = (start..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
        if s.is_empty() { "(empty)".into() } else { s[start..].to_string() }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let mut a = PeerArgs { rpc_port: 15555, ..PeerArgs::new("tcp", 4096, 9) };
        assert_eq!(PeerArgs::parse(a.to_args().into_iter().skip(1)).unwrap(), a);
        a.metadata = "http://127.0.0.1:1/metadata".into();
        a.name = Some("127.0.0.1:2".into());
        let words = a.to_args();
        assert_eq!(words[0], SUBCOMMAND);
        assert_eq!(PeerArgs::parse(words.into_iter().skip(1)).unwrap(), a);
        assert!(PeerArgs::parse(["--size".to_string(), "1".to_string()]).is_err());
        assert!(PeerArgs::parse(["--protocol".to_string()]).is_err());
    }
}
