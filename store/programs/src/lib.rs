//! The store's programs (`mooncake_master`, `mooncake_client`, `mooncake_store_bench`) and what
//! they share: gflags-style command lines with upstream's flag names.
#![forbid(unsafe_code)]

pub mod client_node;
pub mod flags;
pub mod master;
pub mod process;
