//! `mooncake.store`: `MooncakeDistributedStore` and its value types, over [`StoreClient`].
//!
//! Return conventions follow upstream: 0 or a negative code (docs/wire-formats.md section 6); batch calls return one int
//! per key and never raise for a data-path failure; `get` returns `b""` on a miss. Calls before `setup()` and
//! after `close()` return -1010 (`UNAVAILABLE_IN_CURRENT_STATUS`). Keys must be `str` (TypeError otherwise).

use std::collections::HashMap;
use std::ffi::{CStr, c_int};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mooncake::sync;
use mooncake::{AllocOptions, Allocation, MemoryDevice};
use mooncake_store::client::{ClientConfig, HEALTH_NOT_INITIALIZED, StoreClient};
use mooncake_store::types::{
    ErrorCode, ReplicaDescriptor as RustReplica, ReplicaStatus as RustStatus, ReplicateConfig as RustConfig,
};
use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyString, PyTuple};

use crate::buffers::{AddrArg, ValueView, length, type_name};
use crate::convert::Unsigned;
use crate::engine::{int_list, list_items};
use crate::wait::run_interruptibly;
use mooncake_store::dummy::{DummyClient, DummyConfig};

/// Code for calls before `setup()` or after `close()`.
const UNAVAILABLE: i32 = -1010;

/// Replica lifecycle states (upstream values).
#[pyclass(module = "mooncake.store", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::upper_case_acronyms)]
pub enum ReplicaStatus {
    /// Not set.
    UNDEFINED = 0,
    /// Created, no space yet.
    INITIALIZED = 1,
    /// Being written.
    PROCESSING = 2,
    /// Readable.
    COMPLETE = 3,
    /// Removed.
    REMOVED = 4,
    /// Failed.
    FAILED = 5,
}

crate::convert::name_and_value!(ReplicaStatus { UNDEFINED, INITIALIZED, PROCESSING, COMPLETE, REMOVED, FAILED });

/// What kind of data an object holds (upstream's values; exported at module level as upstream does).
#[pyclass(module = "mooncake.store", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum ObjectDataType {
    /// Not said.
    UNKNOWN = 0,
    /// Attention KV cache.
    KVCACHE = 1,
    /// A tensor.
    TENSOR = 2,
    /// Model weights.
    WEIGHT = 3,
    /// Training samples.
    SAMPLE = 4,
    /// Activations.
    ACTIVATION = 5,
    /// Gradients.
    GRADIENT = 6,
    /// Optimizer state.
    OPTIMIZER_STATE = 7,
    /// Metadata.
    METADATA = 8,
    /// Anything else.
    GENERAL = 9,
}

crate::convert::name_and_value!(ObjectDataType {
    UNKNOWN,
    KVCACHE,
    TENSOR,
    WEIGHT,
    SAMPLE,
    ACTIVATION,
    GRADIENT,
    OPTIMIZER_STATE,
    METADATA,
    GENERAL
});

impl From<RustStatus> for ReplicaStatus {
    fn from(s: RustStatus) -> Self {
        match s {
            RustStatus::Undefined => ReplicaStatus::UNDEFINED,
            RustStatus::Initialized => ReplicaStatus::INITIALIZED,
            RustStatus::Processing => ReplicaStatus::PROCESSING,
            RustStatus::Complete => ReplicaStatus::COMPLETE,
            RustStatus::Removed => ReplicaStatus::REMOVED,
            RustStatus::Failed => ReplicaStatus::FAILED,
        }
    }
}

/// What a copy or move task does (upstream values).
#[pyclass(module = "mooncake.store", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum TaskType {
    /// Add replicas on more segments.
    REPLICA_COPY = 0,
    /// Move a replica to another segment.
    REPLICA_MOVE = 1,
}

crate::convert::name_and_value!(TaskType { REPLICA_COPY, REPLICA_MOVE });

/// Where a copy or move task stands (upstream values).
#[pyclass(module = "mooncake.store", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::upper_case_acronyms)]
pub enum TaskStatus {
    /// Queued for the client that runs it.
    PENDING = 0,
    /// Being run.
    PROCESSING = 1,
    /// Given up; `message` says why.
    FAILED = 2,
    /// Done.
    SUCCESS = 3,
}

crate::convert::name_and_value!(TaskStatus { PENDING, PROCESSING, FAILED, SUCCESS });

/// What `query_task` reports about a task. Ids are `(high, low)` pairs of 64-bit ints, as upstream's UUIDs.
#[pyclass(module = "mooncake.store", get_all, set_all, from_py_object)]
#[derive(Clone, Debug)]
pub struct QueryTaskResponse {
    /// The task.
    pub id: (u64, u64),
    /// Copy or move.
    #[pyo3(name = "type")]
    pub kind: TaskType,
    /// Current state.
    pub status: TaskStatus,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_at_ms_epoch: u64,
    /// When its state last changed, in milliseconds since the Unix epoch.
    pub last_updated_at_ms_epoch: u64,
    /// Why it failed, or what it did.
    pub message: String,
    /// The client that runs it.
    pub assigned_client: (u64, u64),
}

#[pymethods]
impl QueryTaskResponse {
    #[new]
    fn new() -> Self {
        QueryTaskResponse {
            id: (0, 0),
            kind: TaskType::REPLICA_COPY,
            status: TaskStatus::PENDING,
            created_at_ms_epoch: 0,
            last_updated_at_ms_epoch: 0,
            message: String::new(),
            assigned_client: (0, 0),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "QueryTaskResponse(id={:?}, type={:?}, status={:?}, message={:?}, assigned_client={:?})",
            self.id, self.kind, self.status, self.message, self.assigned_client
        )
    }
}

impl From<mooncake_store::types::TaskInfo> for QueryTaskResponse {
    fn from(t: mooncake_store::types::TaskInfo) -> Self {
        use mooncake_store::types::{TaskKind, TaskStatus as S};
        QueryTaskResponse {
            id: (t.id.0, t.id.1),
            kind: match t.kind {
                TaskKind::ReplicaCopy => TaskType::REPLICA_COPY,
                TaskKind::ReplicaMove => TaskType::REPLICA_MOVE,
            },
            status: match t.status {
                S::Pending => TaskStatus::PENDING,
                S::Processing => TaskStatus::PROCESSING,
                S::Success => TaskStatus::SUCCESS,
                S::Failed => TaskStatus::FAILED,
            },
            created_at_ms_epoch: t.created_at_ms,
            last_updated_at_ms_epoch: t.updated_at_ms,
            message: t.message,
            assigned_client: ((t.assigned_client.0 >> 64) as u64, t.assigned_client.0 as u64),
        }
    }
}

/// A task id as `create_*_task` returns it: `((high, low), code)`, `(0, 0)` on failure.
fn task_answer(r: StoreResult<mooncake_store::types::TaskId>) -> ((u64, u64), i32) {
    match r {
        Ok(id) => ((id.0, id.1), 0),
        Err(e) => ((0, 0), e.code()),
    }
}

/// What a write does with the object's soft pin (upstream values).
#[pyclass(module = "mooncake.store", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::upper_case_acronyms)]
pub enum SoftPinAction {
    /// Keep what the object had (a new object is not pinned).
    PRESERVE = 0,
    /// Soft-pin the object.
    ENABLE = 1,
    /// Do not soft-pin.
    DISABLE = 2,
}

crate::convert::name_and_value!(SoftPinAction { PRESERVE, ENABLE, DISABLE });

/// Placement and pinning of a write (upstream's fields and defaults).
///
/// The integer and bool fields convert as upstream's do (`crate::convert`): a negative ttl is a `TypeError`.
#[pyclass(module = "mooncake.store", get_all, from_py_object)]
#[derive(Clone, Debug)]
pub struct ReplicateConfig {
    /// Number of replicas, each on a distinct segment (default 1).
    pub replica_num: usize,
    /// What to do with the soft pin (default PRESERVE: not pinned).
    #[pyo3(set)]
    pub soft_pin_action: SoftPinAction,
    /// Soft pin ttl in ms; None uses the master's default.
    pub soft_pin_ttl_ms: Option<u64>,
    /// Never evict the object.
    pub with_hard_pin: bool,
    /// Segments to place replicas on first.
    #[pyo3(set)]
    pub preferred_segments: Vec<String>,
    /// Deprecated single preferred segment (used when `preferred_segments` is empty).
    #[pyo3(set)]
    pub preferred_segment: String,
    /// Prefer segments on this host.
    pub prefer_alloc_in_same_node: bool,
    /// Objects sharing a group id are evicted together.
    #[pyo3(set)]
    pub group_ids: Option<Vec<String>>,
    /// What the object holds (informational, as upstream; default UNKNOWN).
    #[pyo3(set)]
    pub data_type: ObjectDataType,
}

#[pymethods]
impl ReplicateConfig {
    #[new]
    fn new() -> Self {
        ReplicateConfig {
            replica_num: 1,
            soft_pin_action: SoftPinAction::PRESERVE,
            soft_pin_ttl_ms: None,
            with_hard_pin: false,
            preferred_segments: Vec::new(),
            preferred_segment: String::new(),
            prefer_alloc_in_same_node: false,
            group_ids: None,
            data_type: ObjectDataType::UNKNOWN,
        }
    }

    /// `soft_pin_action == ENABLE`, as a bool (older upstream releases had this field).
    #[getter]
    fn get_with_soft_pin(&self) -> bool {
        self.soft_pin_action == SoftPinAction::ENABLE
    }

    #[setter]
    fn set_replica_num(&mut self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let n = crate::convert::unsigned(v, "replica_num")?;
        self.replica_num = usize::try_from(n).map_err(|_| PyTypeError::new_err("replica_num: too large"))?;
        Ok(())
    }

    #[setter]
    fn set_soft_pin_ttl_ms(&mut self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.soft_pin_ttl_ms = if v.is_none() { None } else { Some(crate::convert::unsigned(v, "soft_pin_ttl_ms")?) };
        Ok(())
    }

    #[setter]
    fn set_with_hard_pin(&mut self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.with_hard_pin = crate::convert::truth(v, "with_hard_pin")?;
        Ok(())
    }

    #[setter]
    fn set_prefer_alloc_in_same_node(&mut self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        self.prefer_alloc_in_same_node = crate::convert::truth(v, "prefer_alloc_in_same_node")?;
        Ok(())
    }

    #[setter]
    fn set_with_soft_pin(&mut self, on: bool) {
        self.soft_pin_action = if on { SoftPinAction::ENABLE } else { SoftPinAction::DISABLE };
    }

    fn __repr__(&self) -> String {
        format!(
            "ReplicateConfig(replica_num={}, soft_pin_action={:?}, soft_pin_ttl_ms={:?}, with_hard_pin={}, preferred_segments={:?}, prefer_alloc_in_same_node={}, group_ids={:?}, data_type={:?})",
            self.replica_num,
            self.soft_pin_action,
            self.soft_pin_ttl_ms,
            self.with_hard_pin,
            self.preferred_segments,
            self.prefer_alloc_in_same_node,
            self.group_ids,
            self.data_type
        )
    }
}

impl ReplicateConfig {
    fn to_rust(&self) -> RustConfig {
        let mut preferred = self.preferred_segments.clone();
        if preferred.is_empty() && !self.preferred_segment.is_empty() {
            preferred.push(self.preferred_segment.clone());
        }
        RustConfig {
            replica_num: self.replica_num,
            with_soft_pin: self.soft_pin_action == SoftPinAction::ENABLE,
            soft_pin_ttl_ms: self.soft_pin_ttl_ms,
            with_hard_pin: self.with_hard_pin,
            preferred_segments: preferred,
            prefer_alloc_in_same_node: self.prefer_alloc_in_same_node,
            group_ids: self.group_ids.clone().unwrap_or_default(),
        }
    }
}

/// Where a memory replica lives: the owner's segment, the address there and the object length.
#[pyclass(module = "mooncake.store", get_all, from_py_object)]
#[derive(Clone, Debug)]
pub struct Descriptor {
    /// The transfer-engine segment to reach the bytes through.
    pub transport_endpoint: String,
    /// Absolute address in the owner's process.
    pub buffer_address: u64,
    /// Object length in bytes.
    pub size: u64,
}

/// Upstream's wrapper around a memory replica's [`Descriptor`].
#[pyclass(module = "mooncake.store", get_all, from_py_object)]
#[derive(Clone, Debug)]
pub struct MemoryDescriptor {
    /// The buffer holding the replica.
    pub buffer_descriptor: Descriptor,
}

/// One replica of an object (memory replicas only: this store keeps no disk replicas).
#[pyclass(module = "mooncake.store", get_all, from_py_object)]
#[derive(Clone, Debug)]
pub struct ReplicaDescriptor {
    /// Replica state.
    pub status: ReplicaStatus,
    /// Store segment holding it.
    pub segment_name: String,
    /// Where its bytes are.
    pub buffer: Descriptor,
}

#[pymethods]
impl ReplicaDescriptor {
    fn is_memory_replica(&self) -> bool {
        true
    }

    fn is_disk_replica(&self) -> bool {
        false
    }

    fn is_local_disk_replica(&self) -> bool {
        false
    }

    fn get_memory_descriptor(&self) -> MemoryDescriptor {
        MemoryDescriptor { buffer_descriptor: self.buffer.clone() }
    }

    fn __repr__(&self) -> String {
        format!(
            "ReplicaDescriptor(status={:?}, segment={:?}, endpoint={:?}, address={:#x}, size={})",
            self.status,
            self.segment_name,
            self.buffer.transport_endpoint,
            self.buffer.buffer_address,
            self.buffer.size
        )
    }
}

impl From<RustReplica> for ReplicaDescriptor {
    fn from(r: RustReplica) -> Self {
        ReplicaDescriptor {
            status: r.status.into(),
            segment_name: r.segment,
            buffer: Descriptor { transport_endpoint: r.transport_endpoint, buffer_address: r.addr, size: r.len },
        }
    }
}

/// The bytes of one object, returned by `get_buffer`: `ptr()`, `size()`, `len()` and the buffer protocol
/// (`memoryview(h)`, `numpy.frombuffer(h, ...)`), read-only.
#[pyclass(module = "mooncake.store", frozen)]
pub struct BufferHandle {
    data: Box<[u8]>,
    /// `[len]` and `[1]` for the buffer protocol's shape and strides.
    shape: [ffi::Py_ssize_t; 2],
}

impl BufferHandle {
    fn new(data: Vec<u8>) -> Self {
        let len = data.len() as ffi::Py_ssize_t;
        BufferHandle { data: data.into_boxed_slice(), shape: [len, 1] }
    }
}

#[pymethods]
impl BufferHandle {
    /// Address of the first byte.
    fn ptr(&self) -> u64 {
        self.data.as_ptr() as u64
    }

    /// Number of bytes.
    fn size(&self) -> usize {
        self.data.len()
    }

    /// Number of bytes (as upstream, a method too).
    fn len(&self) -> usize {
        self.data.len()
    }

    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// Exposes the bytes read-only through the buffer protocol.
    ///
    /// # Safety
    /// Called by Python with a valid `view` to fill.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null view"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("BufferHandle is read-only"));
        }
        let this = slf.get();
        static FORMAT: &CStr = c"B";
        // SAFETY: `view` is non-null and points to a Py_buffer Python asked us to fill. Every pointer stored
        // in it points into `this` (a frozen object whose fields never change), which the view keeps alive
        // through `obj` (a new strong reference that Python releases with the view).
        unsafe {
            (*view).obj = slf.clone().into_any().into_ptr();
            (*view).buf = this.data.as_ptr() as *mut std::ffi::c_void;
            (*view).len = this.shape[0];
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                FORMAT.as_ptr() as *mut std::ffi::c_char
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                this.shape.as_ptr() as *mut ffi::Py_ssize_t
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                this.shape[1..].as_ptr() as *mut ffi::Py_ssize_t
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// Nothing to release: the memory belongs to the handle.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __repr__(&self) -> String {
        format!("BufferHandle(ptr={:#x}, size={})", self.data.as_ptr() as u64, self.data.len())
    }
}

/// Host memory for zero-copy calls: `alloc(size)` returns an address (0 on failure), `free(ptr)` 0 or -1.
#[pyclass(module = "mooncake.store")]
pub struct MooncakeHostMemAllocator {
    device: Option<Arc<dyn MemoryDevice>>,
    live: Mutex<HashMap<u64, Allocation>>,
}

#[pymethods]
impl MooncakeHostMemAllocator {
    #[new]
    fn new() -> Self {
        let device =
            mooncake::registry::available_devices().into_iter().find(|d| d.kind() == mooncake::MemoryKind::Host);
        MooncakeHostMemAllocator { device, live: Mutex::new(HashMap::new()) }
    }

    /// Allocates `size` bytes (page-aligned host memory); the address, or 0.
    fn alloc(&self, py: Python<'_>, size: &Bound<'_, PyAny>) -> PyResult<u64> {
        let Some(len) = length(size, "size")?.filter(|l| *l > 0) else { return Ok(0) };
        let Some(device) = &self.device else { return Ok(0) };
        match py.detach(|| device.allocate(len, &AllocOptions::default())) {
            Ok(a) => {
                let addr = a.addr;
                sync::lock(&self.live).insert(addr, a);
                Ok(addr)
            }
            Err(e) => {
                tracing::warn!("MooncakeHostMemAllocator.alloc({len}): {e}");
                Ok(0)
            }
        }
    }

    /// Frees memory from `alloc`: 0, or -1 for an address this allocator did not hand out.
    fn free(&self, ptr: u64) -> i32 {
        let (Some(device), Some(a)) = (&self.device, sync::lock(&self.live).remove(&ptr)) else {
            return -1;
        };
        device.free(&a).map_or(-1, |_| 0)
    }
}

impl Drop for MooncakeHostMemAllocator {
    fn drop(&mut self) {
        if let Some(device) = &self.device {
            for (_, a) in sync::lock(&self.live).drain() {
                let _ = device.free(&a);
            }
        }
    }
}

/// Upstream's `MooncakeDistributedStore`: create it empty, then `setup(...)`.
#[pyclass(module = "mooncake.store", name = "MooncakeDistributedStore", subclass)]
pub struct PyStore {
    client: RwLock<Option<StoreClient>>,
    /// Set instead of `client` by `setup_dummy`.
    dummy: RwLock<Option<Arc<DummyClient>>>,
}

/// What the store client's calls return (the error keeps its cause; the boundary returns its code).
type StoreResult<T> = Result<T, mooncake_store::Error>;

fn code<T>(r: &StoreResult<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.code(),
    }
}

fn codes(rs: Vec<StoreResult<()>>) -> Vec<i32> {
    rs.iter().map(code).collect()
}

/// `is_exist`'s answer: 1, 0 (also while the first write is in flight, as upstream), or a negative code.
fn exist_code(r: StoreResult<bool>) -> i32 {
    match r {
        Ok(b) => i32::from(b),
        Err(e) if e == ErrorCode::ReplicaNotReady => 0,
        Err(e) => e.code(),
    }
}

/// A put's code: as upstream, a key that already exists is not a failure of `put` (the stored value stays;
/// `upsert` replaces it), so `ObjectAlreadyExists` reads 0.
fn put_code(r: &StoreResult<()>) -> i32 {
    match r {
        Err(e) if *e == ErrorCode::ObjectAlreadyExists => 0,
        r => code(r),
    }
}

/// [`put_code`] per key.
fn put_codes(rs: Vec<StoreResult<()>>) -> Vec<i32> {
    rs.iter().map(put_code).collect()
}

/// First failure of a put batch ([`put_code`] per key; 0 when all passed), for calls whose upstream form
/// returns one int.
fn first_put_error(rs: &[StoreResult<()>]) -> i32 {
    rs.iter().map(put_code).find(|c| *c != 0).unwrap_or(0)
}

fn config_of(config: Option<PyRef<'_, ReplicateConfig>>) -> RustConfig {
    config.map(|c| c.to_rust()).unwrap_or_default()
}

/// A size given as an int or a string like `"512MB"`.
fn size_arg(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<u64> {
    if obj.is_instance_of::<PyInt>() {
        return length(obj, arg)?.ok_or_else(|| PyValueError::new_err(format!("{arg}: must be a non-negative size")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s.to_str()?;
        return mooncake_store::units::parse_size(s).ok_or_else(|| {
            PyValueError::new_err(format!("{arg}: {s:?} is not a size (e.g. 4096, \"512MB\", \"4GiB\")"))
        });
    }
    Err(PyTypeError::new_err(format!("{arg}: expected an int or a size string, got {}", type_name(obj))))
}

/// A list of str (TypeError for anything else).
fn str_list(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<String>> {
    list_items(obj, arg)?
        .iter()
        .map(|k| {
            k.cast::<PyString>()
                .map_err(|_| PyTypeError::new_err(format!("{arg}: expected str, got {}", type_name(k))))
                .and_then(|s| Ok(s.to_str()?.to_string()))
        })
        .collect()
}

/// Reads keys: a list of str (TypeError for anything else).
fn keys_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    str_list(obj, "keys")
}

/// Lengths of a zero-copy batch: negative ones become `u64::MAX`, which the client refuses per key.
fn sizes_arg(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<u64>> {
    list_items(obj, arg)?.iter().map(|v| Ok(length(v, arg)?.unwrap_or(u64::MAX))).collect()
}

/// Addresses of a zero-copy batch (ints, or buffer-protocol objects kept exported in `guards`).
fn addrs_arg(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    writable: bool,
    guards: &mut Vec<AddrArg>,
) -> PyResult<(Vec<u64>, Vec<Option<u64>>)> {
    let mut addrs = Vec::new();
    let mut caps = Vec::new();
    for v in list_items(obj, arg)? {
        let a = AddrArg::new(&v, arg, writable)?;
        addrs.push(a.addr);
        caps.push(a.buffer_len);
        if a.buffer_len.is_some() {
            guards.push(a);
        }
    }
    Ok((addrs, caps))
}

/// Marks sizes larger than the buffer object given for them as invalid (the client refuses them per key).
fn cap_sizes(lens: &mut [u64], caps: &[Option<u64>]) {
    for (len, cap) in lens.iter_mut().zip(caps) {
        if cap.is_some_and(|c| *len > c) {
            *len = u64::MAX;
        }
    }
}

impl PyStore {
    fn dummy(&self) -> Option<Arc<DummyClient>> {
        sync::read(&self.dummy).clone()
    }

    fn unmount(&self, py: Python<'_>, ids: &Bound<'_, PyAny>, grace: Unsigned, free: bool) -> PyResult<i32> {
        let ids = str_list(ids, "segment_ids")?;
        let grace = std::time::Duration::from_secs(grace.0);
        let Some(c) = self.client() else { return Ok(-1) };
        Ok(match py.detach(|| c.unmount_segments(&ids, grace, free)) {
            Ok(()) => 0,
            Err(_) => -1,
        })
    }

    fn client(&self) -> Option<StoreClient> {
        sync::read(&self.client).clone()
    }

    /// The client, for the calls that copy bytes through the local buffer (`put`, `get` and their forms):
    /// `Err(code)` before setup (-1010), and, as upstream, for a client set up with `local_buffer_size=0`
    /// (-600: it has no buffer to copy through; the zero-copy calls still work).
    fn bytes_client(&self) -> Result<StoreClient, i32> {
        let c = self.client().ok_or(UNAVAILABLE)?;
        if c.config().local_buffer_size == 0 {
            tracing::error!(
                "MooncakeDistributedStore: this client was set up with local_buffer_size=0; use the zero-copy calls"
            );
            return Err(ErrorCode::InvalidParams.code());
        }
        Ok(c)
    }
}

#[pymethods]
impl PyStore {
    #[new]
    fn new() -> Self {
        PyStore { client: RwLock::new(None), dummy: RwLock::new(None) }
    }

    /// Connects to the master and contributes memory. Either upstream's positional form
    /// `setup(local_hostname, metadata_server, global_segment_size, local_buffer_size, protocol, rdma_devices,
    /// master_server_addr)` or `setup(config_dict)`. Sizes may be ints or strings like `"512MB"`. With
    /// `engine=te.get_engine()` the store shares that engine instead of starting its own, as upstream. 0 or a
    /// negative code (-900 when the master is not reachable within 10 s). A Ctrl-C interrupts it.
    #[pyo3(signature = (
        local_hostname,
        metadata_server = None,
        global_segment_size = None,
        local_buffer_size = None,
        protocol = "tcp".to_string(),
        rdma_devices = String::new(),
        master_server_addr = "127.0.0.1:50051".to_string(),
        engine = None,
        **kwargs
    ))]
    #[allow(clippy::too_many_arguments)]
    fn setup(
        &self,
        py: Python<'_>,
        local_hostname: &Bound<'_, PyAny>,
        metadata_server: Option<String>,
        global_segment_size: Option<&Bound<'_, PyAny>>,
        local_buffer_size: Option<&Bound<'_, PyAny>>,
        protocol: String,
        rdma_devices: String,
        master_server_addr: String,
        engine: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<i32> {
        let _ = kwargs;
        // As upstream: `engine=te.get_engine()` is shared (the store registers its memory with it and never
        // shuts it down); anything else is the RuntimeError upstream's argument conversion raises.
        let shared = match engine.filter(|e| !e.is_none()) {
            None => None,
            Some(e) => match e.cast::<crate::engine::PyInnerEngine>() {
                Ok(inner) => Some(inner.get().engine.clone()),
                Err(_) => {
                    return Err(PyRuntimeError::new_err(format!(
                        "setup: engine must be an InnerTransferEngine (TransferEngine.get_engine()), not {}",
                        crate::buffers::type_name(e)
                    )));
                }
            },
        };
        let mut config = ClientConfig::default();
        if let Ok(d) = local_hostname.cast::<PyDict>() {
            // As upstream: a config it cannot use is a return code, not an exception.
            if let Err(e) = apply_config_dict(&mut config, d) {
                tracing::error!("MooncakeDistributedStore.setup: {e}");
                return Ok(ErrorCode::InvalidParams.code());
            }
        } else {
            config.local_hostname = local_hostname
                .extract::<String>()
                .map_err(|_| PyTypeError::new_err("setup: local_hostname must be a str (or pass one config dict)"))?;
            config.metadata_server = metadata_server.unwrap_or_else(|| "P2PHANDSHAKE".into());
            if let Some(s) = global_segment_size {
                config.global_segment_size = size_arg(s, "global_segment_size")?;
            }
            if let Some(s) = local_buffer_size {
                config.local_buffer_size = size_arg(s, "local_buffer_size")?;
            }
            config.protocol = protocol;
            config.device_name = rdma_devices;
            config.master_server_addr = master_server_addr;
        }
        if crate::engine::env_flag("MC_FORCE_TCP") {
            config.protocol = "tcp".into();
        }
        if let Err(message) = crate::engine::check_protocol(&config.protocol) {
            tracing::error!("MooncakeDistributedStore.setup: {message}");
            return Ok(ErrorCode::InvalidParams.code());
        }
        if self.client().is_some() {
            tracing::warn!("MooncakeDistributedStore.setup: already set up; close() first");
            return Ok(ErrorCode::InvalidParams.code());
        }
        let start = move || match shared {
            Some(engine) => StoreClient::with_engine(config, engine),
            None => StoreClient::setup(config),
        };
        match run_interruptibly(py, "store-setup", start)? {
            Ok(client) => {
                *sync::write(&self.client) = Some(client);
                Ok(0)
            }
            Err(e) => {
                tracing::error!("MooncakeDistributedStore.setup: {e}");
                Ok(e.code())
            }
        }
    }

    /// Makes this store a dummy client of the real client (`mooncake_client`) serving dummies at
    /// `server_address` (its `--port`, on this host): a shared pool of `mem_pool_size` bytes for the
    /// application's buffers (`alloc_from_mem_pool`) plus `local_buffer_size` bytes for staging `put`/`get`
    /// values. Data calls then go through the real client; the set-up, session, task and segment calls are the
    /// real client's own business (they return as before setup). 0 or a negative code (-900 when the real
    /// client cannot be reached).
    fn setup_dummy(
        &self,
        py: Python<'_>,
        mem_pool_size: &Bound<'_, PyAny>,
        local_buffer_size: &Bound<'_, PyAny>,
        server_address: &str,
    ) -> PyResult<i32> {
        let mem_pool_size = length(mem_pool_size, "mem_pool_size")?.unwrap_or(u64::MAX);
        let local_buffer_size = length(local_buffer_size, "local_buffer_size")?.unwrap_or(u64::MAX);
        if self.client().is_some() || self.dummy().is_some() {
            tracing::error!("MooncakeDistributedStore.setup_dummy: this store is set up already");
            return Ok(ErrorCode::InvalidParams.code());
        }
        let config = DummyConfig {
            server_address: server_address.to_string(),
            mem_pool_size,
            local_buffer_size,
            ..DummyConfig::default()
        };
        match py.detach(|| DummyClient::attach(config)) {
            Ok(d) => {
                *sync::write(&self.dummy) = Some(Arc::new(d));
                Ok(0)
            }
            Err(e) => Ok(e.code()),
        }
    }

    /// Unmounts the segment and stops the client; later calls return -1010. 0.
    fn close(&self, py: Python<'_>) -> i32 {
        if let Some(d) = sync::write(&self.dummy).take() {
            py.detach(|| d.close());
        }
        let client = sync::write(&self.client).take();
        if let Some(c) = client {
            let _ = py.detach(|| c.close());
        }
        0
    }

    /// 0 healthy, 1 not set up or closed, 2 master unreachable.
    fn health_check(&self, py: Python<'_>) -> i32 {
        if let Some(d) = self.dummy() {
            // The real client's health; 2 (unreachable) while it cannot be reached.
            return py.detach(|| d.status()).map_or(2, |(_, h)| h);
        }
        match self.client() {
            Some(c) => py.detach(|| c.health()),
            None => HEALTH_NOT_INITIALIZED,
        }
    }

    /// The `local_buffer_size` this client was set up with (0 before setup); `BufferPool` sizes itself by it.
    fn _local_buffer_size(&self) -> u64 {
        if let Some(d) = self.dummy() {
            return d.local_buffer_size();
        }
        self.client().map_or(0, |c| c.config().local_buffer_size)
    }

    /// This client's segment name (`host:port`); "" before setup.
    fn get_hostname(&self) -> String {
        if let Some(d) = self.dummy() {
            return d.status().map(|(name, _)| name).unwrap_or_default();
        }
        self.client().map(|c| c.hostname().to_string()).unwrap_or_default()
    }

    // ---- bytes -----------------------------------------------------------------------------

    /// Stores `value` (bytes or any buffer) under `key`. 0 or a negative code (-705 if the key exists).
    #[pyo3(signature = (key, value, config = None))]
    fn put(
        &self,
        py: Python<'_>,
        key: &str,
        value: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        let view = ValueView::new(value, "value")?;
        let cfg = config_of(config);
        if let Some(d) = self.dummy() {
            let bytes = view.as_slice();
            return Ok(put_code(&py.detach(|| d.put_parts(key, &[bytes], &cfg, false))));
        }
        let c = match self.bytes_client() {
            Ok(c) => c,
            Err(rc) => return Ok(rc),
        };
        let bytes = view.as_slice();
        Ok(put_code(&py.detach(|| c.put(key, bytes, &cfg))))
    }

    /// Stores the concatenation of `parts` under `key`. 0 or a negative code.
    #[pyo3(signature = (key, *parts, config = None))]
    fn put_parts(
        &self,
        py: Python<'_>,
        key: &str,
        parts: &Bound<'_, PyTuple>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        self.parts(py, key, parts, config, false)
    }

    /// Like `put_parts`, replacing an existing object.
    #[pyo3(signature = (key, *parts, config = None))]
    fn upsert_parts(
        &self,
        py: Python<'_>,
        key: &str,
        parts: &Bound<'_, PyTuple>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        self.parts(py, key, parts, config, true)
    }

    /// Stores several values; 0, or the first failure's code.
    #[pyo3(signature = (keys, values, config = None))]
    fn put_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        self.values_batch(py, keys, values, config, false)
    }

    /// Stores `value` under `key`, replacing an existing object. 0 or a negative code.
    #[pyo3(signature = (key, value, config = None))]
    fn upsert(
        &self,
        py: Python<'_>,
        key: &str,
        value: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        let view = ValueView::new(value, "value")?;
        let cfg = config_of(config);
        let c = match self.bytes_client() {
            Ok(c) => c,
            Err(rc) => return Ok(rc),
        };
        let bytes = view.as_slice();
        Ok(code(&py.detach(|| c.upsert(key, bytes, &cfg))))
    }

    /// Upserts several values; 0, or the first failure's code.
    #[pyo3(signature = (keys, values, config = None))]
    fn upsert_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        self.values_batch(py, keys, values, config, true)
    }

    /// The object's bytes, or `b""` when it is missing or unreadable.
    fn get<'py>(&self, py: Python<'py>, key: &str) -> Bound<'py, PyBytes> {
        if let Some(d) = self.dummy() {
            return PyBytes::new(py, &py.detach(|| d.get(key)).unwrap_or_default());
        }
        let Ok(c) = self.bytes_client() else { return PyBytes::new(py, b"") };
        match py.detach(|| c.get(key)) {
            Ok(v) => PyBytes::new(py, &v),
            Err(_) => PyBytes::new(py, b""),
        }
    }

    /// One `bytes` per key (`b""` for misses).
    fn get_batch<'py>(&self, py: Python<'py>, keys: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let keys = keys_arg(keys)?;
        if let Some(d) = self.dummy() {
            let values: Vec<Vec<u8>> = py.detach(|| keys.iter().map(|k| d.get(k).unwrap_or_default()).collect());
            return Ok(values.iter().map(|v| PyBytes::new(py, v)).collect());
        }
        let Ok(c) = self.bytes_client() else { return Ok(keys.iter().map(|_| PyBytes::new(py, b"")).collect()) };
        let results = py.detach(|| c.get_batch(&keys));
        Ok(results.into_iter().map(|r| PyBytes::new(py, r.as_deref().unwrap_or(b""))).collect())
    }

    /// The object's bytes as a `BufferHandle` (no copy into a Python bytes object), or None on a miss.
    fn get_buffer(&self, py: Python<'_>, key: &str) -> Option<BufferHandle> {
        let c = self.bytes_client().ok()?;
        py.detach(|| c.get(key)).ok().map(BufferHandle::new)
    }

    /// One `BufferHandle` (or None) per key.
    fn batch_get_buffer(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<Option<BufferHandle>>> {
        let keys = keys_arg(keys)?;
        let Ok(c) = self.bytes_client() else { return Ok(keys.iter().map(|_| None).collect()) };
        Ok(py.detach(|| c.get_batch(&keys)).into_iter().map(|r| r.ok().map(BufferHandle::new)).collect())
    }

    // ---- zero-copy -------------------------------------------------------------------------

    /// Registers `[buffer_ptr, +size)` for the zero-copy calls (the memory must stay valid until
    /// `unregister_buffer`). 0 or a negative code.
    #[pyo3(signature = (buffer_ptr, size = None))]
    fn register_buffer(
        &self,
        py: Python<'_>,
        buffer_ptr: &Bound<'_, PyAny>,
        size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i32> {
        let a = AddrArg::new(buffer_ptr, "buffer_ptr", false)?;
        let len = match (size, a.buffer_len) {
            (Some(s), _) => length(s, "size")?.filter(|l| a.fits(*l)),
            (None, Some(l)) => Some(l),
            (None, None) => return Err(PyTypeError::new_err("register_buffer: size is required with an int address")),
        };
        let Some(len) = len else { return Ok(ErrorCode::InvalidParams.code()) };
        if let Some(d) = self.dummy() {
            // A dummy's buffers live in its shared pool, which the real client has registered already.
            return Ok(if d.in_pool(a.addr, len) { 0 } else { ErrorCode::InvalidParams.code() });
        }
        let Some(c) = self.client() else { return Ok(UNAVAILABLE) };
        // GPU memory a linked device claims is the device's to check (it is never dereferenced); host memory must
        // be mapped.
        let device_memory = c
            .engine()
            .devices()
            .iter()
            .any(|d| d.kind() != mooncake::MemoryKind::Host && d.classify(a.addr, len).is_some());
        if !device_memory && let Err(why) = crate::mapped::check_mapped(a.addr, len) {
            tracing::warn!("MooncakeDistributedStore.register_buffer: {why}");
            return Ok(ErrorCode::InvalidParams.code());
        }
        // SAFETY: the Python API contract (docs/python-api.md, "Memory the calls use"): a registered buffer is the
        // caller's memory (an int address, or a buffer object it keeps alive), valid until `unregister_buffer`
        // returns 0, as upstream's `register_buffer` requires; host memory was checked to be mapped just above,
        // device memory is claimed by its device, which moves it.
        Ok(code(&py.detach(|| unsafe { c.register_buffer(a.addr, len) })))
    }

    /// Unregisters a buffer registered at `buffer_ptr`. 0 or a negative code.
    fn unregister_buffer(&self, py: Python<'_>, buffer_ptr: &Bound<'_, PyAny>) -> PyResult<i32> {
        let a = AddrArg::new(buffer_ptr, "buffer_ptr", false)?;
        if let Some(d) = self.dummy() {
            d.free(a.addr);
            return Ok(if d.in_pool(a.addr, 1) { 0 } else { ErrorCode::InvalidParams.code() });
        }
        let Some(c) = self.client() else { return Ok(UNAVAILABLE) };
        Ok(code(&py.detach(|| c.unregister_buffer(a.addr))))
    }

    /// Stores `size` bytes at `buffer_ptr` (inside a registered buffer) under `key`. 0 or a negative code.
    #[pyo3(signature = (key, buffer_ptr, size, config = None))]
    fn put_from(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        self.write_from_one(py, key, buffer_ptr, size, config, false)
    }

    /// Like `put_from`, replacing an existing object.
    #[pyo3(signature = (key, buffer_ptr, size, config = None))]
    fn upsert_from(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        self.write_from_one(py, key, buffer_ptr, size, config, true)
    }

    /// Reads the object into `[buffer_ptr, +size)` (inside a registered buffer): the bytes read (the object
    /// length; -10 BUFFER_OVERFLOW when it does not fit) or a negative code.
    fn get_into(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
    ) -> PyResult<i64> {
        let a = AddrArg::new(buffer_ptr, "buffer_ptr", true)?;
        let Some(len) = length(size, "size")?.filter(|l| a.fits(*l)) else {
            return Ok(ErrorCode::InvalidParams.code().into());
        };
        if let Some(d) = self.dummy() {
            let keys = [key.to_string()];
            let r = py.detach(|| d.get_into(&keys, &[a.addr], &[len]));
            return Ok(r
                .first()
                .cloned()
                .unwrap_or(Err(ErrorCode::Internal.into()))
                .map_or_else(|e| e.code().into(), |n| n as i64));
        }
        let Some(c) = self.client() else { return Ok(UNAVAILABLE.into()) };
        Ok(match py.detach(|| c.get_into(key, a.addr, len)) {
            Ok(n) => n as i64,
            Err(e) => e.code().into(),
        })
    }

    /// `put_from` for many keys: one code per key.
    #[pyo3(signature = (keys, buffer_ptrs, sizes, config = None))]
    fn batch_put_from(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        buffer_ptrs: &Bound<'_, PyAny>,
        sizes: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<Vec<i32>> {
        self.write_from_batch(py, keys, buffer_ptrs, sizes, config, false)
    }

    /// `upsert_from` for many keys: one code per key.
    #[pyo3(signature = (keys, buffer_ptrs, sizes, config = None))]
    fn batch_upsert_from(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        buffer_ptrs: &Bound<'_, PyAny>,
        sizes: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<Vec<i32>> {
        self.write_from_batch(py, keys, buffer_ptrs, sizes, config, true)
    }

    /// `get_into` for many keys: bytes read or a negative code, per key.
    fn batch_get_into(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        buffer_ptrs: &Bound<'_, PyAny>,
        sizes: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<i64>> {
        let keys = keys_arg(keys)?;
        let mut guards = Vec::new();
        let (ptrs, caps) = addrs_arg(buffer_ptrs, "buffer_ptrs", true, &mut guards)?;
        let mut lens = sizes_arg(sizes, "sizes")?;
        cap_sizes(&mut lens, &caps);
        if let Some(d) = self.dummy() {
            let results = py.detach(|| d.get_into(&keys, &ptrs, &lens));
            return Ok(results.into_iter().map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64)).collect());
        }
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE.into(); keys.len()]) };
        if ptrs.len() != keys.len() || lens.len() != keys.len() {
            return Ok(vec![ErrorCode::InvalidParams.code().into(); keys.len()]);
        }
        let results = py.detach(|| c.batch_get_into(&keys, &ptrs, &lens));
        Ok(results.into_iter().map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64)).collect())
    }

    /// Stores each key from several buffers (concatenated in order): one code per key.
    #[pyo3(signature = (keys, all_buffer_ptrs, all_sizes, config = None))]
    fn batch_put_from_multi_buffers(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        all_buffer_ptrs: &Bound<'_, PyAny>,
        all_sizes: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        let ptrs = nested_ints(all_buffer_ptrs, "all_buffer_ptrs")?;
        let lens = nested_sizes(all_sizes, "all_sizes")?;
        let cfg = config_of(config);
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE; keys.len()]) };
        if ptrs.len() != keys.len() || lens.len() != keys.len() {
            return Ok(vec![ErrorCode::InvalidParams.code(); keys.len()]);
        }
        Ok(put_codes(py.detach(|| c.batch_put_from_multi_buffers(&keys, &ptrs, &lens, &cfg))))
    }

    /// Reads each key into several buffers (filled in order): bytes read or a negative code, per key.
    #[pyo3(signature = (keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node = false))]
    fn batch_get_into_multi_buffers(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        all_buffer_ptrs: &Bound<'_, PyAny>,
        all_sizes: &Bound<'_, PyAny>,
        prefer_alloc_in_same_node: bool,
    ) -> PyResult<Vec<i64>> {
        let _ = prefer_alloc_in_same_node;
        let keys = keys_arg(keys)?;
        let ptrs = nested_ints(all_buffer_ptrs, "all_buffer_ptrs")?;
        let lens = nested_sizes(all_sizes, "all_sizes")?;
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE.into(); keys.len()]) };
        if ptrs.len() != keys.len() || lens.len() != keys.len() {
            return Ok(vec![ErrorCode::InvalidParams.code().into(); keys.len()]);
        }
        let results = py.detach(|| c.batch_get_into_multi_buffers(&keys, &ptrs, &lens));
        Ok(results.into_iter().map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64)).collect())
    }

    /// Copies byte ranges of objects into registered buffers: for buffer `i`, key `j` of `all_keys[i]` and
    /// range `k`, `all_sizes[i][j][k]` bytes from offset `all_src_offsets[i][j][k]` of the object to offset
    /// `all_dst_offsets[i][j][k]` of `buffer_ptrs[i]`. Returns the bytes copied (or a negative code) per range.
    /// Each object is read whole once, then its ranges are copied.
    fn get_into_ranges(
        &self,
        py: Python<'_>,
        buffer_ptrs: &Bound<'_, PyAny>,
        all_keys: Vec<Vec<String>>,
        all_dst_offsets: Vec<Vec<Vec<u64>>>,
        all_src_offsets: Vec<Vec<Vec<u64>>>,
        all_sizes: Vec<Vec<Vec<u64>>>,
    ) -> PyResult<Vec<Vec<Vec<i64>>>> {
        let bufs = int_list(buffer_ptrs, "buffer_ptrs")?;
        let invalid = ErrorCode::InvalidParams.code() as i64;
        let shape_ok = all_keys.len() == bufs.len()
            && all_dst_offsets.len() == bufs.len()
            && all_src_offsets.len() == bufs.len()
            && all_sizes.len() == bufs.len()
            && (0..bufs.len()).all(|i| {
                let n = all_keys[i].len();
                all_dst_offsets[i].len() == n
                    && all_src_offsets[i].len() == n
                    && all_sizes[i].len() == n
                    && (0..n).all(|j| {
                        all_dst_offsets[i][j].len() == all_sizes[i][j].len()
                            && all_src_offsets[i][j].len() == all_sizes[i][j].len()
                    })
            });
        let fill = |v: i64| -> Vec<Vec<Vec<i64>>> {
            all_sizes.iter().map(|per_key| per_key.iter().map(|r| vec![v; r.len()]).collect()).collect()
        };
        if !shape_ok {
            return Err(PyValueError::new_err("get_into_ranges: the nested lists must have matching shapes"));
        }
        let Some(c) = self.client() else { return Ok(fill(UNAVAILABLE.into())) };
        let out = py.detach(|| {
            let mut out = Vec::with_capacity(bufs.len());
            for i in 0..bufs.len() {
                let values = c.get_batch(&all_keys[i]);
                let mut per_buffer = Vec::with_capacity(values.len());
                for (j, value) in values.into_iter().enumerate() {
                    let per_key: Vec<i64> = match value {
                        Err(e) => vec![e.code().into(); all_sizes[i][j].len()],
                        Ok(bytes) => (0..all_sizes[i][j].len())
                            .map(|k| {
                                let (dst, src, len) =
                                    (all_dst_offsets[i][j][k], all_src_offsets[i][j][k], all_sizes[i][j][k]);
                                let Some(end) = src.checked_add(len).filter(|e| *e <= bytes.len() as u64) else {
                                    return invalid;
                                };
                                let Some(dst_addr) = bufs[i].checked_add(dst) else { return invalid };
                                if c.engine().regions().check(dst_addr, len, "local").is_err() {
                                    return invalid;
                                }
                                // SAFETY: the destination range lies in memory registered with this client's engine
                                // (checked above); the source range lies inside `bytes` (checked above).
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        bytes[src as usize..end as usize].as_ptr(),
                                        dst_addr as *mut u8,
                                        len as usize,
                                    )
                                };
                                len as i64
                            })
                            .collect(),
                    };
                    per_buffer.push(per_key);
                }
                out.push(per_buffer);
            }
            out
        });
        Ok(out)
    }

    // ---- more segments ----------------------------------------------------------------------

    /// Maps `[offset, offset+size)` of the file at `path` shared and contributes it as another segment:
    /// `{"ret": 0, "segment_ids": [id]}`, or `{"ret": -1, "segment_ids": []}` (the log says why). The memory is
    /// reachable through every transport the client's engine runs; `protocol` and `location` are accepted for
    /// upstream's signature.
    #[pyo3(
        signature = (path, size, offset = Unsigned(0), protocol = "tcp".to_string(), location = String::new()),
        text_signature = "(self, path, size, offset=0, protocol='tcp', location='')"
    )]
    fn mount_segment<'py>(
        &self,
        py: Python<'py>,
        path: &str,
        size: Unsigned,
        offset: Unsigned,
        protocol: String,
        location: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let _ = (protocol, location);
        let (size, offset) = (size.0, offset.0);
        let result = match self.client() {
            Some(c) => py.detach(|| c.mount_file_segment(path, size, offset)),
            None => Err(ErrorCode::UnavailableInCurrentStatus.into()),
        };
        let d = PyDict::new(py);
        match result {
            Ok(id) => {
                d.set_item("ret", 0)?;
                d.set_item("segment_ids", vec![id])?;
            }
            Err(_) => {
                d.set_item("ret", -1)?;
                d.set_item("segment_ids", Vec::<String>::new())?;
            }
        }
        Ok(d)
    }

    /// Allocates `size` bytes (rounded up to a multiple of 16 MiB, as upstream) on `location` (`"cpu:N"`, or
    /// `""` for anywhere) and contributes them as another segment: `{"ret": 0, "segment_ids": [id],
    /// "allocated_size": n}`, or `{"ret": -1, "segment_ids": [], "allocated_size": 0}`.
    #[pyo3(signature = (size, protocol = "tcp".to_string(), location = String::new()))]
    fn allocate_and_mount_segment<'py>(
        &self,
        py: Python<'py>,
        size: Unsigned,
        protocol: String,
        location: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let _ = protocol;
        let size = size.0;
        let result = match self.client() {
            Some(c) => py.detach(|| c.allocate_and_mount_segment(size, &location)),
            None => Err(ErrorCode::UnavailableInCurrentStatus.into()),
        };
        let d = PyDict::new(py);
        let (ret, ids, allocated) = match result {
            Ok((id, len)) => (0, vec![id], len),
            Err(_) => (-1, Vec::new(), 0),
        };
        d.set_item("ret", ret)?;
        d.set_item("segment_ids", ids)?;
        d.set_item("allocated_size", allocated)?;
        Ok(d)
    }

    /// Withdraws file segments mounted with `mount_segment`; their memory is unmapped after
    /// `grace_period_seconds` (reads in flight finish). 0, or -1 (nothing unmounted) for an unknown id or an
    /// allocated segment (use `unmount_and_free_segment`).
    #[pyo3(
        signature = (segment_ids, grace_period_seconds = Unsigned(0)),
        text_signature = "(self, segment_ids, grace_period_seconds=0)"
    )]
    fn unmount_segment(
        &self,
        py: Python<'_>,
        segment_ids: &Bound<'_, PyAny>,
        grace_period_seconds: Unsigned,
    ) -> PyResult<i32> {
        self.unmount(py, segment_ids, grace_period_seconds, false)
    }

    /// Withdraws segments mounted with either call and frees (unmaps) their memory after
    /// `grace_period_seconds`. 0, or -1 (nothing unmounted) for an unknown id.
    #[pyo3(
        signature = (segment_ids, grace_period_seconds = Unsigned(0)),
        text_signature = "(self, segment_ids, grace_period_seconds=0)"
    )]
    fn unmount_and_free_segment(
        &self,
        py: Python<'_>,
        segment_ids: &Bound<'_, PyAny>,
        grace_period_seconds: Unsigned,
    ) -> PyResult<i32> {
        self.unmount(py, segment_ids, grace_period_seconds, true)
    }

    // ---- copy and move tasks ----------------------------------------------------------------

    /// Copies an object to more segments (run by the client holding it). `(task_id, 0)` or `((0, 0), code)`.
    fn create_copy_task(&self, py: Python<'_>, key: &str, targets: &Bound<'_, PyAny>) -> PyResult<((u64, u64), i32)> {
        let targets = str_list(targets, "targets")?;
        let Some(c) = self.client() else { return Ok(((0, 0), UNAVAILABLE)) };
        Ok(task_answer(py.detach(|| c.create_copy_task(key, &targets))))
    }

    /// Moves an object's replica from segment `source` to segment `target`. `(task_id, 0)` or
    /// `((0, 0), code)`.
    fn create_move_task(&self, py: Python<'_>, key: &str, source: &str, target: &str) -> ((u64, u64), i32) {
        let Some(c) = self.client() else { return ((0, 0), UNAVAILABLE) };
        task_answer(py.detach(|| c.create_move_task(key, source, target)))
    }

    /// A task's state: `(QueryTaskResponse, 0)` or `(None, code)` (-1400 for an unknown id).
    fn query_task(&self, py: Python<'_>, task_id: (u64, u64)) -> (Option<QueryTaskResponse>, i32) {
        let Some(c) = self.client() else { return (None, UNAVAILABLE) };
        match py.detach(|| c.query_task(mooncake_store::types::TaskId(task_id.0, task_id.1))) {
            Ok(info) => (Some(info.into()), 0),
            Err(e) => (None, e.code()),
        }
    }

    // ---- sessions --------------------------------------------------------------------------
    //
    // Before setup and after close these return an empty list (batch_get_session_end: -1), as upstream's.

    /// Starts a put session: reserves `keys[i]` with `sizes[i]` bytes without writing them (not readable until
    /// `batch_put_session_end`). One code per key.
    #[pyo3(signature = (keys, sizes, config = None))]
    fn batch_put_session_start(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        sizes: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        let sizes = sizes_arg(sizes, "sizes")?;
        let cfg = config_of(config);
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        Ok(codes(py.detach(|| c.put_session_start(&keys, &sizes, &cfg))))
    }

    /// Completes put sessions: the objects become readable. One code per key (-600 without a session).
    fn batch_put_session_end(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        Ok(codes(py.detach(|| c.put_session_end(&keys))))
    }

    /// Abandons put sessions: the space is freed and the keys stay absent. One code per key.
    fn batch_put_session_revoke(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        Ok(codes(py.detach(|| c.put_session_revoke(&keys))))
    }

    /// Starts a get session: looks up each key's replicas once for `batch_get_into_multi_buffer_ranges`. One
    /// code per key.
    fn batch_get_session_start(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        Ok(codes(py.detach(|| c.get_session_start(&keys))))
    }

    /// Ends get sessions (keys without one are ignored). 0 or a negative code.
    fn batch_get_session_end(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<i32> {
        let keys = keys_arg(keys)?;
        let Some(c) = self.client() else { return Ok(ErrorCode::Internal.code()) };
        Ok(code(&py.detach(|| c.get_session_end(&keys))))
    }

    /// Writes ranges of registered buffers into objects of open put sessions: for key `i`, range `k` copies
    /// `all_sizes[i][k]` bytes from `all_buffer_ptrs[i][k]` to offset `all_dst_offsets[i][k]` of the object.
    /// Bytes written or a negative code, per key.
    fn batch_put_from_multi_buffer_ranges(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        all_buffer_ptrs: &Bound<'_, PyAny>,
        all_sizes: &Bound<'_, PyAny>,
        all_dst_offsets: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<i64>> {
        let (keys, ranges) = ranges_args(keys, all_buffer_ptrs, all_sizes, all_dst_offsets, "all_dst_offsets")?;
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        let results = py.detach(|| c.put_session_write(&keys, &ranges));
        Ok(results.into_iter().map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64)).collect())
    }

    /// Reads ranges of objects with a get session into registered buffers: for key `i`, range `k` fills
    /// `all_sizes[i][k]` bytes at `all_buffer_ptrs[i][k]` from offset `all_src_offsets[i][k]` of the object.
    /// Bytes read or a negative code, per key.
    fn batch_get_into_multi_buffer_ranges(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        all_buffer_ptrs: &Bound<'_, PyAny>,
        all_sizes: &Bound<'_, PyAny>,
        all_src_offsets: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<i64>> {
        let (keys, ranges) = ranges_args(keys, all_buffer_ptrs, all_sizes, all_src_offsets, "all_src_offsets")?;
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        let results = py.detach(|| c.get_session_read(&keys, &ranges));
        Ok(results.into_iter().map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64)).collect())
    }

    // ---- other writes ----------------------------------------------------------------------

    /// Stores `metadata_size` bytes at `metadata_buffer_ptr` followed by `size` bytes at `buffer_ptr` (both in
    /// registered buffers) as one object. 0 or a negative code.
    #[pyo3(signature = (key, buffer_ptr, metadata_buffer_ptr, size, metadata_size, config = None))]
    #[allow(clippy::too_many_arguments)]
    fn put_from_with_metadata(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: &Bound<'_, PyAny>,
        metadata_buffer_ptr: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        metadata_size: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
    ) -> PyResult<i32> {
        let data = AddrArg::new(buffer_ptr, "buffer_ptr", false)?;
        let meta = AddrArg::new(metadata_buffer_ptr, "metadata_buffer_ptr", false)?;
        let size = length(size, "size")?.unwrap_or(u64::MAX);
        let metadata_size = length(metadata_size, "metadata_size")?.unwrap_or(u64::MAX);
        let cfg = config_of(config);
        // Upstream's answer before setup is -600 here (not -1010 as for put_from).
        let Some(c) = self.client() else { return Ok(ErrorCode::InvalidParams.code()) };
        let (ptrs, lens) = if metadata_size == 0 {
            (vec![vec![data.addr]], vec![vec![size]])
        } else {
            (vec![vec![meta.addr, data.addr]], vec![vec![metadata_size, size]])
        };
        let keys = [key.to_string()];
        Ok(first_put_error(&py.detach(|| c.batch_put_from_multi_buffers(&keys, &ptrs, &lens, &cfg))))
    }

    /// Upstream's legacy set-up: `setup("localhost:12345", "127.0.0.1:2379", mount_segment_size, 1 GiB,
    /// protocol, device_name)` with the default master (127.0.0.1:50051). 0 or a negative code (-600 when
    /// already set up).
    /// The parameters are (protocol, device_name, mount_segment_size), named as upstream's binding names them.
    fn init_all(slf: &Bound<'_, Self>, arg0: &str, arg1: &str, arg2: &Bound<'_, PyAny>) -> PyResult<i32> {
        let size = crate::convert::unsigned(arg2, "mount_segment_size")?;
        if slf.borrow().client().is_some() {
            return Ok(ErrorCode::InvalidParams.code());
        }
        let r = slf.call_method1("setup", ("localhost:12345", "127.0.0.1:2379", size, 1u64 << 30, arg0, arg1))?;
        r.extract()
    }

    /// `size` bytes of a dummy client's shared pool (for `register_buffer` and the zero-copy calls), or 0 when
    /// the pool has no room; a store set up with `setup` has no pool and returns 0, as upstream's.
    fn alloc_from_mem_pool(&self, arg0: &Bound<'_, PyAny>) -> PyResult<u64> {
        let size = crate::convert::unsigned(arg0, "size")?;
        Ok(self.dummy().and_then(|d| d.alloc(size)).unwrap_or(0))
    }

    /// Clears replicas of keys whose lease has run out and that no write is in flight on: with
    /// `segment_name`, the replica on that segment (the object goes with its last one), otherwise the whole
    /// object. Returns the keys cleared.
    #[pyo3(signature = (keys, segment_name = String::new()))]
    fn batch_replica_clear(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        segment_name: String,
    ) -> PyResult<Vec<String>> {
        let keys = keys_arg(keys)?;
        let Some(c) = self.client() else { return Ok(Vec::new()) };
        Ok(py.detach(|| c.replica_clear(&keys, &segment_name)).unwrap_or_default())
    }

    // ---- queries ---------------------------------------------------------------------------

    /// 1 if the key exists, 0 if not, negative on error.
    fn is_exist(&self, py: Python<'_>, key: &str) -> i32 {
        if let Some(d) = self.dummy() {
            return exist_code(
                py.detach(|| d.exist(&[key.to_string()])).pop().unwrap_or(Err(ErrorCode::Internal.into())),
            );
        }
        let Some(c) = self.client() else { return UNAVAILABLE };
        exist_code(py.detach(|| c.is_exist(key)))
    }

    /// `is_exist` per key.
    fn batch_is_exist(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        if let Some(d) = self.dummy() {
            return Ok(py.detach(|| d.exist(&keys)).into_iter().map(exist_code).collect());
        }
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE; keys.len()]) };
        Ok(py.detach(|| c.batch_is_exist(&keys)).into_iter().map(exist_code).collect())
    }

    /// The object's length, or a negative code.
    fn get_size(&self, py: Python<'_>, key: &str) -> i64 {
        if let Some(d) = self.dummy() {
            let r = py.detach(|| d.get_size(&[key.to_string()]));
            return r
                .first()
                .cloned()
                .unwrap_or(Err(ErrorCode::Internal.into()))
                .map_or_else(|e| e.code().into(), |n| n as i64);
        }
        let Some(c) = self.client() else { return UNAVAILABLE.into() };
        py.detach(|| c.get_size(key)).map_or_else(|e| e.code().into(), |n| n as i64)
    }

    /// `get_size` per key (our addition).
    fn batch_get_size(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
        let keys = keys_arg(keys)?;
        if let Some(d) = self.dummy() {
            let r = py.detach(|| d.get_size(&keys));
            return Ok(r.into_iter().map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64)).collect());
        }
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE.into(); keys.len()]) };
        Ok(py
            .detach(|| c.batch_get_size(&keys))
            .into_iter()
            .map(|r| r.map_or_else(|e| e.code().into(), |n| n as i64))
            .collect())
    }

    /// The object's replicas (empty when it is missing).
    fn get_replica_desc(&self, py: Python<'_>, key: &str) -> Vec<ReplicaDescriptor> {
        let Some(c) = self.client() else { return Vec::new() };
        py.detach(|| c.get_replica_desc(key)).map(|v| v.into_iter().map(Into::into).collect()).unwrap_or_default()
    }

    /// `{key: [ReplicaDescriptor, ...]}` for the keys that exist.
    fn batch_get_replica_desc(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
    ) -> PyResult<HashMap<String, Vec<ReplicaDescriptor>>> {
        let keys = keys_arg(keys)?;
        let Some(c) = self.client() else { return Ok(HashMap::new()) };
        let results = py.detach(|| c.batch_get_replica_desc(&keys));
        Ok(keys
            .into_iter()
            .zip(results)
            .filter_map(|(k, r)| r.ok().map(|v| (k, v.into_iter().map(Into::into).collect())))
            .collect())
    }

    // ---- removal ---------------------------------------------------------------------------

    /// Removes the object (refused while it has a lease unless `force`). 0 or a negative code.
    #[pyo3(signature = (key, force = false))]
    fn remove(&self, py: Python<'_>, key: &str, force: bool) -> i32 {
        if let Some(d) = self.dummy() {
            return code(
                py.detach(|| d.remove(&[key.to_string()], force)).first().unwrap_or(&Err(ErrorCode::Internal.into())),
            );
        }
        let Some(c) = self.client() else { return UNAVAILABLE };
        code(&py.detach(|| c.remove(key, force)))
    }

    /// Removes every object whose key matches the regular expression: the count, or a negative code.
    #[pyo3(signature = (regex_pattern, force = false))]
    fn remove_by_regex(&self, py: Python<'_>, regex_pattern: &str, force: bool) -> i64 {
        let Some(c) = self.client() else { return UNAVAILABLE.into() };
        py.detach(|| c.remove_by_regex(regex_pattern, force)).map_or_else(|e| e.code().into(), |n| n as i64)
    }

    /// Removes every object: the count, or a negative code.
    #[pyo3(signature = (force = false))]
    fn remove_all(&self, py: Python<'_>, force: bool) -> i64 {
        if let Some(d) = self.dummy() {
            return py.detach(|| d.remove_all(force)).map_or_else(|e| e.code().into(), |n| n as i64);
        }
        let Some(c) = self.client() else { return UNAVAILABLE.into() };
        py.detach(|| c.remove_all(force)).map_or_else(|e| e.code().into(), |n| n as i64)
    }

    /// `remove` per key.
    #[pyo3(signature = (keys, force = false))]
    fn batch_remove(&self, py: Python<'_>, keys: &Bound<'_, PyAny>, force: bool) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        if let Some(d) = self.dummy() {
            return Ok(codes(py.detach(|| d.remove(&keys, force))));
        }
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE; keys.len()]) };
        Ok(codes(py.detach(|| c.batch_remove(&keys, force))))
    }
}

impl PyStore {
    fn parts(
        &self,
        py: Python<'_>,
        key: &str,
        parts: &Bound<'_, PyTuple>,
        config: Option<PyRef<'_, ReplicateConfig>>,
        upsert: bool,
    ) -> PyResult<i32> {
        let views: Vec<ValueView> = parts.iter().map(|p| ValueView::new(&p, "parts")).collect::<PyResult<_>>()?;
        let cfg = config_of(config);
        if let Some(d) = self.dummy() {
            let slices: Vec<&[u8]> = views.iter().map(ValueView::as_slice).collect();
            return Ok(put_code(&py.detach(|| d.put_parts(key, &slices, &cfg, upsert))));
        }
        let c = match self.bytes_client() {
            Ok(c) => c,
            Err(rc) => return Ok(rc),
        };
        let slices: Vec<&[u8]> = views.iter().map(ValueView::as_slice).collect();
        Ok(put_code(&py.detach(|| {
            if upsert {
                let joined = slices.concat();
                c.upsert(key, &joined, &cfg)
            } else {
                c.put_parts(key, &slices, &cfg)
            }
        })))
    }

    fn values_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
        upsert: bool,
    ) -> PyResult<i32> {
        let keys = keys_arg(keys)?;
        let views: Vec<ValueView> =
            list_items(values, "values")?.iter().map(|v| ValueView::new(v, "values")).collect::<PyResult<_>>()?;
        let cfg = config_of(config);
        if let Some(d) = self.dummy() {
            if views.len() != keys.len() {
                return Ok(ErrorCode::InvalidParams.code());
            }
            let results: Vec<StoreResult<()>> = py.detach(|| {
                keys.iter().zip(&views).map(|(k, v)| d.put_parts(k, &[v.as_slice()], &cfg, upsert)).collect()
            });
            return Ok(first_put_error(&results));
        }
        let c = match self.bytes_client() {
            Ok(c) => c,
            Err(rc) => return Ok(rc),
        };
        if views.len() != keys.len() {
            return Ok(ErrorCode::InvalidParams.code());
        }
        let slices: Vec<&[u8]> = views.iter().map(ValueView::as_slice).collect();
        let results =
            py.detach(|| if upsert { c.upsert_batch(&keys, &slices, &cfg) } else { c.put_batch(&keys, &slices, &cfg) });
        Ok(first_put_error(&results))
    }

    fn write_from_one(
        &self,
        py: Python<'_>,
        key: &str,
        buffer_ptr: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
        upsert: bool,
    ) -> PyResult<i32> {
        let a = AddrArg::new(buffer_ptr, "buffer_ptr", false)?;
        let Some(len) = length(size, "size")?.filter(|l| a.fits(*l)) else {
            return Ok(ErrorCode::InvalidParams.code());
        };
        let cfg = config_of(config);
        if let Some(d) = self.dummy() {
            let keys = [key.to_string()];
            let r = py.detach(|| d.put_from(&keys, &[a.addr], &[len], &cfg, upsert));
            return Ok(put_code(r.first().unwrap_or(&Err(ErrorCode::Internal.into()))));
        }
        let Some(c) = self.client() else { return Ok(UNAVAILABLE) };
        Ok(put_code(&py.detach(|| {
            if upsert { c.upsert_from(key, a.addr, len, &cfg) } else { c.put_from(key, a.addr, len, &cfg) }
        })))
    }

    fn write_from_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        buffer_ptrs: &Bound<'_, PyAny>,
        sizes: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, ReplicateConfig>>,
        upsert: bool,
    ) -> PyResult<Vec<i32>> {
        let keys = keys_arg(keys)?;
        let mut guards = Vec::new();
        let (ptrs, caps) = addrs_arg(buffer_ptrs, "buffer_ptrs", false, &mut guards)?;
        let mut lens = sizes_arg(sizes, "sizes")?;
        cap_sizes(&mut lens, &caps);
        let cfg = config_of(config);
        if let Some(d) = self.dummy() {
            return Ok(put_codes(py.detach(|| d.put_from(&keys, &ptrs, &lens, &cfg, upsert))));
        }
        let Some(c) = self.client() else { return Ok(vec![UNAVAILABLE; keys.len()]) };
        if ptrs.len() != keys.len() || lens.len() != keys.len() {
            return Ok(vec![ErrorCode::InvalidParams.code(); keys.len()]);
        }
        Ok(put_codes(py.detach(|| {
            if upsert {
                c.batch_upsert_from(&keys, &ptrs, &lens, &cfg)
            } else {
                c.batch_put_from(&keys, &ptrs, &lens, &cfg)
            }
        })))
    }
}

impl Drop for PyStore {
    fn drop(&mut self) {
        if let Some(c) = self.client.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.close();
        }
    }
}

/// The keys and per-key ranges `(ptr, len, offset)` of a ranged session call. Nested lists whose shapes do not
/// match give that key no ranges (the client refuses it with -600); a key list of another length than the
/// outer lists gives every key none.
fn ranges_args(
    keys: &Bound<'_, PyAny>,
    ptrs: &Bound<'_, PyAny>,
    sizes: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    offsets_name: &str,
) -> PyResult<(Vec<String>, Vec<mooncake_store::client::Ranges>)> {
    let keys = keys_arg(keys)?;
    let ptrs = nested_ints(ptrs, "all_buffer_ptrs")?;
    let sizes = nested_sizes(sizes, "all_sizes")?;
    let offsets = nested_ints(offsets, offsets_name)?;
    if ptrs.len() != keys.len() || sizes.len() != keys.len() || offsets.len() != keys.len() {
        return Ok((keys.clone(), vec![Vec::new(); keys.len()]));
    }
    let ranges = (0..keys.len())
        .map(|i| {
            if ptrs[i].len() != sizes[i].len() || offsets[i].len() != sizes[i].len() {
                return Vec::new();
            }
            (0..sizes[i].len()).map(|k| (ptrs[i][k], sizes[i][k], offsets[i][k])).collect()
        })
        .collect();
    Ok((keys, ranges))
}

fn nested_ints(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<Vec<u64>>> {
    list_items(obj, arg)?.iter().map(|l| int_list(l, arg)).collect()
}

fn nested_sizes(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<Vec<u64>>> {
    list_items(obj, arg)?.iter().map(|l| sizes_arg(l, arg)).collect()
}

/// Applies upstream's `setup(config_dict)` keys (unknown keys are logged and ignored).
fn apply_config_dict(config: &mut ClientConfig, d: &Bound<'_, PyDict>) -> PyResult<()> {
    for (k, v) in d.iter() {
        let key: String = k.extract().map_err(|_| PyTypeError::new_err("setup: config keys must be str"))?;
        let text = || -> PyResult<String> {
            v.extract::<String>().map_err(|_| PyTypeError::new_err(format!("setup: {key} must be a str")))
        };
        match key.as_str() {
            "local_hostname" => config.local_hostname = text()?,
            "metadata_server" => config.metadata_server = text()?,
            "protocol" => config.protocol = text()?,
            "rdma_devices" | "device_name" => config.device_name = text()?,
            "master_server_addr" | "master_server_address" => config.master_server_addr = text()?,
            "global_segment_size" => config.global_segment_size = size_arg(&v, "global_segment_size")?,
            "local_buffer_size" => config.local_buffer_size = size_arg(&v, "local_buffer_size")?,
            "setup_timeout_ms" => config.setup_timeout = Duration::from_millis(size_arg(&v, "setup_timeout_ms")?),
            "rpc_timeout_ms" => config.rpc_timeout = Duration::from_millis(size_arg(&v, "rpc_timeout_ms")?),
            "transfer_timeout_ms" => {
                config.transfer_timeout = Duration::from_millis(size_arg(&v, "transfer_timeout_ms")?)
            }
            other => tracing::warn!("MooncakeDistributedStore.setup: ignoring unknown config key {other:?}"),
        }
    }
    Ok(())
}

/// Adds the store's classes to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReplicaStatus>()?;
    m.add_class::<SoftPinAction>()?;
    m.add_class::<ObjectDataType>()?;
    m.add_class::<TaskType>()?;
    m.add_class::<TaskStatus>()?;
    m.add_class::<QueryTaskResponse>()?;
    m.add_class::<ReplicateConfig>()?;
    m.add_class::<Descriptor>()?;
    m.add_class::<MemoryDescriptor>()?;
    m.add_class::<ReplicaDescriptor>()?;
    m.add_class::<BufferHandle>()?;
    m.add_class::<MooncakeHostMemAllocator>()?;
    m.add_class::<PyStore>()?;
    Ok(())
}
