//! Collectives over the transfer engine with elastic membership: the Rust core of a torch.distributed
//! backend (upstream's `mooncake` / `mooncake-cpu` process group).
//!
//! Each rank registers one host buffer with its engine ([`Group::new`]), the ranks exchange
//! [`MemberInfo`]s (the caller does it, over a torch store or gloo) and [`Group::connect`]. Every operation
//! works on byte slices with a [`DType`] and, for reductions, a [`ReduceOp`]; it blocks until done or until
//! the group's timeout. Data moves as direct writes into per-source receive slots of each peer's buffer,
//! each chunk followed by a signal word carrying the chunk's number; large buffers go through in chunks,
//! two in flight per peer, while the receiver reduces or copies out the previous one. A peer that is not
//! heard from in time, or whose writes fail, is marked inactive ([`Group::active_ranks`]) and the call
//! completes over the others; later calls skip it without waiting. docs/ep.md ("Collectives") describes the
//! protocol, the buffer layout and the failure semantics.
//!
//! ```no_run
//! use mooncake_ep::group::{DType, Group, GroupOptions, ReduceOp};
//! # fn run(engine: &mooncake_core::TransferEngine, members: Vec<mooncake_ep::group::MemberInfo>) -> mooncake_ep::group::Result<()> {
//! let group = Group::new(engine, 0, 2, GroupOptions::default())?;
//! // ... exchange group.local_info() with the other ranks, then:
//! group.connect(&members)?;
//! let mut grads = vec![0u8; 4 * 1024];
//! group.all_reduce(&mut grads, DType::F32, ReduceOp::Sum)?;
//! # Ok(()) }
//! ```

mod dtype;
mod error;
mod exchange;
mod ops;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use mooncake_core::TransferEngine;
use mooncake_raw::HostBuffer;

pub use dtype::{DType, ReduceOp, f16_to_f32, f32_to_f16};
pub use error::{Error, Result};
pub use ops::{RecvOp, SendOp};

/// Settings of a [`Group`], the same on every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOptions {
    /// Bytes of one chunk (one receive bank); messages larger than this go through in chunks. A multiple
    /// of 8, at least 4096. The buffer is about `6 * world_size * chunk_bytes`.
    pub chunk_bytes: u64,
    /// How long a call waits for a peer before marking it inactive.
    pub timeout: Duration,
    /// All-reduces of at most this many bytes send the whole buffer to every peer (one round trip);
    /// larger ones reduce-scatter then all-gather (half the traffic at 4 ranks, a quarter of the
    /// arithmetic per rank).
    pub small_all_reduce_bytes: u64,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions { chunk_bytes: 4 << 20, timeout: Duration::from_secs(30), small_all_reduce_bytes: 256 << 10 }
    }
}

/// What a rank tells the others about its buffer (exchanged by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The rank's engine segment name.
    pub segment: String,
    /// Start address of its group buffer in its process.
    pub addr: u64,
    /// Length of its group buffer.
    pub len: u64,
    /// Its `chunk_bytes` (must be the same on every rank).
    pub chunk_bytes: u64,
    /// Its `world_size`.
    pub world_size: u64,
}

/// Where the parts of a group buffer lie (the same on every rank, so a rank computes peers' offsets from its
/// own). Two channels: collectives (0) and point-to-point (1), so that a send does not need the receiver to
/// be in the same call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) ranks: u64,
    pub(crate) bank: u64,
}

/// The collective channel.
pub(crate) const COLL: usize = 0;
/// The point-to-point channel.
pub(crate) const P2P: usize = 1;

impl Layout {
    fn words(&self) -> u64 {
        16 * self.ranks
    }
    /// Signal word written by `src` for bank `b` of channel `chan`.
    pub(crate) fn sig(&self, chan: usize, src: usize, b: usize) -> u64 {
        8 * ((chan as u64 * self.ranks + src as u64) * 2 + b as u64)
    }
    /// Ack word written by `dst` (it consumed our chunk in bank `b`).
    pub(crate) fn ack(&self, chan: usize, dst: usize, b: usize) -> u64 {
        8 * 4 * self.ranks + self.sig(chan, dst, b)
    }
    /// Local source of the signal write to `dst`.
    pub(crate) fn out_sig(&self, chan: usize, dst: usize, b: usize) -> u64 {
        8 * 8 * self.ranks + self.sig(chan, dst, b)
    }
    /// Local source of the ack write to `src`.
    pub(crate) fn out_ack(&self, chan: usize, src: usize, b: usize) -> u64 {
        8 * 12 * self.ranks + self.sig(chan, src, b)
    }
    fn data(&self) -> u64 {
        (self.words() * 8).div_ceil(64) * 64
    }
    /// Receive bank `b` of channel `chan` for chunks from `src`.
    pub(crate) fn recv(&self, chan: usize, src: usize, b: usize) -> u64 {
        self.data() + ((chan as u64 * self.ranks + src as u64) * 2 + b as u64) * self.bank
    }
    /// Staging bank `b` for chunks to `dst` (shared by both channels: calls are serialized).
    pub(crate) fn stage(&self, dst: usize, b: usize) -> u64 {
        self.data() + (4 * self.ranks + dst as u64 * 2 + b as u64) * self.bank
    }
    pub(crate) fn total(&self) -> u64 {
        self.data() + 6 * self.ranks * self.bank
    }
}

/// Per-pair stream state, held for the whole of a call.
pub(crate) struct State {
    pub(crate) peers: Option<Vec<MemberInfo>>,
    /// Chunks sent to each rank, per channel (the next carries one more).
    pub(crate) sent: [Vec<u64>; 2],
    /// Chunks consumed from each rank, per channel.
    pub(crate) recvd: [Vec<u64>; 2],
    /// Calls made.
    pub(crate) calls: u64,
    /// The call (by number) in which a rank was last lost; 0 before any.
    pub(crate) lost_in_call: u64,
    /// Reused bytes.
    pub(crate) scratch: Vec<u8>,
}

/// A process group of `world_size` ranks over one transfer engine per rank. See the module docs.
pub struct Group {
    pub(crate) engine: TransferEngine,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) layout: Layout,
    pub(crate) mem: HostBuffer,
    pub(crate) timeout: Mutex<Duration>,
    pub(crate) small_all_reduce_bytes: u64,
    pub(crate) active: Mutex<Vec<bool>>,
    pub(crate) state: Mutex<State>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .field("segment", &self.engine.local_segment_name())
            .field("buffer", &self.mem)
            .field("active", &self.active_ranks())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Group {
    /// Allocates and registers this rank's buffer (about `6 * world_size * options.chunk_bytes`) with
    /// `engine`. Ranks then exchange [`Group::local_info`] and call [`Group::connect`].
    pub fn new(engine: &TransferEngine, rank: usize, world_size: usize, options: GroupOptions) -> Result<Self> {
        if world_size == 0 || world_size > 4096 {
            return Err(Error::invalid("world_size", format!("{world_size} ranks (1..=4096)")));
        }
        if rank >= world_size {
            return Err(Error::invalid("rank", format!("rank {rank} of {world_size} ranks")));
        }
        let bank = options.chunk_bytes;
        if bank < 4096 || bank % 8 != 0 || bank > (1 << 30) {
            return Err(Error::invalid(
                "options.chunk_bytes",
                format!("{bank} bytes: a multiple of 8 from 4096 to 1 GiB"),
            ));
        }
        if options.timeout.is_zero() {
            return Err(Error::invalid("options.timeout", "a zero timeout would mark every peer inactive"));
        }
        let layout = Layout { ranks: world_size as u64, bank };
        let len = usize::try_from(layout.total())
            .map_err(|_| Error::invalid("options.chunk_bytes", "the buffer does not fit in memory"))?;
        let mem = HostBuffer::zeroed(len);
        engine.register_owned(mem.owned(), "cpu:0")?;
        Ok(Group {
            engine: engine.clone(),
            rank,
            world: world_size,
            layout,
            mem,
            timeout: Mutex::new(options.timeout),
            small_all_reduce_bytes: options.small_all_reduce_bytes,
            active: Mutex::new(vec![true; world_size]),
            state: Mutex::new(State {
                peers: None,
                sent: [vec![0; world_size], vec![0; world_size]],
                recvd: [vec![0; world_size], vec![0; world_size]],
                calls: 0,
                lost_in_call: 0,
                scratch: Vec::new(),
            }),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The engine the buffer is registered with.
    pub fn engine(&self) -> &TransferEngine {
        &self.engine
    }

    /// Bytes of one chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.layout.bank
    }

    /// The timeout of each call.
    pub fn timeout(&self) -> Duration {
        *lock(&self.timeout)
    }

    /// Sets the timeout of later calls (torch's per-group timeout).
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        if timeout.is_zero() {
            return Err(Error::invalid("timeout", "a zero timeout would mark every peer inactive"));
        }
        *lock(&self.timeout) = timeout;
        Ok(())
    }

    /// Calls (collectives and point-to-point) made so far.
    pub fn calls(&self) -> u64 {
        lock(&self.state).calls
    }

    /// What the other ranks need to reach this rank's buffer.
    pub fn local_info(&self) -> MemberInfo {
        MemberInfo {
            segment: self.engine.local_segment_name().to_string(),
            addr: self.mem.addr(),
            len: self.mem.len(),
            chunk_bytes: self.layout.bank,
            world_size: self.world as u64,
        }
    }

    fn check_members(&self, members: &[MemberInfo]) -> Result<()> {
        if members.len() != self.world {
            return Err(Error::invalid("members", format!("{} entries for {} ranks", members.len(), self.world)));
        }
        if members[self.rank] != self.local_info() {
            return Err(Error::invalid("members", format!("entry {} is not this rank's buffer", self.rank)));
        }
        for (r, m) in members.iter().enumerate() {
            if m.chunk_bytes != self.layout.bank || m.world_size != self.world as u64 || m.len < self.layout.total() {
                return Err(Error::invalid(
                    "members",
                    format!(
                        "rank {r} has chunk_bytes {} / world_size {} / {} bytes; this rank has {} / {} / {}",
                        m.chunk_bytes,
                        m.world_size,
                        m.len,
                        self.layout.bank,
                        self.world,
                        self.layout.total()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Takes every rank's [`MemberInfo`] (index = rank; this rank's own must be [`Group::local_info`]).
    /// Every rank is active afterwards.
    pub fn connect(&self, members: &[MemberInfo]) -> Result<()> {
        self.check_members(members)?;
        let mut state = lock(&self.state);
        for r in 0..self.world {
            self.reset_pair(&mut state, r);
        }
        state.peers = Some(members.to_vec());
        *lock(&self.active) = vec![true; self.world];
        Ok(())
    }

    /// Upstream's elastic re-join: a replacement rank registered a new buffer on a new engine (and calls
    /// [`Group::connect`] with the new list); every other rank calls this with the same list. The streams
    /// with every rank whose entry changed start again from zero on both sides (the replacement starts from
    /// zero), the changed ranks become active, and the next collective includes them. Every rank must call
    /// it at the same point (between collectives).
    pub fn update_member(&self, members: &[MemberInfo]) -> Result<()> {
        self.check_members(members)?;
        let mut state = lock(&self.state);
        let Some(old) = state.peers.clone() else {
            drop(state);
            return self.connect(members);
        };
        let mut active = lock(&self.active);
        for r in 0..self.world {
            if old[r] != members[r] {
                self.reset_pair(&mut state, r);
                active[r] = true;
            }
        }
        state.peers = Some(members.to_vec());
        Ok(())
    }

    /// Forgets the stream state with `r` (counters and the words it wrote here).
    fn reset_pair(&self, state: &mut State, r: usize) {
        for chan in [COLL, P2P] {
            state.sent[chan][r] = 0;
            state.recvd[chan][r] = 0;
            for b in 0..2 {
                for off in [self.layout.sig(chan, r, b), self.layout.ack(chan, r, b)] {
                    let _ = self.mem.write(off, &[0u8; 8]);
                }
            }
        }
    }

    /// Which ranks are active (upstream's `active_ranks` tensor as booleans; this rank is always active).
    pub fn active_ranks(&self) -> Vec<bool> {
        lock(&self.active).clone()
    }

    /// Whether `rank` is active.
    pub fn peer_state(&self, rank: usize) -> Result<bool> {
        lock(&self.active).get(rank).copied().ok_or_else(|| self.bad_rank("rank", rank))
    }

    /// Masks `rank` by hand: later calls neither write to nor wait for it.
    pub fn deactivate(&self, rank: usize) -> Result<()> {
        if rank == self.rank {
            return Err(Error::invalid("rank", "a rank cannot deactivate itself"));
        }
        let mut active = lock(&self.active);
        *active.get_mut(rank).ok_or_else(|| self.bad_rank("rank", rank))? = false;
        Ok(())
    }

    /// Upstream's `recover_ranks` for a rank that is alive and was masked (deactivated, or timed out while
    /// slow): restarts the streams with it from zero and makes it active. Every rank must call it for the
    /// same ranks at the same point (between collectives, e.g. after the caller agreed over its store),
    /// the recovering rank included (`activate(own rank)` restarts its streams with everyone); a replaced
    /// rank goes through [`Group::update_member`] instead.
    pub fn activate(&self, rank: usize) -> Result<()> {
        if rank >= self.world {
            return Err(self.bad_rank("rank", rank));
        }
        let mut state = lock(&self.state);
        if rank != self.rank {
            self.reset_pair(&mut state, rank);
        } else {
            // The recovering rank itself: its streams with everyone restart (they do the same for it).
            for r in (0..self.world).filter(|&r| r != self.rank) {
                self.reset_pair(&mut state, r);
            }
        }
        lock(&self.active)[rank] = true;
        Ok(())
    }

    pub(crate) fn bad_rank(&self, arg: &'static str, rank: usize) -> Error {
        Error::invalid(arg, format!("rank {rank} is out of range for world_size {}", self.world))
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn mark_lost(&self, ranks: &[usize]) {
        let mut active = lock(&self.active);
        for &r in ranks {
            if r != self.rank && r < self.world && active[r] {
                tracing::warn!(rank = self.rank, peer = r, "collective peer failed or timed out; marked inactive");
                active[r] = false;
            }
        }
    }
}
