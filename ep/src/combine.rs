//! `combine`: each expert owner sends its output rows back to the tokens' home ranks, which reduce them
//! with the top-k weights (in f32, result BF16).

use std::time::Instant;

use crate::buffer::{EpBuffer, Outgoing, signal_word};
use crate::convert::{bf16_to_f32, f32_to_bf16, u16_to_le_bytes};
use crate::dispatch::{DispatchHandle, check_experts};
use crate::error::{Error, Result};
use crate::layout::BufferLayout;

/// The expert outputs a combine sends.
#[derive(Debug, Clone, Copy)]
pub enum CombineInput<'a> {
    /// `[num_local_experts, num_ranks * N, hidden]` BF16 rows in the dispatch output's layout.
    Rows(&'a [u16]),
    /// The rows are already in the buffer: written through [`EpBuffer::write_next_combine_buffer`] (or at
    /// [`EpBuffer::next_combine_buffer_addr`]) after the dispatch (upstream's `zero_copy`).
    ZeroCopy,
}

/// The arguments of [`EpBuffer::combine`] (upstream's names).
#[derive(Debug, Clone, Copy)]
pub struct CombineArgs<'a> {
    /// The expert outputs.
    pub x: CombineInput<'a>,
    /// This rank's `num_tokens x num_topk` expert indices, as given to the dispatch.
    pub topk_idx: &'a [i64],
    /// `num_tokens x num_topk` weights.
    pub topk_weights: &'a [f32],
    /// Experts per token.
    pub num_topk: usize,
    /// The handle of the dispatch this combine follows.
    pub handle: &'a DispatchHandle,
    /// How long to wait for the other ranks; a rank not heard from in time is marked inactive.
    pub timeout: std::time::Duration,
}

/// A checked combine call.
struct Plan {
    layout: BufferLayout,
    num_tokens: usize,
}

impl EpBuffer {
    /// Upstream's low-latency combine: returns `num_tokens x hidden` BF16 values, each token's expert
    /// outputs weighted by `topk_weights` and summed in f32 (in top-k order). Experts of ranks inactive at
    /// the end of the call contribute nothing. `active_ranks` as for [`EpBuffer::dispatch`].
    pub fn combine(&self, args: &CombineArgs<'_>, active_ranks: &mut [i32]) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        self.combine_into(args, active_ranks, &mut out)?;
        Ok(out)
    }

    /// [`EpBuffer::combine`] into a vector reused between calls.
    pub fn combine_into(&self, args: &CombineArgs<'_>, active_ranks: &mut [i32], out: &mut Vec<u16>) -> Result<()> {
        let start = Instant::now();
        let Plan { layout, num_tokens } = self.check_combine(args, active_ranks)?;
        let mut state = self.lock();
        let peers = self.check_fit(&state, &layout, active_ranks)?;
        let (me, r, n, nl, hidden) = (
            self.rank,
            self.num_ranks,
            layout.num_max_dispatch_tokens_per_rank,
            layout.num_local_experts,
            layout.hidden,
        );
        let row_bytes = layout.row_bytes();
        let ranges = &args.handle.packed_recv_layout_range;

        let seq = state.seq + 1;
        state.seq = seq;
        let bank = layout.bank((seq % 2) as usize);

        // Owner side: rows of (local expert, home rank) to the home rank's receive block for this rank.
        let mut bytes = std::mem::take(&mut state.scratch);
        let mut outgoing = Vec::new();
        let mut own_total = 0u32;
        for h in (0..r).filter(|&h| active_ranks[h] != 0) {
            let remote = peers[h].addr + bank;
            let mut data = Vec::new();
            let mut total = 0u32;
            for le in 0..nl {
                let (begin, count) = split_range(ranges[le * r + h]);
                if count == 0 {
                    continue;
                }
                let send_at = bank + layout.combine_send_row(le, begin);
                let len = count as u64 * row_bytes;
                match args.x {
                    CombineInput::Rows(x) => {
                        let rows = &x[(le * r * n + begin) * hidden..(le * r * n + begin + count) * hidden];
                        u16_to_le_bytes(rows, &mut bytes);
                    }
                    CombineInput::ZeroCopy if h == me => {
                        bytes.resize(len as usize, 0);
                        self.read(send_at, &mut bytes)?;
                    }
                    CombineInput::ZeroCopy => {}
                }
                if h == me {
                    self.write(bank + layout.combine_recv_rows(me, le), &bytes)?;
                } else {
                    if let CombineInput::Rows(_) = args.x {
                        self.write(send_at, &bytes)?;
                    }
                    data.push((self.addr(send_at), remote + layout.combine_recv_rows(me, le), len));
                }
                total += count as u32;
            }
            if h == me {
                own_total = total;
                continue;
            }
            let sig = bank + layout.outgoing_signal_off + h as u64 * 8;
            self.write(sig, &signal_word(seq, total).to_le_bytes())?;
            let signal = (self.addr(sig), remote + layout.combine_signal_off + me as u64 * 8);
            outgoing.push(Outgoing { dest: h, segment: peers[h].segment.clone(), data, signal });
        }
        state.scratch = bytes;

        // Home side: where each (token, k) finds its row among the rows of its expert.
        let k = args.num_topk;
        let mut per_expert = vec![0usize; layout.num_experts];
        let mut row_of = vec![usize::MAX; num_tokens * k];
        for t in 0..num_tokens {
            let idx = &args.topk_idx[t * k..(t + 1) * k];
            for j in 0..k {
                let Ok(e) = usize::try_from(idx[j]) else { continue };
                row_of[t * k + j] = match idx[..j].iter().position(|&p| p == idx[j]) {
                    Some(first) => row_of[t * k + first],
                    None => {
                        per_expert[e] += 1;
                        per_expert[e] - 1
                    }
                };
            }
        }
        let expected: Vec<usize> = (0..r).map(|o| per_expert[o * nl..(o + 1) * nl].iter().sum()).collect();

        let dests: Vec<usize> = outgoing.iter().map(|o| o.dest).collect();
        let sends = self.start_sends(outgoing);
        let waiting = (0..r).map(|s| s != me && active_ranks[s] != 0).collect();
        let deadline = start + args.timeout;
        let mut arrivals = self.wait_signals(bank + layout.combine_signal_off, seq, waiting, &sends, &dests, deadline);
        if active_ranks[me] != 0 {
            arrivals.counts[me] = Some(own_total);
        }
        for &lost in &arrivals.lost {
            active_ranks[lost] = 0;
        }
        drop(state);

        // Owners that answered with the count this rank expects; their rows are read straight out of the
        // receive blocks, one row at a time (it stays in cache for the weighted sum).
        let mut valid = vec![false; r];
        for o in 0..r {
            let Some(count) = arrivals.counts[o] else { continue };
            if active_ranks[o] == 0 {
                continue;
            }
            if count as usize != expected[o] {
                tracing::warn!(
                    owner = o,
                    count,
                    expected = expected[o],
                    "EP combine count mismatch; rank marked inactive"
                );
                active_ranks[o] = 0;
                continue;
            }
            valid[o] = true;
        }

        out.clear();
        out.resize(num_tokens * hidden, 0);
        let mut acc = vec![0f32; hidden];
        let mut row = vec![0u8; row_bytes as usize];
        for t in 0..num_tokens {
            acc.fill(0.0);
            for j in 0..k {
                let Ok(e) = usize::try_from(args.topk_idx[t * k + j]) else { continue };
                let (o, le) = (e / nl, e % nl);
                if active_ranks[o] == 0 || !valid[o] {
                    continue;
                }
                let at = bank + layout.combine_recv_rows(o, le) + row_of[t * k + j] as u64 * row_bytes;
                self.read(at, &mut row)?;
                let w = args.topk_weights[t * k + j];
                for (a, v) in acc.iter_mut().zip(row.chunks_exact(2)) {
                    *a += w * bf16_to_f32(u16::from_le_bytes([v[0], v[1]]));
                }
            }
            for (o, &a) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(&acc) {
                *o = f32_to_bf16(a);
            }
        }
        Ok(())
    }

    /// Address of the zero-copy combine rows for the next call, laid out `[num_local_experts, num_ranks * N,
    /// hidden]` BF16 as the dispatch output (upstream's `get_next_combine_buffer`). For bindings that write
    /// it directly; they must do so between the dispatch and the combine, and nothing else may use the
    /// buffer meanwhile.
    pub fn next_combine_buffer_addr(&self, handle: &DispatchHandle) -> Result<u64> {
        let layout = self.combine_layout(handle)?;
        let bank = layout.bank(((self.sequence() + 1) % 2) as usize);
        Ok(self.addr(bank + layout.combine_send_row(0, 0)))
    }

    /// Writes `values` (whole rows) at row `row` of local expert `local_expert` of the next zero-copy
    /// combine buffer (see [`EpBuffer::next_combine_buffer_addr`]).
    pub fn write_next_combine_buffer(
        &self,
        handle: &DispatchHandle,
        local_expert: usize,
        row: usize,
        values: &[u16],
    ) -> Result<()> {
        let layout = self.combine_layout(handle)?;
        let rows_per_expert = self.num_ranks * layout.num_max_dispatch_tokens_per_rank;
        if local_expert >= layout.num_local_experts {
            return Err(Error::invalid("local_expert", format!("{local_expert} of {}", layout.num_local_experts)));
        }
        if values.len() % layout.hidden != 0 || row + values.len() / layout.hidden > rows_per_expert {
            return Err(Error::invalid(
                "values",
                format!(
                    "{} values from row {row} do not fit {rows_per_expert} rows of {}",
                    values.len(),
                    layout.hidden
                ),
            ));
        }
        let bank = layout.bank(((self.sequence() + 1) % 2) as usize);
        let mut bytes = Vec::new();
        u16_to_le_bytes(values, &mut bytes);
        self.write(bank + layout.combine_send_row(local_expert, row), &bytes)
    }

    fn combine_layout(&self, handle: &DispatchHandle) -> Result<BufferLayout> {
        let layout = BufferLayout::new(
            handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
            self.num_ranks,
            handle.num_experts,
        )?;
        if self.mem.len() < layout.total_bytes() {
            return Err(Error::BufferTooSmall { needed: layout.total_bytes(), have: self.mem.len() });
        }
        Ok(layout)
    }

    fn check_combine(&self, args: &CombineArgs<'_>, active_ranks: &[i32]) -> Result<Plan> {
        let handle = args.handle;
        let layout = BufferLayout::new(
            handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
            self.num_ranks,
            handle.num_experts,
        )?;
        let (r, n, nl) = (self.num_ranks, layout.num_max_dispatch_tokens_per_rank, layout.num_local_experts);
        if handle.packed_recv_src_info.len() != nl * r * n || handle.packed_recv_layout_range.len() != nl * r {
            return Err(Error::invalid("handle", "its tensors do not match its own num_experts and token counts"));
        }
        for (i, &range) in handle.packed_recv_layout_range.iter().enumerate() {
            let (begin, count) = split_range(range);
            if range < 0 || count > n || begin + count > r * n {
                return Err(Error::invalid("handle", format!("layout range {i} ({range:#x}) is out of bounds")));
            }
        }
        if let CombineInput::Rows(x) = args.x {
            if x.len() != nl * r * n * layout.hidden {
                return Err(Error::invalid(
                    "x",
                    format!("{} values, expected {nl} x {} x {}", x.len(), r * n, layout.hidden),
                ));
            }
        }
        if args.num_topk == 0 || args.topk_idx.len() % args.num_topk != 0 {
            return Err(Error::invalid(
                "topk_idx",
                format!("{} entries with num_topk = {}", args.topk_idx.len(), args.num_topk),
            ));
        }
        let num_tokens = args.topk_idx.len() / args.num_topk;
        if num_tokens > n {
            return Err(Error::invalid(
                "topk_idx",
                format!("{num_tokens} tokens, more than num_max_dispatch_tokens_per_rank = {n}"),
            ));
        }
        if args.topk_weights.len() != args.topk_idx.len() {
            return Err(Error::invalid(
                "topk_weights",
                format!("{} weights for {} indices", args.topk_weights.len(), args.topk_idx.len()),
            ));
        }
        check_experts(args.topk_idx, layout.num_experts)?;
        self.check_active(active_ranks)?;
        Ok(Plan { layout, num_tokens })
    }
}

/// `(begin, count)` of a layout-range word.
fn split_range(range: i64) -> (usize, usize) {
    let bits = range as u64;
    ((bits >> 32) as usize, (bits & 0xffff_ffff) as usize)
}
