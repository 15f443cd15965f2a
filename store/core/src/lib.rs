//! Mooncake Store's sans-IO core, shared by the master service and the client: the [`types`] both sides speak,
//! the master's wire messages ([`protocol`]), the per-segment [`allocator`] and the master state machine
//! ([`master::MasterCore`]: a pure state machine with an injected clock). Nothing here opens a socket, starts a
//! thread or reads a clock it was not given: `mooncake-store-master` wraps the core in the RPC service, and the
//! client (`mooncake-store`) moves object bytes with the transfer engine. See `docs/architecture.md`.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod master;
pub mod protocol;
mod rng;
pub mod types;
pub mod units;

pub use types::{ErrorCode, Result};
