//! Shared helpers of the group tests: one engine and group per rank in one process, random inputs of
//! every dtype whose reductions are exact in any order, and plain-loop references.
#![allow(dead_code)]

use std::time::Duration;

use mooncake_core::{EngineConfig, TransferEngine};
use mooncake_ep::convert::{bf16_to_f32, f32_to_bf16};
use mooncake_ep::group::{DType, Group, GroupOptions, MemberInfo, ReduceOp, f16_to_f32, f32_to_f16};

/// An engine on 127.0.0.1 with `protocol` only.
pub fn engine(protocol: &str) -> TransferEngine {
    mooncake::link_all();
    let config = EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([protocol]);
    TransferEngine::new(config).expect("engine")
}

/// Small chunks (so that modest sizes go through in many chunks) and a small direct all-reduce limit.
pub fn options(timeout: Duration) -> GroupOptions {
    GroupOptions { chunk_bytes: 4096, timeout, small_all_reduce_bytes: 2048 }
}

/// One engine and group per rank, connected.
pub fn groups(ranks: usize, protocol: &str, options: GroupOptions) -> (Vec<TransferEngine>, Vec<Group>) {
    let engines: Vec<TransferEngine> = (0..ranks).map(|_| engine(protocol)).collect();
    let groups: Vec<Group> =
        engines.iter().enumerate().map(|(r, e)| Group::new(e, r, ranks, options.clone()).expect("group")).collect();
    let infos: Vec<MemberInfo> = groups.iter().map(Group::local_info).collect();
    for g in &groups {
        g.connect(&infos).expect("connect");
    }
    (engines, groups)
}

/// Runs `f(rank, group)` on the ranks in `who`, one thread each; results by rank.
pub fn on_ranks<T: Send>(groups: &[Group], who: &[usize], f: impl Fn(usize, &Group) -> T + Sync) -> Vec<Option<T>> {
    let mut out: Vec<Option<T>> = (0..groups.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = who.iter().map(|&r| (r, s.spawn(move || f(r, &groups[r])))).collect();
        for (r, h) in hs {
            out[r] = Some(h.join().expect("rank thread"));
        }
    });
    out
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Encodes `v` as one `dtype` element.
pub fn encode(dtype: DType, v: f64) -> Vec<u8> {
    match dtype {
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F64 => v.to_le_bytes().to_vec(),
        DType::F16 => f32_to_f16(v as f32).to_le_bytes().to_vec(),
        DType::BF16 => f32_to_bf16(v as f32).to_le_bytes().to_vec(),
        DType::I8 => vec![(v as i64) as u8],
        DType::U8 => vec![(v as i64) as u8],
        DType::I32 => ((v as i64) as i32).to_le_bytes().to_vec(),
        DType::I64 => (v as i64).to_le_bytes().to_vec(),
        DType::Bool => vec![u8::from(v != 0.0)],
        _ => unreachable!(),
    }
}

/// Decodes element `i` of `bytes`.
pub fn decode(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    let s = dtype.size();
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
        DType::F16 => f16_to_f32(u16::from_le_bytes(b.try_into().unwrap())) as f64,
        DType::BF16 => bf16_to_f32(u16::from_le_bytes(b.try_into().unwrap())) as f64,
        DType::I8 => (b[0] as i8) as f64,
        DType::U8 => b[0] as f64,
        DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::Bool => f64::from(u8::from(b[0] != 0)),
        _ => unreachable!(),
    }
}

/// `n` random elements whose sums, products, minima and maxima over up to 8 ranks are exact in every type
/// and any order: small multiples of 1/4 (integers for the integer types), powers of two for products.
pub fn values(dtype: DType, op: ReduceOp, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        let v = match (dtype, op) {
            (DType::Bool, _) => rng.below(2) as f64,
            (_, ReduceOp::Product) => [-2.0, -1.0, 1.0, 2.0][rng.below(4) as usize],
            (DType::U8, _) => rng.below(30) as f64,
            (DType::I8 | DType::I32 | DType::I64, _) => rng.below(60) as f64 - 30.0,
            _ => (rng.below(120) as f64 - 60.0) / 4.0,
        };
        out.extend(encode(dtype, v));
    }
    out
}

/// The reduction of `inputs` with `op`, as the group computes it (wide accumulation, one rounding).
pub fn reference(dtype: DType, op: ReduceOp, inputs: &[&[u8]]) -> Vec<u8> {
    let n = inputs[0].len() / dtype.size();
    let mut out = Vec::with_capacity(inputs[0].len());
    for i in 0..n {
        let vals: Vec<f64> = inputs.iter().map(|b| decode(dtype, b, i)).collect();
        let v = match op {
            ReduceOp::Sum | ReduceOp::Avg if dtype == DType::Bool => vals.iter().fold(0.0, |a: f64, &b| a.max(b)),
            ReduceOp::Product if dtype == DType::Bool => vals.iter().fold(1.0, |a: f64, &b| a.min(b)),
            ReduceOp::Sum => vals.iter().sum(),
            ReduceOp::Avg => {
                let sum: f64 = vals.iter().sum();
                let k = vals.len();
                match dtype {
                    DType::F64 => sum / k as f64,
                    d if d.is_float() => ((sum as f32) / k as f32) as f64,
                    _ => ((sum as i64) / k as i64) as f64,
                }
            }
            ReduceOp::Product => vals.iter().product(),
            ReduceOp::Min => vals.iter().fold(f64::INFINITY, |a, &b| a.min(b)),
            ReduceOp::Max => vals.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b)),
            _ => unreachable!(),
        };
        out.extend(encode(dtype, v));
    }
    out
}
