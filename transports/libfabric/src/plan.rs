//! How one request is cut into RMA operations: striped across rails (NICs) when it is large,
//! and split so that no operation exceeds the provider's `max_msg_size`.
//!
//! Pure arithmetic, no allocation: [`Plan`] is an iterator of [`Piece`]s.

/// Stripes are rounded to this many bytes (pages), except the last.
pub const STRIPE_ALIGN: u64 = 4096;

/// One RMA operation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Local rail that carries it.
    pub rail: usize,
    /// Offset from the start of the request.
    pub offset: u64,
    /// Bytes (never zero).
    pub len: u64,
}

/// The pieces of one request.
#[derive(Debug, Clone)]
pub struct Plan {
    len: u64,
    rails: usize,
    first_rail: usize,
    stripes: u64,
    stripe_len: u64,
    max_msg: u64,
    // Iteration state.
    stripe: u64,
    offset_in_stripe: u64,
}

impl Plan {
    /// Plans a request of `len` bytes (> 0) over `rails` rails (>= 1), starting at rail
    /// `first_rail` (round-robin across requests). Requests of at least `2 * stripe_min` bytes are
    /// striped over up to `rails` rails in page-aligned stripes of at least `stripe_min` bytes;
    /// every stripe is then cut into operations of at most `max_msg` bytes (0 = unlimited).
    pub fn new(len: u64, rails: usize, first_rail: usize, stripe_min: u64, max_msg: u64) -> Plan {
        let rails = rails.max(1);
        let stripe_min = stripe_min.max(1);
        let stripes = if rails > 1 && len >= stripe_min.saturating_mul(2) {
            (len / stripe_min).min(rails as u64).max(1)
        } else {
            1
        };
        let stripe_len = if stripes > 1 { len.div_ceil(stripes).next_multiple_of(STRIPE_ALIGN) } else { len };
        // Rounding up may leave the last stripes empty; count only the non-empty ones.
        let stripes = if stripe_len == 0 { 1 } else { len.div_ceil(stripe_len).max(1) };
        Plan {
            len,
            rails,
            first_rail: first_rail % rails,
            stripes,
            stripe_len,
            max_msg: if max_msg == 0 { u64::MAX } else { max_msg },
            stripe: 0,
            offset_in_stripe: 0,
        }
    }

    /// Number of stripes (rails used).
    pub fn stripes(&self) -> u64 {
        self.stripes
    }

    fn stripe_bounds(&self, s: u64) -> (u64, u64) {
        let start = s * self.stripe_len;
        let end = if s + 1 == self.stripes { self.len } else { (start + self.stripe_len).min(self.len) };
        (start, end)
    }

    /// Total number of pieces (operations) of the plan, from the start.
    pub fn pieces(&self) -> u64 {
        (0..self.stripes)
            .map(|s| {
                let (a, b) = self.stripe_bounds(s);
                (b - a).div_ceil(self.max_msg)
            })
            .sum()
    }
}

impl Iterator for Plan {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        while self.stripe < self.stripes {
            let (start, end) = self.stripe_bounds(self.stripe);
            let at = start + self.offset_in_stripe;
            if at < end {
                let len = (end - at).min(self.max_msg);
                self.offset_in_stripe += len;
                let rail = (self.first_rail + self.stripe as usize) % self.rails;
                return Some(Piece { rail, offset: at, len });
            }
            self.stripe += 1;
            self.offset_in_stripe = 0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(len: u64, rails: usize, first: usize, stripe_min: u64, max_msg: u64) -> Vec<Piece> {
        let p = Plan::new(len, rails, first, stripe_min, max_msg);
        let count = p.pieces();
        let v: Vec<Piece> = p.collect();
        assert_eq!(v.len() as u64, count, "pieces() matches the iteration");
        // Pieces tile the request exactly, in order, none empty or above max_msg.
        let mut at = 0;
        for x in &v {
            assert_eq!(x.offset, at);
            assert!(x.len > 0);
            assert!(max_msg == 0 || x.len <= max_msg);
            assert!(x.rail < rails.max(1));
            at += x.len;
        }
        assert_eq!(at, len);
        v
    }

    #[test]
    fn one_rail_is_one_piece() {
        assert_eq!(pieces(1, 1, 0, 1 << 20, 0), vec![Piece { rail: 0, offset: 0, len: 1 }]);
        assert_eq!(pieces(64 << 20, 1, 0, 1 << 20, 0), vec![Piece { rail: 0, offset: 0, len: 64 << 20 }]);
    }

    #[test]
    fn small_requests_stay_whole_and_rotate() {
        assert_eq!(pieces(4096, 4, 2, 1 << 20, 0), vec![Piece { rail: 2, offset: 0, len: 4096 }]);
        assert_eq!(pieces(4096, 4, 5, 1 << 20, 0)[0].rail, 1, "first_rail wraps");
        // Just below twice the minimum stripe: not striped.
        assert_eq!(pieces((2 << 20) - 1, 4, 0, 1 << 20, 0).len(), 1);
    }

    #[test]
    fn large_requests_stripe_over_every_rail() {
        let v = pieces(16 << 20, 4, 1, 1 << 20, 0);
        assert_eq!(v.len(), 4);
        assert_eq!(v.iter().map(|p| p.rail).collect::<Vec<_>>(), vec![1, 2, 3, 0]);
        assert!(v.iter().all(|p| p.len == 4 << 20));
        // Two stripes when only twice the minimum.
        let v = pieces(2 << 20, 4, 0, 1 << 20, 0);
        assert_eq!(v.len(), 2);
        // Uneven sizes: page-aligned stripes, the last takes the rest.
        let v = pieces((10 << 20) + 123, 3, 0, 1 << 20, 0);
        assert_eq!(v.len(), 3);
        assert!(v[..2].iter().all(|p| p.len % STRIPE_ALIGN == 0));
        assert!(v[2].len < v[0].len);
    }

    #[test]
    fn max_msg_splits_each_stripe() {
        let v = pieces(10 << 20, 1, 0, 1 << 20, 4 << 20);
        assert_eq!(v.iter().map(|p| p.len).collect::<Vec<_>>(), vec![4 << 20, 4 << 20, 2 << 20]);
        let v = pieces(16 << 20, 2, 0, 1 << 20, 3 << 20);
        // Two 8 MiB stripes, each cut into 3 + 3 + 2 MiB.
        assert_eq!(v.len(), 6);
        assert_eq!(v.iter().filter(|p| p.rail == 0).map(|p| p.len).sum::<u64>(), 8 << 20);
        assert_eq!(v.iter().filter(|p| p.rail == 1).map(|p| p.len).sum::<u64>(), 8 << 20);
        assert_eq!(pieces(7, 1, 0, 1 << 20, 2).len(), 4);
    }

    #[test]
    fn rounding_never_yields_empty_stripes() {
        // 3 rails, length slightly above 2 stripes: rounding up to pages must not leave the third
        // stripe empty.
        for len in [(2 << 20) + 1, (3 << 20) - 1, 3 << 20, (12 << 20) + 4095] {
            for rails in 1..=8 {
                pieces(len, rails, 0, 1 << 20, 0);
                pieces(len, rails, 3, 1 << 20, 1 << 20);
            }
        }
    }
}
