//! Test support shared by the metadata plugins, the conformance runner and the end-to-end tests:
//! real `etcd` and `redis-server` processes on free 127.0.0.1 ports.
//!
//! Each server is a child process owned by its guard: dropping the guard kills it by PID and
//! waits for it, so a test leaves nothing running even when it fails. [`EtcdServer::restart`]
//! and [`RedisServer::restart`] bring the same server back on the same port (for tests of
//! clients surviving a metadata-service restart).
//!
//! The binaries come from Debian's `etcd-server` and `redis-server` packages
//! (`scripts/install-deps.sh` installs them); a missing binary is an error naming the package.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where [`free_port`] looks: above the engines' handshake ports (`MC_MIN_RPC_PORT`..`MC_MAX_RPC_PORT`,
/// 15000..17000 by default) and below the kernel's ephemeral range (`ip_local_port_range`, from 32768 by
/// default), so that nothing else takes the port on its own between the test choosing it and its server
/// binding it.
const QUIET_PORTS: std::ops::Range<u16> = 20000..32768;

/// Ports [`free_port`] has handed out in this process (never handed out twice).
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// A port on 127.0.0.1 that nothing listens on, for a server a test is about to start.
///
/// A port the OS picks (`bind(0)`) comes from the ephemeral range, where any outgoing connection of any
/// process may take it as its local port before the server binds it: etcd then exits at start-up with
/// "address already in use". This one comes from [`QUIET_PORTS`] instead (below the ephemeral range), is
/// checked bindable, and is not handed out twice by this process.
pub fn free_port() -> u16 {
    let end = QUIET_PORTS.end.min(ephemeral_start());
    if end <= QUIET_PORTS.start + 100 {
        // A machine whose ephemeral range covers the quiet ports: let the OS pick.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
    }
    let span = u32::from(end - QUIET_PORTS.start);
    let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), std::process::id());
    let mut handed = mooncake_core::sync::lock(&HANDED_OUT);
    for i in 0..span {
        let port = QUIET_PORTS.start + ((seed as u32).wrapping_add(i.wrapping_mul(7919)) % span) as u16;
        if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.push(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {}..{end}", QUIET_PORTS.start);
}

/// Full path of `program` on `PATH`, if it is installed.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn require(program: &str, package: &str) -> Result<PathBuf, String> {
    which(program).ok_or_else(|| {
        format!("`{program}` is not installed: apt-get install {package} (scripts/install-deps.sh does it)")
    })
}

/// Sends `request` to `port` and returns what came back before the server closed or paused.
fn ask(port: u16, request: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(b"\r\n") && !got.starts_with(b"HTTP") {
            break;
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

fn wait_until(child: &mut Child, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited during start-up ({status}); see its log"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} was not ready after {READY_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A real etcd server on 127.0.0.1 with its own data directory.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    data_dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd on free ports and waits until `/health` reports healthy.
    pub fn start() -> Result<Self, String> {
        require("etcd", "etcd-server")?;
        let data_dir = tempfile::tempdir().map_err(|e| format!("temp dir for etcd: {e}"))?;
        let mut s = EtcdServer { child: None, client_port: free_port(), peer_port: free_port(), data_dir };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.data_dir.path().join("etcd.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new("etcd")
            .arg("--name")
            .arg("testkit")
            .arg("--data-dir")
            .arg(self.data_dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("testkit={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting etcd: {e}"))?;
        let port = self.client_port;
        let ready = wait_until(&mut child, "etcd", || {
            ask(port, b"GET /health HTTP/1.0\r\n\r\n").is_some_and(|r| r.contains("\"health\":\"true\""))
        });
        self.child = Some(child);
        ready.map_err(|e| format!("{e} ({})", self.data_dir.path().join("etcd.log").display()))
    }

    /// `127.0.0.1:PORT` of the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Connection string `etcd://127.0.0.1:PORT`.
    pub fn conn(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// PID of the running server (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL); its data stays for [`EtcdServer::restart`].
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }

    /// Starts the server again on the same ports. With `wipe` the data directory is emptied
    /// first, so every key is gone (a replacement server rather than a restarted one).
    pub fn restart(&mut self, wipe: bool) -> Result<(), String> {
        self.stop();
        if wipe {
            let _ = std::fs::remove_dir_all(self.data_dir.path().join("data"));
        }
        self.spawn()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real redis server on 127.0.0.1 without persistence.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING.
    pub fn start() -> Result<Self, String> {
        Self::start_with_password(None)
    }

    /// Starts redis-server requiring `password` for the default user (`requirepass`).
    pub fn start_with_password(password: Option<&str>) -> Result<Self, String> {
        require("redis-server", "redis-server")?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir for redis: {e}"))?;
        let mut s = RedisServer { child: None, port: free_port(), password: password.map(str::to_string), dir };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting redis-server: {e}"))?;
        let port = self.port;
        // An unauthenticated PING gets +PONG, or -NOAUTH once a password is required: both mean ready.
        let ready = wait_until(&mut child, "redis-server", || {
            ask(port, b"PING\r\n").is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
        });
        self.child = Some(child);
        ready.map_err(|e| format!("{e} ({})", self.dir.path().join("redis.log").display()))
    }

    /// Connection string `redis://127.0.0.1:PORT`.
    pub fn conn(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the running server (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL). Without persistence every key is lost.
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }

    /// Starts the server again on the same port (empty).
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_outside_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        for &p in &ports {
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
            assert!(p < ephemeral_start() || ephemeral_start() <= QUIET_PORTS.start + 100, "{p} is an ephemeral port");
        }
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
    }

    #[test]
    fn etcd_starts_restarts_and_stops() {
        let mut etcd = EtcdServer::start().unwrap();
        let pid = etcd.pid().unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        etcd.restart(true).unwrap();
        assert!(ask(etcd.port(), b"GET /health HTTP/1.0\r\n\r\n").unwrap().contains("true"));
        let pid2 = etcd.pid().unwrap();
        drop(etcd);
        for p in [pid, pid2] {
            assert!(!std::path::Path::new(&format!("/proc/{p}")).exists(), "etcd {p} still running");
        }
    }

    #[test]
    fn redis_starts_and_stops() {
        let mut r = RedisServer::start().unwrap();
        assert!(ask(r.port(), b"PING\r\n").unwrap().starts_with("+PONG"));
        r.restart().unwrap();
        let pid = r.pid().unwrap();
        drop(r);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        let secured = RedisServer::start_with_password(Some("s3cret")).unwrap();
        assert!(ask(secured.port(), b"PING\r\n").unwrap().starts_with("-NOAUTH"));
    }
}
