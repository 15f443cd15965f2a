//! Bad arguments: each is a typed error naming the argument, nothing is sent, and the group stays in step.

mod group_common;

use std::time::Duration;

use group_common::*;
use mooncake_ep::group::{DType, Error, Group, GroupOptions, ReduceOp, SendOp};

fn arg(r: mooncake_ep::group::Result<()>) -> &'static str {
    match r {
        Err(e) => e.arg().unwrap_or_else(|| panic!("not an argument error: {e}")),
        Ok(()) => panic!("accepted"),
    }
}

#[test]
fn bad_arguments_name_the_argument_and_send_nothing() {
    let (_e, groups) = groups(2, "tcp", options(Duration::from_secs(20)));
    let g = &groups[0];
    let mut four = [0u8; 4];
    assert_eq!(arg(g.all_reduce(&mut [0u8; 6], DType::F32, ReduceOp::Sum)), "data");
    assert_eq!(arg(g.all_reduce(&mut [0u8; 3], DType::I64, ReduceOp::Max)), "data");
    assert_eq!(arg(g.all_reduce(&mut four, DType::Bool, ReduceOp::Avg)), "op");
    assert_eq!(arg(g.reduce(&mut four, DType::U8, ReduceOp::Sum, 2)), "root");
    assert_eq!(arg(g.broadcast(&mut four, 9)), "root");
    assert_eq!(arg(g.all_gather(&[0u8; 4], &mut [0u8; 7])), "output");
    assert_eq!(arg(g.all_gather_v(&[0u8; 4], &mut [0u8; 9], &[4, 5, 0])), "counts");
    assert_eq!(arg(g.all_gather_v(&[0u8; 3], &mut [0u8; 9], &[4, 5])), "input");
    assert_eq!(arg(g.all_gather_v(&[0u8; 4], &mut [0u8; 8], &[4, 5])), "output");
    assert_eq!(arg(g.all_gather_v(&[0u8; 4], &mut [0u8; 8], &[4, u64::MAX])), "counts");
    assert_eq!(arg(g.reduce_scatter(&[0u8; 12], &mut [0u8; 4], DType::F32, ReduceOp::Sum)), "input");
    assert_eq!(arg(g.reduce_scatter(&[0u8; 12], &mut [0u8; 6], DType::F32, ReduceOp::Sum)), "output");
    assert_eq!(arg(g.all_to_all(&[0u8; 4], &[2, 2, 0], &mut [0u8; 4], &[2, 2])), "send_counts");
    assert_eq!(arg(g.all_to_all(&[0u8; 4], &[2, 2], &mut [0u8; 4], &[2])), "recv_counts");
    assert_eq!(arg(g.all_to_all(&[0u8; 5], &[2, 2], &mut [0u8; 4], &[2, 2])), "input");
    assert_eq!(arg(g.all_to_all(&[0u8; 4], &[2, 2], &mut [0u8; 5], &[2, 2])), "output");
    assert_eq!(arg(g.all_to_all(&[0u8; 4], &[2, 2], &mut [0u8; 4], &[1, 3])), "recv_counts");
    assert_eq!(arg(g.gather(&[0u8; 4], &mut [0u8; 4], 0)), "output");
    assert_eq!(arg(g.scatter(&[0u8; 4], &mut [0u8; 4], 0)), "input");
    assert_eq!(arg(g.send(&[1], 5, 0)), "dst");
    assert_eq!(arg(g.recv(&mut [0], 0, 0)), "src");
    assert_eq!(arg(g.send_recv(&[SendOp { peer: 0, tag: 0, data: &[] }], &mut [])), "dst");
    assert_eq!(arg(g.deactivate(0)), "rank");
    assert_eq!(arg(g.deactivate(2)), "rank");
    assert_eq!(arg(g.activate(7)), "rank");
    assert!(g.peer_state(2).is_err());
    assert_eq!(arg(g.set_timeout(Duration::ZERO)), "timeout");

    // Nothing was sent: the group is in step.
    let mut rng = Rng(3);
    let inputs: Vec<Vec<u8>> = (0..2).map(|_| values(DType::F32, ReduceOp::Sum, 3000, &mut rng)).collect();
    let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
    let want = reference(DType::F32, ReduceOp::Sum, &refs);
    let out = on_ranks(&groups, &[0, 1], |rank, g| {
        let mut d = inputs[rank].clone();
        g.all_reduce(&mut d, DType::F32, ReduceOp::Sum).map(|_| d)
    });
    assert!(out.into_iter().all(|d| d.unwrap().unwrap() == want));
    assert!(groups.iter().all(|g| g.active_ranks() == [true, true]));
}

#[test]
fn constructor_and_connect_errors() {
    let e = engine("tcp");
    let opts = GroupOptions::default();
    let arg = |r: mooncake_ep::group::Result<Group>| r.err().and_then(|e| e.arg()).expect("an argument error");
    assert_eq!(arg(Group::new(&e, 0, 0, opts.clone())), "world_size");
    assert_eq!(arg(Group::new(&e, 2, 2, opts.clone())), "rank");
    assert_eq!(arg(Group::new(&e, 0, 2, GroupOptions { chunk_bytes: 100, ..opts.clone() })), "options.chunk_bytes");
    assert_eq!(arg(Group::new(&e, 0, 2, GroupOptions { chunk_bytes: 4099, ..opts.clone() })), "options.chunk_bytes");
    assert_eq!(arg(Group::new(&e, 0, 2, GroupOptions { timeout: Duration::ZERO, ..opts.clone() })), "options.timeout");

    let g = Group::new(&e, 0, 2, options(Duration::from_secs(5))).unwrap();
    assert!(matches!(g.barrier(), Err(Error::NotConnected)));
    let other = Group::new(&e, 1, 2, GroupOptions { chunk_bytes: 8192, ..options(Duration::from_secs(5)) }).unwrap();
    let infos = [g.local_info(), other.local_info()];
    assert_eq!(g.connect(&infos).unwrap_err().arg(), Some("members"), "chunk sizes differ");
    assert_eq!(g.connect(&infos[..1]).unwrap_err().arg(), Some("members"));
    assert_eq!(g.connect(&[other.local_info(), g.local_info()]).unwrap_err().arg(), Some("members"));
}
