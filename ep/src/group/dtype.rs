//! Element types, reduction operators and the receiver-side reduction loops.
//!
//! Reductions accumulate in a wide type (f32 for f16/bf16/f32, f64 for f64, i64 for the integer types and
//! bool) and are narrowed once at the end, so a half-precision result is rounded once, however many ranks
//! contribute. The loops walk `chunks_exact` of little-endian bytes with the operator chosen outside the
//! loop, which the compiler vectorizes.

use crate::convert::{bf16_to_f32, f32_to_bf16};

use super::error::{Error, Result};

/// The element type of a buffer (torch's dtypes that the backend supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
    /// `torch.float16` (IEEE binary16).
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.int8`.
    I8,
    /// `torch.uint8`.
    U8,
    /// `torch.int32`.
    I32,
    /// `torch.int64`.
    I64,
    /// `torch.bool` (one byte, 0 or not 0).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    /// Every type, for tests and sweeps.
    pub const ALL: [DType; 9] =
        [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I8, DType::U8, DType::I32, DType::I64, DType::Bool];
}

/// A reduction operator (torch's `ReduceOp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReduceOp {
    /// Sum (logical or for bool, as torch).
    Sum,
    /// Sum divided by the number of ranks that contributed (the active ranks). Integers divide with
    /// truncation toward zero (as NCCL's `ncclAvg`); bool is refused as torch refuses it.
    Avg,
    /// Product (logical and for bool).
    Product,
    /// Minimum (NaN wins, as `torch.minimum`).
    Min,
    /// Maximum (NaN wins, as `torch.maximum`).
    Max,
}

/// Checks that `op` is defined for `dtype` (`arg` names the argument in the error).
pub(crate) fn check_op(dtype: DType, op: ReduceOp) -> Result<()> {
    if dtype == DType::Bool && op == ReduceOp::Avg {
        return Err(Error::invalid(
            "op",
            "ReduceOp::Avg is not defined for bool (torch: \"Cannot use ReduceOp.AVG with boolean inputs\")",
        ));
    }
    Ok(())
}

/// The accumulator of a reduction over `n` elements.
#[derive(Debug)]
pub(crate) enum Acc {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

fn fold<A: Copy, const W: usize>(acc: &mut [A], src: &[u8], dec: impl Fn([u8; W]) -> A, f: impl Fn(A, A) -> A) {
    for (a, c) in acc.iter_mut().zip(src.chunks_exact(W)) {
        let mut b = [0u8; W];
        b.copy_from_slice(c);
        *a = f(*a, dec(b));
    }
}

fn load<A: Copy, const W: usize>(acc: &mut [A], src: &[u8], dec: impl Fn([u8; W]) -> A) {
    fold(acc, src, dec, |_, v| v);
}

fn fmax<T: PartialOrd + Copy>(a: T, b: T) -> T {
    // `b != b` is NaN: NaN propagates as torch.maximum.
    #[allow(clippy::eq_op)]
    if b > a || b != b { b } else { a }
}

fn fmin<T: PartialOrd + Copy>(a: T, b: T) -> T {
    #[allow(clippy::eq_op)]
    if b < a || b != b { b } else { a }
}

macro_rules! apply {
    ($acc:expr, $src:expr, $dec:expr, $op:expr, $sum:expr, $prod:expr) => {
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => fold($acc, $src, $dec, $sum),
            ReduceOp::Product => fold($acc, $src, $dec, $prod),
            ReduceOp::Min => fold($acc, $src, $dec, fmin),
            ReduceOp::Max => fold($acc, $src, $dec, fmax),
        }
    };
}

impl Acc {
    /// An accumulator for `n` elements of `dtype`, initialised from `src` (`n * size` bytes).
    pub(crate) fn new(dtype: DType, src: &[u8]) -> Acc {
        let n = src.len() / dtype.size();
        let mut acc = match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Acc::F32(vec![0.0; n]),
            DType::F64 => Acc::F64(vec![0.0; n]),
            _ => Acc::I64(vec![0; n]),
        };
        acc.load(dtype, src);
        acc
    }

    /// Replaces the values with `src`.
    fn load(&mut self, dtype: DType, src: &[u8]) {
        match (self, dtype) {
            (Acc::F32(a), DType::F32) => load(a, src, f32::from_le_bytes),
            (Acc::F32(a), DType::F16) => load(a, src, |b| f16_to_f32(u16::from_le_bytes(b))),
            (Acc::F32(a), DType::BF16) => load(a, src, |b| bf16_to_f32(u16::from_le_bytes(b))),
            (Acc::F64(a), _) => load(a, src, f64::from_le_bytes),
            (Acc::I64(a), DType::I8) => load(a, src, |b: [u8; 1]| i64::from(b[0] as i8)),
            (Acc::I64(a), DType::U8) => load(a, src, |b: [u8; 1]| i64::from(b[0])),
            (Acc::I64(a), DType::Bool) => load(a, src, |b: [u8; 1]| i64::from(b[0] != 0)),
            (Acc::I64(a), DType::I32) => load(a, src, |b| i64::from(i32::from_le_bytes(b))),
            (Acc::I64(a), _) => load(a, src, i64::from_le_bytes),
            _ => {}
        }
    }

    /// Folds `src` (elements starting at element `at` of the accumulator) in with `op`.
    pub(crate) fn fold(&mut self, dtype: DType, op: ReduceOp, at: usize, src: &[u8]) {
        let n = src.len() / dtype.size();
        match self {
            Acc::F32(a) => {
                let Some(a) = a.get_mut(at..at + n) else { return };
                match dtype {
                    DType::F16 => apply!(a, src, |b| f16_to_f32(u16::from_le_bytes(b)), op, |x, y| x + y, |x, y| x * y),
                    DType::BF16 => {
                        apply!(a, src, |b| bf16_to_f32(u16::from_le_bytes(b)), op, |x, y| x + y, |x, y| x * y)
                    }
                    _ => apply!(a, src, f32::from_le_bytes, op, |x, y| x + y, |x, y| x * y),
                }
            }
            Acc::F64(a) => {
                let Some(a) = a.get_mut(at..at + n) else { return };
                apply!(a, src, f64::from_le_bytes, op, |x, y| x + y, |x, y| x * y)
            }
            Acc::I64(a) => {
                let Some(a) = a.get_mut(at..at + n) else { return };
                let (sum, prod) = (i64::wrapping_add, i64::wrapping_mul);
                match dtype {
                    // bool: sum = or, product = and (values are 0/1).
                    DType::Bool => apply!(a, src, |b: [u8; 1]| i64::from(b[0] != 0), op, |x, y| x | y, |x, y| x & y),
                    DType::I8 => apply!(a, src, |b: [u8; 1]| i64::from(b[0] as i8), op, sum, prod),
                    DType::U8 => apply!(a, src, |b: [u8; 1]| i64::from(b[0]), op, sum, prod),
                    DType::I32 => apply!(a, src, |b| i64::from(i32::from_le_bytes(b)), op, sum, prod),
                    _ => apply!(a, src, i64::from_le_bytes, op, sum, prod),
                }
            }
        }
    }

    /// Writes the result into `out` (as `dtype`), dividing by `count` for [`ReduceOp::Avg`].
    pub(crate) fn finish(&self, dtype: DType, op: ReduceOp, count: usize, out: &mut [u8]) {
        let avg = op == ReduceOp::Avg && count > 0;
        match self {
            Acc::F32(a) => {
                let d = count as f32;
                let f = |v: f32| if avg { v / d } else { v };
                match dtype {
                    DType::F16 => store(out, a, |v| f32_to_f16(f(v)).to_le_bytes()),
                    DType::BF16 => store(out, a, |v| f32_to_bf16(f(v)).to_le_bytes()),
                    _ => store(out, a, |v| f(v).to_le_bytes()),
                }
            }
            Acc::F64(a) => {
                let d = count as f64;
                store(out, a, |v| if avg { v / d } else { v }.to_le_bytes())
            }
            Acc::I64(a) => {
                let d = count as i64;
                let f = |v: i64| if avg { v / d } else { v };
                match dtype {
                    DType::Bool => store(out, a, |v| [u8::from(v != 0)]),
                    DType::I8 | DType::U8 => store(out, a, |v| [f(v) as u8]),
                    DType::I32 => store(out, a, |v| (f(v) as i32).to_le_bytes()),
                    _ => store(out, a, |v| f(v).to_le_bytes()),
                }
            }
        }
    }
}

/// Where a reduction accumulates: in the element type itself, in place in the result (when that gives the
/// same bits as the wide accumulator: f32, f64, i64, and i32 except Avg), or in a wide [`Acc`].
#[derive(Debug)]
pub(crate) enum Reducer {
    InPlace,
    Wide(Acc),
}

impl Reducer {
    /// A reduction initialised from `init`; for [`Reducer::InPlace`] the caller's `target` of [`Reducer::fold`]
    /// must already hold `init`.
    pub(crate) fn new(dtype: DType, op: ReduceOp, init: &[u8]) -> Reducer {
        match (dtype, op) {
            (DType::F32 | DType::F64 | DType::I64, _) => Reducer::InPlace,
            (DType::I32, op) if op != ReduceOp::Avg => Reducer::InPlace,
            _ => Reducer::Wide(Acc::new(dtype, init)),
        }
    }

    /// Folds `src` in at byte `at` of the reduction (`target` is the in-place result).
    pub(crate) fn fold(&mut self, dtype: DType, op: ReduceOp, target: &mut [u8], at: usize, src: &[u8]) {
        match self {
            Reducer::InPlace => {
                if let Some(dst) = target.get_mut(at..at + src.len()) {
                    fold_in_place(dtype, op, dst, src);
                }
            }
            Reducer::Wide(acc) => acc.fold(dtype, op, at / dtype.size(), src),
        }
    }

    /// Writes the result into `out` (for [`Reducer::InPlace`], the `target` folded into), dividing by
    /// `count` for [`ReduceOp::Avg`].
    pub(crate) fn finish(&self, dtype: DType, op: ReduceOp, count: usize, out: &mut [u8]) {
        match self {
            Reducer::InPlace => {
                if op == ReduceOp::Avg && count > 0 {
                    match dtype {
                        DType::F32 => map_in_place(out, f32::from_le_bytes, |v| (v / count as f32).to_le_bytes()),
                        DType::F64 => map_in_place(out, f64::from_le_bytes, |v| (v / count as f64).to_le_bytes()),
                        _ => map_in_place(out, i64::from_le_bytes, |v| (v / count as i64).to_le_bytes()),
                    }
                }
            }
            Reducer::Wide(acc) => acc.finish(dtype, op, count, out),
        }
    }
}

fn map_in_place<T, const W: usize>(out: &mut [u8], dec: impl Fn([u8; W]) -> T, enc: impl Fn(T) -> [u8; W]) {
    for o in out.chunks_exact_mut(W) {
        let mut b = [0u8; W];
        b.copy_from_slice(o);
        o.copy_from_slice(&enc(dec(b)));
    }
}

/// `dst[i] = f(dst[i], src[i])` over little-endian elements; the loop vectorizes for the plain types.
#[inline(always)]
fn zip_in_place<T: Copy, const W: usize>(
    dst: &mut [u8],
    src: &[u8],
    dec: impl Fn([u8; W]) -> T,
    enc: impl Fn(T) -> [u8; W],
    f: impl Fn(T, T) -> T,
) {
    for (d, s) in dst.chunks_exact_mut(W).zip(src.chunks_exact(W)) {
        let (mut a, mut b) = ([0u8; W], [0u8; W]);
        a.copy_from_slice(d);
        b.copy_from_slice(s);
        d.copy_from_slice(&enc(f(dec(a), dec(b))));
    }
}

macro_rules! in_place {
    ($dst:expr, $src:expr, $t:ty, $op:expr, $sum:expr, $prod:expr) => {
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => zip_in_place($dst, $src, <$t>::from_le_bytes, <$t>::to_le_bytes, $sum),
            ReduceOp::Product => zip_in_place($dst, $src, <$t>::from_le_bytes, <$t>::to_le_bytes, $prod),
            ReduceOp::Min => zip_in_place($dst, $src, <$t>::from_le_bytes, <$t>::to_le_bytes, fmin),
            ReduceOp::Max => zip_in_place($dst, $src, <$t>::from_le_bytes, <$t>::to_le_bytes, fmax),
        }
    };
}

/// Folds `src` into `dst` (elements of `dtype`, one of the [`Reducer::InPlace`] types).
fn fold_in_place(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    match dtype {
        DType::F32 => in_place!(dst, src, f32, op, |x, y| x + y, |x, y| x * y),
        DType::F64 => in_place!(dst, src, f64, op, |x, y| x + y, |x, y| x * y),
        DType::I32 => in_place!(dst, src, i32, op, i32::wrapping_add, i32::wrapping_mul),
        _ => in_place!(dst, src, i64, op, i64::wrapping_add, i64::wrapping_mul),
    }
}

fn store<A: Copy, const W: usize>(out: &mut [u8], acc: &[A], enc: impl Fn(A) -> [u8; W]) {
    for (o, &a) in out.chunks_exact_mut(W).zip(acc) {
        o.copy_from_slice(&enc(a));
    }
}

/// IEEE binary16 bits to `f32` (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = (u32::from(h) & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match exp {
        0 => {
            let v = man as f32 * (1.0 / 16_777_216.0);
            if sign != 0 { -v } else { v }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// `f32` to IEEE binary16 bits, round to nearest even; overflow becomes infinity, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 255 {
        return sign | 0x7c00 | if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1u32 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f16_round_trips() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
            } else {
                assert_eq!(f32_to_f16(f), h, "{h:#x} -> {f}");
            }
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between 1 and the next f16: ties to even (1).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
    }

    #[test]
    fn bool_and_integer_reductions() {
        let mut a = Acc::new(DType::Bool, &[0, 1, 1, 0]);
        a.fold(DType::Bool, ReduceOp::Sum, 0, &[0, 0, 7, 1]);
        let mut out = [9u8; 4];
        a.finish(DType::Bool, ReduceOp::Sum, 2, &mut out);
        assert_eq!(out, [0, 1, 1, 1]);
        let mut a = Acc::new(DType::I8, &[100u8, 0x80]);
        a.fold(DType::I8, ReduceOp::Sum, 0, &[100u8, 0xff]);
        let mut out = [0u8; 2];
        a.finish(DType::I8, ReduceOp::Sum, 2, &mut out);
        assert_eq!(out, [200u8, 0x7f], "wraps as torch int8");
        assert!(check_op(DType::Bool, ReduceOp::Avg).is_err());
    }

    #[test]
    fn in_place_reductions_equal_the_wide_accumulator() {
        let f32s: Vec<f32> = vec![1.5, -2.0, f32::NAN, 3.25, 0.0, -0.0, 1e30, 7.0, -1e-3];
        let f64s: Vec<f64> = f32s.iter().map(|&v| f64::from(v) * 1.25).collect();
        let i32s: Vec<i32> = vec![i32::MAX, -7, 3, i32::MIN, 0, 1 << 20, -1, 5, 9];
        let i64s: Vec<i64> = vec![i64::MAX, -7, 3, i64::MIN, 0, 1 << 40, -1, 5, 9];
        let cases: Vec<(DType, Vec<u8>)> = vec![
            (DType::F32, f32s.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (DType::F64, f64s.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (DType::I32, i32s.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (DType::I64, i64s.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ];
        for (dtype, a) in cases {
            let mut b = a.clone();
            b.rotate_left(3 * dtype.size());
            let mut c = a.clone();
            c.reverse();
            c.truncate(c.len() / dtype.size() * dtype.size());
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Product, ReduceOp::Min, ReduceOp::Max] {
                let mut wide = Acc::new(dtype, &a);
                let mut want = vec![0u8; a.len()];
                let mut got = a.clone();
                let mut red = Reducer::new(dtype, op, &a);
                let half = a.len() / 2 / dtype.size() * dtype.size();
                for src in [&b, &c] {
                    wide.fold(dtype, op, 0, src);
                    // In two pieces, as the receive blocks come.
                    red.fold(dtype, op, &mut got, 0, &src[..half]);
                    red.fold(dtype, op, &mut got, half, &src[half..]);
                }
                wide.finish(dtype, op, 3, &mut want);
                red.finish(dtype, op, 3, &mut got);
                let bits = |v: &[u8]| -> Vec<u8> {
                    // NaN payloads may differ; compare NaN-ness for floats.
                    if dtype == DType::F32 {
                        v.chunks_exact(4)
                            .flat_map(|c| {
                                let f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                                if f.is_nan() { [0xff; 4] } else { f.to_le_bytes() }
                            })
                            .collect()
                    } else if dtype == DType::F64 {
                        v.chunks_exact(8)
                            .flat_map(|c| {
                                let mut w = [0u8; 8];
                                w.copy_from_slice(c);
                                let f = f64::from_le_bytes(w);
                                if f.is_nan() { [0xff; 8] } else { f.to_le_bytes() }
                            })
                            .collect()
                    } else {
                        v.to_vec()
                    }
                };
                assert_eq!(bits(&got), bits(&want), "{dtype:?} {op:?}");
            }
        }
    }
}
