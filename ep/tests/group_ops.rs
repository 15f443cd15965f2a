//! Every operation of the group against a reference computed here, for every dtype, sizes from zero to
//! many chunks (chunks are 4 KiB here), at 2 and 4 ranks, over tcp and over shm.

mod group_common;

use std::time::Duration;

use group_common::*;
use mooncake_ep::group::{DType, Group, RecvOp, ReduceOp, SendOp};

const OPS: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Product, ReduceOp::Min, ReduceOp::Max];
/// Element counts: empty, one, below the direct all-reduce limit, and many chunks.
const SIZES: [usize; 5] = [0, 1, 37, 700, 5000];

fn run_all(protocol: &str, ranks: usize) {
    let (_engines, groups) = groups(ranks, protocol, options(Duration::from_secs(20)));
    let mut rng = Rng(ranks as u64 * 31 + protocol.len() as u64);
    reductions(&groups, &mut rng);
    data_movement(&groups, &mut rng);
    point_to_point(&groups, &mut rng);
    for g in &groups {
        assert!(g.active_ranks().iter().all(|&a| a), "rank {} masked someone: {:?}", g.rank(), g.active_ranks());
    }
}

fn reductions(groups: &[Group], rng: &mut Rng) {
    let r = groups.len();
    let all: Vec<usize> = (0..r).collect();
    for dtype in DType::ALL {
        for op in OPS {
            if dtype == DType::Bool && op == ReduceOp::Avg {
                continue;
            }
            for n in SIZES {
                let inputs: Vec<Vec<u8>> = (0..r).map(|_| values(dtype, op, n, rng)).collect();
                let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
                let want = reference(dtype, op, &refs);
                let what = format!("{dtype:?} {op:?} n={n}");

                let out = on_ranks(groups, &all, |rank, g| {
                    let mut data = inputs[rank].clone();
                    g.all_reduce(&mut data, dtype, op).expect("all_reduce");
                    data
                });
                for (rank, got) in out.into_iter().enumerate() {
                    assert_eq!(got.unwrap(), want, "all_reduce {what} rank {rank}");
                }

                let root = n % r;
                let out = on_ranks(groups, &all, |rank, g| {
                    let mut data = inputs[rank].clone();
                    g.reduce(&mut data, dtype, op, root).expect("reduce");
                    data
                });
                for (rank, got) in out.into_iter().enumerate() {
                    let expect = if rank == root { &want } else { &inputs[rank] };
                    assert_eq!(&got.unwrap(), expect, "reduce {what} root {root} rank {rank}");
                }

                // reduce_scatter: each rank's input is r parts of n elements.
                let big: Vec<Vec<u8>> = (0..r).map(|_| values(dtype, op, n * r, rng)).collect();
                let part = n * dtype.size();
                let out = on_ranks(groups, &all, |rank, g| {
                    let mut output = vec![0xa5u8; part];
                    g.reduce_scatter(&big[rank], &mut output, dtype, op).expect("reduce_scatter");
                    output
                });
                for (rank, got) in out.into_iter().enumerate() {
                    let parts: Vec<&[u8]> = big.iter().map(|b| &b[rank * part..(rank + 1) * part]).collect();
                    assert_eq!(got.unwrap(), reference(dtype, op, &parts), "reduce_scatter {what} rank {rank}");
                }
            }
        }
    }
}

fn data_movement(groups: &[Group], rng: &mut Rng) {
    let r = groups.len();
    let all: Vec<usize> = (0..r).collect();
    for bytes in [0usize, 1, 13, 4096, 4097, 20_000] {
        let inputs: Vec<Vec<u8>> = (0..r).map(|_| rng.bytes(bytes)).collect();
        let root = bytes % r;

        let out = on_ranks(groups, &all, |rank, g| {
            let mut data = if rank == root { inputs[rank].clone() } else { vec![0; bytes] };
            g.broadcast(&mut data, root).expect("broadcast");
            data
        });
        assert!(out.into_iter().all(|d| d.unwrap() == inputs[root]), "broadcast {bytes}");

        let concat: Vec<u8> = inputs.concat();
        let out = on_ranks(groups, &all, |rank, g| {
            let mut output = vec![0; bytes * r];
            g.all_gather(&inputs[rank], &mut output).expect("all_gather");
            output
        });
        assert!(out.into_iter().all(|d| d.unwrap() == concat), "all_gather {bytes}");

        let out = on_ranks(groups, &all, |rank, g| {
            let mut output = if rank == root { vec![0; bytes * r] } else { Vec::new() };
            g.gather(&inputs[rank], &mut output, root).expect("gather");
            output
        });
        assert_eq!(out[root].as_ref().unwrap(), &concat, "gather {bytes}");

        let out = on_ranks(groups, &all, |rank, g| {
            let input = if rank == root { concat.clone() } else { Vec::new() };
            let mut output = vec![0; bytes];
            g.scatter(&input, &mut output, root).expect("scatter");
            output
        });
        for (rank, got) in out.into_iter().enumerate() {
            assert_eq!(got.unwrap(), &concat[rank * bytes..(rank + 1) * bytes], "scatter {bytes} rank {rank}");
        }
    }

    // Uneven all_gather_v and all_to_all, zero-length parts included.
    for round in 0..6 {
        let max = [0u64, 5, 3000, 9000, 30_000, 100][round];
        let counts: Vec<u64> = (0..r).map(|_| if max == 0 { 0 } else { rng.below(max + 1) }).collect();
        let inputs: Vec<Vec<u8>> = counts.iter().map(|&c| rng.bytes(c as usize)).collect();
        let concat = inputs.concat();
        let out = on_ranks(groups, &all, |rank, g| {
            let mut output = vec![0; concat.len()];
            g.all_gather_v(&inputs[rank], &mut output, &counts).expect("all_gather_v");
            output
        });
        assert!(out.into_iter().all(|d| d.unwrap() == concat), "all_gather_v {counts:?}");

        // split[s][d]: bytes rank s sends to rank d (zero now and then).
        let split: Vec<Vec<u64>> = (0..r)
            .map(|_| (0..r).map(|_| if max == 0 || rng.below(4) == 0 { 0 } else { rng.below(max + 1) }).collect())
            .collect();
        let payload: Vec<Vec<Vec<u8>>> =
            split.iter().map(|row| row.iter().map(|&c| rng.bytes(c as usize)).collect()).collect();
        let out = on_ranks(groups, &all, |rank, g| {
            let input = payload[rank].concat();
            let recv_counts: Vec<u64> = (0..r).map(|s| split[s][rank]).collect();
            let mut output = vec![0; recv_counts.iter().sum::<u64>() as usize];
            g.all_to_all(&input, &split[rank], &mut output, &recv_counts).expect("all_to_all");
            output
        });
        for (rank, got) in out.into_iter().enumerate() {
            let want: Vec<u8> = (0..r).flat_map(|s| payload[s][rank].clone()).collect();
            assert_eq!(got.unwrap(), want, "all_to_all round {round} rank {rank} split {split:?}");
        }
    }

    for _ in 0..3 {
        let out = on_ranks(groups, &all, |_, g| g.barrier());
        assert!(out.into_iter().all(|r| r.unwrap().is_ok()));
    }
}

fn point_to_point(groups: &[Group], rng: &mut Rng) {
    let r = groups.len();
    let all: Vec<usize> = (0..r).collect();
    // Every rank sends two tagged messages to its right neighbour and receives from its left one, in one
    // batch (messages larger than the two receive banks included), then a plain send/recv pair.
    for bytes in [0usize, 100, 4096 * 5 + 3] {
        let msgs: Vec<[Vec<u8>; 2]> = (0..r).map(|_| [rng.bytes(bytes), rng.bytes(bytes / 2)]).collect();
        let out = on_ranks(groups, &all, |rank, g| {
            let (right, left) = ((rank + 1) % r, (rank + r - 1) % r);
            let sends = [
                SendOp { peer: right, tag: 7, data: &msgs[rank][0] },
                SendOp { peer: right, tag: 8, data: &msgs[rank][1] },
            ];
            let mut a = vec![0u8; bytes];
            let mut b = vec![0u8; bytes / 2];
            let mut recvs =
                [RecvOp { peer: left, tag: 7, data: &mut a[..] }, RecvOp { peer: left, tag: 8, data: &mut b[..] }];
            g.send_recv(&sends, &mut recvs).expect("send_recv");
            (a, b)
        });
        for (rank, got) in out.into_iter().enumerate() {
            let (a, b) = got.unwrap();
            let left = (rank + r - 1) % r;
            assert_eq!(a, msgs[left][0], "p2p {bytes} rank {rank}");
            assert_eq!(b, msgs[left][1], "p2p {bytes} rank {rank}");
        }
        let out = on_ranks(groups, &[0, 1], |rank, g| {
            if rank == 0 {
                g.send(&msgs[0][0], 1, 3).map(|_| Vec::new())
            } else {
                let mut d = vec![0u8; bytes];
                g.recv(&mut d, 0, 3).map(|_| d)
            }
        });
        assert_eq!(out[1].as_ref().unwrap().as_ref().unwrap(), &msgs[0][0]);
    }
}

#[test]
fn two_ranks_over_tcp() {
    run_all("tcp", 2);
}

#[test]
fn four_ranks_over_tcp() {
    run_all("tcp", 4);
}

#[test]
fn two_ranks_over_shm() {
    run_all("shm", 2);
}

#[test]
fn four_ranks_over_shm() {
    run_all("shm", 4);
}

#[test]
fn one_rank_is_a_group_too() {
    let (_e, groups) = groups(1, "tcp", options(Duration::from_secs(5)));
    let mut data = vec![1u8, 2, 3, 4];
    groups[0].all_reduce(&mut data, DType::U8, ReduceOp::Avg).unwrap();
    assert_eq!(data, [1, 2, 3, 4]);
    let mut out = vec![0u8; 4];
    groups[0].all_gather(&data, &mut out).unwrap();
    assert_eq!(out, data);
    groups[0].barrier().unwrap();
}

#[test]
fn a_buffer_much_larger_than_a_chunk_goes_through_in_chunks() {
    // 3 MiB of f32 through 4 KiB chunks at 3 ranks: hundreds of chunks per pair, two-phase all-reduce
    // with parts that are not a multiple of the chunk.
    let (_e, groups) = groups(3, "tcp", options(Duration::from_secs(60)));
    let mut rng = Rng(5);
    let n = (3 << 20) / 4 + 3;
    let inputs: Vec<Vec<u8>> = (0..3).map(|_| values(DType::F32, ReduceOp::Sum, n, &mut rng)).collect();
    let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
    let want = reference(DType::F32, ReduceOp::Sum, &refs);
    let out = on_ranks(&groups, &[0, 1, 2], |rank, g| {
        let mut data = inputs[rank].clone();
        g.all_reduce(&mut data, DType::F32, ReduceOp::Sum).expect("all_reduce");
        data
    });
    assert!(out.into_iter().all(|d| d.unwrap() == want));
}
