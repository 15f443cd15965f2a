//! Fault tolerance of the group: a rank whose engine shuts down, or that stops taking part, is masked in
//! the active ranks and the others finish with results exact over the survivors; later calls skip it; a
//! replaced rank rejoins through `update_member`, a masked live rank through `activate`; garbage a peer
//! writes into the signal words cannot make a rank read outside its buffer.

mod group_common;

use std::time::{Duration, Instant};

use group_common::*;
use mooncake_core::Opcode;
use mooncake_ep::group::{DType, Error, Group, MemberInfo, ReduceOp};
use mooncake_raw::HostBuffer;

/// all_reduce on `who`, checked against the reference over `who`.
fn all_reduce_exact(groups: &[Group], who: &[usize], dtype: DType, op: ReduceOp, n: usize, rng: &mut Rng) {
    let inputs: Vec<Vec<u8>> = (0..groups.len()).map(|_| values(dtype, op, n, rng)).collect();
    let refs: Vec<&[u8]> = who.iter().map(|&r| inputs[r].as_slice()).collect();
    let want = reference(dtype, op, &refs);
    let out = on_ranks(groups, who, |rank, g| {
        let mut data = inputs[rank].clone();
        g.all_reduce(&mut data, dtype, op).map(|_| data)
    });
    for &r in who {
        let got = out[r].as_ref().unwrap().as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(got, &want, "all_reduce {dtype:?} {op:?} n={n} rank {r} over {who:?}");
    }
}

fn mask(groups: &[Group], r: usize) -> Vec<bool> {
    groups[r].active_ranks()
}

#[test]
fn a_shut_down_rank_is_masked_and_a_replacement_rejoins() {
    let timeout = Duration::from_secs(3);
    let (engines, mut groups) = groups(4, "tcp", options(timeout));
    let mut rng = Rng(21);
    let everyone = [0, 1, 2, 3];
    let survivors = [0, 1, 2];
    all_reduce_exact(&groups, &everyone, DType::F32, ReduceOp::Sum, 3000, &mut rng);

    engines[3].shutdown();
    // A large (two-phase) all-reduce first: rank 3's part is orphaned and reduced from the raw inputs.
    let started = Instant::now();
    all_reduce_exact(&groups, &survivors, DType::BF16, ReduceOp::Avg, 5000, &mut rng);
    // Liveness, not speed: generous margin for a loaded machine.
    assert!(started.elapsed() < 2 * timeout + Duration::from_secs(20), "survivors hung: {:?}", started.elapsed());
    for r in survivors {
        assert_eq!(mask(&groups, r), [true, true, true, false], "rank {r}");
        assert!(!groups[r].peer_state(3).unwrap());
    }
    // Later calls skip the masked rank.
    all_reduce_exact(&groups, &survivors, DType::I32, ReduceOp::Max, 10, &mut rng);
    all_reduce_exact(&groups, &survivors, DType::F64, ReduceOp::Sum, 4000, &mut rng);
    let inputs: Vec<Vec<u8>> = (0..4).map(|_| rng.bytes(5000)).collect();
    let out = on_ranks(&groups, &survivors, |rank, g| {
        let mut output = vec![0xeeu8; 4 * 5000];
        g.all_gather(&inputs[rank], &mut output).map(|_| output)
    });
    for r in survivors {
        let got = out[r].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(&got[..3 * 5000], &inputs[..3].concat()[..], "rank {r}");
        assert!(got[3 * 5000..].iter().all(|&b| b == 0xee), "the lost rank's part is left as it was");
    }
    let out = on_ranks(&groups, &survivors, |_, g| g.barrier());
    assert!(survivors.iter().all(|&r| out[r].as_ref().unwrap().is_ok()));
    let out = on_ranks(&groups, &survivors, |_, g| g.broadcast(&mut [0u8; 8], 3));
    assert!(survivors.iter().all(|&r| matches!(out[r], Some(Err(Error::RootInactive { root: 3 })))));

    // A replacement registers a new group on a new engine; everyone updates the membership.
    let engine = engine("tcp");
    groups[3] = Group::new(&engine, 3, 4, options(timeout)).expect("replacement");
    let infos: Vec<MemberInfo> = groups.iter().map(Group::local_info).collect();
    groups[3].connect(&infos).expect("connect");
    for g in &groups[..3] {
        g.update_member(&infos).expect("update_member");
    }
    for r in everyone {
        assert_eq!(mask(&groups, r), [true; 4], "rank {r}");
    }
    all_reduce_exact(&groups, &everyone, DType::F16, ReduceOp::Sum, 5000, &mut rng);
    all_reduce_exact(&groups, &everyone, DType::I64, ReduceOp::Min, 3, &mut rng);
}

#[test]
fn a_silent_rank_times_out_is_skipped_then_recovers() {
    let timeout = Duration::from_secs(2);
    let (_engines, groups) = groups(3, "shm", options(timeout));
    let mut rng = Rng(22);
    all_reduce_exact(&groups, &[0, 1, 2], DType::F32, ReduceOp::Sum, 100, &mut rng);
    // Rank 1 stops taking part: a large all-reduce waits it out in the first phase, then reduces its
    // orphaned part from the survivors' raw inputs.
    let started = Instant::now();
    all_reduce_exact(&groups, &[0, 2], DType::F32, ReduceOp::Sum, 6000, &mut rng);
    assert!(started.elapsed() < 3 * timeout + Duration::from_secs(20), "survivors hung");
    assert_eq!(mask(&groups, 0), [true, false, true]);
    assert_eq!(mask(&groups, 2), [true, false, true]);
    all_reduce_exact(&groups, &[0, 2], DType::U8, ReduceOp::Product, 50, &mut rng);

    // Everyone agrees to take it back (rank 1 too): streams restart and it is included again.
    for (r, g) in groups.iter().enumerate() {
        g.activate(1).unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
    all_reduce_exact(&groups, &[0, 1, 2], DType::F32, ReduceOp::Sum, 6000, &mut rng);
    all_reduce_exact(&groups, &[0, 1, 2], DType::BF16, ReduceOp::Max, 7, &mut rng);
}

#[test]
fn deactivated_ranks_are_skipped_without_waiting() {
    let (_engines, groups) = groups(3, "tcp", options(Duration::from_secs(60)));
    let mut rng = Rng(23);
    for g in &groups[..2] {
        g.deactivate(2).unwrap();
    }
    let started = Instant::now();
    all_reduce_exact(&groups, &[0, 1], DType::I8, ReduceOp::Sum, 900, &mut rng);
    assert!(started.elapsed() < Duration::from_secs(30), "a deactivated rank was waited for");
    for g in &groups {
        g.activate(2).unwrap();
    }
    all_reduce_exact(&groups, &[0, 1, 2], DType::I8, ReduceOp::Sum, 900, &mut rng);
}

/// Writes `bytes` from a buffer registered with `from`'s engine to `addr` of segment `to`.
fn poke(from: &Group, to: &MemberInfo, addr: u64, bytes: &[u8]) {
    let src = HostBuffer::from_vec(bytes.to_vec());
    from.engine().register_owned(src.owned(), "cpu:0").expect("register");
    from.engine().transfer_sync(&to.segment, Opcode::Write, src.addr(), addr, bytes.len() as u64).expect("poke");
    from.engine().unregister_memory(src.addr()).expect("unregister");
}

#[test]
fn a_garbage_chunk_length_masks_the_peer_without_reading_outside() {
    let (_engines, groups) = groups(2, "tcp", options(Duration::from_secs(60)));
    let victim = groups[0].local_info();
    // Rank 1's first collective chunk to rank 0 is chunk 1, bank 1: its signal word is the second word of
    // rank 1's pair in the collective channel ((channel 0 * 2 ranks + source 1) * 2 banks + bank 1).
    let word = (1u64 << 32) | (1 << 31) | 0x7fff_ffff;
    poke(&groups[1], &victim, victim.addr + 8 * 3, &word.to_le_bytes());
    let started = Instant::now();
    let mut data = vec![1u8; 64];
    groups[0].all_reduce(&mut data, DType::U8, ReduceOp::Sum).expect("all_reduce");
    assert!(started.elapsed() < Duration::from_secs(30), "the garbage was waited out instead of recognised");
    assert_eq!(data, vec![1u8; 64], "the result is over this rank alone");
    assert_eq!(groups[0].active_ranks(), [true, false]);
}

#[test]
fn sizes_that_differ_between_ranks_are_reported_and_the_group_stays_in_step() {
    let (_engines, groups) = groups(2, "shm", options(Duration::from_secs(20)));
    let out = on_ranks(&groups, &[0, 1], |rank, g| {
        let mut data = vec![1u8; if rank == 0 { 10 } else { 2000 }];
        g.all_reduce(&mut data, DType::U8, ReduceOp::Sum)
    });
    assert!(matches!(out[0], Some(Err(Error::SizeMismatch { peer: 1, sent: 2000, expected: 10 }))), "{out:?}");
    assert!(matches!(out[1], Some(Err(Error::SizeMismatch { peer: 0, sent: 10, expected: 2000 }))), "{out:?}");
    // A receive with the wrong tag drains the message and says so.
    let out =
        on_ranks(
            &groups,
            &[0, 1],
            |rank, g| {
                if rank == 0 { g.send(&[5u8; 20], 1, 1) } else { g.recv(&mut [0u8; 20], 0, 2) }
            },
        );
    assert!(matches!(out[1], Some(Err(Error::TagMismatch { peer: 0, expected: 2, found: 1 }))), "{out:?}");
    let mut rng = Rng(24);
    all_reduce_exact(&groups, &[0, 1], DType::F32, ReduceOp::Sum, 3000, &mut rng);
    assert!(groups.iter().all(|g| g.active_ranks() == [true, true]));
}

#[test]
fn in_place_reductions_with_an_orphaned_part_are_exact_over_the_survivors() {
    // The types that reduce in place in the result (f32, f64, i64, i32 but Avg): a rank lost at the
    // start of a two-phase all_reduce leaves its part orphaned; the survivors' in-place parts and the
    // orphan's raw inputs must still give the reference over the survivors. Then reduce_scatter and reduce.
    let cases = [
        (DType::F32, ReduceOp::Sum),
        (DType::F64, ReduceOp::Avg),
        (DType::I64, ReduceOp::Product),
        (DType::I32, ReduceOp::Min),
    ];
    let mut rng = Rng(77);
    for (dtype, op) in cases {
        let (engines, groups) = groups(4, "shm", options(Duration::from_secs(3)));
        engines[1].shutdown();
        let survivors = [0, 2, 3];
        all_reduce_exact(&groups, &survivors, dtype, op, 7001, &mut rng);
        for r in survivors {
            assert_eq!(mask(&groups, r), [true, false, true, true], "{dtype:?} {op:?} rank {r}");
        }
        // reduce_scatter over the survivors: part r of the reference.
        let n = 900;
        let inputs: Vec<Vec<u8>> = (0..4).map(|_| values(dtype, op, 4 * n, &mut rng)).collect();
        let refs: Vec<&[u8]> = survivors.iter().map(|&r| inputs[r].as_slice()).collect();
        let want = reference(dtype, op, &refs);
        let size = dtype.size();
        let out = on_ranks(&groups, &survivors, |rank, g| {
            let mut output = vec![0u8; n * size];
            g.reduce_scatter(&inputs[rank], &mut output, dtype, op).map(|_| output)
        });
        for r in survivors {
            let got = out[r].as_ref().unwrap().as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
            assert_eq!(got[..], want[r * n * size..(r + 1) * n * size], "reduce_scatter {dtype:?} {op:?} rank {r}");
        }
        // reduce to rank 2.
        let out = on_ranks(&groups, &survivors, |rank, g| {
            let mut data = inputs[rank].clone();
            g.reduce(&mut data, dtype, op, 2).map(|_| data)
        });
        let got = out[2].as_ref().unwrap().as_ref().unwrap_or_else(|e| panic!("rank 2: {e}"));
        assert_eq!(got, &want, "reduce {dtype:?} {op:?}");
    }
}
