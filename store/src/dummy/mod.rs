//! Dummy clients: application processes that use a store client running in another process on the same host
//! (the *real client*, `mooncake_client`), through shared memory.
//!
//! A real client owns the transfer engine, the segment it contributes and the connection to the master. A dummy
//! client ([`DummyClient`]) creates a shared-memory pool (a file under `/dev/shm`), asks the real client to map
//! it too (`Attach`), and from then on every call names byte ranges of that pool: the real client moves object
//! bytes straight between the store and the pool (`put_from` / `get_into` on its side), so a zero-copy read into
//! a pool buffer costs the dummy one local round trip plus the real client's copy. The bytes API (`put`, `get`)
//! stages values in a part of the pool reserved as the dummy's local buffer.
//!
//! The service ([`RealClientService`]) listens on 127.0.0.1 only: dummies are local by construction. It maps only
//! files this module names (`/dev/shm/mooncake-dummy-*`). When the real client goes away, a dummy's calls fail
//! with `RpcFail` / `RpcTimeout` within the RPC timeout; its next call attaches again, so a restarted real
//! client serves the same pool without the application doing anything.

mod client;
mod protocol;
mod server;

pub use client::{DummyClient, DummyConfig};
pub use protocol::{DummyRequest, DummyResponse, service_id};
pub use server::RealClientService;

/// Files of shared-memory pools live here, named with this prefix.
pub const POOL_PREFIX: &str = "/dev/shm/mooncake-dummy-";
