//! Core of mooncake-rs: the three traits every backend implements ([`Transport`],
//! [`MemoryDevice`], [`MetadataStore`]), the link-time [`registry`], shared wire types, typed
//! [`Error`]s, and the [`TransferEngine`] written purely against the traits.
//!
//! This crate knows no concrete backend; link them through the `mooncake` facade crate. It also
//! holds the parts every transport shares: [`sync`] (poison-tolerant locking), [`fanin`] (a request
//! cut into pieces completes once, when the last piece does) and [`stripe`] (where to cut).
//!
//! ```no_run
//! use mooncake_core::{EngineConfig, Opcode, OwnedMemory, TransferEngine};
//! # fn main() -> mooncake_core::Result<()> {
//! // (a transport and the P2P handshake must be linked, e.g. through the `mooncake` facade)
//! let engine = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE"))?;
//! // Memory the engine holds needs no `unsafe` (see also `register_allocation` and mooncake-raw's
//! // HostBuffer); raw addresses are registered with the `unsafe` `register_memory`.
//! let memory = OwnedMemory::from_static(Vec::leak(vec![7u8; 4096]));
//! let local = memory.addr();
//! engine.register_owned(memory, "cpu:0")?;
//! let peer = "127.0.0.1:15123"; // another engine's segment name
//! let remote = engine.first_buffer_address(peer)?;
//! engine.transfer_sync(peer, Opcode::Write, local, remote, 4096)?;
//! # Ok(()) }
//! ```
// Core never dereferences memory and contains no `unsafe` block. It declares the `unsafe fn`s through which
// callers vouch for raw memory (registration by address, vouched local ranges), each allowed where it is.
#![deny(unsafe_code)]

pub mod capabilities;
pub mod completion;
pub mod descriptor;
pub mod device;
mod engine;
pub mod error;
pub mod fanin;
pub mod memory;
pub mod metadata;
pub mod registry;
pub mod rpc;
pub mod stripe;
pub mod sync;
pub mod transport;
pub mod types;

pub use capabilities::{Capabilities, DeviceCapabilities, PerfModel};
pub use completion::{Batch, Completion};
pub use descriptor::{Addressing, BufferDesc, FieldError, Fields, Section, SegmentDescriptor};
pub use device::{AllocOptions, Allocation, DmabufExport, MemoryDevice, SharingHandle};
pub use engine::{
    CALLER_THREAD_MAX_BYTES, EngineConfig, PendingTransfers, Transfer, TransferEngine, UncheckedTransfers,
    join_host_port, split_host_port,
};
pub use error::{Error, Result};
pub use fanin::{FanIn, PieceDone};
pub use memory::{Access, DeviceMemory, LocalRange, OwnedMemory, Region, RegionGuard, RegionTable};
pub use metadata::{MetadataCapabilities, MetadataKeys, MetadataStore, RpcMeta, WatchEvent};
pub use rpc::{PeerRpc, RpcHandler};
pub use stripe::{StripePiece, StripePlan, StripeRounding};
pub use transport::{
    BackendConfig, BlockingRequest, NoPeerHandshake, PeerEvents, PeerHandshake, RemoteSegment, TransferTask, Transport,
    TransportContext,
};
pub use types::{
    BatchId, Location, MemoryKind, MemoryKinds, Notification, Opcode, SegmentHandle, TransferRequest, TransferState,
    TransferStatus,
};

/// Re-exported so backend crates register with the same `inventory` the registry collects from.
pub use inventory;
