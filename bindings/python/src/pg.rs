//! `mooncake._mooncake.pg`: the collectives of `mooncake-ep` ([`Group`]) for the torch.distributed backend
//! `mooncake.pg` (`mooncake-cpu` / `mooncake`).
//!
//! torch is not a dependency: the Python layer passes each tensor as its address and byte length (it keeps
//! the tensor alive and contiguous for the call), element types by name (`float32`, `bfloat16`, `bool`, ...)
//! and reduce operations by name (`sum`, `avg`, `product`, `min`, `max`). Every argument is checked before
//! anything moves: a bad one raises `ValueError` / `TypeError` naming it. Every collective runs with the GIL
//! released, on the calling thread.
//!
//! A peer that fails or is not heard from within the group's timeout is masked in `active_ranks()` and the
//! call completes over the others (no exception). Calls that cannot produce a result because a peer is
//! gone (a rooted collective whose root is inactive, a send/recv peer that is inactive, a large all-reduce
//! that lost a rank between its phases) raise `CollectiveError`, a `RuntimeError` whose `ranks` attribute
//! lists the ranks at fault.

use std::time::Duration;

use mooncake_ep::group::{DType, Error as GroupError, Group, GroupOptions, MemberInfo, RecvOp, ReduceOp, SendOp};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::buffers::type_name;
use crate::engine::{PyInnerEngine, engine_for};

pyo3::create_exception!(
    pg,
    CollectiveError,
    PyRuntimeError,
    "A collective or point-to-point call that has no result because ranks failed; `ranks` lists them."
);

/// The element type named `name` (torch's dtype name without the `torch.` prefix).
fn dtype_of(name: &str) -> PyResult<DType> {
    Ok(match name {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "int32" | "int" => DType::I32,
        "int64" | "long" => DType::I64,
        "bool" => DType::Bool,
        other => {
            return Err(PyTypeError::new_err(format!(
                "dtype: {other:?} cannot be reduced (float32, float64, float16, bfloat16, int8, uint8, int32, int64, bool)"
            )));
        }
    })
}

/// The reduce operation named `name`.
fn op_of(name: &str) -> PyResult<ReduceOp> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "sum" => ReduceOp::Sum,
        "avg" => ReduceOp::Avg,
        "product" | "prod" => ReduceOp::Product,
        "min" => ReduceOp::Min,
        "max" => ReduceOp::Max,
        _ => return Err(PyValueError::new_err(format!("op: {name:?} is not one of sum, avg, product, min, max"))),
    })
}

/// A region of caller memory: `(address, bytes)`.
#[derive(Debug, Clone, Copy)]
struct Region {
    ptr: usize,
    len: usize,
}

impl Region {
    fn new(arg: &str, ptr: usize, len: usize) -> PyResult<Self> {
        if len > 0 && ptr == 0 {
            return Err(PyValueError::new_err(format!("{arg}: a null address for {len} bytes")));
        }
        if ptr.checked_add(len).is_none() || len > isize::MAX as usize {
            return Err(PyValueError::new_err(format!("{arg}: {len} bytes at {ptr:#x} wrap the address space")));
        }
        Ok(Region { ptr, len })
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.len > 0 && other.len > 0 && self.ptr < other.ptr + other.len && other.ptr < self.ptr + self.len
    }

    /// # Safety
    /// The caller's memory `[ptr, ptr + len)` is valid for reads for the call and not written meanwhile.
    unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the Python layer passes a live, contiguous tensor's storage and keeps it alive for the call;
        // the region was checked non-null and not wrapping.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// # Safety
    /// The caller's memory `[ptr, ptr + len)` is valid for writes for the call and not aliased by any other
    /// slice made for the same call.
    unsafe fn bytes_mut<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as `bytes`; the callers copy an input that overlaps an output first, so no two slices alias.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }
}

/// Reads `input` (copied when it overlaps `output`, e.g. torch's in-place all_gather where the input is a
/// view of the output) and writes `output`.
fn with_in_out<T>(input: Region, output: Region, f: impl FnOnce(&[u8], &mut [u8]) -> T) -> T {
    // SAFETY: the Python layer keeps both tensors alive for the call; an overlapping input is copied first
    // so the two slices never alias.
    unsafe {
        if input.overlaps(&output) {
            let copy = input.bytes().to_vec();
            f(&copy, output.bytes_mut())
        } else {
            f(input.bytes(), output.bytes_mut())
        }
    }
}

fn counts_of(arg: &str, counts: Vec<i64>) -> PyResult<Vec<u64>> {
    counts
        .into_iter()
        .map(|c| u64::try_from(c).map_err(|_| PyValueError::new_err(format!("{arg}: negative count {c}"))))
        .collect()
}

/// Maps a group error to a Python exception (`ValueError` naming the argument, `CollectiveError` with the
/// ranks at fault, `RuntimeError`).
fn group_err(e: GroupError) -> PyErr {
    let ranks: Vec<usize> = match &e {
        GroupError::InvalidArgument { arg, reason } => return PyValueError::new_err(format!("{arg}: {reason}")),
        GroupError::RootInactive { root } => vec![*root],
        GroupError::PeerInactive { peer } => vec![*peer],
        GroupError::SizeMismatch { peer, .. } | GroupError::TagMismatch { peer, .. } => vec![*peer],
        GroupError::Incomplete { ranks } => ranks.clone(),
        _ => return PyRuntimeError::new_err(e.to_string()),
    };
    Python::attach(|py| {
        let err = CollectiveError::new_err(e.to_string());
        let _ = err.value(py).setattr("ranks", ranks);
        err
    })
}

fn member_of(obj: &Bound<'_, PyAny>) -> PyResult<MemberInfo> {
    let bad = || {
        PyTypeError::new_err(format!(
            "members: expected (segment, addr, len, chunk_bytes, world_size) tuples, got {}",
            type_name(obj)
        ))
    };
    let t = obj.cast::<PyTuple>().map_err(|_| bad())?;
    if t.len() != 5 {
        return Err(bad());
    }
    Ok(MemberInfo {
        segment: t.get_item(0)?.extract().map_err(|_| bad())?,
        addr: t.get_item(1)?.extract().map_err(|_| bad())?,
        len: t.get_item(2)?.extract().map_err(|_| bad())?,
        chunk_bytes: t.get_item(3)?.extract().map_err(|_| bad())?,
        world_size: t.get_item(4)?.extract().map_err(|_| bad())?,
    })
}

fn members_of(members: &Bound<'_, PyAny>) -> PyResult<Vec<MemberInfo>> {
    crate::engine::list_items(members, "members")?.iter().map(member_of).collect()
}

fn seconds(arg: &str, s: f64) -> PyResult<Duration> {
    if !(s.is_finite() && s > 0.0) {
        return Err(PyValueError::new_err(format!("{arg}: {s} seconds (a positive number)")));
    }
    Duration::try_from_secs_f64(s).map_err(|_| PyValueError::new_err(format!("{arg}: {s} seconds is too long")))
}

/// One rank's process group over a transfer engine: the native half of `mooncake.pg`'s backend.
#[pyclass(module = "mooncake.pg", name = "Group", frozen)]
pub struct PyGroup {
    group: Group,
    /// Whether the group started its engine (shut down with the group).
    own_engine: bool,
}

#[pymethods]
impl PyGroup {
    /// Registers this rank's buffer (about `6 * world_size * chunk_bytes`). `engine` (an
    /// `InnerTransferEngine` from `TransferEngine.get_engine()`) is used when given; otherwise the group
    /// starts an engine of its own on `local_hostname` in P2P mode over `protocol`, with the same-host
    /// transports (shm) next to it unless `same_host_transports` is false.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (rank, world_size, chunk_bytes = 4 << 20, timeout = 30.0,
                        small_all_reduce_bytes = 256 << 10, engine = None, protocol = "tcp",
                        local_hostname = "127.0.0.1", same_host_transports = true))]
    fn new(
        py: Python<'_>,
        rank: usize,
        world_size: usize,
        chunk_bytes: u64,
        timeout: f64,
        small_all_reduce_bytes: u64,
        engine: Option<&Bound<'_, PyAny>>,
        protocol: &str,
        local_hostname: &str,
        same_host_transports: bool,
    ) -> PyResult<Self> {
        let timeout = seconds("timeout", timeout)?;
        let (engine, own_engine) =
            engine_for(py, engine, protocol, local_hostname, same_host_transports, "process group's")?;
        let options = GroupOptions { chunk_bytes, timeout, small_all_reduce_bytes };
        let group = match Group::new(&engine, rank, world_size, options) {
            Ok(g) => g,
            Err(e) => {
                if own_engine {
                    engine.shutdown();
                }
                return Err(group_err(e));
            }
        };
        Ok(PyGroup { group, own_engine })
    }

    /// This rank.
    #[getter]
    fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Ranks in the group.
    #[getter]
    fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// Bytes of one chunk.
    #[getter]
    fn chunk_bytes(&self) -> u64 {
        self.group.chunk_bytes()
    }

    /// The engine's segment name (`host:port`).
    #[getter]
    fn segment_name(&self) -> String {
        self.group.engine().local_segment_name().to_string()
    }

    /// Seconds a call waits for a peer before masking it.
    #[getter]
    fn timeout(&self) -> f64 {
        self.group.timeout().as_secs_f64()
    }

    /// The engine the group's buffer is registered with (to share it with later groups).
    fn get_engine(&self, py: Python<'_>) -> PyResult<Py<PyInnerEngine>> {
        Py::new(py, PyInnerEngine { engine: self.group.engine().clone() })
    }

    /// Sets the timeout (seconds) of later calls.
    fn set_timeout(&self, seconds_: f64) -> PyResult<()> {
        self.group.set_timeout(seconds("timeout", seconds_)?).map_err(group_err)
    }

    /// Calls made so far.
    fn calls(&self) -> u64 {
        self.group.calls()
    }

    /// `(segment, addr, len, chunk_bytes, world_size)`: what the other ranks need to reach this rank.
    fn local_info(&self) -> (String, u64, u64, u64, u64) {
        let m = self.group.local_info();
        (m.segment, m.addr, m.len, m.chunk_bytes, m.world_size)
    }

    /// Takes every rank's `local_info()` (index = rank); every rank is active afterwards.
    fn connect(&self, py: Python<'_>, members: &Bound<'_, PyAny>) -> PyResult<()> {
        let members = members_of(members)?;
        py.detach(|| self.group.connect(&members)).map_err(group_err)
    }

    /// A replaced rank's new `local_info()` (and everyone else's unchanged): the streams with every changed
    /// rank restart and it becomes active. Every rank but the replacement calls it at the same point.
    fn update_member(&self, py: Python<'_>, members: &Bound<'_, PyAny>) -> PyResult<()> {
        let members = members_of(members)?;
        py.detach(|| self.group.update_member(&members)).map_err(group_err)
    }

    /// Which ranks are active.
    fn active_ranks(&self) -> Vec<bool> {
        self.group.active_ranks()
    }

    /// Whether `rank` is active.
    fn peer_state(&self, rank: usize) -> PyResult<bool> {
        self.group.peer_state(rank).map_err(group_err)
    }

    /// Masks `rank`: later calls neither write to it nor wait for it.
    fn deactivate(&self, rank: usize) -> PyResult<()> {
        self.group.deactivate(rank).map_err(group_err)
    }

    /// Takes back a live masked rank (every rank calls it at the same point, that rank included).
    fn activate(&self, py: Python<'_>, rank: usize) -> PyResult<()> {
        py.detach(|| self.group.activate(rank)).map_err(group_err)
    }

    /// In place over `nbytes` at `ptr`.
    fn all_reduce(&self, py: Python<'_>, ptr: usize, nbytes: usize, dtype: &str, op: &str) -> PyResult<()> {
        let (dtype, op, data) = (dtype_of(dtype)?, op_of(op)?, Region::new("tensor", ptr, nbytes)?);
        // SAFETY: the Python layer keeps the tensor alive and unaliased for the call.
        py.detach(|| self.group.all_reduce(unsafe { data.bytes_mut() }, dtype, op)).map_err(group_err)
    }

    /// In place; `root` sends.
    fn broadcast(&self, py: Python<'_>, ptr: usize, nbytes: usize, root: usize) -> PyResult<()> {
        let data = Region::new("tensor", ptr, nbytes)?;
        // SAFETY: as all_reduce.
        py.detach(|| self.group.broadcast(unsafe { data.bytes_mut() }, root)).map_err(group_err)
    }

    /// `output` = every rank's `input`, in rank order.
    fn all_gather(
        &self,
        py: Python<'_>,
        in_ptr: usize,
        in_bytes: usize,
        out_ptr: usize,
        out_bytes: usize,
    ) -> PyResult<()> {
        let (i, o) = (Region::new("input", in_ptr, in_bytes)?, Region::new("output", out_ptr, out_bytes)?);
        py.detach(|| with_in_out(i, o, |i, o| self.group.all_gather(i, o))).map_err(group_err)
    }

    /// Uneven parts: `counts[r]` bytes from rank `r`.
    fn all_gather_v(
        &self,
        py: Python<'_>,
        in_ptr: usize,
        in_bytes: usize,
        out_ptr: usize,
        out_bytes: usize,
        counts: Vec<i64>,
    ) -> PyResult<()> {
        let (i, o) = (Region::new("input", in_ptr, in_bytes)?, Region::new("output", out_ptr, out_bytes)?);
        let counts = counts_of("counts", counts)?;
        py.detach(|| with_in_out(i, o, |i, o| self.group.all_gather_v(i, o, &counts))).map_err(group_err)
    }

    /// `input` = `world_size` equal parts; `output` = this rank's part reduced over the ranks.
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        in_ptr: usize,
        in_bytes: usize,
        out_ptr: usize,
        out_bytes: usize,
        dtype: &str,
        op: &str,
    ) -> PyResult<()> {
        let (dtype, op) = (dtype_of(dtype)?, op_of(op)?);
        let (i, o) = (Region::new("input", in_ptr, in_bytes)?, Region::new("output", out_ptr, out_bytes)?);
        py.detach(|| with_in_out(i, o, |i, o| self.group.reduce_scatter(i, o, dtype, op))).map_err(group_err)
    }

    /// Uneven all-to-all: `send_counts[r]` bytes of `input` to rank `r`, `recv_counts[r]` bytes of `output`
    /// from it, both packed in rank order.
    #[allow(clippy::too_many_arguments)]
    fn all_to_all(
        &self,
        py: Python<'_>,
        in_ptr: usize,
        in_bytes: usize,
        send_counts: Vec<i64>,
        out_ptr: usize,
        out_bytes: usize,
        recv_counts: Vec<i64>,
    ) -> PyResult<()> {
        let (i, o) = (Region::new("input", in_ptr, in_bytes)?, Region::new("output", out_ptr, out_bytes)?);
        let (sc, rc) = (counts_of("send_counts", send_counts)?, counts_of("recv_counts", recv_counts)?);
        py.detach(|| with_in_out(i, o, |i, o| self.group.all_to_all(i, &sc, o, &rc))).map_err(group_err)
    }

    /// In place; the result lands at `root` (the others' buffers are unchanged).
    fn reduce(&self, py: Python<'_>, ptr: usize, nbytes: usize, dtype: &str, op: &str, root: usize) -> PyResult<()> {
        let (dtype, op, data) = (dtype_of(dtype)?, op_of(op)?, Region::new("tensor", ptr, nbytes)?);
        // SAFETY: as all_reduce.
        py.detach(|| self.group.reduce(unsafe { data.bytes_mut() }, dtype, op, root)).map_err(group_err)
    }

    /// `output` (root only; empty elsewhere) = every rank's `input` in rank order.
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        py: Python<'_>,
        in_ptr: usize,
        in_bytes: usize,
        out_ptr: usize,
        out_bytes: usize,
        root: usize,
    ) -> PyResult<()> {
        let (i, o) = (Region::new("input", in_ptr, in_bytes)?, Region::new("output", out_ptr, out_bytes)?);
        py.detach(|| with_in_out(i, o, |i, o| self.group.gather(i, o, root))).map_err(group_err)
    }

    /// `input` (root only; empty elsewhere) = `world_size` equal parts; `output` = this rank's part.
    #[allow(clippy::too_many_arguments)]
    fn scatter(
        &self,
        py: Python<'_>,
        in_ptr: usize,
        in_bytes: usize,
        out_ptr: usize,
        out_bytes: usize,
        root: usize,
    ) -> PyResult<()> {
        let (i, o) = (Region::new("input", in_ptr, in_bytes)?, Region::new("output", out_ptr, out_bytes)?);
        py.detach(|| with_in_out(i, o, |i, o| self.group.scatter(i, o, root))).map_err(group_err)
    }

    /// Every active rank reaches this point.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.group.barrier()).map_err(group_err)
    }

    /// Sends `nbytes` at `ptr` to `dst` with `tag`.
    fn send(&self, py: Python<'_>, ptr: usize, nbytes: usize, dst: usize, tag: u32) -> PyResult<()> {
        let data = Region::new("tensor", ptr, nbytes)?;
        // SAFETY: as all_reduce (read only).
        py.detach(|| self.group.send(unsafe { data.bytes() }, dst, tag)).map_err(group_err)
    }

    /// Receives exactly `nbytes` from `src` with `tag` into `ptr`.
    fn recv(&self, py: Python<'_>, ptr: usize, nbytes: usize, src: usize, tag: u32) -> PyResult<()> {
        let data = Region::new("tensor", ptr, nbytes)?;
        // SAFETY: as all_reduce.
        py.detach(|| self.group.recv(unsafe { data.bytes_mut() }, src, tag)).map_err(group_err)
    }

    /// A batch of sends and receives run together (`batch_isend_irecv`): lists of `(peer, tag, ptr, nbytes)`.
    fn send_recv(
        &self,
        py: Python<'_>,
        sends: Vec<(usize, u32, usize, usize)>,
        recvs: Vec<(usize, u32, usize, usize)>,
    ) -> PyResult<()> {
        let send_regions = sends
            .iter()
            .map(|&(p, t, ptr, n)| Ok((p, t, Region::new("sends", ptr, n)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let recv_regions = recvs
            .iter()
            .map(|&(p, t, ptr, n)| Ok((p, t, Region::new("recvs", ptr, n)?)))
            .collect::<PyResult<Vec<_>>>()?;
        for (i, (_, _, a)) in recv_regions.iter().enumerate() {
            let clash = recv_regions[i + 1..].iter().any(|(_, _, b)| a.overlaps(b))
                || send_regions.iter().any(|(_, _, b)| a.overlaps(b));
            if clash {
                return Err(PyValueError::new_err("recvs: a receive buffer overlaps another send or receive buffer"));
            }
        }
        py.detach(|| {
            let sends: Vec<SendOp<'_>> = send_regions
                .iter()
                .map(|&(peer, tag, r)| {
                    // SAFETY: the Python layer keeps every tensor alive for the call; sends are only read.
                    let data = unsafe { r.bytes() };
                    SendOp { peer, tag, data }
                })
                .collect();
            let mut recvs: Vec<RecvOp<'_>> = recv_regions
                .iter()
                .map(|&(peer, tag, r)| {
                    // SAFETY: as above; receive regions were checked not to overlap each other or any send.
                    let data = unsafe { r.bytes_mut() };
                    RecvOp { peer, tag, data }
                })
                .collect();
            self.group.send_recv(&sends, &mut recvs)
        })
        .map_err(group_err)
    }

    /// Shuts the group's own engine down (nothing when the engine was passed in).
    fn shutdown(&self, py: Python<'_>) {
        if self.own_engine {
            py.detach(|| self.group.engine().shutdown());
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Group(rank={}, world_size={}, segment={:?}, active={:?})",
            self.group.rank(),
            self.group.world_size(),
            self.group.engine().local_segment_name(),
            self.group.active_ranks()
        )
    }
}

/// Adds the process-group classes to the extension module (re-exported by `mooncake.pg`).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let pg = PyModule::new(m.py(), "pg")?;
    pg.add_class::<PyGroup>()?;
    pg.add("CollectiveError", m.py().get_type::<CollectiveError>())?;
    m.add_submodule(&pg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_types_and_ops() {
        assert_eq!(dtype_of("bfloat16").ok(), Some(DType::BF16));
        assert_eq!(dtype_of("bool").ok(), Some(DType::Bool));
        assert!(dtype_of("complex64").is_err());
        assert_eq!(op_of("AVG").ok(), Some(ReduceOp::Avg));
        assert!(op_of("xor").is_err());
    }

    #[test]
    fn regions_overlap_only_when_they_share_bytes() {
        let a = Region { ptr: 100, len: 10 };
        assert!(a.overlaps(&Region { ptr: 109, len: 1 }));
        assert!(!a.overlaps(&Region { ptr: 110, len: 5 }));
        assert!(!a.overlaps(&Region { ptr: 100, len: 0 }));
        assert!(Region::new("x", 0, 4).is_err());
        assert!(Region::new("x", usize::MAX, 4).is_err());
    }
}
