//! Expert-parallel (MoE) dispatch and combine over the transfer engine: upstream Mooncake's
//! `mooncake.ep.Buffer` (DeepEP-style low-latency layout with an `active_ranks` mask that survives a rank
//! failing), written against `mooncake-core` only, so it runs over whatever transport the engine has
//! (tcp, shm, rdma, ...).
//!
//! Each rank registers one host buffer ([`size_hint`] bytes), the ranks exchange [`PeerInfo`]s and
//! [`EpBuffer::connect`]. [`EpBuffer::dispatch`] writes every token into per-source receive slots of the
//! ranks owning its top-k experts, then one signal word per (source, destination) carrying the call's
//! sequence number; [`EpBuffer::combine`] sends expert outputs back and reduces them with the top-k weights.
//! A rank not heard from before the timeout, or whose writes fail, is set to 0 in `active_ranks` and
//! skipped from then on. docs/ep.md describes the buffer layout and the protocol.
//!
//! ```no_run
//! use std::time::Duration;
//! use mooncake_ep::{DispatchArgs, EpBuffer, Tokens, size_hint};
//! # fn run(engine: &mooncake_core::TransferEngine, peers: Vec<mooncake_ep::PeerInfo>) -> mooncake_ep::Result<()> {
//! let (rank, ranks, hidden, n_max, experts) = (0, 2, 256, 64, 8);
//! let buffer = EpBuffer::new(engine, rank, ranks, size_hint(n_max, hidden, ranks, experts))?;
//! // ... exchange buffer.local_info() with the other ranks, then:
//! buffer.connect(&peers)?;
//! let x = vec![0u16; 4 * hidden];
//! let topk_idx = vec![0i64, 5, -1, 3, 7, 1, 2, 6];
//! let mut active = vec![1i32; ranks];
//! let args = DispatchArgs {
//!     x: Tokens::Bf16(&x), hidden, topk_idx: &topk_idx, num_topk: 2,
//!     num_max_dispatch_tokens_per_rank: n_max, num_experts: experts,
//!     timeout: Duration::from_secs(5), use_fp8: false,
//! };
//! let received = buffer.dispatch(&args, &mut active)?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod buffer;
mod combine;
pub mod convert;
mod dispatch;
mod error;
pub mod group;
pub mod layout;

pub use buffer::{EpBuffer, PeerInfo};
pub use combine::{CombineArgs, CombineInput};
pub use dispatch::{DispatchArgs, DispatchHandle, DispatchOutput, RecvX, Tokens};
pub use error::{Error, Result};
pub use layout::{BufferLayout, size_hint};
