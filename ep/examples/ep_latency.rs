//! Dispatch + combine latency of in-process ranks over one transport (not the benchmark, which
//! compares against the all-gather fallback; this prints our side only).
//!
//! `cargo run --release -p mooncake-ep --example ep_latency -- [ranks] [tokens] [hidden] [experts] [topk] [protocol] [iters]`

use std::time::{Duration, Instant};

use mooncake_core::{EngineConfig, TransferEngine};
use mooncake_ep::{CombineArgs, CombineInput, DispatchArgs, DispatchOutput, EpBuffer, PeerInfo, Tokens, size_hint};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (ranks, tokens, hidden, experts, topk) = (arg(0, 4), arg(1, 128), arg(2, 7168), arg(3, 64), arg(4, 8));
    let protocol = a.get(5).cloned().unwrap_or_else(|| "tcp".into());
    let iters = arg(6, 20);
    println!(
        "ranks={ranks} tokens={tokens} hidden={hidden} experts={experts} topk={topk} protocol={protocol} iters={iters}"
    );
    mooncake::link_all();
    let bytes = size_hint(tokens, hidden, ranks, experts);
    let engines: Vec<TransferEngine> = (0..ranks)
        .map(|_| {
            TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols([protocol.as_str()]))
                .expect("engine")
        })
        .collect();
    let buffers: Vec<EpBuffer> =
        engines.iter().enumerate().map(|(r, e)| EpBuffer::new(e, r, ranks, bytes).expect("buffer")).collect();
    let infos: Vec<PeerInfo> = buffers.iter().map(EpBuffer::local_info).collect();
    for b in &buffers {
        b.connect(&infos).expect("connect");
    }
    let x = vec![0x3f80u16; tokens * hidden];
    let topk_idx: Vec<Vec<i64>> = (0..ranks)
        .map(|r| (0..tokens * topk).map(|i| ((i * 7 + r * 13 + i / topk * 5) % experts) as i64).collect())
        .collect();
    let weights = vec![0.125f32; tokens * topk];
    let timeout = Duration::from_secs(30);
    let times: Vec<Vec<(Duration, Duration)>> = std::thread::scope(|s| {
        let hs: Vec<_> = buffers
            .iter()
            .zip(&topk_idx)
            .map(|(b, idx)| {
                let (x, weights) = (&x, &weights);
                s.spawn(move || {
                    let mut active = vec![1; ranks];
                    let mut out = DispatchOutput::default();
                    let mut combined = Vec::new();
                    let mut y = Vec::new();
                    let mut times = Vec::new();
                    for _ in 0..iters {
                        let args = DispatchArgs {
                            x: Tokens::Bf16(x),
                            hidden,
                            topk_idx: idx,
                            num_topk: topk,
                            num_max_dispatch_tokens_per_rank: tokens,
                            num_experts: experts,
                            timeout,
                            use_fp8: false,
                        };
                        let t0 = Instant::now();
                        b.dispatch_into(&args, &mut active, &mut out).expect("dispatch");
                        let t1 = Instant::now();
                        if let mooncake_ep::RecvX::Bf16(v) = &out.packed_recv_x {
                            y.clone_from(v);
                        }
                        let t2 = Instant::now();
                        let cargs = CombineArgs {
                            x: CombineInput::Rows(&y),
                            topk_idx: idx,
                            topk_weights: weights,
                            num_topk: topk,
                            handle: &out.handle,
                            timeout,
                        };
                        b.combine_into(&cargs, &mut active, &mut combined).expect("combine");
                        times.push((t1 - t0, t2.elapsed()));
                    }
                    times
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let skip = iters / 4;
    let avg = |f: &dyn Fn(&(Duration, Duration)) -> Duration| {
        let v: Vec<Duration> = times.iter().flat_map(|t| t[skip..].iter().map(f)).collect();
        v.iter().sum::<Duration>() / v.len().max(1) as u32
    };
    println!(
        "dispatch avg {:?}  combine avg {:?} (per rank, after {skip} warm-up iterations)",
        avg(&|t| t.0),
        avg(&|t| t.1)
    );
}
