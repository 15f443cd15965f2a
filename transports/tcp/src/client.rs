//! The initiator side: a pool of persistent connections ("lanes") per peer. Requests are
//! pipelined on a lane (many in flight, answers in order), spread over lanes by load, and large
//! ones are striped across all lanes. A dead connection fails exactly the requests it carried
//! and the lane reconnects for the next ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use mooncake_core::{Error, LocalRange, Opcode, PeerEvents, PieceDone, Result};
use mooncake_raw::Span;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};

use crate::staging::{self, StageIn, StageOut, StagedSink, StagedSource};
use crate::wire::{self, Header};

const IO_BUFFER: usize = 64 << 10;

/// Where and how to reach one peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PeerInfo {
    /// Segment name (for errors and staleness reports).
    pub name: String,
    /// Host of the data port.
    pub host: String,
    /// Data port.
    pub port: u16,
    /// Use version-2 framing.
    pub v2: bool,
}

/// One wire request.
pub(crate) struct Piece {
    pub opcode: Opcode,
    /// Bytes to move (`local.len()`).
    pub len: u64,
    /// The local range with its proof; it keeps the local region registered until the piece is done.
    pub local: LocalRange,
    pub remote: u64,
    pub done: PieceDone,
    /// Connections this piece was carried over from without being sent.
    pub attempts: u8,
}

/// Connections to one peer.
pub(crate) struct PeerPool {
    pub info: PeerInfo,
    lanes: Vec<Lane>,
    next: AtomicUsize,
}

struct Lane {
    tx: mpsc::UnboundedSender<Piece>,
    load: Arc<AtomicU64>,
}

/// Settings shared by all lanes.
#[derive(Debug, Clone)]
pub(crate) struct LaneConfig {
    pub connect_timeout: Duration,
}

impl PeerPool {
    /// Starts `lanes` lane tasks (they connect on first use).
    pub(crate) fn new(
        info: PeerInfo,
        lanes: usize,
        config: &LaneConfig,
        runtime: &tokio::runtime::Handle,
        events: Arc<dyn PeerEvents>,
    ) -> Self {
        let info_arc = Arc::new(info.clone());
        let lanes = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let load = Arc::new(AtomicU64::new(0));
                runtime.spawn(lane_task(info_arc.clone(), rx, load.clone(), config.clone(), events.clone()));
                Lane { tx, load }
            })
            .collect();
        PeerPool { info, lanes, next: AtomicUsize::new(0) }
    }

    /// Number of lanes.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Queues a piece on lane `index`, or on the least-loaded lane when `None`.
    pub(crate) fn send(&self, piece: Piece, index: Option<usize>) {
        let i = index.unwrap_or_else(|| self.least_loaded());
        let lane = &self.lanes[i % self.lanes.len()];
        lane.load.fetch_add(piece.len, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(p)) = lane.tx.send(piece) {
            lane.load.fetch_sub(p.len, Ordering::Relaxed);
            p.done.finish(Err(Error::disconnected(&self.info.name, "transport is shutting down")));
        }
    }

    fn least_loaded(&self) -> usize {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.lanes.len();
        (0..n).map(|k| (start + k) % n).min_by_key(|i| self.lanes[*i].load.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

fn complete(piece: Piece, result: Result<u64>, load: &AtomicU64) {
    load.fetch_sub(piece.len, Ordering::Relaxed);
    piece.done.finish(result);
}

/// Marks a connection dead and wakes whoever waits on it.
#[derive(Default)]
struct Dead {
    flag: AtomicBool,
    notify: Notify,
}

impl Dead {
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

async fn lane_task(
    info: Arc<PeerInfo>,
    mut rx: mpsc::UnboundedReceiver<Piece>,
    load: Arc<AtomicU64>,
    config: LaneConfig,
    events: Arc<dyn PeerEvents>,
) {
    let mut carried: Option<Piece> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let stream = match connect(&info, config.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                events.peer_failed(&info.name);
                complete(first, Err(e.clone()), &load);
                while let Ok(p) = rx.try_recv() {
                    complete(p, Err(e.clone()), &load);
                }
                continue;
            }
        };
        let (died, unsent) = run_connection(stream, first, &mut rx, &info, &load).await;
        if died {
            events.peer_failed(&info.name);
        }
        if let Some(mut p) = unsent {
            // Never sent: retry it once on a fresh connection.
            p.attempts += 1;
            if p.attempts > 1 {
                complete(p, Err(Error::disconnected(&info.name, "connection died twice before sending")), &load);
            } else {
                carried = Some(p);
            }
        }
    }
}

async fn connect(info: &PeerInfo, limit: Duration) -> Result<TcpStream> {
    let target = (info.host.as_str(), info.port);
    let stream = match tokio::time::timeout(limit, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(Error::disconnected(&info.name, format!("connect to {}:{}: {e}", info.host, info.port)));
        }
        Err(_) => {
            return Err(Error::disconnected(
                &info.name,
                format!("connect to {}:{} timed out after {limit:?}", info.host, info.port),
            ));
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Drives one connection until it dies (true) or the pool is dropped (false); also returns a
/// piece taken from the queue but never sent.
async fn run_connection(
    stream: TcpStream,
    first: Piece,
    rx: &mut mpsc::UnboundedReceiver<Piece>,
    info: &Arc<PeerInfo>,
    load: &Arc<AtomicU64>,
) -> (bool, Option<Piece>) {
    let (r, w) = stream.into_split();
    let dead = Arc::new(Dead::default());
    let (inflight_tx, inflight_rx) = mpsc::unbounded_channel::<Piece>();
    let reader = tokio::spawn(read_loop(r, inflight_rx, info.clone(), load.clone(), dead.clone()));
    let mut writer = BufWriter::with_capacity(IO_BUFFER, w);
    let mut unflushed_v1_writes: Vec<Piece> = Vec::new();
    let mut next = Some(first);
    let mut died = false;
    loop {
        let piece = match next.take() {
            Some(p) => p,
            None => match rx.try_recv() {
                Ok(p) => p,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if let Err(e) = writer.flush().await {
                        died = fail_all(&mut unflushed_v1_writes, &dead, info, &e, load);
                        break;
                    }
                    for p in unflushed_v1_writes.drain(..) {
                        let len = p.len;
                        complete(p, Ok(len), load);
                    }
                    tokio::select! {
                        p = rx.recv() => match p { Some(p) => p, None => break },
                        _ = dead.wait() => { died = true; break }
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let flushed = writer.flush().await;
                    for p in unflushed_v1_writes.drain(..) {
                        let r = flushed.as_ref().map(|_| p.len).map_err(|e| Error::disconnected(&info.name, e));
                        complete(p, r, load);
                    }
                    break;
                }
            },
        };
        if dead.is_set() {
            // The reader saw the connection die: keep this piece for the next connection.
            next = Some(piece);
            died = true;
            break;
        }
        if piece.done.is_final() {
            load.fetch_sub(piece.len, Ordering::Relaxed);
            continue;
        }
        let (opcode, len) = (piece.opcode, piece.len);
        // Check the local side before anything reaches the wire (device memory no device can copy is refused
        // here). A write reads its payload through its own handle on the range, as the piece moves on below:
        // host memory in place, device memory as a copy the device stages now.
        let source = (opcode == Opcode::Write).then(|| piece.local.clone());
        let span = match source.as_ref().map(Span::local).transpose() {
            Ok(s) => s,
            Err(e) => {
                complete(piece, Err(e), load);
                continue;
            }
        };
        // Large device-memory writes are staged in chunks that overlap the network; the first chunk is copied
        // before the header goes out, so a device that refuses the range fails this piece alone.
        let mut staged = match &span {
            Some(s) if !s.is_host() && staging::pipelined(len) => {
                let mut source = StagedSource::start(stage_out(&piece.local), len);
                match source.next().await {
                    Some(Ok(first)) => Some((first, source)),
                    Some(Err(e)) => {
                        complete(piece, Err(e), load);
                        continue;
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let payload = match span.as_ref().filter(|_| staged.is_none()).map(Span::bytes).transpose() {
            Ok(p) => p,
            Err(e) => {
                complete(piece, Err(e), load);
                continue;
            }
        };
        if opcode == Opcode::Read {
            if let Err(e) = Span::local(&piece.local) {
                complete(piece, Err(e), load);
                continue;
            }
        }
        let header = Header { size: len, addr: piece.remote, opcode, v2: info.v2 }.encode();
        let expects_reply = opcode == Opcode::Read || info.v2;
        if expects_reply {
            // Queue before writing so the reader never sees an answer it does not expect.
            if let Err(mpsc::error::SendError(p)) = inflight_tx.send(piece) {
                next = Some(p);
                died = true;
                break;
            }
        } else {
            unflushed_v1_writes.push(piece);
        }
        let written = async {
            writer.write_all(&header).await?;
            if let Some(payload) = &payload {
                // `source` keeps the local region registered until the payload is written.
                writer.write_all(payload).await?;
            }
            if let Some((first, mut rest)) = staged.take() {
                writer.write_all(&first).await?;
                rest.recycle(first);
                while let Some(chunk) = rest.next().await {
                    // The header promised the bytes: a device copy failing midway can only end the connection.
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    writer.write_all(&chunk).await?;
                    rest.recycle(chunk);
                }
            }
            std::io::Result::Ok(())
        }
        .await;
        if let Err(e) = written {
            died = fail_all(&mut unflushed_v1_writes, &dead, info, &e, load);
            break;
        }
    }
    drop(inflight_tx);
    if died {
        dead.set();
    }
    let _ = reader.await;
    (died, next)
}

fn fail_all(pieces: &mut Vec<Piece>, dead: &Dead, info: &PeerInfo, e: &std::io::Error, load: &AtomicU64) -> bool {
    dead.set();
    for p in pieces.drain(..) {
        complete(p, Err(Error::disconnected(&info.name, e)), load);
    }
    true
}

async fn read_loop(
    r: OwnedReadHalf,
    mut inflight: mpsc::UnboundedReceiver<Piece>,
    info: Arc<PeerInfo>,
    load: Arc<AtomicU64>,
    dead: Arc<Dead>,
) {
    let mut reader = BufReader::with_capacity(IO_BUFFER, r);
    let reason: Error = loop {
        let piece = tokio::select! {
            biased;
            p = inflight.recv() => match p {
                Some(p) => p,
                None => return,
            },
            _ = dead.wait() => break Error::disconnected(&info.name, "connection closed by the writer"),
            got = reader.fill_buf() => match got {
                // Idle, yet the socket is readable: closed by the peer (restart, rejection)...
                Ok([]) => break Error::disconnected(&info.name, "peer closed the connection"),
                Err(e) => break Error::disconnected(&info.name, e),
                // ...or an answer overtook its request on the queue (the channel can report
                // empty under tokio's cooperative budget). Wait for the request; garbage fails
                // its status-word or length check there.
                Ok(_) => match inflight.recv().await {
                    Some(p) => p,
                    None => return,
                },
            },
        };
        match receive(&mut reader, &piece, &info).await {
            Ok(Ok(())) => {
                let len = piece.len;
                complete(piece, Ok(len), &load);
            }
            // The request failed but the connection is in step (a rejection, a device copy that failed).
            Ok(Err(e)) => complete(piece, Err(e), &load),
            Err(e) => {
                complete(piece, Err(e.clone()), &load);
                break e;
            }
        }
    };
    dead.set();
    inflight.close();
    while let Some(p) = inflight.recv().await {
        let e = match &reason {
            Error::Protocol(m) => Error::disconnected(&info.name, m),
            other => other.clone(),
        };
        complete(p, Err(e), &load);
    }
}

/// Reads the answer to one request: `Err` when the connection failed, `Ok(Err)` when only the request did
/// (the peer rejected it, or the device refused the staged bytes) and the connection is still in step.
async fn receive(reader: &mut BufReader<OwnedReadHalf>, piece: &Piece, info: &PeerInfo) -> Result<Result<()>> {
    let io = |e: std::io::Error| Error::disconnected(&info.name, e);
    if info.v2 {
        let mut word = [0u8; 8];
        reader.read_exact(&mut word).await.map_err(io)?;
        if wire::decode_status(word)? != wire::STATUS_OK {
            return Ok(Err(Error::RemoteRejected { peer: info.name.clone(), addr: piece.remote, len: piece.len }));
        }
    }
    if piece.opcode == Opcode::Read {
        // The piece holds the local range (and its region) until it completes, after this read. The range was
        // checked before the request was sent, so the span cannot fail here.
        let mut span = Span::local(&piece.local).map_err(|e| Error::Protocol(format!("local range: {e}")))?;
        if !span.is_host() && staging::pipelined(piece.len) {
            // Device memory: the device copies each chunk in while the next one is received.
            let mut sink = StagedSink::new(stage_in(&piece.local));
            for (off, len) in staging::chunks(piece.len) {
                let mut buf = sink.buffer(len);
                reader.read_exact(&mut buf).await.map_err(io)?;
                sink.push(off, buf).await;
            }
            return Ok(sink.finish().await);
        }
        let mut sink = span.sink();
        reader.read_exact(sink.bytes()).await.map_err(io)?;
        // Device memory: the device copies the staged bytes in now.
        return Ok(sink.commit());
    }
    Ok(Ok(()))
}

/// Copies chunks of `range` (device memory) out through its device.
fn stage_out(range: &LocalRange) -> StageOut {
    let range = range.clone();
    Arc::new(move |off, buf: &mut [u8]| Span::local_part(&range, off, buf.len() as u64)?.read_into(0, buf))
}

/// Copies chunks into `range` (device memory) through its device.
fn stage_in(range: &LocalRange) -> StageIn {
    let range = range.clone();
    Arc::new(move |off, bytes: &[u8]| Span::local_part(&range, off, bytes.len() as u64)?.write_from(0, bytes))
}
