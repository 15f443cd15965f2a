//! Plain data shared by the engine and every backend: opcodes, memory locations, requests, statuses.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Direction of a transfer, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Copy remote memory into local memory.
    Read = 0,
    /// Copy local memory into remote memory.
    Write = 1,
}

impl Opcode {
    /// Upstream's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Opcode::Read => "read",
            Opcode::Write => "write",
        }
    }
}

/// The kind of memory an address range lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryKind {
    /// Host DRAM.
    Host,
    /// NVIDIA GPU memory.
    Cuda,
    /// AMD GPU memory.
    Rocm,
    /// Moore Threads GPU memory.
    Musa,
    /// CXL-attached memory.
    Cxl,
    /// NVMe storage (file or block device ranges).
    Nvme,
}

impl MemoryKind {
    const ALL: [MemoryKind; 6] =
        [MemoryKind::Host, MemoryKind::Cuda, MemoryKind::Rocm, MemoryKind::Musa, MemoryKind::Cxl, MemoryKind::Nvme];

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A small set of [`MemoryKind`]s (which memories a transport can touch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemoryKinds(u32);

impl MemoryKinds {
    /// Host memory only.
    pub const HOST: MemoryKinds = MemoryKinds(1);

    /// A set holding the given kinds.
    pub fn of(kinds: &[MemoryKind]) -> Self {
        MemoryKinds(kinds.iter().fold(0, |acc, k| acc | k.bit()))
    }

    /// True when `kind` is in the set.
    pub fn contains(self, kind: MemoryKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The kinds in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = MemoryKind> {
        MemoryKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

/// Where a registered buffer lives, in upstream's spelling: `cpu:0`, `cuda:1`, `*` (detect).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// Let the engine ask the memory devices (upstream `*`).
    Detect,
    /// Host memory, with its NUMA node when known (`cpu:N`; plain `cpu` when unknown).
    Cpu(Option<u32>),
    /// A GPU or other device: kind and index, e.g. `cuda:1`.
    Device(MemoryKind, u32),
    /// A location name this build does not interpret (kept verbatim; published as is).
    Other(String),
}

impl Location {
    /// The memory kind of this location, when known.
    pub fn kind(&self) -> Option<MemoryKind> {
        match self {
            Location::Cpu(_) => Some(MemoryKind::Host),
            Location::Device(k, _) => Some(*k),
            Location::Detect | Location::Other(_) => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Detect => f.write_str("*"),
            Location::Cpu(Some(n)) => write!(f, "cpu:{n}"),
            Location::Cpu(None) => f.write_str("cpu:0"),
            Location::Device(kind, n) => {
                let prefix = match kind {
                    MemoryKind::Host => "cpu",
                    MemoryKind::Cuda => "cuda",
                    MemoryKind::Rocm => "hip",
                    MemoryKind::Musa => "musa",
                    MemoryKind::Cxl => "cxl",
                    MemoryKind::Nvme => "nvme",
                };
                write!(f, "{prefix}:{n}")
            }
            Location::Other(s) => f.write_str(s),
        }
    }
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.is_empty() || s == "*" {
            return Ok(Location::Detect);
        }
        let (prefix, index) = match s.split_once(':') {
            Some((p, i)) => (p, Some(i)),
            None => (s, None),
        };
        let index = match index {
            None => None,
            Some(i) => Some(
                i.parse::<u32>()
                    .map_err(|_| Error::InvalidArgument(format!("location {s:?}: index {i:?} is not a number")))?,
            ),
        };
        let kind = match prefix {
            "cpu" => return Ok(Location::Cpu(index)),
            "cuda" | "gpu" => MemoryKind::Cuda,
            "hip" | "rocm" => MemoryKind::Rocm,
            "musa" => MemoryKind::Musa,
            "cxl" => MemoryKind::Cxl,
            "nvme" => MemoryKind::Nvme,
            _ => return Ok(Location::Other(s.to_string())),
        };
        Ok(Location::Device(kind, index.unwrap_or(0)))
    }
}

/// Engine-wide handle of an opened remote segment (upstream `SegmentID`).
pub type SegmentHandle = u64;

/// Engine-wide id of a batch (upstream `BatchID`); 0 is never a valid id.
pub type BatchId = u64;

/// One transfer as the user asks for it (upstream `TransferRequest`, whose `source`, `target_id` and
/// `target_offset` are `local_addr`, `target` and `remote_addr` here: the two ends of a transfer are called local
/// and remote everywhere in this project, and both are absolute addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRequest {
    /// Read or write.
    pub opcode: Opcode,
    /// Address in this process (the source of a write, the destination of a read).
    pub local_addr: u64,
    /// Target segment, from [`crate::TransferEngine::open_segment`].
    pub target: SegmentHandle,
    /// Address in the target's process.
    pub remote_addr: u64,
    /// Bytes to move.
    pub length: u64,
}

/// State of one request, numbered as upstream (docs/wire-formats.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TransferState {
    /// Not submitted yet.
    Waiting = 0,
    /// In flight.
    Pending = 1,
    /// Rejected before it started (bad argument).
    Invalid = 2,
    /// Canceled.
    Canceled = 3,
    /// Done, all bytes moved.
    Completed = 4,
    /// Did not finish in time.
    Timeout = 5,
    /// Failed; see the error.
    Failed = 6,
}

impl TransferState {
    /// True for every state a request cannot leave.
    pub fn is_final(self) -> bool {
        !matches!(self, TransferState::Waiting | TransferState::Pending)
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => TransferState::Waiting,
            1 => TransferState::Pending,
            2 => TransferState::Invalid,
            3 => TransferState::Canceled,
            4 => TransferState::Completed,
            5 => TransferState::Timeout,
            _ => TransferState::Failed,
        }
    }
}

/// Status of one request or of a whole batch.
#[derive(Debug, Clone)]
pub struct TransferStatus {
    /// Where it stands.
    pub state: TransferState,
    /// Bytes moved so far (all of them when completed).
    pub transferred_bytes: u64,
    /// Why it failed, for failed, invalid, timed-out or canceled requests.
    pub error: Option<Error>,
}

/// A notification message between engines (upstream `TransferNotify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Sender-chosen name (upstream: usually the sender's segment name).
    pub name: String,
    /// Payload.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_round_trip() {
        for s in ["cpu:0", "cpu:3", "cuda:1", "hip:2", "musa:0", "*"] {
            let loc: Location = s.parse().unwrap();
            assert_eq!(loc.to_string(), s);
        }
        assert_eq!("".parse::<Location>().unwrap(), Location::Detect);
        assert_eq!("cpu".parse::<Location>().unwrap(), Location::Cpu(None));
        assert_eq!("npu:3".parse::<Location>().unwrap(), Location::Other("npu:3".into()));
        assert!(matches!("cuda:x".parse::<Location>(), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn memory_kind_sets() {
        let s = MemoryKinds::of(&[MemoryKind::Host, MemoryKind::Cuda]);
        assert!(s.contains(MemoryKind::Cuda));
        assert!(!s.contains(MemoryKind::Rocm));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![MemoryKind::Host, MemoryKind::Cuda]);
        assert!(MemoryKinds::HOST.contains(MemoryKind::Host));
    }
}
