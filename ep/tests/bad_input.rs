//! Bad arguments are typed errors naming the argument, and nothing is written: the sequence number does
//! not move and the group carries on in step afterwards.

mod common;

use std::time::Duration;

use common::*;
use mooncake_ep::{CombineArgs, CombineInput, DispatchArgs, EpBuffer, Error, Tokens, size_hint};

fn dispatch_err<'a>(b: &EpBuffer, shape: &Shape, edit: impl FnOnce(&mut DispatchArgs<'a>, &mut Vec<i32>)) -> Error {
    // Leaked so that the edits may put in slices of any caller's lifetime.
    let x: &'a [u16] = Vec::leak(vec![0u16; 4 * shape.hidden]);
    let topk: &'a [i64] = Vec::leak((0..4 * shape.topk as i64).map(|i| i % shape.experts as i64).collect());
    let mut args = DispatchArgs {
        x: Tokens::Bf16(x),
        hidden: shape.hidden,
        topk_idx: topk,
        num_topk: shape.topk,
        num_max_dispatch_tokens_per_rank: shape.n_max,
        num_experts: shape.experts,
        timeout: Duration::from_secs(1),
        use_fp8: false,
    };
    let mut active = vec![1; shape.ranks];
    edit(&mut args, &mut active);
    let before = active.clone();
    let err = b.dispatch(&args, &mut active).expect_err("bad input accepted");
    assert_eq!(active, before, "the mask was touched");
    err
}

#[test]
fn bad_arguments_name_the_argument_and_write_nothing() {
    let shape = Shape { ranks: 2, hidden: 256, n_max: 8, experts: 8, topk: 2 };
    let (_engines, buffers) = group(shape, "tcp");
    let b = &buffers[0];
    let arg = |e: Error| e.arg().unwrap_or("<none>");

    let x200 = vec![0u16; 4 * 200];
    assert_eq!(
        arg(dispatch_err(b, &shape, |a, _| {
            a.x = Tokens::Bf16(&x200);
            a.hidden = 200;
            a.use_fp8 = true;
        })),
        "hidden"
    );
    let x_many = vec![0u16; 9 * 256];
    let topk_many = vec![0i64; 9 * 2];
    assert_eq!(
        arg(dispatch_err(b, &shape, |a, _| {
            a.x = Tokens::Bf16(&x_many);
            a.topk_idx = &topk_many;
        })),
        "x"
    );
    let odd = [0u8; 3];
    assert_eq!(arg(dispatch_err(b, &shape, |a, _| a.x = Tokens::Bf16Bytes(&odd))), "x");
    assert_eq!(arg(dispatch_err(b, &shape, |a, _| a.num_experts = 7)), "num_experts");
    let out_of_range = vec![0, 8, 1, 2, 3, 4, 5, 6];
    assert_eq!(arg(dispatch_err(b, &shape, |a, _| a.topk_idx = &out_of_range)), "topk_idx");
    let below = vec![0, -2, 1, 2, 3, 4, 5, 6];
    assert_eq!(arg(dispatch_err(b, &shape, |a, _| a.topk_idx = &below)), "topk_idx");
    let short = vec![0i64; 7];
    assert_eq!(arg(dispatch_err(b, &shape, |a, _| a.topk_idx = &short)), "topk_idx");
    assert_eq!(arg(dispatch_err(b, &shape, |_, m| m.push(1))), "active_ranks");
    // A layout larger than the buffer was sized for.
    let err = dispatch_err(b, &shape, |a, _| a.num_max_dispatch_tokens_per_rank = 64);
    assert!(matches!(err, Error::BufferTooSmall { .. }), "{err}");
    assert_eq!(arg(err), "num_ep_buffer_bytes");
    assert_eq!(b.sequence(), 0, "a rejected call does not advance the sequence");

    // Combine: a handle or weights that do not fit.
    let mut rng = Rng(21);
    let inputs = inputs(&shape, &mut rng);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = buffers
            .iter()
            .zip(&inputs)
            .map(|(b, i)| {
                s.spawn(move || {
                    let mut active = vec![1; 2];
                    let args = DispatchArgs {
                        x: Tokens::Bf16(&i.x),
                        hidden: shape.hidden,
                        topk_idx: &i.topk_idx,
                        num_topk: shape.topk,
                        num_max_dispatch_tokens_per_rank: shape.n_max,
                        num_experts: shape.experts,
                        timeout: Duration::from_secs(30),
                        use_fp8: false,
                    };
                    b.dispatch(&args, &mut active).expect("dispatch")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let out = &results[0];
    let y = expert_outputs(&shape, 0, out);
    let mut active = vec![1; 2];
    let base = CombineArgs {
        x: CombineInput::Rows(&y),
        topk_idx: &inputs[0].topk_idx,
        topk_weights: &inputs[0].weights,
        num_topk: shape.topk,
        handle: &out.handle,
        timeout: Duration::from_secs(1),
    };
    let few = vec![0.5f32; 1];
    let e = b.combine(&CombineArgs { topk_weights: &few, ..base }, &mut active).unwrap_err();
    assert_eq!(arg(e), "topk_weights");
    let mut bad_handle = out.handle.clone();
    bad_handle.packed_recv_layout_range[0] = (100i64 << 32) | 5;
    let e = b.combine(&CombineArgs { handle: &bad_handle, ..base }, &mut active).unwrap_err();
    assert_eq!(arg(e), "handle");
    let short_y = vec![0u16; 3];
    let e = b.combine(&CombineArgs { x: CombineInput::Rows(&short_y), ..base }, &mut active).unwrap_err();
    assert_eq!(arg(e), "x");
    let e = b.write_next_combine_buffer(&out.handle, 9, 0, &y[..shape.hidden]).unwrap_err();
    assert_eq!(arg(e), "local_expert");
    assert_eq!(b.sequence(), 1);

    // Everyone still in step: the real combine works and is exact.
    let combined: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let (b, i, out) = (&buffers[r], &inputs[r], &results[r]);
                s.spawn(move || {
                    let y = expert_outputs(&shape, r, out);
                    let args = CombineArgs {
                        x: CombineInput::Rows(&y),
                        topk_idx: &i.topk_idx,
                        topk_weights: &i.weights,
                        num_topk: shape.topk,
                        handle: &out.handle,
                        timeout: Duration::from_secs(30),
                    };
                    let mut active = vec![1; 2];
                    let c = b.combine(&args, &mut active).expect("combine");
                    assert_eq!(active, vec![1, 1]);
                    c
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in 0..2 {
        assert_eq!(combined[r], ref_combine(&shape, &inputs[r], &[true, true], false));
    }
}

#[test]
fn constructor_and_connect_errors() {
    let e = engine("tcp");
    assert_eq!(EpBuffer::new(&e, 2, 2, 4096).unwrap_err().arg(), Some("rank"));
    assert_eq!(EpBuffer::new(&e, 0, 0, 4096).unwrap_err().arg(), Some("num_ranks"));
    assert_eq!(EpBuffer::new(&e, 0, 2, 0).unwrap_err().arg(), Some("num_ep_buffer_bytes"));
    let b = EpBuffer::new(&e, 0, 2, 4096).unwrap();
    let x = vec![0u16; 128];
    let topk = vec![0i64];
    let args = DispatchArgs {
        x: Tokens::Bf16(&x),
        hidden: 128,
        topk_idx: &topk,
        num_topk: 1,
        num_max_dispatch_tokens_per_rank: 4,
        num_experts: 2,
        timeout: Duration::from_secs(1),
        use_fp8: false,
    };
    assert!(matches!(b.dispatch(&args, &mut [1, 1]), Err(Error::NotConnected)));
    let mine = b.local_info();
    assert_eq!(b.connect(std::slice::from_ref(&mine)).unwrap_err().arg(), Some("peers"));
    let mut other = mine.clone();
    other.addr += 64;
    assert_eq!(b.connect(&[other.clone(), other]).unwrap_err().arg(), Some("peers"));
    assert_eq!(size_hint(4, 128, 2, 3), 0);
}
