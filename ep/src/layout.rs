//! Where everything lives in a rank's EP buffer for one call's parameters.
//!
//! The buffer holds two banks (a call with sequence number `seq` uses bank `seq % 2`, so a fast rank's next
//! call never lands on data a slow rank is still reading). A bank is, in order, each part aligned to 64 bytes:
//!
//! | part | size | what |
//! |------|------|------|
//! | dispatch signals | `R` x u64 | written by source `s` after its dispatch records |
//! | combine signals | `R` x u64 | written by expert owner `o` after its combine rows |
//! | outgoing signals | `R` x u64 | this rank's signal words, the source of the 8-byte signal writes |
//! | dispatch receive | `R` slots x `N` records | slot `s`: the records source `s` sent |
//! | combine receive | `R` x `L` x `N` rows | rows expert owner `o` computed for this rank's tokens, per local expert |
//! | send | max of both | dispatch: `R` slots x `N` records; combine: `L` x `R*N` rows (the zero-copy buffer) |
//!
//! `R` ranks, `E` experts, `L = E / R` local experts, `N` = `num_max_dispatch_tokens_per_rank`, a row is
//! `hidden` BF16 values. A dispatch record is a 8-byte header (source token index u32, reserved u32), the
//! token's local-expert mask at the destination (`ceil(L / 64)` u64 words), and the payload (BF16 row, or
//! FP8 codes followed by `hidden / 128` f32 scales), rounded up to 16 bytes. All words are little-endian.

use crate::convert::FP8_BLOCK;
use crate::error::{Error, Result};

/// Signal words, records and rows are aligned to this many bytes.
const ALIGN: u64 = 64;

fn align(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Byte offsets (from the start of the buffer) of one call's layout; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLayout {
    /// Ranks.
    pub num_ranks: usize,
    /// Experts over all ranks.
    pub num_experts: usize,
    /// Experts per rank.
    pub num_local_experts: usize,
    /// Most tokens one rank dispatches per call.
    pub num_max_dispatch_tokens_per_rank: usize,
    /// Values per token.
    pub hidden: usize,
    /// u64 words of a record's local-expert mask.
    pub mask_words: usize,
    /// Bytes of one bank.
    pub bank_bytes: u64,
    /// Offset of the dispatch signals inside a bank.
    pub dispatch_signal_off: u64,
    /// Offset of the combine signals inside a bank.
    pub combine_signal_off: u64,
    /// Offset of the outgoing signal words inside a bank.
    pub outgoing_signal_off: u64,
    /// Offset of the dispatch receive slots inside a bank.
    pub dispatch_recv_off: u64,
    /// Offset of the combine receive rows inside a bank.
    pub combine_recv_off: u64,
    /// Offset of the send area inside a bank.
    pub send_off: u64,
}

impl BufferLayout {
    /// The layout for these parameters, or a typed error naming the bad one.
    pub fn new(
        num_max_dispatch_tokens_per_rank: usize,
        hidden: usize,
        num_ranks: usize,
        num_experts: usize,
    ) -> Result<Self> {
        if num_ranks == 0 {
            return Err(Error::invalid("num_ranks", "at least one rank is needed"));
        }
        if num_experts == 0 || num_experts % num_ranks != 0 {
            return Err(Error::invalid(
                "num_experts",
                format!("{num_experts} experts cannot be split evenly over {num_ranks} ranks"),
            ));
        }
        if hidden == 0 || hidden > 1 << 24 {
            return Err(Error::invalid("hidden", format!("hidden = {hidden} must be in 1..=16777216")));
        }
        if num_max_dispatch_tokens_per_rank == 0 || num_max_dispatch_tokens_per_rank > 1 << 20 {
            return Err(Error::invalid(
                "num_max_dispatch_tokens_per_rank",
                format!("{num_max_dispatch_tokens_per_rank} must be in 1..=1048576"),
            ));
        }
        let num_local_experts = num_experts / num_ranks;
        let mask_words = num_local_experts.div_ceil(64);
        let (r, n, e) = (num_ranks as u64, num_max_dispatch_tokens_per_rank as u64, num_experts as u64);
        let row = hidden as u64 * 2;
        let record = align(8 + 8 * mask_words as u64 + row, 16);
        let too_big = || Error::invalid("num_max_dispatch_tokens_per_rank", "the layout overflows 64-bit offsets");
        let dispatch_area = r.checked_mul(n).and_then(|x| x.checked_mul(record)).ok_or_else(too_big)?;
        let combine_area = e.checked_mul(n).and_then(|x| x.checked_mul(row)).ok_or_else(too_big)?;
        let signals = align(r * 8, ALIGN);
        let dispatch_signal_off = 0;
        let combine_signal_off = signals;
        let outgoing_signal_off = 2 * signals;
        let dispatch_recv_off = 3 * signals;
        let combine_recv_off = dispatch_recv_off + align(dispatch_area, ALIGN);
        let send_off = combine_recv_off.checked_add(align(combine_area, ALIGN)).ok_or_else(too_big)?;
        let bank_bytes = send_off.checked_add(align(dispatch_area.max(combine_area), ALIGN)).ok_or_else(too_big)?;
        bank_bytes.checked_mul(2).ok_or_else(too_big)?;
        Ok(BufferLayout {
            num_ranks,
            num_experts,
            num_local_experts,
            num_max_dispatch_tokens_per_rank,
            hidden,
            mask_words,
            bank_bytes,
            dispatch_signal_off,
            combine_signal_off,
            outgoing_signal_off,
            dispatch_recv_off,
            combine_recv_off,
            send_off,
        })
    }

    /// Bytes the whole buffer needs (both banks).
    pub fn total_bytes(&self) -> u64 {
        2 * self.bank_bytes
    }

    /// Start of bank `bank` (0 or 1).
    pub fn bank(&self, bank: usize) -> u64 {
        bank as u64 * self.bank_bytes
    }

    /// Bytes of a BF16 row.
    pub fn row_bytes(&self) -> u64 {
        self.hidden as u64 * 2
    }

    /// Bytes of a record's payload: a BF16 row, or FP8 codes plus one f32 scale per 128 values.
    pub fn payload_bytes(&self, fp8: bool) -> u64 {
        if fp8 { (self.hidden + self.hidden / FP8_BLOCK * 4) as u64 } else { self.row_bytes() }
    }

    /// Bytes of a record's header (source token index, reserved word, local-expert mask).
    pub fn header_bytes(&self) -> u64 {
        8 + 8 * self.mask_words as u64
    }

    /// Stride of dispatch records of this precision.
    pub fn record_bytes(&self, fp8: bool) -> u64 {
        align(self.header_bytes() + self.payload_bytes(fp8), 16)
    }

    /// Bytes of one source's dispatch slot (room for `N` BF16 records, the larger kind).
    pub fn dispatch_slot_bytes(&self) -> u64 {
        self.num_max_dispatch_tokens_per_rank as u64 * self.record_bytes(false)
    }

    /// Offset (in a bank) of the dispatch receive slot of source `src`.
    pub fn dispatch_recv_slot(&self, src: usize) -> u64 {
        self.dispatch_recv_off + src as u64 * self.dispatch_slot_bytes()
    }

    /// Offset (in a bank) of the outgoing dispatch records for destination `dst`.
    pub fn dispatch_send_slot(&self, dst: usize) -> u64 {
        self.send_off + dst as u64 * self.dispatch_slot_bytes()
    }

    /// Offset (in a bank) of the combine rows expert owner `src` sends for its local expert `local_expert`.
    pub fn combine_recv_rows(&self, src: usize, local_expert: usize) -> u64 {
        let block = (src * self.num_local_experts + local_expert) as u64;
        self.combine_recv_off + block * self.num_max_dispatch_tokens_per_rank as u64 * self.row_bytes()
    }

    /// Offset (in a bank) of row `row` of local expert `local_expert` in the combine send area, laid out as
    /// the dispatch output `[L, R * N, hidden]`.
    pub fn combine_send_row(&self, local_expert: usize, row: usize) -> u64 {
        let rows_per_expert = (self.num_ranks * self.num_max_dispatch_tokens_per_rank) as u64;
        self.send_off + (local_expert as u64 * rows_per_expert + row as u64) * self.row_bytes()
    }
}

/// Bytes of EP buffer needed for these parameters (upstream's `get_ep_buffer_size_hint`); 0 when they
/// cannot form a layout (experts not divisible by ranks, zero sizes).
pub fn size_hint(num_max_dispatch_tokens_per_rank: usize, hidden: usize, num_ranks: usize, num_experts: usize) -> u64 {
    BufferLayout::new(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).map_or(0, |l| l.total_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_do_not_overlap_and_fit_the_hint() {
        let l = BufferLayout::new(128, 7168, 4, 64).unwrap();
        assert_eq!(l.num_local_experts, 16);
        assert!(l.dispatch_recv_slot(3) + l.dispatch_slot_bytes() <= l.combine_recv_off);
        assert!(l.combine_recv_rows(3, 15) + 128 * l.row_bytes() <= l.send_off);
        assert!(l.combine_send_row(15, 4 * 128 - 1) + l.row_bytes() <= l.bank_bytes);
        assert!(l.dispatch_send_slot(3) + l.dispatch_slot_bytes() <= l.bank_bytes);
        assert_eq!(size_hint(128, 7168, 4, 64), 2 * l.bank_bytes);
        assert!(l.record_bytes(true) < l.record_bytes(false));
        assert_eq!(l.record_bytes(false) % 16, 0);
    }

    #[test]
    fn bad_parameters_name_the_argument() {
        assert_eq!(BufferLayout::new(8, 128, 3, 8).unwrap_err().arg(), Some("num_experts"));
        assert_eq!(BufferLayout::new(8, 0, 2, 8).unwrap_err().arg(), Some("hidden"));
        assert_eq!(BufferLayout::new(0, 128, 2, 8).unwrap_err().arg(), Some("num_max_dispatch_tokens_per_rank"));
        assert_eq!(size_hint(8, 128, 3, 8), 0);
    }
}
