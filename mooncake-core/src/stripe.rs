//! Cutting one request into pieces: striped over several lanes (connections, rails, copy threads)
//! when it is large, and split so that no piece exceeds a size limit (a provider's largest
//! message, an RDMA slice). Pure arithmetic, no allocation: [`StripePlan`] is an iterator of
//! [`StripePiece`]s; [`piece_count`] and [`piece_bounds`] cut a range into fixed-size pieces with
//! random access.
//!
//! A request is striped when there is more than one lane and it is at least twice `stripe_min`:
//! then into `len / stripe_min` stripes, at most one per lane, each a multiple of
//! [`STRIPE_ALIGN`] bytes except the last, which takes the rest. Rounding up to pages can leave
//! nothing for the last stripes; those are not planned, so every piece is non-empty.

/// Stripes are rounded up to this many bytes (a page), except the last.
pub const STRIPE_ALIGN: u64 = 4096;

/// How the length of a stripe is derived before it is rounded up to [`STRIPE_ALIGN`].
///
/// Both are kept so that each transport cuts exactly where it always has; they differ only when
/// `len / stripes` is an exact multiple of a page and `len` is not a multiple of `stripes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeRounding {
    /// `len / stripes`, rounded down: the last stripe may be up to `stripes - 1` bytes longer than
    /// the others (tcp, shm).
    Down,
    /// `len / stripes`, rounded up: no stripe is longer than the first (libfabric).
    Up,
}

/// One piece of a planned request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripePiece {
    /// Index of the stripe it belongs to (`0..stripes`): the lane, or the offset from a first lane.
    pub stripe: usize,
    /// Offset from the start of the request.
    pub offset: u64,
    /// Bytes (never zero).
    pub len: u64,
}

/// The pieces of one request, in order of offset.
#[derive(Debug, Clone)]
pub struct StripePlan {
    len: u64,
    /// Non-empty stripes.
    stripes: u64,
    stripe_len: u64,
    max_piece: u64,
    // Iteration state.
    stripe: u64,
    offset_in_stripe: u64,
}

impl StripePlan {
    /// Plans a `len`-byte request over `lanes` lanes (0 counts as 1): requests of at least
    /// `2 * stripe_min` bytes are striped over up to `lanes` lanes in page-aligned stripes of about
    /// `len / stripes` bytes (at least `stripe_min`), rounded as `rounding` says. Pieces are not
    /// limited in size until [`StripePlan::max_piece`] says so.
    pub fn new(len: u64, lanes: usize, stripe_min: u64, rounding: StripeRounding) -> StripePlan {
        let lanes = lanes.max(1) as u64;
        let stripe_min = stripe_min.max(1);
        let wanted = if lanes > 1 && len >= stripe_min.saturating_mul(2) { (len / stripe_min).min(lanes) } else { 1 };
        let stripe_len = if wanted > 1 {
            let even = match rounding {
                StripeRounding::Down => len / wanted,
                StripeRounding::Up => len.div_ceil(wanted),
            };
            even.next_multiple_of(STRIPE_ALIGN)
        } else {
            len
        };
        // Rounding up may leave the last stripes empty; count only the non-empty ones. (Rounding
        // down may leave a few bytes past `wanted` stripes: the last one takes them.)
        let stripes = if stripe_len == 0 { 0 } else { len.div_ceil(stripe_len).min(wanted) };
        StripePlan { len, stripes, stripe_len, max_piece: u64::MAX, stripe: 0, offset_in_stripe: 0 }
    }

    /// Also cuts every stripe into pieces of at most `max_piece` bytes (0 = unlimited).
    pub fn max_piece(mut self, max_piece: u64) -> StripePlan {
        self.max_piece = unlimited_if_zero(max_piece);
        self
    }

    /// Number of non-empty stripes (lanes used): 0 for an empty request, else at least 1.
    pub fn stripes(&self) -> u64 {
        self.stripes
    }

    /// True when the request is cut over more than one lane.
    pub fn is_striped(&self) -> bool {
        self.stripes > 1
    }

    /// Total number of pieces of the plan, from the start (not what is left to iterate).
    pub fn pieces(&self) -> u64 {
        if self.stripes == 0 {
            return 0;
        }
        let (start, end) = self.stripe_bounds(self.stripes - 1);
        (self.stripes - 1) * self.stripe_len.div_ceil(self.max_piece) + (end - start).div_ceil(self.max_piece)
    }

    fn stripe_bounds(&self, s: u64) -> (u64, u64) {
        let start = s * self.stripe_len;
        let end = if s + 1 == self.stripes { self.len } else { start + self.stripe_len };
        (start, end)
    }
}

impl Iterator for StripePlan {
    type Item = StripePiece;

    fn next(&mut self) -> Option<StripePiece> {
        while self.stripe < self.stripes {
            let (start, end) = self.stripe_bounds(self.stripe);
            let at = start + self.offset_in_stripe;
            if at < end {
                let len = (end - at).min(self.max_piece);
                self.offset_in_stripe += len;
                return Some(StripePiece { stripe: self.stripe as usize, offset: at, len });
            }
            self.stripe += 1;
            self.offset_in_stripe = 0;
        }
        None
    }
}

fn unlimited_if_zero(max_piece: u64) -> u64 {
    if max_piece == 0 { u64::MAX } else { max_piece }
}

/// Number of pieces of at most `max_piece` bytes (0 = unlimited) that cover `len` bytes.
pub fn piece_count(len: u64, max_piece: u64) -> u64 {
    len.div_ceil(unlimited_if_zero(max_piece))
}

/// Offset and length of piece `i` when `len` bytes are cut into pieces of `max_piece` bytes
/// (0 = unlimited), the last one taking the rest; `(len, 0)` past the end.
pub fn piece_bounds(len: u64, max_piece: u64, i: u64) -> (u64, u64) {
    let size = unlimited_if_zero(max_piece);
    let offset = i.saturating_mul(size).min(len);
    (offset, (len - offset).min(size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use StripeRounding::{Down, Up};

    /// Plans and checks the invariants: the pieces tile the request exactly, in order, none empty
    /// or above `max_piece`, stripes numbered from 0 without gaps, `pieces()` matching.
    fn plan(len: u64, lanes: usize, stripe_min: u64, rounding: StripeRounding, max_piece: u64) -> Vec<StripePiece> {
        let p = StripePlan::new(len, lanes, stripe_min, rounding).max_piece(max_piece);
        let (stripes, count) = (p.stripes(), p.pieces());
        let v: Vec<StripePiece> = p.collect();
        assert_eq!(v.len() as u64, count, "pieces() matches the iteration ({len}, {lanes}, {stripe_min}, {max_piece})");
        let mut at = 0;
        let mut last_stripe = 0;
        for x in &v {
            assert_eq!(x.offset, at, "pieces are contiguous");
            assert!(x.len > 0, "no empty piece");
            assert!(max_piece == 0 || x.len <= max_piece);
            assert!(x.stripe == last_stripe || x.stripe == last_stripe + 1, "stripes in order");
            assert!((x.stripe as u64) < stripes && x.stripe < lanes.max(1));
            last_stripe = x.stripe;
            at += x.len;
        }
        assert_eq!(at, len, "every byte exactly once");
        assert_eq!(v.last().map_or(0, |x| x.stripe as u64 + 1), stripes);
        v
    }

    fn lens(v: &[StripePiece]) -> Vec<u64> {
        v.iter().map(|p| p.len).collect()
    }

    #[test]
    fn one_lane_or_a_small_request_is_one_piece() {
        for r in [Down, Up] {
            assert_eq!(plan(1, 1, 1 << 20, r, 0), vec![StripePiece { stripe: 0, offset: 0, len: 1 }]);
            assert_eq!(lens(&plan(64 << 20, 1, 1 << 20, r, 0)), vec![64 << 20]);
            assert_eq!(lens(&plan(4096, 4, 1 << 20, r, 0)), vec![4096]);
            // Just below twice the minimum stripe: not striped; at twice: two stripes.
            let p = StripePlan::new((2 << 20) - 1, 4, 1 << 20, r);
            assert!(!p.is_striped() && p.stripes() == 1);
            assert_eq!(lens(&plan(2 << 20, 4, 1 << 20, r, 0)), vec![1 << 20, 1 << 20]);
            // Zero lanes count as one.
            assert_eq!(plan(16 << 20, 0, 1 << 20, r, 0).len(), 1);
        }
    }

    #[test]
    fn an_empty_request_has_no_pieces() {
        for r in [Down, Up] {
            let p = StripePlan::new(0, 4, 4096, r);
            assert_eq!((p.stripes(), p.pieces(), p.is_striped()), (0, 0, false));
            assert!(plan(0, 4, 4096, r, 1).is_empty());
        }
    }

    #[test]
    fn large_requests_stripe_over_every_lane() {
        for r in [Down, Up] {
            let v = plan(16 << 20, 4, 1 << 20, r, 0);
            assert_eq!(v.iter().map(|p| p.stripe).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
            assert!(v.iter().all(|p| p.len == 4 << 20));
            // Fewer stripes than lanes when the request holds fewer minimum stripes.
            assert_eq!(plan(3 << 20, 8, 1 << 20, r, 0).len(), 3);
            // Uneven sizes: page-aligned stripes, the last takes the rest.
            let v = plan((10 << 20) + 123, 3, 1 << 20, r, 0);
            assert_eq!(v.len(), 3);
            assert!(v[..2].iter().all(|p| p.len % STRIPE_ALIGN == 0));
            assert!(v[2].len < v[0].len);
        }
    }

    #[test]
    fn rounding_down_and_up_cut_where_the_transports_do() {
        // len / stripes is exactly 1 MiB with one byte left over.
        let len = (4 << 20) + 1;
        // Down (tcp, shm): three 1 MiB stripes, the last takes 1 MiB + 1.
        assert_eq!(lens(&plan(len, 4, 1 << 20, Down, 0)), vec![1 << 20, 1 << 20, 1 << 20, (1 << 20) + 1]);
        // Up (libfabric): 1 MiB + one page each, the last takes the rest.
        let up = (1 << 20) + 4096;
        assert_eq!(lens(&plan(len, 4, 1 << 20, Up, 0)), vec![up, up, up, len - 3 * up]);
    }

    #[test]
    fn rounding_never_yields_empty_stripes() {
        // Small minimum stripes over many lanes: rounding to pages covers the request in fewer
        // stripes than planned; the empty ones are dropped.
        let v = plan(64 * 4097, 64, 4096, Down, 0);
        assert!(v.len() < 64 && v.iter().all(|p| p.len > 0));
        for len in [(2 << 20) + 1, (3 << 20) - 1, 3 << 20, (12 << 20) + 4095, 8192, 8193, 3 * 4096 + 1] {
            for lanes in 1..=9 {
                for r in [Down, Up] {
                    plan(len, lanes, 1 << 20, r, 0);
                    plan(len, lanes, 4096, r, 0);
                    plan(len, lanes, 4096, r, 5000);
                    plan(len, lanes, 1, r, 1 << 20);
                }
            }
        }
    }

    #[test]
    fn boundary_sizes_tile_exactly() {
        for len in (1..=3 * STRIPE_ALIGN + 2).step_by(97).chain([u64::MAX / 2, u64::MAX - 1, u64::MAX]) {
            for lanes in [1, 2, 3, 64] {
                for stripe_min in [1, 4096, len / 2 + 1, u64::MAX] {
                    for r in [Down, Up] {
                        let v = plan(len, lanes, stripe_min, r, 0);
                        assert!(v.len() <= lanes);
                        plan(len, lanes, stripe_min, r, u64::MAX / 3);
                    }
                }
            }
        }
    }

    #[test]
    fn max_piece_splits_each_stripe() {
        for r in [Down, Up] {
            assert_eq!(lens(&plan(10 << 20, 1, 1 << 20, r, 4 << 20)), vec![4 << 20, 4 << 20, 2 << 20]);
            // Two 8 MiB stripes, each cut into 3 + 3 + 2 MiB.
            let v = plan(16 << 20, 2, 1 << 20, r, 3 << 20);
            assert_eq!(v.len(), 6);
            assert_eq!(v.iter().filter(|p| p.stripe == 0).map(|p| p.len).sum::<u64>(), 8 << 20);
            assert_eq!(v.iter().filter(|p| p.stripe == 1).map(|p| p.len).sum::<u64>(), 8 << 20);
            assert_eq!(plan(7, 1, 1 << 20, r, 2).len(), 4);
            assert_eq!(lens(&plan(7, 1, 1 << 20, r, 7)), vec![7]);
            assert_eq!(lens(&plan(7, 1, 1 << 20, r, 8)), vec![7]);
        }
    }

    /// The cut tcp and shm made before this planner (lane, offset, len of the non-empty pieces;
    /// one piece on no particular lane when not striped).
    fn cut_before_down(len: u64, lanes: u64, stripe_min: u64) -> Vec<(Option<u64>, u64, u64)> {
        let parts = if lanes > 1 { (len / stripe_min).min(lanes) } else { 1 };
        if parts < 2 {
            return vec![(None, 0, len)];
        }
        let piece = (len / parts).next_multiple_of(4096);
        let (mut offset, mut out) = (0, Vec::new());
        for i in 0..parts {
            let l = if i + 1 == parts { len - offset } else { piece.min(len - offset) };
            if l > 0 {
                out.push((Some(i), offset, l));
            }
            offset += l;
        }
        out
    }

    /// The stripes libfabric's own planner cut before this one.
    fn cut_before_up(len: u64, rails: u64, stripe_min: u64) -> Vec<(u64, u64)> {
        let stripes = if rails > 1 && len >= stripe_min * 2 { (len / stripe_min).min(rails).max(1) } else { 1 };
        let stripe_len = if stripes > 1 { len.div_ceil(stripes).next_multiple_of(4096) } else { len };
        let stripes = len.div_ceil(stripe_len).max(1);
        (0..stripes)
            .map(|s| {
                let start = s * stripe_len;
                let end = if s + 1 == stripes { len } else { (start + stripe_len).min(len) };
                (start, end - start)
            })
            .collect()
    }

    #[test]
    fn cuts_exactly_where_the_transports_cut_before() {
        let mut lens: Vec<u64> = (1..64).map(|k| k * 4096 * 7 / 3).collect();
        for base in [1u64 << 20, 2 << 20, 4 << 20, 64 << 20, 1 << 30] {
            lens.extend([base - 4097, base - 1, base, base + 1, base + 4095, base + 4096, base + 12289]);
            lens.extend((2..9).flat_map(|k| [k * base - 1, k * base, k * base + 1, k * base + 7]));
        }
        for &len in &lens {
            for lanes in 1..=9u64 {
                for stripe_min in [4096, 64 << 10, 256 << 10, 1 << 20] {
                    let p = StripePlan::new(len, lanes as usize, stripe_min, Down);
                    let got: Vec<(Option<u64>, u64, u64)> = if p.is_striped() {
                        p.map(|x| (Some(x.stripe as u64), x.offset, x.len)).collect()
                    } else {
                        vec![(None, 0, len)]
                    };
                    assert_eq!(got, cut_before_down(len, lanes, stripe_min), "down: {len} {lanes} {stripe_min}");
                    let got: Vec<(u64, u64)> =
                        StripePlan::new(len, lanes as usize, stripe_min, Up).map(|x| (x.offset, x.len)).collect();
                    assert_eq!(got, cut_before_up(len, lanes, stripe_min), "up: {len} {lanes} {stripe_min}");
                }
            }
        }
    }

    #[test]
    fn fixed_size_pieces_cover_the_range_exactly() {
        let size = 64 << 10;
        assert_eq!(piece_count(1, size), 1);
        assert_eq!(piece_count(size, size), 1);
        assert_eq!(piece_count(size + 1, size), 2);
        assert_eq!(piece_count(0, size), 0);
        assert_eq!((piece_count(5, 0), piece_count(0, 0)), (1, 0), "0 = unlimited");
        assert_eq!(piece_bounds(5, 0, 0), (0, 5));
        for len in [1, size - 1, size, size + 1, 3 * size + 100] {
            let n = piece_count(len, size);
            let mut next = 0;
            for i in 0..n {
                let (off, l) = piece_bounds(len, size, i);
                assert_eq!(off, next);
                assert!(l > 0 && l <= size);
                next = off + l;
            }
            assert_eq!(next, len);
            assert_eq!(piece_bounds(len, size, n), (len, 0));
        }
        assert_eq!(piece_bounds(3 * size + 100, size, 3), (3 * size, 100));
        assert_eq!(piece_bounds(10, size, u64::MAX), (10, 0), "no overflow past the end");
    }
}
