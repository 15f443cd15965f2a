//! The operations: argument checks, which messages go where, and what the receiver does with each chunk.

use std::time::Instant;

use super::dtype::{Acc, DType, ReduceOp, Reducer, check_op};
use super::error::{Error, Result};
use super::exchange::{Chunk, Incoming, Outcome, Outgoing};
use super::{COLL, Group, P2P, State};

/// A point-to-point send of [`Group::send_recv`].
#[derive(Debug, Clone, Copy)]
pub struct SendOp<'a> {
    /// Destination rank.
    pub peer: usize,
    /// Tag the matching receive names.
    pub tag: u32,
    /// The bytes.
    pub data: &'a [u8],
}

/// A point-to-point receive of [`Group::send_recv`].
#[derive(Debug)]
pub struct RecvOp<'a> {
    /// Source rank.
    pub peer: usize,
    /// Tag the message must carry.
    pub tag: u32,
    /// Where the bytes go (the message must have exactly this many).
    pub data: &'a mut [u8],
}

const P2P_HEADER: usize = 16;

fn check_elems(arg: &'static str, len: usize, dtype: DType) -> Result<()> {
    if len % dtype.size() != 0 {
        return Err(Error::invalid(
            arg,
            format!("{len} bytes are not whole {dtype:?} elements ({} bytes each)", dtype.size()),
        ));
    }
    Ok(())
}

/// Bytes a reduction reads out of a receive bank at a time (stays in cache between the copy and the fold).
const BLOCK: usize = 64 << 10;

/// Reads `chunk` through `buf` in cache-sized blocks, handing `f(byte offset in the chunk, bytes)` each.
fn blocks(chunk: &Chunk<'_>, buf: &mut Vec<u8>, mut f: impl FnMut(usize, &[u8])) -> Result<()> {
    buf.resize(BLOCK.min(chunk.len), 0);
    let mut pos = 0;
    while pos < chunk.len {
        let n = BLOCK.min(chunk.len - pos);
        chunk.read(pos, &mut buf[..n])?;
        f(pos, &buf[..n]);
        pos += n;
    }
    Ok(())
}

/// The first size mismatch among `ins`.
fn check_sizes(ins: &[Incoming], outcome: &Outcome) -> Result<()> {
    for (inc, got) in ins.iter().zip(&outcome.received) {
        if let (Some(expected), Some(sent)) = (inc.expected, *got) {
            if expected != sent {
                return Err(Error::SizeMismatch { peer: inc.src, sent, expected });
            }
        }
    }
    Ok(())
}

/// Number of incoming messages that arrived whole.
fn arrived(outcome: &Outcome) -> usize {
    outcome.received.iter().filter(|r| r.is_some()).count()
}

/// Prefix offsets of `counts` (and the total), checked against overflow.
fn offsets(arg: &'static str, counts: &[u64]) -> Result<(Vec<usize>, usize)> {
    let mut offs = Vec::with_capacity(counts.len());
    let mut total = 0usize;
    for &c in counts {
        offs.push(total);
        let c = usize::try_from(c).map_err(|_| Error::invalid(arg, format!("{c} bytes")))?;
        total = total.checked_add(c).ok_or_else(|| Error::invalid(arg, "the counts overflow"))?;
    }
    Ok((offs, total))
}

impl Group {
    /// Locks the call state and reads the active ranks (`None` peers: not connected).
    fn begin(&self) -> Result<(std::sync::MutexGuard<'_, State>, Vec<bool>, Instant)> {
        let mut state = self.lock_state();
        if state.peers.is_none() {
            return Err(Error::NotConnected);
        }
        state.calls += 1;
        // Survivors learn of a lost rank up to one timeout apart (one from a failed write, another by waiting the
        // timeout out), so in the call after a loss a survivor may start up to a timeout late: wait twice as
        // long then, or a late survivor would be taken for dead too.
        let after_loss = state.lost_in_call > 0 && state.lost_in_call + 1 >= state.calls;
        let deadline = Instant::now() + self.timeout() * if after_loss { 2 } else { 1 };
        Ok((state, self.active_ranks(), deadline))
    }

    fn others(&self, active: &[bool]) -> Vec<usize> {
        (0..self.world).filter(|&p| p != self.rank && active[p]).collect()
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.world { Err(self.bad_rank("root", root)) } else { Ok(()) }
    }

    /// Receives `ins` into `output` at `starts[i]` (a copy straight out of the receive bank).
    fn exchange_copy(
        &self,
        state: &mut State,
        outs: &[Outgoing<'_>],
        ins: &[Incoming],
        starts: &[usize],
        output: &mut [u8],
        deadline: Instant,
    ) -> Result<Outcome> {
        let outcome = self.exchange(state, COLL, outs, ins, deadline, &mut |i, off, chunk| {
            let at = starts[i] + off as usize;
            chunk.read(0, &mut output[at..at + chunk.len])
        })?;
        check_sizes(ins, &outcome)?;
        Ok(outcome)
    }

    /// Reduces `data` (elements of `dtype`) over every active rank with `op`, in place on every rank.
    /// [`ReduceOp::Avg`] divides by the number of ranks that contributed. A rank lost during the call is
    /// masked and the result is over the others.
    pub fn all_reduce(&self, data: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_elems("data", data.len(), dtype)?;
        check_op(dtype, op)?;
        let (mut state, active, deadline) = self.begin()?;
        let others = self.others(&active);
        if others.is_empty() {
            return Ok(());
        }
        if data.len() as u64 <= self.small_all_reduce_bytes {
            self.all_reduce_direct(&mut state, data, dtype, op, &others, deadline)
        } else {
            self.all_reduce_two_phase(&mut state, data, dtype, op, &active, deadline)
        }
    }

    /// Every rank sends its whole buffer to every other; each reduces all of them (one round trip).
    fn all_reduce_direct(
        &self,
        state: &mut State,
        data: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        others: &[usize],
        deadline: Instant,
    ) -> Result<()> {
        let size = dtype.size();
        let mut acc = Acc::new(dtype, data);
        let mut buf = std::mem::take(&mut state.scratch);
        let outs: Vec<Outgoing<'_>> = others.iter().map(|&p| Outgoing { dest: p, pieces: vec![&*data] }).collect();
        let ins: Vec<Incoming> =
            others.iter().map(|&p| Incoming { src: p, expected: Some(data.len() as u64) }).collect();
        let outcome = self.exchange(state, COLL, &outs, &ins, deadline, &mut |_, off, chunk| {
            blocks(chunk, &mut buf, |at, b| acc.fold(dtype, op, (off as usize + at) / size, b))
        });
        state.scratch = buf;
        let outcome = outcome?;
        check_sizes(&ins, &outcome)?;
        drop(outs);
        acc.finish(dtype, op, 1 + arrived(&outcome), data);
        Ok(())
    }

    /// Reduce-scatter over the active ranks (rank `members[i]` reduces part `i`), then every part to every
    /// rank. A part whose owner failed in the first phase is reduced by everyone from the raw inputs the
    /// survivors append to their second-phase messages.
    fn all_reduce_two_phase(
        &self,
        state: &mut State,
        data: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        active: &[bool],
        deadline: Instant,
    ) -> Result<()> {
        let size = dtype.size();
        let n = data.len() / size;
        let members: Vec<usize> = (0..self.world).filter(|&p| active[p]).collect();
        let k = members.len();
        let me = members.iter().position(|&p| p == self.rank).unwrap_or(0);
        let part = |i: usize| (i * n / k * size)..((i + 1) * n / k * size);
        let mut buf = std::mem::take(&mut state.scratch);
        // This rank's part (reduced in place where the type allows) and the others around it.
        let (mine_at, mine_end) = (part(me).start, part(me).end);
        let (before, rest) = data.split_at_mut(mine_at);
        let (mine, after) = rest.split_at_mut(mine_end - mine_at);
        let other = |i: usize| if i < me { part(i) } else { (part(i).start - mine_end)..(part(i).end - mine_end) };

        // Phase 1: part i of this rank's input to members[i]; reduce our own part.
        let mut red = Reducer::new(dtype, op, mine);
        let peers: Vec<usize> = (0..k).filter(|&i| i != me).collect();
        let outs: Vec<Outgoing<'_>> = peers
            .iter()
            .map(|&i| Outgoing {
                dest: members[i],
                pieces: vec![if i < me { &before[other(i)] } else { &after[other(i)] }],
            })
            .collect();
        let mine_len = mine.len() as u64;
        let ins: Vec<Incoming> =
            peers.iter().map(|&i| Incoming { src: members[i], expected: Some(mine_len) }).collect();
        let outcome = self.exchange(state, COLL, &outs, &ins, deadline, &mut |_, off, chunk| {
            blocks(chunk, &mut buf, |at, b| red.fold(dtype, op, mine, off as usize + at, b))
        });
        drop(outs);
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                state.scratch = buf;
                return Err(e);
            }
        };
        check_sizes(&ins, &outcome)?;
        red.finish(dtype, op, 1 + arrived(&outcome), mine);
        let mine: &[u8] = mine;

        // Phase 2: our reduced part (and our raw input of orphaned parts) to every survivor.
        let now = self.active_ranks();
        let orphans: Vec<usize> = peers.iter().copied().filter(|&i| !now[members[i]]).collect();
        let survivors: Vec<usize> = peers.iter().copied().filter(|&i| now[members[i]]).collect();
        let mut raw = Vec::new();
        let mut orphan_accs = Vec::new();
        let mut orphan_offs = Vec::new();
        for &o in &orphans {
            let input = if o < me { &before[other(o)] } else { &after[other(o)] };
            orphan_offs.push(raw.len());
            raw.extend_from_slice(input);
            orphan_accs.push(Acc::new(dtype, input));
        }
        let outs: Vec<Outgoing<'_>> =
            survivors.iter().map(|&i| Outgoing { dest: members[i], pieces: vec![mine, &raw] }).collect();
        let ins: Vec<Incoming> = survivors
            .iter()
            .map(|&i| Incoming { src: members[i], expected: Some((part(i).len() + raw.len()) as u64) })
            .collect();
        // A phase 1 that waited out a silent rank must not leave phase 2 without time: it gets a timeout of
        // its own, twice as long when phase 1 lost a rank (a survivor that waited that rank's timeout out in
        // phase 1 starts phase 2 up to a timeout later than one that saw a write fail).
        let grace = if state.lost_in_call == state.calls { 2 } else { 1 };
        let deadline = deadline.max(Instant::now() + self.timeout() * grace);
        let outcome = self.exchange(state, COLL, &outs, &ins, deadline, &mut |j, off, chunk| {
            let i = survivors[j];
            let theirs = if i < me { &mut before[other(i)] } else { &mut after[other(i)] };
            let (off, end) = (off as usize, off as usize + chunk.len);
            // The sender's reduced part: straight into place.
            if off < theirs.len() {
                let upto = end.min(theirs.len());
                chunk.read(0, &mut theirs[off..upto])?;
            }
            // Raw inputs of the orphaned parts: fold them in.
            if end > theirs.len() {
                let from = off.max(theirs.len());
                buf.resize(end - from, 0);
                chunk.read(from - off, &mut buf)?;
                let raw_from = from - theirs.len();
                for (o, (&start, acc)) in orphan_offs.iter().zip(orphan_accs.iter_mut()).enumerate() {
                    let len = part(orphans[o]).len();
                    let (s, e) = (raw_from.max(start), (raw_from + buf.len()).min(start + len));
                    if s < e {
                        acc.fold(dtype, op, (s - start) / size, &buf[s - raw_from..e - raw_from]);
                    }
                }
            }
            Ok(())
        });
        state.scratch = buf;
        let outcome = outcome?;
        drop(outs);
        check_sizes(&ins, &outcome)?;
        let count = 1 + arrived(&outcome);
        for (&o, acc) in orphans.iter().zip(&orphan_accs) {
            let target = if o < me { &mut before[other(o)] } else { &mut after[other(o)] };
            acc.finish(dtype, op, count, target);
        }
        let missing: Vec<usize> =
            survivors.iter().zip(&outcome.received).filter(|(_, r)| r.is_none()).map(|(&i, _)| members[i]).collect();
        if missing.is_empty() { Ok(()) } else { Err(Error::Incomplete { ranks: missing }) }
    }

    /// Sends `root`'s `data` to every active rank. A non-root whose root is inactive or lost gets
    /// [`Error::RootInactive`] and its `data` is unspecified.
    pub fn broadcast(&self, data: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        let (mut state, active, deadline) = self.begin()?;
        if !active[root] {
            return Err(Error::RootInactive { root });
        }
        if root == self.rank {
            let outs: Vec<Outgoing<'_>> =
                self.others(&active).into_iter().map(|p| Outgoing { dest: p, pieces: vec![&*data] }).collect();
            self.exchange(&mut state, COLL, &outs, &[], deadline, &mut |_, _, _| Ok(()))?;
            return Ok(());
        }
        let ins = [Incoming { src: root, expected: Some(data.len() as u64) }];
        let outcome = self.exchange_copy(&mut state, &[], &ins, &[0], data, deadline)?;
        if outcome.received[0].is_none() { Err(Error::RootInactive { root }) } else { Ok(()) }
    }

    /// Every rank's `input` (the same length on every rank) into `output` (`world_size * input.len()`
    /// bytes, rank order). The part of an inactive or lost rank is left as it was.
    pub fn all_gather(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        let counts = vec![input.len() as u64; self.world];
        if output.len() != input.len() * self.world {
            return Err(Error::invalid(
                "output",
                format!("{} bytes; all_gather needs world_size * input = {}", output.len(), input.len() * self.world),
            ));
        }
        self.all_gather_v(input, output, &counts)
    }

    /// [`Group::all_gather`] with uneven parts: rank `r` contributes `counts[r]` bytes (its `input`),
    /// placed at the sum of the counts before it.
    pub fn all_gather_v(&self, input: &[u8], output: &mut [u8], counts: &[u64]) -> Result<()> {
        if counts.len() != self.world {
            return Err(Error::invalid("counts", format!("{} entries for {} ranks", counts.len(), self.world)));
        }
        let (offs, total) = offsets("counts", counts)?;
        if input.len() as u64 != counts[self.rank] {
            return Err(Error::invalid(
                "input",
                format!("{} bytes but counts[{}] = {}", input.len(), self.rank, counts[self.rank]),
            ));
        }
        if output.len() != total {
            return Err(Error::invalid("output", format!("{} bytes but the counts add up to {total}", output.len())));
        }
        let (mut state, active, deadline) = self.begin()?;
        let others = self.others(&active);
        output[offs[self.rank]..offs[self.rank] + input.len()].copy_from_slice(input);
        let outs: Vec<Outgoing<'_>> = others.iter().map(|&p| Outgoing { dest: p, pieces: vec![input] }).collect();
        let ins: Vec<Incoming> = others.iter().map(|&p| Incoming { src: p, expected: Some(counts[p]) }).collect();
        let starts: Vec<usize> = others.iter().map(|&p| offs[p]).collect();
        self.exchange_copy(&mut state, &outs, &ins, &starts, output, deadline)?;
        Ok(())
    }

    /// Reduces `input` (`world_size` equal parts) over the active ranks; part `rank` of the result goes to
    /// `output` (`input.len() / world_size` bytes).
    pub fn reduce_scatter(&self, input: &[u8], output: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_elems("output", output.len(), dtype)?;
        check_op(dtype, op)?;
        let n = output.len();
        if input.len() != n * self.world {
            return Err(Error::invalid(
                "input",
                format!("{} bytes; reduce_scatter needs world_size * output = {}", input.len(), n * self.world),
            ));
        }
        let (mut state, active, deadline) = self.begin()?;
        let others = self.others(&active);
        let me = self.rank;
        output.copy_from_slice(&input[me * n..(me + 1) * n]);
        let mut red = Reducer::new(dtype, op, output);
        let mut buf = std::mem::take(&mut state.scratch);
        let outs: Vec<Outgoing<'_>> =
            others.iter().map(|&p| Outgoing { dest: p, pieces: vec![&input[p * n..(p + 1) * n]] }).collect();
        let ins: Vec<Incoming> = others.iter().map(|&p| Incoming { src: p, expected: Some(n as u64) }).collect();
        let outcome = self.exchange(&mut state, COLL, &outs, &ins, deadline, &mut |_, off, chunk| {
            blocks(chunk, &mut buf, |at, b| red.fold(dtype, op, output, off as usize + at, b))
        });
        state.scratch = buf;
        let outcome = outcome?;
        check_sizes(&ins, &outcome)?;
        red.finish(dtype, op, 1 + arrived(&outcome), output);
        Ok(())
    }

    /// Reduces `data` over the active ranks into `root`'s `data` (other ranks' `data` is unchanged). A
    /// non-root whose root failed returns `Ok` (it has no result to give) with the root masked.
    pub fn reduce(&self, data: &mut [u8], dtype: DType, op: ReduceOp, root: usize) -> Result<()> {
        check_elems("data", data.len(), dtype)?;
        check_op(dtype, op)?;
        self.check_root(root)?;
        let (mut state, active, deadline) = self.begin()?;
        if !active[root] {
            return Err(Error::RootInactive { root });
        }
        if root != self.rank {
            let outs = [Outgoing { dest: root, pieces: vec![&*data] }];
            self.exchange(&mut state, COLL, &outs, &[], deadline, &mut |_, _, _| Ok(()))?;
            return Ok(());
        }
        let others = self.others(&active);
        let mut red = Reducer::new(dtype, op, data);
        let mut buf = std::mem::take(&mut state.scratch);
        let ins: Vec<Incoming> =
            others.iter().map(|&p| Incoming { src: p, expected: Some(data.len() as u64) }).collect();
        let outcome = self.exchange(&mut state, COLL, &[], &ins, deadline, &mut |_, off, chunk| {
            blocks(chunk, &mut buf, |at, b| red.fold(dtype, op, data, off as usize + at, b))
        });
        state.scratch = buf;
        let outcome = outcome?;
        check_sizes(&ins, &outcome)?;
        red.finish(dtype, op, 1 + arrived(&outcome), data);
        Ok(())
    }

    /// Every rank's `input` into `root`'s `output` (`world_size * input.len()` bytes; ignored, may be
    /// empty, elsewhere). The part of an inactive or lost rank is left as it was.
    pub fn gather(&self, input: &[u8], output: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = input.len();
        if self.rank == root && output.len() != n * self.world {
            return Err(Error::invalid(
                "output",
                format!("{} bytes; gather needs world_size * input = {}", output.len(), n * self.world),
            ));
        }
        let (mut state, active, deadline) = self.begin()?;
        if !active[root] {
            return Err(Error::RootInactive { root });
        }
        if root != self.rank {
            let outs = [Outgoing { dest: root, pieces: vec![input] }];
            self.exchange(&mut state, COLL, &outs, &[], deadline, &mut |_, _, _| Ok(()))?;
            return Ok(());
        }
        output[root * n..(root + 1) * n].copy_from_slice(input);
        let others = self.others(&active);
        let ins: Vec<Incoming> = others.iter().map(|&p| Incoming { src: p, expected: Some(n as u64) }).collect();
        let starts: Vec<usize> = others.iter().map(|&p| p * n).collect();
        self.exchange_copy(&mut state, &[], &ins, &starts, output, deadline)?;
        Ok(())
    }

    /// Part `r` of `root`'s `input` (`world_size * output.len()` bytes; ignored, may be empty, elsewhere)
    /// into rank `r`'s `output`. A non-root whose root is inactive or lost gets [`Error::RootInactive`].
    pub fn scatter(&self, input: &[u8], output: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        let n = output.len();
        if self.rank == root && input.len() != n * self.world {
            return Err(Error::invalid(
                "input",
                format!("{} bytes; scatter needs world_size * output = {}", input.len(), n * self.world),
            ));
        }
        let (mut state, active, deadline) = self.begin()?;
        if !active[root] {
            return Err(Error::RootInactive { root });
        }
        if root == self.rank {
            output.copy_from_slice(&input[root * n..(root + 1) * n]);
            let outs: Vec<Outgoing<'_>> = self
                .others(&active)
                .into_iter()
                .map(|p| Outgoing { dest: p, pieces: vec![&input[p * n..(p + 1) * n]] })
                .collect();
            self.exchange(&mut state, COLL, &outs, &[], deadline, &mut |_, _, _| Ok(()))?;
            return Ok(());
        }
        let ins = [Incoming { src: root, expected: Some(n as u64) }];
        let outcome = self.exchange_copy(&mut state, &[], &ins, &[0], output, deadline)?;
        if outcome.received[0].is_none() { Err(Error::RootInactive { root }) } else { Ok(()) }
    }

    /// Rank `r` sends `send_counts[d]` bytes of `input` (consecutive, in rank order) to each rank `d` and
    /// receives `recv_counts[s]` bytes from each rank `s` into `output` (consecutive, in rank order). Counts
    /// may be uneven and zero; `send_counts[d]` here must equal `recv_counts[r]` at `d`. The part from an
    /// inactive or lost rank is left as it was.
    pub fn all_to_all(&self, input: &[u8], send_counts: &[u64], output: &mut [u8], recv_counts: &[u64]) -> Result<()> {
        for (arg, counts) in [("send_counts", send_counts), ("recv_counts", recv_counts)] {
            if counts.len() != self.world {
                return Err(Error::invalid(arg, format!("{} entries for {} ranks", counts.len(), self.world)));
            }
        }
        let (soffs, stotal) = offsets("send_counts", send_counts)?;
        let (roffs, rtotal) = offsets("recv_counts", recv_counts)?;
        if input.len() != stotal {
            return Err(Error::invalid("input", format!("{} bytes but send_counts add up to {stotal}", input.len())));
        }
        if output.len() != rtotal {
            return Err(Error::invalid("output", format!("{} bytes but recv_counts add up to {rtotal}", output.len())));
        }
        let me = self.rank;
        if send_counts[me] != recv_counts[me] {
            return Err(Error::invalid(
                "recv_counts",
                format!("recv_counts[{me}] = {} but send_counts[{me}] = {}", recv_counts[me], send_counts[me]),
            ));
        }
        let (mut state, active, deadline) = self.begin()?;
        let others = self.others(&active);
        let own = send_counts[me] as usize;
        output[roffs[me]..roffs[me] + own].copy_from_slice(&input[soffs[me]..soffs[me] + own]);
        let outs: Vec<Outgoing<'_>> = others
            .iter()
            .map(|&p| Outgoing { dest: p, pieces: vec![&input[soffs[p]..soffs[p] + send_counts[p] as usize]] })
            .collect();
        let ins: Vec<Incoming> = others.iter().map(|&p| Incoming { src: p, expected: Some(recv_counts[p]) }).collect();
        let starts: Vec<usize> = others.iter().map(|&p| roffs[p]).collect();
        self.exchange_copy(&mut state, &outs, &ins, &starts, output, deadline)?;
        Ok(())
    }

    /// Returns when every active rank has entered the barrier (one empty message to and from each).
    pub fn barrier(&self) -> Result<()> {
        let (mut state, active, deadline) = self.begin()?;
        let others = self.others(&active);
        let outs: Vec<Outgoing<'_>> = others.iter().map(|&p| Outgoing { dest: p, pieces: vec![] }).collect();
        let ins: Vec<Incoming> = others.iter().map(|&p| Incoming { src: p, expected: Some(0) }).collect();
        self.exchange_copy(&mut state, &outs, &ins, &vec![0; ins.len()], &mut [], deadline)?;
        Ok(())
    }

    /// Sends `data` to `dst` (matched by the `dst`'s `recv` with the same tag, in order). Returns when the
    /// data is in `dst`'s buffer; a message larger than two chunks needs `dst` to be receiving.
    pub fn send(&self, data: &[u8], dst: usize, tag: u32) -> Result<()> {
        self.send_recv(&[SendOp { peer: dst, tag, data }], &mut [])
    }

    /// Receives the next message from `src` into `data`; it must carry `tag` and exactly `data.len()`
    /// bytes (else [`Error::TagMismatch`] / [`Error::SizeMismatch`], the message drained).
    pub fn recv(&self, data: &mut [u8], src: usize, tag: u32) -> Result<()> {
        self.send_recv(&[], &mut [RecvOp { peer: src, tag, data }])
    }

    /// Runs point-to-point sends and receives together (torch's `batch_isend_irecv`), so that two ranks
    /// may exchange large messages with each other without deadlock. Messages between a pair are matched
    /// in order.
    pub fn send_recv(&self, sends: &[SendOp<'_>], recvs: &mut [RecvOp<'_>]) -> Result<()> {
        for (arg, peer) in sends.iter().map(|s| ("dst", s.peer)).chain(recvs.iter().map(|r| ("src", r.peer))) {
            if peer >= self.world {
                return Err(self.bad_rank(arg, peer));
            }
            if peer == self.rank {
                return Err(Error::invalid(arg, "a rank cannot send to or receive from itself"));
            }
        }
        let (mut state, active, deadline) = self.begin()?;
        if let Some(peer) = sends.iter().map(|s| s.peer).chain(recvs.iter().map(|r| r.peer)).find(|&p| !active[p]) {
            return Err(Error::PeerInactive { peer });
        }
        // Round i carries the i-th message of every pair.
        let mut round = 0;
        loop {
            let pick = |peers: &mut dyn Iterator<Item = usize>| -> Vec<usize> {
                let mut seen = vec![0usize; self.world];
                let mut out = Vec::new();
                for (i, p) in peers.enumerate() {
                    if seen[p] == round {
                        out.push(i);
                    }
                    seen[p] += 1;
                }
                out
            };
            let s_idx = pick(&mut sends.iter().map(|s| s.peer));
            let r_idx = pick(&mut recvs.iter().map(|r| r.peer));
            if s_idx.is_empty() && r_idx.is_empty() {
                return Ok(());
            }
            let headers: Vec<[u8; P2P_HEADER]> = s_idx
                .iter()
                .map(|&i| {
                    let mut h = [0u8; P2P_HEADER];
                    h[..4].copy_from_slice(&sends[i].tag.to_le_bytes());
                    h[8..].copy_from_slice(&(sends[i].data.len() as u64).to_le_bytes());
                    h
                })
                .collect();
            let outs: Vec<Outgoing<'_>> = s_idx
                .iter()
                .zip(&headers)
                .map(|(&i, h)| Outgoing { dest: sends[i].peer, pieces: vec![&h[..], sends[i].data] })
                .collect();
            let ins: Vec<Incoming> = r_idx.iter().map(|&i| Incoming { src: recvs[i].peer, expected: None }).collect();
            // Per receive: the header's (tag, length) once read.
            let mut found: Vec<Option<(u32, u64)>> = vec![None; ins.len()];
            let outcome = {
                let mut targets: Vec<&mut RecvOp<'_>> = Vec::new();
                let mut rest: &mut [RecvOp<'_>] = recvs;
                let mut pos = 0;
                for &i in &r_idx {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - pos);
                    let (first, tail) = tail.split_at_mut(1);
                    targets.push(&mut first[0]);
                    rest = tail;
                    pos = i + 1;
                }
                self.exchange(&mut state, P2P, &outs, &ins, deadline, &mut |j, off, chunk| {
                    let t = &mut targets[j];
                    let mut skip = 0usize;
                    if off == 0 {
                        let mut h = [0u8; P2P_HEADER];
                        if chunk.len < P2P_HEADER {
                            found[j] = Some((u32::MAX, u64::MAX));
                            return Ok(());
                        }
                        chunk.read(0, &mut h)?;
                        let tag = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                        let len = u64::from_le_bytes(h[8..].try_into().unwrap_or_default());
                        found[j] = Some((tag, len));
                        skip = P2P_HEADER;
                    }
                    match found[j] {
                        Some((tag, len)) if tag == t.tag && len == t.data.len() as u64 => {}
                        _ => return Ok(()),
                    }
                    let at = off as usize + skip - P2P_HEADER;
                    let n = chunk.len - skip;
                    if at + n > t.data.len() {
                        return Ok(());
                    }
                    chunk.read(skip, &mut t.data[at..at + n])
                })?
            };
            for (j, &i) in r_idx.iter().enumerate() {
                let r = &recvs[i];
                let Some(total) = outcome.received[j] else {
                    return Err(Error::PeerInactive { peer: r.peer });
                };
                match found[j] {
                    Some((tag, len))
                        if len.checked_add(P2P_HEADER as u64) != Some(total) || len != r.data.len() as u64 =>
                    {
                        let _ = tag;
                        return Err(Error::SizeMismatch { peer: r.peer, sent: len, expected: r.data.len() as u64 });
                    }
                    Some((tag, _)) if tag != r.tag => {
                        return Err(Error::TagMismatch { peer: r.peer, expected: r.tag, found: tag });
                    }
                    None => {
                        return Err(Error::SizeMismatch { peer: r.peer, sent: total, expected: r.data.len() as u64 });
                    }
                    _ => {}
                }
            }
            if let Some(&peer) = outcome.lost.iter().find(|p| outs.iter().any(|o| o.dest == **p)) {
                return Err(Error::PeerInactive { peer });
            }
            round += 1;
        }
    }
}
