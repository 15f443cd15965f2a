//! A store cluster of real processes for the cluster tests: one `mooncake_master`, N `mooncake_client`
//! nodes and in-process [`StoreClient`] drivers, all on 127.0.0.1.
//!
//! Every child is owned by a [`Proc`] whose `Drop` kills it (SIGKILL) and reaps it, so nothing keeps running
//! when a test fails. Children's stderr (their logs) goes to files in a temporary directory; when a test
//! panics, the [`Cluster`]'s `Drop` prints the tail of each log. Cluster tests run one at a time
//! ([`Cluster::start`] takes a process-wide lock): they use wall-clock liveness (pings, client ttl) that
//! parallel clusters on a small machine could starve.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::ReplicateConfig;
use mooncake_testkit::free_port;

pub const MIB: u64 = 1 << 20;

/// How long a process may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound for anything time-based the tests wait for (liveness, remount, health).
pub const SETTLE: Duration = Duration::from_secs(20);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn link() {
    static LINK: Once = Once::new();
    LINK.call_once(|| {
        mooncake::link_all();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

// ---- processes -------------------------------------------------------------------------------------------

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Receiver<String>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &str, args: &[String], log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let stderr = File::create(&log).expect("creating a log file");
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", std::env::var("CLUSTER_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { name: name.to_string(), child, lines, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line starting with `prefix`; the reason otherwise (exit, timeout).
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(format!("{} exited ({status}) before it was ready", self.name));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: the process is exiting.
                    let status = self.wait_exit(Duration::from_secs(5));
                    return Err(format!("{} closed stdout before it was ready (exit: {status:?})", self.name));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("{} printed no {prefix:?} line within {timeout:?}", self.name));
            }
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (through kill(1)); the exit status, or a panic when it does not stop within `timeout`.
    pub fn sigterm(&mut self, timeout: Duration) -> ExitStatus {
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("running kill(1)");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
        self.wait_exit(timeout).unwrap_or_else(|| panic!("{} did not stop within {timeout:?} of SIGTERM", self.name))
    }

    /// The last `n` lines of the process's log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---- admin HTTP --------------------------------------------------------------------------------------------

/// `GET path` on the master's admin port: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let sock: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

// ---- the cluster -------------------------------------------------------------------------------------------

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Setup {
    pub nodes: usize,
    /// `--global_segment_size` of every node, in bytes.
    pub segment_size: u64,
    /// Extra master flags (`--client_ttl=2`, ...).
    pub master_args: Vec<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup { nodes: 3, segment_size: 32 * MIB, master_args: Vec::new() }
    }
}

/// One `mooncake_client` node.
pub struct Node {
    pub proc: Proc,
    /// Its segment name (also its transport endpoint), from the ready line.
    pub segment: String,
    pub size: u64,
}

pub struct Cluster {
    /// The default driver: tcp only, no segment.
    driver: Option<StoreClient>,
    pub nodes: Vec<Node>,
    master: Option<Proc>,
    pub rpc_addr: String,
    pub admin_addr: String,
    rpc_port: u16,
    admin_port: u16,
    master_args: Vec<String>,
    masters_started: usize,
    logs: tempfile::TempDir,
    /// Killed or stopped processes, kept for their logs.
    retired: Vec<Proc>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts the master and the nodes, waits for their ready lines and sets up the default driver.
    pub fn start(setup: Setup) -> Cluster {
        let serial = serial();
        link();
        let logs = tempfile::Builder::new().prefix("mooncake-cluster-").tempdir().expect("temp dir");
        let (rpc_port, admin_port) = (free_port(), free_port());
        let mut cluster = Cluster {
            driver: None,
            nodes: Vec::new(),
            master: None,
            rpc_addr: format!("127.0.0.1:{rpc_port}"),
            admin_addr: format!("127.0.0.1:{admin_port}"),
            rpc_port,
            admin_port,
            master_args: setup.master_args.clone(),
            masters_started: 0,
            logs,
            retired: Vec::new(),
            _serial: serial,
        };
        cluster.start_master();
        let mut starting: Vec<Proc> = (0..setup.nodes)
            .map(|i| {
                let args = vec![
                    "--host=127.0.0.1".to_string(),
                    "--port=0".into(),
                    format!("--master_server_address={}", cluster.rpc_addr),
                    format!("--global_segment_size={}", setup.segment_size),
                    "--local_buffer_size=1MB".into(),
                ];
                Proc::spawn(&format!("node{i}"), env!("CARGO_BIN_EXE_mooncake_client"), &args, cluster.logs.path())
            })
            .collect();
        for mut proc in starting.drain(..) {
            let line = proc.wait_line("mooncake_client segment ", READY_TIMEOUT).unwrap_or_else(|e| {
                let tail = proc.log_tail(20);
                panic!("{e}\n--- {} log ---\n{tail}", proc.name)
            });
            // mooncake_client segment NAME size N master ADDR
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words.len(), 7, "unexpected ready line {line:?}");
            assert_eq!(words[6], cluster.rpc_addr, "{line}");
            let size: u64 = words[4].parse().unwrap_or_else(|_| panic!("bad size in {line:?}"));
            assert_eq!(size, setup.segment_size, "{line}");
            cluster.nodes.push(Node { proc, segment: words[2].to_string(), size });
        }
        let mut names: Vec<&str> = cluster.nodes.iter().map(|n| n.segment.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), setup.nodes, "segment names must be distinct");
        cluster.wait_segments(&cluster.node_segments(), SETTLE);
        cluster.driver = Some(cluster.new_driver(false));
        cluster
    }

    /// Starts `mooncake_master` on the cluster's ports (retrying while a previous master's ports are not
    /// free yet) and waits for its ready line.
    pub fn start_master(&mut self) {
        assert!(self.master.is_none(), "a master is running");
        let mut args = vec![
            "--rpc_address=127.0.0.1".to_string(),
            format!("--rpc_port={}", self.rpc_port),
            format!("--metrics_port={}", self.admin_port),
        ];
        args.extend(self.master_args.iter().cloned());
        let deadline = Instant::now() + SETTLE;
        loop {
            self.masters_started += 1;
            let name = format!("master{}", self.masters_started);
            let mut proc = Proc::spawn(&name, env!("CARGO_BIN_EXE_mooncake_master"), &args, self.logs.path());
            match proc.wait_line("mooncake_master rpc ", READY_TIMEOUT) {
                Ok(line) => {
                    assert_eq!(line, format!("mooncake_master rpc {} admin {}", self.rpc_addr, self.admin_addr));
                    self.master = Some(proc);
                    return;
                }
                Err(e) if Instant::now() < deadline && proc.log_tail(5).contains("cannot serve") => {
                    eprintln!("master not started yet ({e}); retrying");
                    self.retired.push(proc);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    let tail = proc.log_tail(20);
                    panic!("{e}\n--- {name} log ---\n{tail}");
                }
            }
        }
    }

    /// Takes the running master out of the cluster (to stop it); it stays around for its log.
    pub fn take_master(&mut self) -> &mut Proc {
        let proc = self.master.take().expect("the master is running");
        self.retired.push(proc);
        self.retired.last_mut().expect("just pushed")
    }

    /// The default driver (tcp only, no segment).
    pub fn driver(&self) -> &StoreClient {
        self.driver.as_ref().expect("driver is set up")
    }

    /// A new in-process client without a segment: tcp only, or with the same-host transports (shm) too.
    pub fn new_driver(&self, same_host_transports: bool) -> StoreClient {
        StoreClient::setup(ClientConfig {
            local_hostname: "127.0.0.1".into(),
            metadata_server: "P2PHANDSHAKE".into(),
            protocol: "tcp".into(),
            master_server_addr: self.rpc_addr.clone(),
            global_segment_size: 0,
            local_buffer_size: 4 * MIB,
            same_host_transports,
            ..Default::default()
        })
        .expect("driver setup")
    }

    /// Node segment names, sorted.
    pub fn node_segments(&self) -> Vec<String> {
        let mut v: Vec<String> = self.nodes.iter().map(|n| n.segment.clone()).collect();
        v.sort();
        v
    }

    /// Total bytes the nodes contribute.
    pub fn capacity(&self) -> u64 {
        self.nodes.iter().map(|n| n.size).sum()
    }

    /// `/get_all_segments`, sorted; `None` when the master does not answer.
    pub fn segments(&self) -> Option<Vec<String>> {
        match http_get(&self.admin_addr, "/get_all_segments") {
            Ok((200, body)) => {
                let mut v: Vec<String> = body.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
                v.sort();
                Some(v)
            }
            _ => None,
        }
    }

    /// Polls `/get_all_segments` until it lists exactly `expected`; returns how long that took.
    pub fn wait_segments(&self, expected: &[String], timeout: Duration) -> Duration {
        let mut expected = expected.to_vec();
        expected.sort();
        let mut last = None;
        wait_until(&format!("/get_all_segments to list {expected:?}"), timeout, || {
            last = self.segments();
            last.as_deref() == Some(&expected[..])
        })
    }

    /// The `/metrics` body.
    pub fn metrics(&self) -> String {
        let (status, body) = http_get(&self.admin_addr, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// One metric's value from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let body = self.metrics();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
    }

    /// `/query_key?key=` as JSON (status, value).
    pub fn query_key(&self, key: &str) -> (u16, serde_json::Value) {
        let (status, body) = http_get(&self.admin_addr, &format!("/query_key?key={key}")).expect("GET /query_key");
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("bad JSON {body:?}: {e}")))
    }

    /// Removes node `i` from the cluster and SIGKILLs it (kept for its log). Returns its segment name.
    pub fn kill_node(&mut self, i: usize) -> String {
        let mut node = self.nodes.remove(i);
        node.proc.sigkill();
        let segment = node.segment.clone();
        self.retired.push(node.proc);
        segment
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take() {
            let _ = d.close();
        }
        let procs = self.nodes.drain(..).map(|n| n.proc).chain(self.master.take()).collect::<Vec<_>>();
        if std::thread::panicking() {
            for p in procs.iter().chain(&self.retired) {
                eprintln!("--- last lines of {} (pid {}) ---\n{}", p.name, p.pid(), p.log_tail(30));
            }
        }
        drop(procs); // kills and reaps
        self.retired.clear();
    }
}

// ---- helpers ----------------------------------------------------------------------------------------------

/// Polls `f` every 50 ms until it holds; returns how long it took, panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Runs `f` on its own thread and waits at most `limit` for it: the result and how long it took. Panics
/// (naming `what`) when `f` hangs or panics.
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => (v, start.elapsed()),
        Err(RecvTimeoutError::Timeout) => panic!("{what} did not return within {limit:?} (hang)"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// The value stored under `key`: `len` bytes of a splitmix64 stream seeded by the key's FNV-1a hash, so any
/// read can be checked against the key alone.
pub fn value_for(key: &str, len: usize) -> Vec<u8> {
    let mut state =
        key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Checks `bytes` against [`value_for`]; says where they differ.
pub fn verify(key: &str, bytes: &[u8], len: usize) -> Result<(), String> {
    if bytes.len() != len {
        return Err(format!("{key}: read {} bytes, expected {len}", bytes.len()));
    }
    let expected = value_for(key, len);
    match bytes.iter().zip(&expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => Err(format!(
            "{key}: WRONG BYTES at offset {at} of {len} (read {:#04x}, expected {:#04x})",
            bytes[at], expected[at]
        )),
    }
}

/// Places the replicas on `segments` first.
pub fn on(segments: &[&str], replicas: usize) -> ReplicateConfig {
    ReplicateConfig {
        replica_num: replicas,
        preferred_segments: segments.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `replica_num` replicas by the master's strategy.
pub fn replicas(n: usize) -> ReplicateConfig {
    ReplicateConfig { replica_num: n, ..Default::default() }
}

/// A buffer registered with a client for the zero-copy calls; unregistered on drop.
pub struct Registered {
    data: Vec<u8>,
    ptr: u64,
    client: StoreClient,
}

impl Registered {
    pub fn new(client: &StoreClient, len: usize) -> Registered {
        let mut data = vec![0xEEu8; len];
        let ptr = data.as_mut_ptr() as u64;
        // SAFETY: `data` is never resized and lives in the returned value, whose Drop unregisters it first; the
        // tests read and write it only between the client's calls.
        unsafe { client.register_buffer(ptr, len as u64) }.expect("register_buffer");
        Registered { data, ptr, client: client.clone() }
    }

    pub fn at(&self, offset: usize) -> u64 {
        self.ptr + offset as u64
    }

    pub fn read(&self, offset: usize, len: usize) -> &[u8] {
        &self.data[offset..offset + len]
    }

    pub fn fill(&mut self, byte: u8) {
        self.data.fill(byte);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = self.client.unregister_buffer(self.ptr);
    }
}
