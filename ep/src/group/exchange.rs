//! The data path every operation shares: one message per (source, destination) pair, in chunks of at most
//! one bank, each chunk written into the destination's receive bank and followed by its signal word; the
//! receiver acknowledges each chunk so that the sender may reuse the bank two chunks later.
//!
//! A signal word is `(m mod 2^32) << 32 | last << 31 | len`, where `m` numbers the chunks of the pair's
//! channel (1, 2, ...; bank `m % 2`) and `last` marks a message's last chunk, so messages describe their own
//! length and a receiver always drains exactly what was sent. An ack word is the full `m` of the last chunk
//! consumed from that bank.

use std::sync::atomic::{Ordering, fence};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mooncake_core::{Opcode, TransferEngine, TransferRequest};

use super::error::Result;
use super::{Group, State};

/// One message to `dest`: the concatenation of `pieces`.
pub(crate) struct Outgoing<'a> {
    pub(crate) dest: usize,
    pub(crate) pieces: Vec<&'a [u8]>,
}

/// One message expected from `src`; `expected` bytes when the call knows (a message of another size is
/// drained and reported), or any size (point-to-point: the message carries a header).
pub(crate) struct Incoming {
    pub(crate) src: usize,
    pub(crate) expected: Option<u64>,
}

/// A received chunk, read out of the receive bank with bounds checks.
pub(crate) struct Chunk<'g> {
    group: &'g Group,
    off: u64,
    pub(crate) len: usize,
}

impl Chunk<'_> {
    /// Copies `out.len()` bytes from byte `at` of the chunk.
    pub(crate) fn read(&self, at: usize, out: &mut [u8]) -> Result<()> {
        if at + out.len() > self.len {
            return Err(super::Error::invalid("chunk", "read past the chunk"));
        }
        Ok(self.group.mem.read(self.off + at as u64, out)?)
    }
}

/// What became of a call's messages.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Ranks lost in this call (signal not in time, writes failed or not finished, garbage).
    pub(crate) lost: Vec<usize>,
    /// Per incoming message (same order): the bytes the sender sent, when the whole message arrived.
    pub(crate) received: Vec<Option<u64>>,
}

struct Tx {
    total: u64,
    off: u64,
    busy: [bool; 2],
    submitted: bool,
}

struct Rx {
    got: u64,
    done: bool,
}

const SPIN: Duration = Duration::from_micros(50);

/// How long past its deadline a call still waits for peers before masking them (at most the group's timeout).
const LATE_GRACE: Duration = Duration::from_millis(500);

impl Group {
    /// Runs the messages `outs` and `ins` on channel `chan` until every one completed or `deadline`.
    /// `sink(i, msg_off, chunk)` gets the chunks of `ins[i]` in order (only the part within `expected`).
    /// Peers that fail or stay silent are returned in [`Outcome::lost`] (and masked).
    pub(crate) fn exchange(
        &self,
        state: &mut State,
        chan: usize,
        outs: &[Outgoing<'_>],
        ins: &[Incoming],
        deadline: Instant,
        sink: &mut dyn FnMut(usize, u64, &Chunk<'_>) -> Result<()>,
    ) -> Result<Outcome> {
        let (r, me, bank) = (self.world, self.rank, self.layout.bank);
        let peers = state.peers.clone().ok_or(super::Error::NotConnected)?;
        let (tx, rx) = mpsc::channel::<(usize, usize, bool)>();
        let mut txs: Vec<Tx> = outs
            .iter()
            .map(|o| Tx {
                total: o.pieces.iter().map(|p| p.len() as u64).sum(),
                off: 0,
                busy: [false; 2],
                submitted: false,
            })
            .collect();
        let mut rxs: Vec<Rx> = ins.iter().map(|_| Rx { got: 0, done: false }).collect();
        let mut outcome = Outcome { lost: Vec::new(), received: vec![None; ins.len()] };
        let mut lost = vec![false; r];
        let mut sigs = vec![0u8; r * 16];
        let mut acks = vec![0u8; r * 16];
        let sig_base = self.layout.sig(chan, 0, 0);
        let ack_base = self.layout.ack(chan, 0, 0);
        let word = |bytes: &[u8], peer: usize, b: usize| {
            let at = (peer * 2 + b) * 8;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
        };
        let mut idle = Instant::now();
        let (mut deadline, mut extended) = (deadline, false);
        loop {
            let mut progress = false;
            while let Ok((dest, b, ok)) = rx.try_recv() {
                progress = true;
                for (t, o) in txs.iter_mut().zip(outs) {
                    if o.dest == dest {
                        t.busy[b] = false;
                    }
                }
                if !ok {
                    lost[dest] = true;
                }
            }

            // Sends: the next chunk of every message whose bank is free here and consumed there.
            self.mem.read(ack_base, &mut acks)?;
            for (t, o) in txs.iter_mut().zip(outs) {
                let d = o.dest;
                if t.submitted || lost[d] {
                    continue;
                }
                let m = state.sent[chan][d] + 1;
                let b = (m % 2) as usize;
                if t.busy[b] || (m > 2 && word(&acks, d, b) < m - 2) {
                    continue;
                }
                let len = bank.min(t.total - t.off);
                let last = t.off + len == t.total;
                let stage = self.layout.stage(d, b);
                self.stage_pieces(&o.pieces, t.off, len, stage)?;
                let sig = signal_word(m, len, last);
                let out_sig = self.layout.out_sig(chan, d, b);
                self.mem.write(out_sig, &sig.to_le_bytes())?;
                let base = peers[d].addr;
                let writes = Writes {
                    data: (len > 0).then(|| (self.mem.addr() + stage, base + self.layout.recv(chan, me, b), len)),
                    signal: (self.mem.addr() + out_sig, base + self.layout.sig(chan, me, b)),
                };
                spawn_writes(&self.engine, peers[d].segment.clone(), writes, Some((tx.clone(), d, b)));
                state.sent[chan][d] = m;
                t.off += len;
                t.busy[b] = true;
                t.submitted = last;
                progress = true;
            }

            // Receives: every chunk whose signal carries the number expected next.
            self.mem.read(sig_base, &mut sigs)?;
            for (i, (x, inc)) in rxs.iter_mut().zip(ins).enumerate() {
                let s = inc.src;
                while !x.done && !lost[s] {
                    let m = state.recvd[chan][s] + 1;
                    let b = (m % 2) as usize;
                    let w = word(&sigs, s, b);
                    if (w >> 32) as u32 != m as u32 {
                        break;
                    }
                    // The signal was written after the data completed; keep the data reads after it.
                    fence(Ordering::Acquire);
                    let len = w & 0x7fff_ffff;
                    let last = w & (1 << 31) != 0;
                    if len > bank {
                        tracing::warn!(rank = me, peer = s, len, "chunk length out of range; peer masked");
                        lost[s] = true;
                        break;
                    }
                    let within = match inc.expected {
                        Some(e) => e.saturating_sub(x.got).min(len),
                        None => len,
                    };
                    if within > 0 {
                        let chunk = Chunk { group: self, off: self.layout.recv(chan, s, b), len: within as usize };
                        sink(i, x.got, &chunk)?;
                    }
                    state.recvd[chan][s] = m;
                    x.got += len;
                    // Acknowledge: the sender may reuse this bank.
                    let out_ack = self.layout.out_ack(chan, s, b);
                    self.mem.write(out_ack, &m.to_le_bytes())?;
                    let writes = Writes {
                        data: None,
                        signal: (self.mem.addr() + out_ack, peers[s].addr + self.layout.ack(chan, me, b)),
                    };
                    spawn_writes(&self.engine, peers[s].segment.clone(), writes, None);
                    progress = true;
                    if last {
                        x.done = true;
                        outcome.received[i] = Some(x.got);
                    }
                }
            }

            // A rank whose writes failed is not waited for either.
            let sends_done = txs.iter().zip(outs).all(|(t, o)| lost[o.dest] || (t.submitted && t.busy == [false; 2]));
            let recvs_done = rxs.iter().zip(ins).all(|(x, i)| x.done || lost[i.src]);
            if sends_done && recvs_done {
                break;
            }
            let now = Instant::now();
            if now >= deadline && !extended {
                // A peer still missing at the deadline may be alive but late: it was waiting out the same dead
                // rank in its previous call, whose timeout began a little earlier than ours. A short second
                // chance before masking keeps such a survivor in the group.
                extended = true;
                deadline = now + LATE_GRACE.min(self.timeout());
            } else if now >= deadline {
                for (t, o) in txs.iter().zip(outs) {
                    if !(t.submitted && t.busy == [false; 2]) {
                        lost[o.dest] = true;
                    }
                }
                for (x, i) in rxs.iter().zip(ins) {
                    if !x.done {
                        lost[i.src] = true;
                    }
                }
                break;
            }
            if progress {
                idle = now;
            } else if now - idle < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        outcome.lost = (0..r).filter(|&p| lost[p] && p != me).collect();
        if !outcome.lost.is_empty() {
            state.lost_in_call = state.calls;
        }
        self.mark_lost(&outcome.lost);
        Ok(outcome)
    }

    /// Copies bytes `[off, off + len)` of the concatenated `pieces` into the buffer at `at`.
    fn stage_pieces(&self, pieces: &[&[u8]], off: u64, len: u64, at: u64) -> Result<()> {
        let (start, end) = (off, off + len);
        let mut pos = 0u64;
        for p in pieces {
            let (ps, pe) = (pos, pos + p.len() as u64);
            pos = pe;
            let (s, e) = (ps.max(start), pe.min(end));
            if s < e {
                self.mem.write(at + (s - start), &p[(s - ps) as usize..(e - ps) as usize])?;
            }
        }
        Ok(())
    }
}

/// The signal word of chunk `m`.
pub(crate) fn signal_word(m: u64, len: u64, last: bool) -> u64 {
    ((m as u32 as u64) << 32) | (u64::from(last) << 31) | (len & 0x7fff_ffff)
}

/// Where a chunk's writes report `(dest, bank, ok)`.
type Report = mpsc::Sender<(usize, usize, bool)>;

/// One chunk's writes: data (local, remote, length), then the 8-byte word (local, remote).
struct Writes {
    data: Option<(u64, u64, u64)>,
    signal: (u64, u64),
}

/// Starts `writes` on the engine's runtime: the data, and after it completed, the word. Reports
/// `(dest, bank, ok)` on `report` when given.
fn spawn_writes(engine: &TransferEngine, segment: String, writes: Writes, report: Option<(Report, usize, usize)>) {
    let e = engine.clone();
    engine.runtime().spawn(async move {
        let result = async {
            let target = e.open_segment_async(&segment).await?;
            let request = |(local_addr, remote_addr, length): (u64, u64, u64)| TransferRequest {
                opcode: Opcode::Write,
                local_addr,
                target,
                remote_addr,
                length,
            };
            if let Some(d) = writes.data {
                for r in e.transfer(&[request(d)]).await? {
                    r?;
                }
            }
            let (local, remote) = writes.signal;
            for r in e.transfer(&[request((local, remote, 8))]).await? {
                r?;
            }
            Ok::<(), mooncake_core::Error>(())
        }
        .await;
        if let Some((tx, dest, b)) = report {
            let _ = tx.send((dest, b, result.is_ok()));
        }
    });
}
