//! Number formats of the wire and the outputs: BF16 (as `u16` bits) and FP8 E4M3 (`float8_e4m3fn`: 4
//! exponent bits with bias 7, 3 mantissa bits, no infinities, `0x7f`/`0xff` = NaN, largest finite 448).
//!
//! Every conversion from `f32` rounds to nearest, ties to even. FP8 saturates: a finite value beyond the
//! range becomes ±448 (as CUDA's `__NV_SATFINITE`), NaN stays NaN.

/// The largest finite E4M3 value.
pub const FP8_MAX: f32 = 448.0;

/// Values sharing one FP8 scale (upstream's per-128-channel block).
pub const FP8_BLOCK: usize = 128;

/// Smallest block maximum used to build a scale (upstream's clamp), so an all-zero block gets a finite scale.
pub const FP8_AMAX_MIN: f32 = 1e-4;

/// BF16 bits to `f32` (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `f32` to BF16 bits, round to nearest even; NaN stays a (quiet) NaN, overflow becomes infinity.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// `f32` to E4M3 bits, round to nearest even, saturating at ±448; NaN becomes `0x7f` (with the sign).
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = x.abs();
    if a >= FP8_MAX {
        return sign | 0x7e;
    }
    let bits = a.to_bits();
    let exp = bits >> 23;
    // E4M3 normals have an unbiased exponent of at least -6 (f32 biased exponent 121).
    if exp < 121 {
        // Subnormal range: multiples of 2^-9. Scaling by a power of two is exact; 8 rounds up into the
        // smallest normal, whose code is 0x08, so the code is the rounded multiple itself.
        let q = (a * 512.0).round_ties_even();
        return sign | (q as u8);
    }
    // Keep the f32 exponent and the top 3 mantissa bits, rounding the 20 dropped bits to even.
    let mut keep = bits >> 20;
    let rest = bits & 0x000f_ffff;
    if rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1) {
        keep += 1;
    }
    // Rebias the exponent from 127 to 7 (120 << 3 in these units); a carry moves into the exponent.
    let code = keep - (120 << 3);
    sign | code.min(0x7e) as u8
}

/// E4M3 bits to `f32` (exact).
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0x0f);
    let mant = f32::from(code & 0x07);
    if exp == 0x0f && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        return sign * mant * (1.0 / 512.0);
    }
    sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
}

/// Quantizes BF16 values (a multiple of [`FP8_BLOCK`] of them) to E4M3 with one `f32` scale per block, as
/// upstream: `amax = max(|x|)` over the block (at least [`FP8_AMAX_MIN`]), code = `e4m3(x * (448 / amax))`,
/// scale = `amax / 448` (so `x ≈ e4m3_to_f32(code) * scale`).
pub fn quantize_fp8(x: &[u16], codes: &mut [u8], scales: &mut [f32]) {
    for ((block, out), scale) in x.chunks(FP8_BLOCK).zip(codes.chunks_mut(FP8_BLOCK)).zip(scales.iter_mut()) {
        let amax = block.iter().fold(0f32, |m, &b| m.max(bf16_to_f32(b).abs())).max(FP8_AMAX_MIN);
        let mul = FP8_MAX / amax;
        for (o, &b) in out.iter_mut().zip(block) {
            *o = f32_to_e4m3(bf16_to_f32(b) * mul);
        }
        *scale = amax / FP8_MAX;
    }
}

/// Replaces `out` with the little-endian bytes of `values` (a loop the compiler vectorizes).
pub fn u16_to_le_bytes(values: &[u16], out: &mut Vec<u8>) {
    out.clear();
    out.resize(values.len() * 2, 0);
    for (o, v) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// Fills `out` with the `u16`s of little-endian `bytes` (as many as both hold).
pub fn le_bytes_to_u16(bytes: &[u8], out: &mut [u16]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = u16::from_le_bytes([c[0], c[1]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_conversions_are_little_endian() {
        let mut bytes = Vec::new();
        u16_to_le_bytes(&[0x1234, 0xabcd], &mut bytes);
        assert_eq!(bytes, [0x34, 0x12, 0xcd, 0xab]);
        let mut back = [0u16; 2];
        le_bytes_to_u16(&bytes, &mut back);
        assert_eq!(back, [0x1234, 0xabcd]);
    }

    #[test]
    fn bf16_round_trip_and_rounding() {
        for bits in 0..=u16::MAX {
            let f = bf16_to_f32(bits);
            if f.is_nan() {
                assert!(bf16_to_f32(f32_to_bf16(f)).is_nan());
            } else {
                assert_eq!(f32_to_bf16(f), bits, "{bits:#x}");
            }
        }
        // 1 + 2^-8 is halfway between 1 and the next bf16 (1 + 2^-7): ties to the even one, 1.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // (1 + 2^-7) + 2^-8 is halfway between odd 0x3f81 and even 0x3f82.
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0 + 1e-6), 0x3f81);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
    }

    #[test]
    fn e4m3_known_values() {
        assert_eq!(f32_to_e4m3(0.0), 0x00);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        assert_eq!(f32_to_e4m3(1.0), 0x38);
        assert_eq!(f32_to_e4m3(-2.0), 0xc0);
        assert_eq!(f32_to_e4m3(448.0), 0x7e);
        assert_eq!(f32_to_e4m3(1e9), 0x7e, "saturates");
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
        assert_eq!(f32_to_e4m3(-1e9), 0xfe);
        assert_eq!(f32_to_e4m3(f32::NAN) & 0x7f, 0x7f);
        assert_eq!(f32_to_e4m3(2f32.powi(-9)), 0x01, "smallest subnormal");
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00, "half the smallest subnormal ties to even zero");
        assert_eq!(f32_to_e4m3(3.0 * 2f32.powi(-10)), 0x02, "1.5 subnormal steps ties to even 2");
        assert_eq!(f32_to_e4m3(2f32.powi(-6)), 0x08, "smallest normal");
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn e4m3_every_code_round_trips_and_midpoints_tie_to_even() {
        let finite: Vec<u8> = (0u8..=0x7e).collect();
        for &c in &finite {
            let f = e4m3_to_f32(c);
            assert_eq!(f32_to_e4m3(f), c, "{c:#x}");
            assert_eq!(f32_to_e4m3(-f), c | 0x80, "-{c:#x}");
        }
        for w in finite.windows(2) {
            let (lo, hi) = (e4m3_to_f32(w[0]), e4m3_to_f32(w[1]));
            let mid = (lo + hi) / 2.0; // exact in f32
            let even = if w[0] & 1 == 0 { w[0] } else { w[1] };
            assert_eq!(f32_to_e4m3(mid), even, "midpoint of {:#x} and {:#x}", w[0], w[1]);
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(f32_to_e4m3(below), w[0]);
            assert_eq!(f32_to_e4m3(above), w[1]);
        }
        // Between 448 and the next (NaN) slot everything saturates.
        assert_eq!(f32_to_e4m3(464.0), 0x7e);
        assert_eq!(f32_to_e4m3(470.0), 0x7e);
    }

    #[test]
    fn quantize_blocks_scale_to_the_block_maximum() {
        let mut x = vec![0u16; 256];
        for (i, v) in x.iter_mut().enumerate().take(128) {
            *v = f32_to_bf16(i as f32 - 64.0);
        }
        let mut codes = vec![0u8; 256];
        let mut scales = vec![0f32; 2];
        quantize_fp8(&x, &mut codes, &mut scales);
        assert_eq!(scales[0], 64.0 / 448.0);
        assert_eq!(codes[0], 0xfe, "-64 is the block maximum: -448");
        assert_eq!(scales[1], FP8_AMAX_MIN / 448.0, "all-zero block");
        assert!(codes[128..].iter().all(|&c| c == 0));
        for (i, &code) in codes.iter().enumerate().take(128) {
            let back = e4m3_to_f32(code) * scales[0];
            let want = i as f32 - 64.0;
            assert!((back - want).abs() <= want.abs() / 16.0 + 1e-6, "{i}: {back} vs {want}");
        }
    }
}
