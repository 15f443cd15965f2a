//! Dispatch and combine over real engines (tcp and shm, 2 and 4 ranks, BF16 and FP8) equal plain-loop
//! references, for random inputs with masked top-k entries.

mod common;

use std::time::Duration;

use common::*;

fn run_case(ranks: usize, protocol: &str, fp8: bool, seed: u64) {
    let shape = Shape { ranks, hidden: 256, n_max: 12, experts: 4 * ranks, topk: 3 };
    let (_engines, buffers) = group(shape, protocol);
    let mut rng = Rng(seed);
    let all_active = vec![true; ranks];
    // Several iterations: both banks, growing sequence numbers, copied and zero-copy combines.
    for iteration in 0..4 {
        let inputs = inputs(&shape, &mut rng);
        let zero_copy = iteration % 2 == 1;
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = buffers
                .iter()
                .zip(&inputs)
                .map(|(b, input)| {
                    s.spawn(move || {
                        let mut active = vec![1i32; ranks];
                        let (out, combined) =
                            run_rank(&shape, b, input, &mut active, fp8, zero_copy, Duration::from_secs(30));
                        (out, combined, active)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        for (rank, (out, combined, active)) in results.iter().enumerate() {
            assert_eq!(active, &vec![1; ranks], "rank {rank} lost a peer");
            check_dispatch(&shape, rank, &inputs, &all_active, fp8, out);
            assert_eq!(combined, &ref_combine(&shape, &inputs[rank], &all_active, fp8), "rank {rank} combine");
        }
    }
    for b in &buffers {
        assert_eq!(b.sequence(), 8);
    }
}

#[test]
fn bf16_two_ranks_tcp() {
    run_case(2, "tcp", false, 1);
}

#[test]
fn fp8_two_ranks_tcp() {
    run_case(2, "tcp", true, 2);
}

#[test]
fn bf16_four_ranks_tcp() {
    run_case(4, "tcp", false, 3);
}

#[test]
fn fp8_four_ranks_tcp() {
    run_case(4, "tcp", true, 4);
}

#[test]
fn bf16_two_ranks_shm() {
    run_case(2, "shm", false, 5);
}

#[test]
fn fp8_two_ranks_shm() {
    run_case(2, "shm", true, 6);
}

#[test]
fn bf16_four_ranks_shm() {
    run_case(4, "shm", false, 7);
}

#[test]
fn fp8_four_ranks_shm() {
    run_case(4, "shm", true, 8);
}

#[test]
fn one_rank_keeps_everything_local() {
    run_case(1, "tcp", false, 9);
}
