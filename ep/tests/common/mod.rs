//! Shared helpers of the EP tests: engines and connected buffers in one process, random inputs, and the
//! reference dispatch/combine computed with plain loops.
#![allow(dead_code)]

use std::time::Duration;

use mooncake_core::{EngineConfig, TransferEngine};
use mooncake_ep::convert::{FP8_AMAX_MIN, FP8_BLOCK, FP8_MAX, bf16_to_f32, e4m3_to_f32, f32_to_bf16, f32_to_e4m3};
use mooncake_ep::{
    CombineArgs, CombineInput, DispatchArgs, DispatchOutput, EpBuffer, PeerInfo, RecvX, Tokens, size_hint,
};

/// Shapes of a test run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub ranks: usize,
    pub hidden: usize,
    pub n_max: usize,
    pub experts: usize,
    pub topk: usize,
}

impl Shape {
    pub fn local(&self) -> usize {
        self.experts / self.ranks
    }
}

/// An engine on 127.0.0.1 with `protocol` only.
pub fn engine(protocol: &str) -> TransferEngine {
    mooncake::link_all();
    let config = EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([protocol]);
    TransferEngine::new(config).expect("engine")
}

/// One engine and buffer per rank, connected.
pub fn group(shape: Shape, protocol: &str) -> (Vec<TransferEngine>, Vec<EpBuffer>) {
    let bytes = size_hint(shape.n_max, shape.hidden, shape.ranks, shape.experts);
    let engines: Vec<TransferEngine> = (0..shape.ranks).map(|_| engine(protocol)).collect();
    let buffers: Vec<EpBuffer> =
        engines.iter().enumerate().map(|(r, e)| EpBuffer::new(e, r, shape.ranks, bytes).expect("buffer")).collect();
    let infos: Vec<PeerInfo> = buffers.iter().map(EpBuffer::local_info).collect();
    for b in &buffers {
        b.connect(&infos).expect("connect");
    }
    (engines, buffers)
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

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// One rank's inputs of one iteration.
#[derive(Debug, Clone)]
pub struct Input {
    pub x: Vec<u16>,
    pub topk_idx: Vec<i64>,
    pub weights: Vec<f32>,
}

impl Input {
    pub fn tokens(&self, shape: &Shape) -> usize {
        self.topk_idx.len() / shape.topk
    }
}

/// Random inputs for every rank: token counts from 0 to n_max, about a fifth of the top-k entries masked,
/// and now and then the same expert twice in one token.
pub fn inputs(shape: &Shape, rng: &mut Rng) -> Vec<Input> {
    (0..shape.ranks)
        .map(|_| {
            let t = if rng.below(5) == 0 { shape.n_max } else { rng.below(shape.n_max + 1) };
            let x = (0..t * shape.hidden).map(|_| f32_to_bf16((rng.unit() - 0.5) * 8.0)).collect();
            let mut topk_idx = Vec::with_capacity(t * shape.topk);
            for i in 0..t * shape.topk {
                let e = match rng.below(10) {
                    0 | 1 => -1,
                    // Now and then the previous entry again: the same expert twice in one token.
                    2 if i % shape.topk > 0 => topk_idx[i - 1],
                    _ => rng.below(shape.experts) as i64,
                };
                topk_idx.push(e);
            }
            let weights = (0..t * shape.topk).map(|_| rng.unit()).collect();
            Input { x, topk_idx, weights }
        })
        .collect()
}

/// The reference FP8 quantization of one row: codes and scales.
pub fn ref_quantize(row: &[u16]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::new();
    let mut scales = Vec::new();
    for block in row.chunks(FP8_BLOCK) {
        let mut amax = 0f32;
        for &v in block {
            amax = amax.max(bf16_to_f32(v).abs());
        }
        let amax = amax.max(FP8_AMAX_MIN);
        for &v in block {
            codes.push(f32_to_e4m3(bf16_to_f32(v) * (FP8_MAX / amax)));
        }
        scales.push(amax / FP8_MAX);
    }
    (codes, scales)
}

/// What an expert receives of a token, as f32: the BF16 row, or its FP8 codes times their scales.
pub fn ref_received(row: &[u16], fp8: bool) -> Vec<f32> {
    if !fp8 {
        return row.iter().map(|&v| bf16_to_f32(v)).collect();
    }
    let (codes, scales) = ref_quantize(row);
    codes.iter().enumerate().map(|(i, &c)| e4m3_to_f32(c) * scales[i / FP8_BLOCK]).collect()
}

/// The test's expert `e`: an affine map per expert, rounded to BF16.
pub fn expert(e: usize, v: f32) -> u16 {
    f32_to_bf16(v * (0.5 + e as f32 * 0.25) + e as f32 * 0.125)
}

/// Checks rank `rank`'s dispatch output against plain loops over every rank's inputs, counting only the
/// sources in `active`.
pub fn check_dispatch(shape: &Shape, rank: usize, all: &[Input], active: &[bool], fp8: bool, out: &DispatchOutput) {
    let (r, n, nl, hidden) = (shape.ranks, shape.n_max, shape.local(), shape.hidden);
    let rows = r * n;
    for le in 0..nl {
        let e = (rank * nl + le) as i64;
        let mut pos = 0usize;
        for s in 0..r {
            let begin = pos;
            if active[s] {
                let input = &all[s];
                for t in 0..input.tokens(shape) {
                    if !input.topk_idx[t * shape.topk..(t + 1) * shape.topk].contains(&e) {
                        continue;
                    }
                    let row = le * rows + pos;
                    assert_eq!(out.handle.packed_recv_src_info[row], t as i32, "rank {rank} expert {e} row {pos}");
                    let want = &input.x[t * hidden..(t + 1) * hidden];
                    match &out.packed_recv_x {
                        RecvX::Bf16(v) => {
                            assert!(!fp8);
                            assert_eq!(&v[row * hidden..(row + 1) * hidden], want, "rank {rank} expert {e} row {pos}");
                        }
                        RecvX::Fp8 { codes, scales } => {
                            assert!(fp8);
                            let (c, sc) = ref_quantize(want);
                            let spr = hidden / FP8_BLOCK;
                            assert_eq!(
                                &codes[row * hidden..(row + 1) * hidden],
                                &c[..],
                                "rank {rank} expert {e} row {pos}"
                            );
                            assert_eq!(&scales[row * spr..(row + 1) * spr], &sc[..]);
                        }
                    }
                    pos += 1;
                }
            }
            let count = pos - begin;
            let want = if count == 0 { 0 } else { ((begin as i64) << 32) | count as i64 };
            assert_eq!(out.handle.packed_recv_layout_range[le * r + s], want, "rank {rank} expert {e} source {s}");
        }
        assert_eq!(out.packed_recv_count[le], pos as i32, "rank {rank} expert {e} count");
        assert!(out.handle.packed_recv_src_info[le * rows + pos..(le + 1) * rows].iter().all(|&v| v == -1));
    }
}

/// The expert outputs of one rank, in the dispatch output's layout.
pub fn expert_outputs(shape: &Shape, rank: usize, out: &DispatchOutput) -> Vec<u16> {
    let (r, n, nl, hidden) = (shape.ranks, shape.n_max, shape.local(), shape.hidden);
    let mut y = vec![0u16; nl * r * n * hidden];
    for le in 0..nl {
        let e = rank * nl + le;
        for j in 0..out.packed_recv_count[le] as usize {
            let row = le * r * n + j;
            for i in 0..hidden {
                let v = match &out.packed_recv_x {
                    RecvX::Bf16(v) => bf16_to_f32(v[row * hidden + i]),
                    RecvX::Fp8 { codes, scales } => {
                        e4m3_to_f32(codes[row * hidden + i]) * scales[row * (hidden / FP8_BLOCK) + i / FP8_BLOCK]
                    }
                };
                y[row * hidden + i] = expert(e, v);
            }
        }
    }
    y
}

/// The reference combine of one rank's tokens over the experts of the ranks in `active`.
pub fn ref_combine(shape: &Shape, input: &Input, active: &[bool], fp8: bool) -> Vec<u16> {
    let (k, hidden) = (shape.topk, shape.hidden);
    let mut out = Vec::new();
    for t in 0..input.tokens(shape) {
        let recv = ref_received(&input.x[t * hidden..(t + 1) * hidden], fp8);
        let mut acc = vec![0f32; hidden];
        for j in 0..k {
            let e = input.topk_idx[t * k + j];
            if e < 0 || !active[e as usize / shape.local()] {
                continue;
            }
            let w = input.weights[t * k + j];
            for i in 0..hidden {
                acc[i] += w * bf16_to_f32(expert(e as usize, recv[i]));
            }
        }
        out.extend(acc.iter().map(|&a| f32_to_bf16(a)));
    }
    out
}

/// One rank's dispatch, experts and combine (zero-copy when asked); returns the dispatch output, the
/// combined tokens and the mask after the combine.
pub fn run_rank(
    shape: &Shape,
    buffer: &EpBuffer,
    input: &Input,
    active: &mut [i32],
    fp8: bool,
    zero_copy: bool,
    timeout: Duration,
) -> (DispatchOutput, Vec<u16>) {
    let args = DispatchArgs {
        x: Tokens::Bf16(&input.x),
        hidden: shape.hidden,
        topk_idx: &input.topk_idx,
        num_topk: shape.topk,
        num_max_dispatch_tokens_per_rank: shape.n_max,
        num_experts: shape.experts,
        timeout,
        use_fp8: fp8,
    };
    let out = buffer.dispatch(&args, active).expect("dispatch");
    let y = expert_outputs(shape, buffer.rank(), &out);
    let x = if zero_copy {
        let rows = shape.ranks * shape.n_max * shape.hidden;
        for le in 0..shape.local() {
            buffer
                .write_next_combine_buffer(&out.handle, le, 0, &y[le * rows..(le + 1) * rows])
                .expect("zero-copy rows");
        }
        CombineInput::ZeroCopy
    } else {
        CombineInput::Rows(&y)
    };
    let cargs = CombineArgs {
        x,
        topk_idx: &input.topk_idx,
        topk_weights: &input.weights,
        num_topk: shape.topk,
        handle: &out.handle,
        timeout,
    };
    let combined = buffer.combine(&cargs, active).expect("combine");
    (out, combined)
}
