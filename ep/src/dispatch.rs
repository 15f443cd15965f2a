//! `dispatch`: every token goes to the ranks that own its top-k experts, as records in per-source receive
//! slots; the receiver packs them per local expert, by source rank, as upstream's low-latency layout.

use std::time::Instant;

use crate::buffer::{EpBuffer, Outgoing, signal_word};
use crate::convert::{FP8_BLOCK, le_bytes_to_u16, quantize_fp8, u16_to_le_bytes};
use crate::error::{Error, Result};
use crate::layout::BufferLayout;

/// The tokens of a dispatch: `num_tokens x hidden` BF16 values, row-major.
#[derive(Debug, Clone, Copy)]
pub enum Tokens<'a> {
    /// BF16 values as their `u16` bits.
    Bf16(&'a [u16]),
    /// BF16 values as little-endian bytes (two per value), e.g. a tensor's memory.
    Bf16Bytes(&'a [u8]),
}

impl Tokens<'_> {
    /// Number of BF16 values.
    pub fn len(&self) -> usize {
        match self {
            Tokens::Bf16(v) => v.len(),
            Tokens::Bf16Bytes(b) => b.len() / 2,
        }
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `t` as little-endian bytes, appended to `out` (cleared first).
    fn row_bytes(&self, t: usize, hidden: usize, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Tokens::Bf16(v) => u16_to_le_bytes(&v[t * hidden..(t + 1) * hidden], out),
            Tokens::Bf16Bytes(b) => out.extend_from_slice(&b[t * hidden * 2..(t + 1) * hidden * 2]),
        }
    }

    /// Row `t` as values, appended to `out` (cleared first).
    fn row_values(&self, t: usize, hidden: usize, out: &mut Vec<u16>) {
        out.clear();
        match self {
            Tokens::Bf16(v) => out.extend_from_slice(&v[t * hidden..(t + 1) * hidden]),
            Tokens::Bf16Bytes(b) => out.extend(
                b[t * hidden * 2..(t + 1) * hidden * 2].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])),
            ),
        }
    }
}

/// The arguments of [`EpBuffer::dispatch`] (upstream's names).
#[derive(Debug, Clone, Copy)]
pub struct DispatchArgs<'a> {
    /// `num_tokens x hidden` tokens of this rank.
    pub x: Tokens<'a>,
    /// Values per token.
    pub hidden: usize,
    /// `num_tokens x num_topk` expert indices, `-1` = masked.
    pub topk_idx: &'a [i64],
    /// Experts per token.
    pub num_topk: usize,
    /// Most tokens any rank dispatches in one call (same on every rank).
    pub num_max_dispatch_tokens_per_rank: usize,
    /// Experts over all ranks (same on every rank); rank `r` owns `[r*E/R, (r+1)*E/R)`.
    pub num_experts: usize,
    /// How long to wait for the other ranks; a rank that is not heard from in time is marked inactive.
    pub timeout: std::time::Duration,
    /// Send and return E4M3 codes with one f32 scale per 128 values instead of BF16.
    pub use_fp8: bool,
}

/// Received tokens, `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`.
#[derive(Debug, Clone, PartialEq)]
pub enum RecvX {
    /// BF16 values as `u16` bits.
    Bf16(Vec<u16>),
    /// E4M3 codes, and their scales `[num_local_experts, num_ranks * N, hidden / 128]` (value = code * scale).
    Fp8 {
        /// The codes.
        codes: Vec<u8>,
        /// One scale per 128 codes.
        scales: Vec<f32>,
    },
}

impl Default for RecvX {
    fn default() -> Self {
        RecvX::Bf16(Vec::new())
    }
}

/// What [`EpBuffer::combine`] needs from the dispatch it follows (upstream's `handle` tuple).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchHandle {
    /// `packed_recv_src_info` `[num_local_experts, num_ranks * N]`: each row's token index in its source
    /// rank, `-1` past the expert's count.
    pub packed_recv_src_info: Vec<i32>,
    /// `packed_recv_layout_range` `[num_local_experts, num_ranks]`: `(begin << 32) | count` of the rows from
    /// each source rank (0 when none).
    pub packed_recv_layout_range: Vec<i64>,
    /// The dispatch's `num_max_dispatch_tokens_per_rank`.
    pub num_max_dispatch_tokens_per_rank: usize,
    /// The dispatch's `hidden`.
    pub hidden: usize,
    /// The dispatch's `num_experts`.
    pub num_experts: usize,
}

/// The result of a dispatch (upstream's `packed_recv_x`, `packed_recv_count` and handle).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchOutput {
    /// The received tokens; rows past an expert's count are unspecified.
    pub packed_recv_x: RecvX,
    /// `packed_recv_count` `[num_local_experts]`: rows received per local expert.
    pub packed_recv_count: Vec<i32>,
    /// Source info and layout ranges, for combine.
    pub handle: DispatchHandle,
}

/// A checked dispatch call.
struct Plan {
    layout: BufferLayout,
    num_tokens: usize,
}

impl EpBuffer {
    /// Upstream's low-latency dispatch. Sends each token to the ranks owning its experts and returns what
    /// this rank's experts received. `active_ranks` (one entry per rank, 0 = inactive) is read and updated:
    /// inactive ranks are skipped, and a rank that is not heard from before `timeout` or whose writes fail
    /// is set to 0. Argument errors write nothing anywhere.
    pub fn dispatch(&self, args: &DispatchArgs<'_>, active_ranks: &mut [i32]) -> Result<DispatchOutput> {
        let mut out = DispatchOutput::default();
        self.dispatch_into(args, active_ranks, &mut out)?;
        Ok(out)
    }

    /// [`EpBuffer::dispatch`] into an output reused between calls (no large allocation per call).
    pub fn dispatch_into(
        &self,
        args: &DispatchArgs<'_>,
        active_ranks: &mut [i32],
        out: &mut DispatchOutput,
    ) -> Result<()> {
        let start = Instant::now();
        let Plan { layout, num_tokens } = self.check_dispatch(args, active_ranks)?;
        let mut state = self.lock();
        let peers = self.check_fit(&state, &layout, active_ranks)?;
        let (me, r, w) = (self.rank, self.num_ranks, layout.mask_words);
        let nl = layout.num_local_experts;

        // Local-expert masks of every token at every rank.
        let mut masks = vec![0u64; num_tokens * r * w];
        for t in 0..num_tokens {
            for &e in &args.topk_idx[t * args.num_topk..(t + 1) * args.num_topk] {
                if e < 0 {
                    continue;
                }
                let (d, le) = (e as usize / nl, e as usize % nl);
                masks[(t * r + d) * w + le / 64] |= 1 << (le % 64);
            }
        }

        let seq = state.seq + 1;
        state.seq = seq;
        let bank = layout.bank((seq % 2) as usize);
        let fp8 = args.use_fp8;
        let stride = layout.record_bytes(fp8);
        let header_len = layout.header_bytes() as usize;

        // Records, in token order, into the send slot of each destination (our own straight into our
        // receive slot).
        let mut counts = vec![0u32; r];
        let mut header = Vec::with_capacity(header_len);
        let mut payload = std::mem::take(&mut state.scratch);
        let mut values = Vec::new();
        let (mut codes, mut scales) = (vec![0u8; args.hidden], vec![0f32; args.hidden / FP8_BLOCK]);
        for t in 0..num_tokens {
            let mut encoded = false;
            for d in 0..r {
                let mask = &masks[(t * r + d) * w..(t * r + d + 1) * w];
                if active_ranks[d] == 0 || mask.iter().all(|&m| m == 0) {
                    continue;
                }
                if !encoded {
                    encoded = true;
                    if fp8 {
                        args.x.row_values(t, args.hidden, &mut values);
                        quantize_fp8(&values, &mut codes, &mut scales);
                        payload.clear();
                        payload.extend_from_slice(&codes);
                        payload.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
                    } else {
                        args.x.row_bytes(t, args.hidden, &mut payload);
                    }
                }
                header.clear();
                header.extend_from_slice(&(t as u32).to_le_bytes());
                header.extend_from_slice(&0u32.to_le_bytes());
                header.extend(mask.iter().flat_map(|m| m.to_le_bytes()));
                let slot = if d == me { layout.dispatch_recv_slot(me) } else { layout.dispatch_send_slot(d) };
                let at = bank + slot + u64::from(counts[d]) * stride;
                self.write(at, &header)?;
                self.write(at + header_len as u64, &payload)?;
                counts[d] += 1;
            }
        }
        state.scratch = payload;

        // Data then signal to every other active rank.
        let mut outgoing = Vec::new();
        for d in (0..r).filter(|&d| d != me && active_ranks[d] != 0) {
            let sig = bank + layout.outgoing_signal_off + d as u64 * 8;
            self.write(sig, &signal_word(seq, counts[d]).to_le_bytes())?;
            let remote = peers[d].addr + bank;
            let mut data = Vec::new();
            if counts[d] > 0 {
                data.push((
                    self.addr(bank + layout.dispatch_send_slot(d)),
                    remote + layout.dispatch_recv_slot(me),
                    u64::from(counts[d]) * stride,
                ));
            }
            let signal = (self.addr(sig), remote + layout.dispatch_signal_off + me as u64 * 8);
            outgoing.push(Outgoing { dest: d, segment: peers[d].segment.clone(), data, signal });
        }
        let dests: Vec<usize> = outgoing.iter().map(|o| o.dest).collect();
        let sends = self.start_sends(outgoing);
        let waiting = (0..r).map(|s| s != me && active_ranks[s] != 0).collect();
        let deadline = start + args.timeout;
        let mut arrivals = self.wait_signals(bank + layout.dispatch_signal_off, seq, waiting, &sends, &dests, deadline);
        arrivals.counts[me] = Some(counts[me]);
        for &lost in &arrivals.lost {
            active_ranks[lost] = 0;
        }
        drop(state);
        self.unpack(&layout, bank, fp8, &arrivals.counts, active_ranks, out)
    }

    fn check_dispatch(&self, args: &DispatchArgs<'_>, active_ranks: &[i32]) -> Result<Plan> {
        let layout =
            BufferLayout::new(args.num_max_dispatch_tokens_per_rank, args.hidden, self.num_ranks, args.num_experts)?;
        if args.use_fp8 && args.hidden % FP8_BLOCK != 0 {
            return Err(Error::invalid(
                "hidden",
                format!("hidden = {} is not a multiple of 128 (use_fp8)", args.hidden),
            ));
        }
        if args.x.len() % args.hidden != 0 {
            return Err(Error::invalid(
                "x",
                format!("{} values are not rows of hidden = {}", args.x.len(), args.hidden),
            ));
        }
        if let Tokens::Bf16Bytes(b) = args.x {
            if b.len() % 2 != 0 {
                return Err(Error::invalid("x", format!("{} bytes are not BF16 values", b.len())));
            }
        }
        let num_tokens = args.x.len() / args.hidden;
        if args.num_topk == 0 || args.topk_idx.len() != num_tokens * args.num_topk {
            return Err(Error::invalid(
                "topk_idx",
                format!("{} indices for {num_tokens} tokens with num_topk = {}", args.topk_idx.len(), args.num_topk),
            ));
        }
        if num_tokens > args.num_max_dispatch_tokens_per_rank {
            return Err(Error::invalid(
                "x",
                format!(
                    "{num_tokens} tokens, more than num_max_dispatch_tokens_per_rank = {}",
                    args.num_max_dispatch_tokens_per_rank
                ),
            ));
        }
        check_experts(args.topk_idx, args.num_experts)?;
        self.check_active(active_ranks)?;
        Ok(Plan { layout, num_tokens })
    }

    /// Packs the records of every arrived source into `out`; a source whose count or records are out of
    /// range is ignored as a whole and marked inactive (nothing is read outside its slot).
    fn unpack(
        &self,
        layout: &BufferLayout,
        bank: u64,
        fp8: bool,
        counts: &[Option<u32>],
        active_ranks: &mut [i32],
        out: &mut DispatchOutput,
    ) -> Result<()> {
        let (r, n, nl, hidden) =
            (self.num_ranks, layout.num_max_dispatch_tokens_per_rank, layout.num_local_experts, layout.hidden);
        let stride = layout.record_bytes(fp8) as usize;
        let header_len = layout.header_bytes() as usize;
        let w = layout.mask_words;
        let mut slots: Vec<Vec<u8>> = vec![Vec::new(); r];
        for s in 0..r {
            let Some(count) = counts[s] else { continue };
            if active_ranks[s] == 0 {
                continue;
            }
            let count = count as usize;
            if count > n {
                tracing::warn!(source = s, count, "EP dispatch count out of range; rank marked inactive");
                active_ranks[s] = 0;
                continue;
            }
            let mut bytes = vec![0u8; count * stride];
            self.read(bank + layout.dispatch_recv_slot(s), &mut bytes)?;
            let valid = bytes.chunks_exact(stride).all(|rec| {
                let src = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
                let mut any = false;
                let mut inside = true;
                for i in 0..w {
                    let m = u64::from_le_bytes(rec[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default());
                    any |= m != 0;
                    let bits_here = nl.saturating_sub(64 * i).min(64);
                    if bits_here < 64 && m >> bits_here != 0 {
                        inside = false;
                    }
                }
                src < n && any && inside
            });
            if !valid {
                tracing::warn!(source = s, "EP dispatch records out of range; rank marked inactive");
                active_ranks[s] = 0;
                continue;
            }
            slots[s] = bytes;
        }

        let rows = r * n;
        let (values, scales_per_row) = (nl * rows * hidden, hidden / FP8_BLOCK);
        match (&mut out.packed_recv_x, fp8) {
            (RecvX::Bf16(v), false) => v.resize(values, 0),
            (RecvX::Fp8 { codes, scales }, true) => {
                codes.resize(values, 0);
                scales.resize(nl * rows * scales_per_row, 0.0);
            }
            (x, false) => *x = RecvX::Bf16(vec![0; values]),
            (x, true) => *x = RecvX::Fp8 { codes: vec![0; values], scales: vec![0.0; nl * rows * scales_per_row] },
        }
        let h = &mut out.handle;
        h.packed_recv_src_info.clear();
        h.packed_recv_src_info.resize(nl * rows, -1);
        h.packed_recv_layout_range.clear();
        h.packed_recv_layout_range.resize(nl * r, 0);
        h.num_max_dispatch_tokens_per_rank = n;
        h.hidden = hidden;
        h.num_experts = layout.num_experts;
        out.packed_recv_count.clear();
        out.packed_recv_count.resize(nl, 0);

        for le in 0..nl {
            let (word, bit) = (le / 64, le % 64);
            let mut pos = 0usize;
            for (s, slot) in slots.iter().enumerate() {
                let begin = pos;
                for rec in slot.chunks_exact(stride) {
                    let m = u64::from_le_bytes(rec[8 + 8 * word..16 + 8 * word].try_into().unwrap_or_default());
                    if m >> bit & 1 == 0 {
                        continue;
                    }
                    let row = le * rows + pos;
                    let src = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
                    out.handle.packed_recv_src_info[row] = src as i32;
                    let payload = &rec[header_len..];
                    match &mut out.packed_recv_x {
                        RecvX::Bf16(v) => {
                            le_bytes_to_u16(&payload[..hidden * 2], &mut v[row * hidden..(row + 1) * hidden]);
                        }
                        RecvX::Fp8 { codes, scales } => {
                            codes[row * hidden..(row + 1) * hidden].copy_from_slice(&payload[..hidden]);
                            let sc = &payload[hidden..hidden + scales_per_row * 4];
                            for (o, c) in scales[row * scales_per_row..(row + 1) * scales_per_row]
                                .iter_mut()
                                .zip(sc.chunks_exact(4))
                            {
                                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            }
                        }
                    }
                    pos += 1;
                }
                let count = pos - begin;
                if count > 0 {
                    out.handle.packed_recv_layout_range[le * r + s] = ((begin as i64) << 32) | count as i64;
                }
            }
            out.packed_recv_count[le] = pos as i32;
        }
        Ok(())
    }
}

/// Every index is `-1` (masked) or an expert in `[0, num_experts)`.
pub(crate) fn check_experts(topk_idx: &[i64], num_experts: usize) -> Result<()> {
    if let Some((i, &e)) = topk_idx.iter().enumerate().find(|&(_, &e)| e < -1 || e >= num_experts as i64) {
        return Err(Error::invalid(
            "topk_idx",
            format!("entry {i} is expert {e}, outside -1 (masked) and 0..{num_experts}"),
        ));
    }
    Ok(())
}
