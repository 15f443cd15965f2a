//! Mooncake Store's client: a distributed KV cache whose master keeps metadata only, while clients contribute
//! memory segments and move object bytes with the TransferEngine.
//!
//! [`client::StoreClient`] contributes memory and moves object bytes with the transfer engine of `mooncake-core`;
//! [`dummy`] serves application processes that share one client through shared memory. The types and wire
//! messages come from `mooncake-store-core` (re-exported here); the master service is `mooncake-store-master`.
//! Backends are linked by the final program, never by this crate.
// Unsafe code is denied: bytes of registered memory are touched through `mooncake-raw` (`client::local_copy`),
// and only the declaration of the `unsafe fn` `StoreClient::register_buffer` is allowed.
#![deny(unsafe_code)]

pub mod client;
pub mod dummy;
pub mod error;

pub use error::{Cause, Error, Result};
pub use mooncake_store_core::{ErrorCode, allocator, protocol, types, units};
