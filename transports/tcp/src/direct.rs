//! The caller-thread path for small blocking requests: the calling thread writes the requests
//! and polls for the answers itself on a pooled blocking connection, so a sync 4 KiB transfer
//! costs one wake-up (the server's) instead of three. A batch of small requests with one opcode
//! is pipelined on one connection: every request is written at once, then the answers are read
//! in order (one opcode, so one side only ever sends small frames: requests for reads, status
//! words for writes, and neither can fill the socket buffers while the other waits).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_core::{BlockingRequest, Error, LocalRange, Opcode, Result, sync};
use mooncake_raw::Span;

use crate::client::PeerInfo;
use crate::wire::{self, Header};

/// Largest request that takes this path; larger ones are striped over lanes instead.
pub(crate) const DIRECT_MAX: u64 = 64 << 10;
/// Most requests one pipelined batch may hold.
pub(crate) const BATCH_MAX_REQUESTS: usize = 256;
/// Most bytes one pipelined batch may move; larger batches go over the lanes (several connections).
pub(crate) const BATCH_MAX_BYTES: u64 = 1 << 20;
/// Idle connections kept per peer.
const IDLE_PER_PEER: usize = 8;
/// How long the caller polls the socket before sleeping in the kernel.
const SPIN: Duration = Duration::from_micros(200);

/// One request on this path (host memory only: the caller sends device memory over the lanes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub op: Opcode,
    /// The local range with its proof; the call borrows it until the bytes moved.
    pub local: &'a LocalRange,
    pub remote: u64,
}

/// Idle blocking connections by peer.
#[derive(Default)]
pub(crate) struct DirectPool {
    idle: Mutex<HashMap<PeerInfo, Vec<TcpStream>>>,
}

impl DirectPool {
    fn take(&self, info: &PeerInfo) -> Option<TcpStream> {
        sync::lock(&self.idle).get_mut(info).and_then(Vec::pop)
    }

    fn put(&self, info: &PeerInfo, s: TcpStream) {
        let mut idle = sync::lock(&self.idle);
        let v = idle.entry(info.clone()).or_default();
        if v.len() < IDLE_PER_PEER {
            v.push(s);
        }
    }

    /// Drops the idle connections of a segment.
    pub(crate) fn forget(&self, name: &str) {
        sync::lock(&self.idle).retain(|k, _| k.name != name);
    }

    /// Drops every idle connection.
    pub(crate) fn clear(&self) {
        sync::lock(&self.idle).clear();
    }

    /// Runs one request; retries once on a fresh connection when a pooled one turns out dead
    /// before any answer byte arrived (the peer restarted or closed it while idle).
    pub(crate) fn transfer(
        &self,
        info: &PeerInfo,
        req: Request<'_>,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<u64> {
        let len = req.local.len();
        let deadline = Instant::now() + timeout;
        // Timeouts below report the remaining time (zero); callers want the bound that ran out.
        let bound = |e: Error| if matches!(e, Error::Timeout(_)) { Error::Timeout(timeout) } else { e };
        if let Some(s) = self.take(info) {
            match exchange(&s, info, req, deadline) {
                Ok(()) => {
                    self.put(info, s);
                    return Ok(len);
                }
                Err(Failure::BeforeAnswer(_)) => {} // stale pooled connection: try a fresh one
                Err(Failure::Rejected(e)) => return Err(e),
                Err(Failure::After(e)) => return Err(bound(e)),
            }
        }
        let s = connect(info, connect_timeout.min(timeout))?;
        match exchange(&s, info, req, deadline) {
            Ok(()) => {
                self.put(info, s);
                Ok(len)
            }
            Err(Failure::BeforeAnswer(e) | Failure::After(e) | Failure::Rejected(e)) => Err(bound(e)),
        }
    }
}

impl DirectPool {
    /// Runs `requests` (one opcode, each at most [`DIRECT_MAX`]) pipelined on one connection; one
    /// result per request. Requests left unanswered when a pooled connection turns out dead, or
    /// when the connection fails part-way, are sent again once on a fresh connection (a transfer
    /// moves the same bytes when repeated).
    pub(crate) fn transfer_many(
        &self,
        info: &PeerInfo,
        op: Opcode,
        requests: &[BlockingRequest],
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Vec<Result<u64>> {
        let deadline = Instant::now() + timeout;
        let bound = |e: Error| if matches!(e, Error::Timeout(_)) { Error::Timeout(timeout) } else { e };
        let mut results: Vec<Option<Result<u64>>> = vec![None; requests.len()];
        let mut retried = false;
        let mut conn = self.take(info);
        loop {
            let s = match conn.take() {
                Some(s) => s,
                None => match connect(info, connect_timeout.min(deadline.saturating_duration_since(Instant::now()))) {
                    Ok(s) => s,
                    Err(e) => {
                        fill_unanswered(&mut results, &e);
                        break;
                    }
                },
            };
            let open: Vec<usize> = (0..requests.len()).filter(|&i| results[i].is_none()).collect();
            let pending: Vec<&BlockingRequest> = open.iter().map(|&i| &requests[i]).collect();
            let mut answers = Vec::with_capacity(pending.len());
            let outcome = exchange_many(&s, info, op, &pending, deadline, &mut answers);
            let clean = answers.iter().all(Result::is_ok);
            for (k, answer) in answers.into_iter().enumerate() {
                results[open[k]] = Some(answer.map_err(bound));
            }
            match outcome {
                Ok(()) => {
                    if clean {
                        self.put(info, s);
                    }
                    break;
                }
                Err(e) if retried || matches!(e, Error::Timeout(_)) => {
                    fill_unanswered(&mut results, &bound(e));
                    break;
                }
                Err(_) => retried = true, // dead pooled connection, or it broke part-way: once more, fresh
            }
        }
        let missing = || Error::Protocol("pipelined request got no answer".into());
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(missing()))).collect()
    }
}

fn fill_unanswered(results: &mut [Option<Result<u64>>], e: &Error) {
    for r in results.iter_mut().filter(|r| r.is_none()) {
        *r = Some(Err(e.clone()));
    }
}

/// Writes every request, then reads the answers in order, pushing one entry per answered request
/// onto `answers` (a refused range is that request's error; the rest go on). `Err` when the
/// connection failed: requests without an entry then have no answer.
fn exchange_many(
    mut s: &TcpStream,
    info: &PeerInfo,
    op: Opcode,
    requests: &[&BlockingRequest],
    deadline: Instant,
    answers: &mut Vec<Result<u64>>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::disconnected(&info.name, e);
    s.set_nonblocking(false).map_err(io)?;
    s.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
        .map_err(io)?;
    OUT.with(|out| {
        let mut out = out.borrow_mut();
        out.clear();
        for r in requests {
            out.extend_from_slice(&Header { size: r.length(), addr: r.remote_addr, opcode: op, v2: info.v2 }.encode());
            if op == Opcode::Write {
                // The request holds its local range until the call returns, after the bytes are copied out.
                let span = Span::local(&r.local).map_err(std::io::Error::other)?;
                out.extend_from_slice(&span.bytes().map_err(std::io::Error::other)?);
            }
        }
        s.write_all(&out)
    })
    .map_err(io)?;
    let unwrap = |f: Failure| match f {
        Failure::BeforeAnswer(e) | Failure::Rejected(e) | Failure::After(e) => e,
    };
    let mut got_any = false;
    for r in requests {
        let (remote, len) = (r.remote_addr, r.length());
        if !info.v2 && op == Opcode::Write {
            answers.push(Ok(len)); // v1 writes have no answer
            continue;
        }
        if info.v2 {
            let mut word = [0u8; 8];
            read_polling(s, &mut word, deadline, &mut got_any, info).map_err(unwrap)?;
            if wire::decode_status(word)? != wire::STATUS_OK {
                answers.push(Err(Error::RemoteRejected { peer: info.name.clone(), addr: remote, len }));
                continue;
            }
        }
        if op == Opcode::Read {
            // As above, for the destination; it is written only during this call.
            let mut span = Span::local(&r.local)?;
            let mut sink = span.sink();
            read_polling(s, sink.bytes(), deadline, &mut got_any, info).map_err(unwrap)?;
            if let Err(e) = sink.commit() {
                answers.push(Err(e));
                continue;
            }
        }
        answers.push(Ok(len));
    }
    Ok(())
}

enum Failure {
    /// Nothing of the answer arrived: the request may never have reached the server.
    BeforeAnswer(Error),
    /// The server refused the range (the connection is dropped: upstream closes it too).
    Rejected(Error),
    /// Failed part-way through the answer.
    After(Error),
}

fn connect(info: &PeerInfo, limit: Duration) -> Result<TcpStream> {
    let gone = |e: &dyn std::fmt::Display| {
        Error::disconnected(&info.name, format!("connect to {}:{}: {e}", info.host, info.port))
    };
    let addrs = (info.host.as_str(), info.port).to_socket_addrs().map_err(|e| gone(&e))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, limit) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(gone(&last.map_or_else(|| "no address".to_string(), |e| e.to_string())))
}

thread_local! {
    /// Header and small payload, sent with one write.
    static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn exchange(
    mut s: &TcpStream,
    info: &PeerInfo,
    req: Request<'_>,
    deadline: Instant,
) -> std::result::Result<(), Failure> {
    let Request { op, local, remote } = req;
    let len = local.len();
    let io = |e: std::io::Error| Error::disconnected(&info.name, e);
    let header = Header { size: len, addr: remote, opcode: op, v2: info.v2 }.encode();
    s.set_nonblocking(false).map_err(|e| Failure::BeforeAnswer(io(e)))?;
    s.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
        .map_err(|e| Failure::BeforeAnswer(io(e)))?;
    let sent = OUT.with(|out| {
        let mut out = out.borrow_mut();
        out.clear();
        out.extend_from_slice(&header);
        if op == Opcode::Write {
            // `local` (borrowed for the call) keeps the range valid until the bytes are copied out.
            let span = Span::local(local).map_err(std::io::Error::other)?;
            out.extend_from_slice(&span.bytes().map_err(std::io::Error::other)?);
        }
        s.write_all(&out)
    });
    sent.map_err(|e| Failure::BeforeAnswer(io(e)))?;
    if !info.v2 && op == Opcode::Write {
        return Ok(()); // v1 writes have no answer
    }
    let mut got_any = false;
    if info.v2 {
        let mut word = [0u8; 8];
        read_polling(s, &mut word, deadline, &mut got_any, info)?;
        match wire::decode_status(word) {
            Ok(wire::STATUS_OK) => {}
            Ok(_) => {
                return Err(Failure::Rejected(Error::RemoteRejected { peer: info.name.clone(), addr: remote, len }));
            }
            Err(e) => return Err(Failure::After(e)),
        }
    }
    if op == Opcode::Read {
        // As above, for the destination; it is written only during this call.
        let mut span = Span::local(local).map_err(Failure::Rejected)?;
        let mut sink = span.sink();
        read_polling(s, sink.bytes(), deadline, &mut got_any, info)?;
        sink.commit().map_err(Failure::Rejected)?;
    }
    Ok(())
}

/// Fills `buf`, polling the non-blocking socket for a while before sleeping in `read`.
fn read_polling(
    mut s: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    got_any: &mut bool,
    info: &PeerInfo,
) -> std::result::Result<(), Failure> {
    let fail = |got: bool, e: Error| if got { Failure::After(e) } else { Failure::BeforeAnswer(e) };
    let io = |e: std::io::Error| Error::disconnected(&info.name, e);
    let spin_until = Instant::now() + SPIN;
    let mut blocking = false;
    s.set_nonblocking(true).map_err(|e| fail(*got_any, io(e)))?;
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..]) {
            Ok(0) => return Err(fail(*got_any, Error::disconnected(&info.name, "peer closed the connection"))),
            Ok(n) => {
                done += n;
                *got_any = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && !blocking => {
                if Instant::now() < spin_until {
                    std::hint::spin_loop();
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Failure::After(Error::Timeout(left)));
                }
                s.set_nonblocking(false).map_err(|e| fail(*got_any, io(e)))?;
                s.set_read_timeout(Some(left)).map_err(|e| fail(*got_any, io(e)))?;
                blocking = true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Failure::After(Error::Timeout(deadline.saturating_duration_since(Instant::now()))));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(*got_any, io(e))),
        }
    }
    Ok(())
}
