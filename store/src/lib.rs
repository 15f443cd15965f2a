//! Mooncake Store: a distributed KV cache. The master keeps metadata only; clients contribute memory segments
//! and move object bytes with the TransferEngine.
//!
//! This crate holds the shared [`types`], the per-segment [`allocator`] and the master's sans-IO core
//! ([`master::MasterCore`]): a pure state machine with an injected clock, wrapped by the RPC [`service`]
//! ([`protocol`] has its messages). [`client::StoreClient`] contributes memory and moves object bytes with the
//! transfer engine of `mooncake-core`; backends are linked by the final program, never by this crate.
// Unsafe code is denied everywhere except `client::local_copy`, the one place that copies between
// registered memory of this process (same-process replicas), checked against the engine's regions.
#![deny(unsafe_code)]

pub mod allocator;
pub mod client;
pub mod dummy;
pub mod master;
pub mod protocol;
mod rng;
pub mod service;
pub mod types;
pub mod units;

pub use types::{ErrorCode, Result};
