//! The EP buffer: one registered host buffer per rank, the peers' buffers, the sequence number, and the
//! signal/transfer machinery dispatch and combine share.

use std::sync::atomic::{Ordering, fence};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use mooncake_core::{Opcode, TransferEngine, TransferRequest};
use mooncake_raw::HostBuffer;

use crate::error::{Error, Result};
use crate::layout::BufferLayout;

/// What a rank tells the others about its buffer (exchanged by the caller, e.g. over torch.distributed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The rank's engine segment name.
    pub segment: String,
    /// Start address of its EP buffer in its process.
    pub addr: u64,
    /// Length of its EP buffer.
    pub len: u64,
    /// Its sequence number (calls made so far); ranks adopt the largest on `connect`.
    pub seq: u64,
}

/// Mutable state of a buffer, held for the whole of a call (calls on one buffer are serialized).
pub(crate) struct State {
    pub(crate) peers: Option<Vec<PeerInfo>>,
    /// Calls made so far; the next call's signals carry `seq + 1`.
    pub(crate) seq: u64,
    /// Reused scratch bytes.
    pub(crate) scratch: Vec<u8>,
}

/// An expert-parallel dispatch/combine buffer of one rank (upstream's `mooncake.ep.Buffer`), working over
/// any transport the engine has. See the crate docs for the protocol.
pub struct EpBuffer {
    pub(crate) engine: TransferEngine,
    pub(crate) rank: usize,
    pub(crate) num_ranks: usize,
    pub(crate) mem: HostBuffer,
    pub(crate) state: Mutex<State>,
}

impl std::fmt::Debug for EpBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpBuffer")
            .field("rank", &self.rank)
            .field("num_ranks", &self.num_ranks)
            .field("segment", &self.engine.local_segment_name())
            .field("buffer", &self.mem)
            .finish()
    }
}

/// One destination's outgoing writes: data ranges, then (after they completed) the signal word.
pub(crate) struct Outgoing {
    pub(crate) dest: usize,
    pub(crate) segment: String,
    /// (local address, remote address, length).
    pub(crate) data: Vec<(u64, u64, u64)>,
    /// (local address of the signal word, remote address of the destination's signal slot).
    pub(crate) signal: (u64, u64),
}

/// What became of the sources a call waited for.
pub(crate) struct Arrivals {
    /// The count each source signalled, `None` when it did not arrive (or was not waited for).
    pub(crate) counts: Vec<Option<u32>>,
    /// Ranks to mark inactive: a timed-out source, or a destination whose writes failed or did not finish.
    pub(crate) lost: Vec<usize>,
}

impl EpBuffer {
    /// Allocates and registers this rank's buffer of `num_ep_buffer_bytes` (see [`crate::size_hint`]) with
    /// `engine`. Ranks then exchange [`EpBuffer::local_info`] and call [`EpBuffer::connect`].
    pub fn new(engine: &TransferEngine, rank: usize, num_ranks: usize, num_ep_buffer_bytes: u64) -> Result<Self> {
        if num_ranks == 0 || num_ranks > u32::MAX as usize {
            return Err(Error::invalid("num_ranks", format!("{num_ranks} ranks")));
        }
        if rank >= num_ranks {
            return Err(Error::invalid("rank", format!("rank {rank} of {num_ranks} ranks")));
        }
        if num_ep_buffer_bytes == 0 || usize::try_from(num_ep_buffer_bytes).is_err() {
            return Err(Error::invalid("num_ep_buffer_bytes", format!("{num_ep_buffer_bytes} bytes")));
        }
        let mem = HostBuffer::zeroed(num_ep_buffer_bytes as usize);
        engine.register_owned(mem.owned(), "cpu:0")?;
        Ok(EpBuffer {
            engine: engine.clone(),
            rank,
            num_ranks,
            mem,
            state: Mutex::new(State { peers: None, seq: 0, scratch: Vec::new() }),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// The engine the buffer is registered with.
    pub fn engine(&self) -> &TransferEngine {
        &self.engine
    }

    /// Bytes of the buffer.
    pub fn num_ep_buffer_bytes(&self) -> u64 {
        self.mem.len()
    }

    /// Calls (dispatch or combine) made so far with every rank in step; the next call's signals carry one more.
    pub fn sequence(&self) -> u64 {
        self.lock().seq
    }

    /// What the other ranks need to reach this buffer.
    pub fn local_info(&self) -> PeerInfo {
        PeerInfo {
            segment: self.engine.local_segment_name().to_string(),
            addr: self.mem.addr(),
            len: self.mem.len(),
            seq: self.sequence(),
        }
    }

    /// Takes every rank's [`PeerInfo`] (index = rank; this rank's own must match [`EpBuffer::local_info`])
    /// and adopts the largest sequence number, so that a rank that joined late continues in step.
    pub fn connect(&self, peers: &[PeerInfo]) -> Result<()> {
        if peers.len() != self.num_ranks {
            return Err(Error::invalid("peers", format!("{} entries for {} ranks", peers.len(), self.num_ranks)));
        }
        let me = &peers[self.rank];
        if me.segment != self.engine.local_segment_name() || me.addr != self.mem.addr() || me.len != self.mem.len() {
            return Err(Error::invalid("peers", format!("entry {} is not this rank's buffer", self.rank)));
        }
        let mut state = self.lock();
        state.seq = peers.iter().map(|p| p.seq).max().unwrap_or(0).max(state.seq);
        state.peers = Some(peers.to_vec());
        Ok(())
    }

    /// Upstream's `update_ep_member`: every rank (the surviving ones and a replacement that registered a
    /// new buffer on a new engine) calls it with the new [`PeerInfo`] list; peers' segments are opened
    /// again by name on the next transfer. The caller then sets the replaced rank's `active_ranks` entry
    /// back to 1.
    pub fn update_ep_member(&self, peers: &[PeerInfo]) -> Result<()> {
        self.connect(peers)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the active-ranks mask argument.
    pub(crate) fn check_active(&self, active_ranks: &[i32]) -> Result<()> {
        if active_ranks.len() != self.num_ranks {
            return Err(Error::invalid(
                "active_ranks",
                format!("{} entries for {} ranks", active_ranks.len(), self.num_ranks),
            ));
        }
        Ok(())
    }

    /// Checks that this buffer and every active peer's fit `layout`; returns the peers.
    pub(crate) fn check_fit(&self, state: &State, layout: &BufferLayout, active: &[i32]) -> Result<Vec<PeerInfo>> {
        let peers = state.peers.clone().ok_or(Error::NotConnected)?;
        let needed = layout.total_bytes();
        if self.mem.len() < needed {
            return Err(Error::BufferTooSmall { needed, have: self.mem.len() });
        }
        for (rank, p) in peers.iter().enumerate() {
            if active[rank] != 0 && p.len < needed {
                return Err(Error::PeerBufferTooSmall { rank, needed, have: p.len });
            }
        }
        Ok(peers)
    }

    /// Writes `bytes` at `offset` of the buffer (offsets come from a checked layout).
    pub(crate) fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        Ok(self.mem.write(offset, bytes)?)
    }

    /// Reads `out.len()` bytes at `offset` of the buffer.
    pub(crate) fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        Ok(self.mem.read(offset, out)?)
    }

    pub(crate) fn addr(&self, offset: u64) -> u64 {
        self.mem.addr() + offset
    }

    /// Starts every destination's writes on the engine's runtime: its data, and after they all completed,
    /// its signal word. Each destination reports once on the returned channel.
    pub(crate) fn start_sends(&self, outgoing: Vec<Outgoing>) -> mpsc::Receiver<(usize, bool)> {
        let (tx, rx) = mpsc::channel();
        for out in outgoing {
            let engine = self.engine.clone();
            let tx = tx.clone();
            self.engine.runtime().spawn(async move {
                let dest = out.dest;
                let result = send_one(&engine, out).await;
                if let Err(e) = &result {
                    tracing::warn!(dest, error = %e, "EP writes to a rank failed; it is marked inactive");
                }
                let _ = tx.send((dest, result.is_ok()));
            });
        }
        rx
    }

    /// Waits until every source in `waiting` signalled `seq` in the signal array at `signals` (a buffer
    /// offset), a destination write failed (that rank stops being waited for), or `deadline`; then waits
    /// (until `deadline`) for the reports of the destinations `sends` still owes (`send_dests`).
    pub(crate) fn wait_signals(
        &self,
        signals: u64,
        seq: u64,
        mut waiting: Vec<bool>,
        sends: &mpsc::Receiver<(usize, bool)>,
        send_dests: &[usize],
        deadline: Instant,
    ) -> Arrivals {
        let r = self.num_ranks;
        let mut counts = vec![None; r];
        let mut lost = Vec::new();
        let mut unreported = vec![false; r];
        for &d in send_dests {
            unreported[d] = true;
        }
        let mut words = vec![0u8; r * 8];
        let want = seq as u32;
        let start = Instant::now();
        loop {
            if self.read(signals, &mut words).is_err() {
                break;
            }
            for (s, w) in words.chunks_exact(8).enumerate() {
                let word = u64::from_le_bytes(w.try_into().unwrap_or_default());
                if waiting[s] && (word >> 32) as u32 == want {
                    waiting[s] = false;
                    counts[s] = Some(word as u32);
                }
            }
            while let Ok((dest, ok)) = sends.try_recv() {
                note_send(dest, ok, &mut unreported, &mut waiting, &mut lost);
            }
            if !waiting.iter().any(|&w| w) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                for (s, w) in waiting.iter().enumerate() {
                    if *w && !lost.contains(&s) {
                        tracing::warn!(source = s, "EP signal did not arrive before the timeout; rank marked inactive");
                        lost.push(s);
                    }
                }
                break;
            }
            if now - start < Duration::from_micros(200) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        // The signal was written after the data completed; keep the data reads after the signal read.
        fence(Ordering::Acquire);
        while unreported.iter().any(|&u| u) {
            let left = deadline.saturating_duration_since(Instant::now());
            match sends.recv_timeout(left) {
                Ok((dest, ok)) => note_send(dest, ok, &mut unreported, &mut waiting, &mut lost),
                Err(_) => break,
            }
        }
        // Destinations whose writes did not finish in time count as lost.
        for (dest, u) in unreported.iter().enumerate() {
            if *u && !lost.contains(&dest) {
                tracing::warn!(dest, "EP writes did not finish before the timeout; rank marked inactive");
                lost.push(dest);
            }
        }
        Arrivals { counts, lost }
    }
}

/// Records a destination's report: a failed one is lost and no longer waited for.
fn note_send(dest: usize, ok: bool, unreported: &mut [bool], waiting: &mut [bool], lost: &mut Vec<usize>) {
    if dest < unreported.len() {
        unreported[dest] = false;
        if !ok {
            waiting[dest] = false;
            if !lost.contains(&dest) {
                lost.push(dest);
            }
        }
    }
}

/// One destination's writes: data, then the signal.
async fn send_one(engine: &TransferEngine, out: Outgoing) -> mooncake_core::Result<()> {
    let target = engine.open_segment_async(&out.segment).await?;
    let request = |(local_addr, remote_addr, length): (u64, u64, u64)| TransferRequest {
        opcode: Opcode::Write,
        local_addr,
        target,
        remote_addr,
        length,
    };
    if !out.data.is_empty() {
        let requests: Vec<TransferRequest> = out.data.iter().map(|&d| request(d)).collect();
        for r in engine.transfer(&requests).await? {
            r?;
        }
    }
    let (local, remote) = out.signal;
    for r in engine.transfer(&[request((local, remote, 8))]).await? {
        r?;
    }
    Ok(())
}

/// The signal word of a call: its sequence number (low 32 bits) and a count.
pub(crate) fn signal_word(seq: u64, count: u32) -> u64 {
    ((seq as u32 as u64) << 32) | u64::from(count)
}
