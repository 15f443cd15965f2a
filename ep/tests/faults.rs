//! Fault tolerance: a rank whose engine shuts down, or that stops taking part, is masked in `active_ranks`
//! and the others finish with results exact over the surviving ranks; a replaced rank comes back through
//! `update_ep_member`; garbage a peer writes into a receive slot cannot make a rank read outside its buffer.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mooncake_core::Opcode;
use mooncake_ep::{BufferLayout, CombineArgs, CombineInput, DispatchArgs, EpBuffer, PeerInfo, Tokens};
use mooncake_raw::HostBuffer;

type RankResult = (mooncake_ep::DispatchOutput, Vec<u16>);

/// Runs one iteration on the ranks in `who` (each with its mask), in parallel.
fn iterate(
    shape: &Shape,
    buffers: &[&EpBuffer],
    who: &[usize],
    inputs: &[Input],
    masks: &mut [Vec<i32>],
    fp8: bool,
    timeout: Duration,
) -> Vec<Option<RankResult>> {
    let mut results: Vec<Option<RankResult>> = (0..shape.ranks).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = masks
            .iter_mut()
            .enumerate()
            .filter(|(r, _)| who.contains(r))
            .map(|(r, mask)| {
                let (b, input) = (buffers[r], &inputs[r]);
                (r, s.spawn(move || run_rank(shape, b, input, mask, fp8, false, timeout)))
            })
            .collect();
        for (r, h) in handles {
            results[r] = Some(h.join().expect("rank thread"));
        }
    });
    results
}

fn check_all(shape: &Shape, results: &[Option<RankResult>], inputs: &[Input], active: &[bool], fp8: bool) {
    for (rank, result) in results.iter().enumerate() {
        let Some((out, combined)) = result else { continue };
        check_dispatch(shape, rank, inputs, active, fp8, out);
        assert_eq!(combined, &ref_combine(shape, &inputs[rank], active, fp8), "rank {rank} combine");
    }
}

#[test]
fn a_shut_down_rank_is_masked_and_a_replacement_rejoins() {
    let shape = Shape { ranks: 4, hidden: 256, n_max: 10, experts: 16, topk: 4 };
    let (engines, mut buffers) = group(shape, "tcp");
    let mut rng = Rng(11);
    let mut masks = vec![vec![1i32; 4]; 4];
    let timeout = Duration::from_secs(3);
    let everyone = [0, 1, 2, 3];
    let survivors = [0, 1, 2];

    let inputs = inputs(&shape, &mut rng);
    let refs: Vec<&EpBuffer> = buffers.iter().collect();
    let results = iterate(&shape, &refs, &everyone, &inputs, &mut masks, false, timeout);
    check_all(&shape, &results, &inputs, &[true; 4], false);

    // Rank 3's engine goes away between calls.
    engines[3].shutdown();
    for fp8 in [false, true] {
        let inputs = common::inputs(&shape, &mut rng);
        let started = Instant::now();
        let results = iterate(&shape, &refs, &survivors, &inputs, &mut masks, fp8, timeout);
        // Liveness, not speed: the survivors are not stuck past the timeout (generous margin for a loaded machine).
        assert!(started.elapsed() < 2 * timeout + Duration::from_secs(20), "survivors hung: {:?}", started.elapsed());
        for r in survivors {
            assert_eq!(masks[r], vec![1, 1, 1, 0], "rank {r}'s mask");
        }
        check_all(&shape, &results, &inputs, &[true, true, true, false], fp8);
    }

    // A replacement registers a new buffer on a new engine; everyone updates the membership.
    let engine = engine("tcp");
    let bytes = buffers[0].num_ep_buffer_bytes();
    buffers[3] = EpBuffer::new(&engine, 3, 4, bytes).expect("replacement buffer");
    let infos: Vec<PeerInfo> = buffers.iter().map(EpBuffer::local_info).collect();
    for b in &buffers {
        b.update_ep_member(&infos).expect("update_ep_member");
    }
    assert!(buffers.iter().all(|b| b.sequence() == buffers[0].sequence()), "the replacement continues in step");
    for mask in &mut masks {
        mask[3] = 1;
    }
    let refs: Vec<&EpBuffer> = buffers.iter().collect();
    for fp8 in [false, true] {
        let inputs = common::inputs(&shape, &mut rng);
        let results = iterate(&shape, &refs, &everyone, &inputs, &mut masks, fp8, timeout);
        assert!(masks.iter().all(|m| m == &vec![1; 4]), "{masks:?}");
        check_all(&shape, &results, &inputs, &[true; 4], fp8);
    }
}

#[test]
fn a_silent_rank_times_out_and_is_skipped_later() {
    let shape = Shape { ranks: 3, hidden: 128, n_max: 8, experts: 6, topk: 2 };
    let (_engines, buffers) = group(shape, "shm");
    let refs: Vec<&EpBuffer> = buffers.iter().collect();
    let mut rng = Rng(12);
    let mut masks = vec![vec![1i32; 3]; 3];
    let timeout = Duration::from_secs(2);
    for round in 0..2 {
        let inputs = inputs(&shape, &mut rng);
        let started = Instant::now();
        let results = iterate(&shape, &refs, &[0, 2], &inputs, &mut masks, round == 1, timeout);
        assert!(started.elapsed() < 2 * timeout + Duration::from_secs(20), "survivors hung");
        assert_eq!(masks[0], vec![1, 0, 1]);
        assert_eq!(masks[2], vec![1, 0, 1]);
        check_all(&shape, &results, &inputs, &[true, false, true], round == 1);
    }
}

/// Writes `bytes` from a buffer registered with `from`'s engine to `addr` of segment `to`.
fn poke(from: &EpBuffer, to: &PeerInfo, addr: u64, bytes: &[u8]) {
    let src = HostBuffer::from_vec(bytes.to_vec());
    from.engine().register_owned(src.owned(), "cpu:0").expect("register");
    from.engine().transfer_sync(&to.segment, Opcode::Write, src.addr(), addr, bytes.len() as u64).expect("poke");
    from.engine().unregister_memory(src.addr()).expect("unregister");
}

#[test]
fn garbage_counts_and_records_from_a_peer_are_ignored_and_the_peer_masked() {
    let shape = Shape { ranks: 2, hidden: 128, n_max: 6, experts: 4, topk: 2 };
    let (_engines, buffers) = group(shape, "tcp");
    let layout = BufferLayout::new(shape.n_max, shape.hidden, 2, shape.experts).unwrap();
    let victim = buffers[0].local_info();
    let mut rng = Rng(13);
    let timeout = Duration::from_secs(2);
    let signal = |seq: u64, count: u32| (((seq as u32 as u64) << 32) | u64::from(count)).to_le_bytes();
    let alone = [true, false];

    // 1. A dispatch signal with this call's sequence number and an absurd count.
    let inputs = inputs(&shape, &mut rng);
    let at = victim.addr + layout.bank(1) + layout.dispatch_signal_off + 8;
    poke(&buffers[1], &victim, at, &signal(1, u32::MAX));
    let mut mask = vec![1, 1];
    let (out, combined) = run_rank(&shape, &buffers[0], &inputs[0], &mut mask, false, false, timeout);
    assert_eq!(mask, vec![1, 0]);
    check_dispatch(&shape, 0, &inputs, &alone, false, &out);
    assert_eq!(combined, ref_combine(&shape, &inputs[0], &alone, false));
    // (the combine, sequence 2, did not wait for the masked rank)

    // 2. A plausible count over records with an out-of-range token index and expert bits.
    let inputs = common::inputs(&shape, &mut rng);
    let stride = layout.record_bytes(false) as usize;
    let mut records = vec![0xffu8; 2 * stride];
    records[..4].copy_from_slice(&7u32.to_le_bytes());
    let base = victim.addr + layout.bank(1);
    poke(&buffers[1], &victim, base + layout.dispatch_recv_slot(1), &records);
    poke(&buffers[1], &victim, base + layout.dispatch_signal_off + 8, &signal(3, 2));
    // A timeout this long is never reached: the garbage is recognised, not waited out.
    let timeout = Duration::from_secs(60);
    let started = Instant::now();
    let mut mask = vec![1, 1];
    let x = inputs[0].x.clone();
    let args = DispatchArgs {
        x: Tokens::Bf16(&x),
        hidden: shape.hidden,
        topk_idx: &inputs[0].topk_idx,
        num_topk: shape.topk,
        num_max_dispatch_tokens_per_rank: shape.n_max,
        num_experts: shape.experts,
        timeout,
        use_fp8: false,
    };
    let out = buffers[0].dispatch(&args, &mut mask).expect("dispatch");
    assert_eq!(mask, vec![1, 0]);
    check_dispatch(&shape, 0, &inputs, &alone, false, &out);

    // 3. A combine signal whose count is not what this rank expects from that owner.
    let base = victim.addr + layout.bank(0);
    poke(&buffers[1], &victim, base + layout.combine_signal_off + 8, &signal(4, 999));
    let mut mask = vec![1, 1];
    let y = expert_outputs(&shape, 0, &out);
    let cargs = CombineArgs {
        x: CombineInput::Rows(&y),
        topk_idx: &inputs[0].topk_idx,
        topk_weights: &inputs[0].weights,
        num_topk: shape.topk,
        handle: &out.handle,
        timeout,
    };
    let combined = buffers[0].combine(&cargs, &mut mask).expect("combine");
    assert!(started.elapsed() < timeout, "the garbage was waited out instead of recognised");
    assert_eq!(mask, vec![1, 0]);
    assert_eq!(combined, ref_combine(&shape, &inputs[0], &alone, false));
}
