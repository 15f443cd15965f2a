//! The hardware boundary: what the transport needs from a verbs implementation. `verbs.rs`
//! implements it with libibverbs; the tests implement it with an in-memory fabric, so that the
//! whole transport (handshake, slicing, posting, completion, retry) runs without a NIC.

use mooncake_core::{Opcode, Result};

use crate::config::RdmaConfig;
use crate::discovery::UsableNic;
use crate::memory::MrSource;
use crate::qp::QpOps;

/// One RDMA READ or WRITE of one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkRequest {
    /// Identifies the slice in the completion.
    pub wr_id: u64,
    /// READ copies remote -> local, WRITE local -> remote.
    pub opcode: Opcode,
    /// Local address.
    pub local_addr: u64,
    /// Local key of the local memory on the posting NIC.
    pub lkey: u32,
    /// Bytes.
    pub length: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key of the remote memory on the peer's NIC.
    pub rkey: u32,
}

/// Outcome of one work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    /// Done.
    Success,
    /// Failed with `ibv_wc_status` `code` (e.g. 12 = transport retry counter exceeded).
    Error {
        /// The status code.
        code: u32,
        /// Vendor syndrome.
        vendor_err: u32,
    },
}

/// One completion polled from a NIC's completion queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The `wr_id` of the work request.
    pub wr_id: u64,
    /// Its outcome.
    pub status: WcStatus,
}

/// Text of an `ibv_wc_status` code.
pub fn wc_status_text(code: u32) -> &'static str {
    match code {
        0 => "success",
        1 => "local length error",
        2 => "local QP operation error",
        4 => "local protection error",
        5 => "work request flushed",
        9 => "remote invalid request",
        10 => "remote access error (rkey or bounds)",
        11 => "remote operation error",
        12 => "transport retry counter exceeded (peer unreachable)",
        13 => "RNR retry counter exceeded",
        _ => "work request failed",
    }
}

/// Why a post failed: how many work requests went in before the failure, and the error.
#[derive(Debug)]
pub struct PostFailure {
    /// Work requests accepted before the failing one.
    pub posted: usize,
    /// The error.
    pub error: mooncake_core::Error,
}

/// NIC resources for the data path. Indices are positions in the NIC list the fabric was opened
/// with (the published device order).
pub trait Fabric: Send + Sync + 'static {
    /// An RC queue pair bound to one NIC's protection domain and completion queue.
    type Qp: QpOps + Send + 'static;
    /// A registered memory region; deregistered when dropped.
    type Mr: Send + Sync + 'static;

    /// Creates a queue pair in RESET on NIC `nic`.
    fn create_qp(&self, nic: usize) -> Result<Self::Qp>;

    /// Posts RDMA READ/WRITE work requests (signaled) on `qp`.
    fn post(&self, qp: &mut Self::Qp, wrs: &[WorkRequest]) -> std::result::Result<(), PostFailure>;

    /// Polls up to `out.len()` completions of NIC `nic` into `out`; returns how many.
    fn poll(&self, nic: usize, out: &mut [WorkCompletion]) -> Result<usize>;

    /// Registers memory on NIC `nic`.
    fn register(&self, nic: usize, addr: u64, len: u64, source: MrSource) -> Result<Self::Mr>;

    /// `(lkey, rkey)` of a region.
    fn keys(mr: &Self::Mr) -> (u32, u32);
}

/// Finds the usable NICs and opens them.
pub trait FabricProvider: Send + Sync + 'static {
    /// The opened fabric.
    type Fabric: Fabric;

    /// The NICs that can be used here (typed `Unavailable` when none).
    fn discover(&self, config: &RdmaConfig) -> Result<Vec<UsableNic>>;

    /// Opens `nics`, in this order.
    fn open(&self, config: &RdmaConfig, nics: &[UsableNic]) -> Result<Self::Fabric>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_texts_name_the_common_failures() {
        assert_eq!(wc_status_text(0), "success");
        assert!(wc_status_text(12).contains("peer unreachable"));
        assert!(wc_status_text(10).contains("rkey"));
        assert_eq!(wc_status_text(99), "work request failed");
    }
}
