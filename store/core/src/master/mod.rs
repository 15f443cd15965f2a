//! The store master's sans-IO core: [`MasterCore`], a pure state machine holding clients, segments, objects,
//! leases, pins and eviction state. No sockets, threads or clock reads of its own: time comes from a [`Clock`],
//! randomness from a seed, and the service calls [`MasterCore::tick`] periodically.
//!
//! ```
//! use mooncake_store_core::master::{ManualClock, MasterCore};
//! use mooncake_store_core::types::{ClientId, MasterConfig, ReplicateConfig, Segment};
//!
//! let clock = ManualClock::new(0);
//! let mut core = MasterCore::new(MasterConfig::default(), Box::new(clock.clone()), 42).unwrap();
//! let client = ClientId(1);
//! let segment = Segment {
//!     name: "seg-a".into(),
//!     transport_endpoint: "10.0.0.1:12345".into(),
//!     base: 0x7f00_0000_0000,
//!     size: 1 << 20,
//!     host: "node-a".into(),
//!     protocol: "tcp".into(),
//! };
//! core.mount_segment(client, segment).unwrap();
//! let replicas = core.put_start(client, "k", 4096, &ReplicateConfig::default()).unwrap();
//! // ... the client writes 4096 bytes to replicas[0].addr on replicas[0].transport_endpoint ...
//! core.put_end(client, "k").unwrap();
//! assert!(core.exist("k").unwrap());
//! clock.advance(100);
//! core.tick();
//! ```
//!
//! Module map: `membership` (clients, segments, liveness), `placement`, `writes` (put, upsert), `reads`,
//! `removal`, `eviction`, `cxl` (the shared CXL pool), with storage in `objects`, `segments`, `groups` and `key`.

mod clock;
mod core;
mod cxl;
mod eviction;
mod groups;
mod key;
mod membership;
mod objects;
mod placement;
mod reads;
mod removal;
mod segments;
mod tasks;
mod views;
mod writes;

#[cfg(test)]
mod testing;

pub use self::clock::{Clock, ManualClock, SystemClock};
pub use self::core::MasterCore;
pub use self::tasks::{TaskAssignment, TaskConfig, TaskId, TaskInfo, TaskKind, TaskStatus};
pub use self::views::{KeyInfo, MasterStats, PingOutcome, SegmentInfo, TickReport};
