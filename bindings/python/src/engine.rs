//! `mooncake.engine`: `TransferEngine`, `TransferOpcode`, `TransferNotify` and `available_transports()`.
//!
//! Return conventions follow upstream: 0 or a negative code (docs/wire-formats.md section 6) for calls that act, a batch
//! id (0 = failure) for async submissions. Failures are logged to stderr with the reason. Calls made before
//! `initialize()` return the not-initialised code (-202) instead of crashing.
//!
//! Python users pass raw integer addresses, as upstream's API does. The Python API contract
//! (docs/python-api.md, "Memory the calls use") makes the caller responsible for them: a registered buffer
//! stays valid until `unregister_memory` returns 0, and an unregistered local buffer of a transfer (upstream's
//! TCP transport accepts one) stays valid until the call returns, or until an async batch is finished. The
//! binding takes that responsibility into the engine through its `unsafe` calls (`register_memory`,
//! `TransferEngine::unchecked`), each with a `// SAFETY:` comment citing that contract, after checking what it
//! can: host addresses must be mapped (`crate::mapped`), so a stray int gives an error code, not a crash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mooncake::raw::Span;
use mooncake::registry::{self, Availability};
use mooncake::sync;
use mooncake::{
    AllocOptions, Allocation, Batch, EngineConfig, Error, MemoryDevice, MemoryKind, Notification, Opcode,
    TransferEngine, TransferRequest, TransferState,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyType};

use crate::buffers::{ValueView, length, type_name};
use crate::wait::{run_interruptibly, wait_batch};

/// Code returned by calls made before `initialize()`.
const NOT_INITIALIZED: i32 = -202;
/// Code for malformed arguments (upstream `ERR_INVALID_ARGUMENT`).
const INVALID_ARGUMENT: i32 = -1;

/// Most ranges of a sync batch run as one blocking engine call (see `sync_transfer`).
const INLINE_BATCH_RANGES: usize = 256;
/// Most bytes of a sync batch run as one blocking engine call: at TCP's 1-4 GB/s, a few milliseconds.
const INLINE_BATCH_BYTES: u64 = 1 << 20;

/// Direction of a transfer, seen from the caller: `Read` pulls remote bytes into local memory, `Write` pushes.
#[pyclass(module = "mooncake.engine", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TransferOpcode {
    /// Remote to local.
    Read = 0,
    /// Local to remote.
    Write = 1,
}

crate::convert::name_and_value!(TransferOpcode { Read, Write });

impl From<TransferOpcode> for Opcode {
    fn from(op: TransferOpcode) -> Opcode {
        match op {
            TransferOpcode::Read => Opcode::Read,
            TransferOpcode::Write => Opcode::Write,
        }
    }
}

/// Reads an opcode argument: a `TransferOpcode` or its int value (0 read, 1 write).
fn opcode_arg(obj: &Bound<'_, PyAny>) -> PyResult<Opcode> {
    if let Ok(op) = obj.extract::<TransferOpcode>() {
        return Ok(op.into());
    }
    if obj.is_instance_of::<PyInt>() {
        return match obj.extract::<i64>() {
            Ok(0) => Ok(Opcode::Read),
            Ok(1) => Ok(Opcode::Write),
            _ => {
                Err(PyValueError::new_err(format!("opcode: expected TransferOpcode.Read (0) or .Write (1), got {obj}")))
            }
        };
    }
    Err(PyTypeError::new_err(format!("opcode: expected a TransferOpcode, got {}", type_name(obj))))
}

/// A notification between engines: a sender-chosen `name` and a `msg` payload.
#[pyclass(module = "mooncake.engine", get_all, set_all, from_py_object)]
#[derive(Clone, Debug, Default)]
pub struct TransferNotify {
    /// Sender-chosen name (usually the sender's segment name).
    pub name: String,
    /// Payload.
    pub msg: String,
}

#[pymethods]
impl TransferNotify {
    #[new]
    #[pyo3(signature = (name = String::new(), msg = String::new()))]
    fn new(name: String, msg: String) -> Self {
        TransferNotify { name, msg }
    }

    fn __repr__(&self) -> String {
        format!("TransferNotify(name={:?}, msg={:?})", self.name, self.msg)
    }
}

/// A buffer from `allocate_managed_buffer` and the device it came from.
type ManagedBuffer = (Arc<dyn MemoryDevice>, Allocation);

/// Local addresses, remote addresses and lengths of a batch call.
type BatchLists = (Vec<u64>, Vec<u64>, Vec<u64>);

/// An async batch the caller polls or waits for by id.
struct AsyncBatch {
    batch: Arc<Batch>,
    started: Instant,
    timeout: Duration,
}

/// Upstream's `TransferEngine`: create it empty, then `initialize()`.
#[pyclass(module = "mooncake.engine", name = "TransferEngine", subclass)]
pub struct PyTransferEngine {
    engine: OnceLock<TransferEngine>,
    /// What `get_engine()` returns: one object per initialized engine, as upstream.
    shared: OnceLock<Py<PyInnerEngine>>,
    managed: Mutex<HashMap<u64, ManagedBuffer>>,
    batches: Mutex<HashMap<u64, AsyncBatch>>,
}

/// Upstream's `InnerTransferEngine`: the engine itself, from `TransferEngine.get_engine()`, for
/// `MooncakeDistributedStore.setup(..., engine=...)` to share. Opaque; it has no constructor.
#[pyclass(module = "mooncake.engine", name = "InnerTransferEngine", frozen)]
pub struct PyInnerEngine {
    pub(crate) engine: TransferEngine,
}

/// Logs a failed call and returns its upstream code.
fn fail(what: &str, e: &Error) -> i32 {
    tracing::warn!("TransferEngine.{what}: {e}");
    e.code()
}

/// Reads parallel address/length lists of a batch call (ints; negative lengths are an argument error).
fn batch_lists(
    buffers: &Bound<'_, PyAny>,
    peer_addrs: &Bound<'_, PyAny>,
    lengths: &Bound<'_, PyAny>,
) -> PyResult<Result<BatchLists, String>> {
    let locals: Vec<u64> = int_list(buffers, "buffers")?;
    let remotes: Vec<u64> = int_list(peer_addrs, "peer_buffer_addresses")?;
    let lens_obj = list_items(lengths, "lengths")?;
    let mut lens = Vec::with_capacity(lens_obj.len());
    for l in &lens_obj {
        match length(l, "lengths")? {
            Some(v) => lens.push(v),
            None => return Ok(Err(format!("lengths: {l} is not a valid length"))),
        }
    }
    if locals.len() != remotes.len() || locals.len() != lens.len() {
        return Ok(Err(format!(
            "{} buffers, {} peer addresses and {} lengths: the lists must have the same length",
            locals.len(),
            remotes.len(),
            lens.len()
        )));
    }
    Ok(Ok((locals, remotes, lens)))
}

/// The items of a list or tuple argument (TypeError otherwise, naming the argument).
pub fn list_items<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(format!("{arg}: expected a list, got {}", type_name(obj))));
    }
    let iter =
        obj.try_iter().map_err(|_| PyTypeError::new_err(format!("{arg}: expected a list, got {}", type_name(obj))))?;
    iter.collect()
}

/// A list of non-negative ints (addresses).
pub fn int_list(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<u64>> {
    list_items(obj, arg)?
        .iter()
        .map(|v| {
            if !v.is_instance_of::<PyInt>() {
                return Err(PyTypeError::new_err(format!("{arg}: expected ints, got {}", type_name(v))));
            }
            v.extract::<u64>().map_err(|_| PyValueError::new_err(format!("{arg}: {v} is not an address in [0, 2**64)")))
        })
        .collect()
}

impl PyTransferEngine {
    fn get(&self, what: &str) -> Result<&TransferEngine, i32> {
        self.engine.get().ok_or_else(|| {
            tracing::warn!("TransferEngine.{what} called before initialize()");
            NOT_INITIALIZED
        })
    }

    fn get_or_raise(&self, what: &str) -> PyResult<&TransferEngine> {
        self.engine
            .get()
            .ok_or_else(|| PyRuntimeError::new_err(format!("TransferEngine.{what}: call initialize() first")))
    }

    /// Runs a sync transfer of one or more ranges to `target`. One range, or a small batch (at most
    /// [`INLINE_BATCH_RANGES`] ranges and [`INLINE_BATCH_BYTES`]), runs as one blocking engine call (the latency
    /// path: transports may run it on this thread; a Ctrl-C is seen when it ends, within the transfer timeout);
    /// larger batches are submitted and waited for in slices that a Ctrl-C interrupts.
    #[allow(clippy::too_many_arguments)]
    fn sync_transfer(
        &self,
        py: Python<'_>,
        what: &str,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
        notify: Option<TransferNotify>,
    ) -> PyResult<i32> {
        let engine = match self.get(what) {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        if let Err(e) = Self::check_local_ranges(engine, locals, lens) {
            return Ok(fail(what, &e));
        }
        let small = locals.len() <= INLINE_BATCH_RANGES && lens.iter().sum::<u64>() <= INLINE_BATCH_BYTES;
        let result = if small {
            // SAFETY: the Python API contract (module docs): local buffers are the caller's memory, valid until
            // this call returns (upstream's TCP transport accepts unregistered ones); each was checked to be
            // mapped just above. Registered ranges are still used as registered (their regions held).
            let unchecked = unsafe { engine.unchecked() };
            py.detach(|| unchecked.batch_transfer_sync(target, opcode, locals, remotes, lens))
        } else {
            self.sync_batch(py, engine, target, opcode, locals, remotes, lens)?
        };
        if let Err(e) = result {
            return Ok(fail(what, &e));
        }
        if let Some(n) = notify {
            let note = Notification { name: n.name, message: n.msg };
            if let Err(e) = py.detach(|| engine.send_notify(target, note)) {
                return Ok(fail(what, &e));
            }
        }
        Ok(0)
    }

    #[allow(clippy::too_many_arguments)]
    fn sync_batch(
        &self,
        py: Python<'_>,
        engine: &TransferEngine,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> PyResult<mooncake::Result<()>> {
        // SAFETY: the Python API contract (module docs): local buffers are the caller's memory, valid until this
        // call returns; the caller (`sync_transfer`) checked each is mapped.
        let unchecked = unsafe { engine.unchecked() };
        let submitted = py.detach(|| -> mooncake::Result<Arc<Batch>> {
            let target_id = engine.open_segment(target)?;
            let requests = requests_to(target_id, opcode, locals, remotes, lens);
            let batch = Batch::new(requests.len());
            unchecked.submit_into(&batch, &requests)?;
            Ok(batch)
        });
        let batch = match submitted {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let timeout = engine.sync_timeout(lens.iter().sum());
        if !wait_batch(py, &batch, timeout)? {
            batch.abort(TransferState::Timeout, Error::Timeout(timeout));
            return Ok(Err(Error::Timeout(timeout)));
        }
        Ok(batch.overall().error.map_or(Ok(()), Err))
    }

    /// Submits an async batch; its id, or 0 on failure.
    #[allow(clippy::too_many_arguments)]
    fn submit_async(
        &self,
        py: Python<'_>,
        what: &str,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> u64 {
        let Ok(engine) = self.get(what) else { return 0 };
        if locals.is_empty() {
            tracing::warn!("TransferEngine.{what}: empty batch");
            return 0;
        }
        if let Err(e) = Self::check_local_ranges(engine, locals, lens) {
            fail(what, &e);
            return 0;
        }
        // SAFETY: the Python API contract (module docs): local buffers of an async batch are the caller's memory,
        // valid until the batch is finished (as upstream's `batch_transfer_async_*`); each was checked to be
        // mapped just above.
        let unchecked = unsafe { engine.unchecked() };
        let submitted = py.detach(|| -> mooncake::Result<(u64, Arc<Batch>)> {
            let target_id = engine.open_segment(target)?;
            let requests = requests_to(target_id, opcode, locals, remotes, lens);
            let id = engine.allocate_batch(requests.len())?;
            let submitted = engine.batch(id).and_then(|batch| unchecked.submit_into(&batch, &requests).map(|_| batch));
            match submitted {
                Ok(batch) => Ok((id, batch)),
                Err(e) => {
                    let _ = engine.free_batch(id);
                    Err(e)
                }
            }
        });
        match submitted {
            Ok((id, batch)) => {
                let entry =
                    AsyncBatch { batch, started: Instant::now(), timeout: engine.sync_timeout(lens.iter().sum()) };
                sync::lock(&self.batches).insert(id, entry);
                id
            }
            Err(e) => {
                fail(what, &e);
                0
            }
        }
    }

    /// Forgets an async batch (the engine frees it once nothing is in flight).
    fn release_batch(&self, engine: &TransferEngine, id: u64) {
        sync::lock(&self.batches).remove(&id);
        let _ = engine.free_batch(id);
    }

    /// Checks local ranges outside registered memory are at least mapped (TCP lets the initiator use
    /// unregistered buffers; a stray int must give an error code, not a segfault).
    fn check_local_ranges(engine: &TransferEngine, locals: &[u64], lens: &[u64]) -> mooncake::Result<()> {
        for (&addr, &len) in locals.iter().zip(lens) {
            // GPU memory a linked device claims is moved through that device, never read by the CPU.
            let device_memory =
                || engine.devices().iter().any(|d| d.kind() != MemoryKind::Host && d.classify(addr, len).is_some());
            if engine.regions().lookup(addr, len).is_none() && !device_memory() {
                crate::mapped::check_mapped(addr, len).map_err(|why| Error::AddressNotRegistered {
                    addr,
                    len,
                    context: format!("local: {why}"),
                })?;
            }
        }
        Ok(())
    }

    /// Checks a range to register is mapped host memory (device memory is checked by its device).
    fn check_registrable(engine: &TransferEngine, addr: u64, len: u64, location: &str) -> mooncake::Result<()> {
        let host = location.trim().is_empty()
            || location.starts_with("cpu")
            || (location.trim() == "*" && engine.devices().iter().all(|d| d.kind() == MemoryKind::Host));
        if !host {
            return Ok(());
        }
        crate::mapped::check_mapped(addr, len).map_err(|why| Error::InvalidArgument(format!("cannot register: {why}")))
    }
}

#[pymethods]
impl PyTransferEngine {
    #[new]
    fn new() -> Self {
        PyTransferEngine {
            engine: OnceLock::new(),
            shared: OnceLock::new(),
            managed: Mutex::new(HashMap::new()),
            batches: Mutex::new(HashMap::new()),
        }
    }

    /// The opcode enum, also reachable as `TransferEngine.TransferOpcode` as upstream.
    #[classattr]
    #[pyo3(name = "TransferOpcode")]
    fn opcode_type(py: Python<'_>) -> Py<PyType> {
        py.get_type::<TransferOpcode>().unbind()
    }

    /// Starts the engine. `protocol` picks a linked transport (`MC_FORCE_TCP=1` forces tcp); an unknown or
    /// unusable one fails with a message naming those that work here. 0 or a negative code.
    #[pyo3(signature = (local_hostname, metadata_server, protocol = "tcp", device_name = ""))]
    fn initialize(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
    ) -> PyResult<i32> {
        self.initialize_ext(py, local_hostname, metadata_server, protocol, device_name, "")
    }

    /// `initialize` with an explicit metadata type (`etcd`, `redis`, `http`, `p2p`) for a server given
    /// without a scheme.
    #[pyo3(signature = (local_hostname, metadata_server, protocol, device_name, metadata_type))]
    fn initialize_ext(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
        metadata_type: &str,
    ) -> PyResult<i32> {
        if self.engine.get().is_some() {
            tracing::warn!("TransferEngine.initialize: already initialized");
            return Ok(INVALID_ARGUMENT);
        }
        let protocol = if env_flag("MC_FORCE_TCP") { "tcp".to_string() } else { protocol.trim().to_string() };
        let protocol = if protocol.is_empty() { "tcp".to_string() } else { protocol };
        if let Err(message) = check_protocol(&protocol) {
            tracing::error!("TransferEngine.initialize: {message}");
            return Ok(Error::unavailable("").code());
        }
        let metadata = metadata_conn(metadata_server, metadata_type);
        let mut config = EngineConfig::new(local_hostname, metadata);
        let auto = config.auto_protocols.clone();
        config = config.with_protocols([protocol]).with_auto_protocols(auto);
        if !device_name.trim().is_empty() {
            config.backend.options.insert("devices".into(), device_name.to_string());
        }
        match run_interruptibly(py, "engine-start", move || TransferEngine::new(config))? {
            Ok(engine) => {
                let _ = self.engine.set(engine);
                Ok(0)
            }
            Err(e) => Ok(fail("initialize", &e)),
        }
    }

    /// The handshake port; in P2P mode this engine's segment name is `f"{host}:{port}"`. -202 before
    /// `initialize()`.
    fn get_rpc_port(&self) -> i32 {
        match self.get("get_rpc_port") {
            Ok(e) => i32::from(e.rpc_port()),
            Err(code) => code,
        }
    }

    /// Prepares the path to `segment_name` ahead of the first transfer: fetches its metadata and opens it with
    /// the engine's transport (upstream does this for EFA only; here it helps every transport). Failures are
    /// logged; the result is 0, as upstream's (also before `initialize`).
    fn warmup_efa_segment(&self, py: Python<'_>, segment_name: &str) -> i32 {
        let Some(engine) = self.engine.get() else { return 0 };
        if segment_name.is_empty() {
            return 0;
        }
        if let Err(e) = py.detach(|| engine.open_segment(segment_name)) {
            tracing::info!("TransferEngine.warmup_efa_segment({segment_name:?}): {e}");
        }
        0
    }

    /// This engine's segment name (our addition; upstream users build it from host and rpc port).
    fn get_local_segment_name(&self) -> PyResult<String> {
        Ok(self.get_or_raise("get_local_segment_name")?.local_segment_name().to_string())
    }

    /// Registers `[buffer_addr, +capacity)` so peers can read and write it. 0 or a negative code.
    #[pyo3(signature = (buffer_addr, capacity, location = "*"))]
    fn register_memory(
        &self,
        py: Python<'_>,
        buffer_addr: u64,
        capacity: &Bound<'_, PyAny>,
        location: &str,
    ) -> PyResult<i32> {
        let engine = match self.get("register_memory") {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        let Some(len) = length(capacity, "capacity")? else { return Ok(INVALID_ARGUMENT) };
        if let Err(e) = Self::check_registrable(engine, buffer_addr, len, location) {
            return Ok(fail("register_memory", &e));
        }
        // SAFETY: the Python API contract (module docs): a registered buffer is the caller's memory, valid until
        // `unregister_memory` for it returns 0; host memory was checked to be mapped just above.
        Ok(py
            .detach(|| unsafe { engine.register_memory(buffer_addr, len, location) })
            .map_or_else(|e| fail("register_memory", &e), |_| 0))
    }

    /// Unregisters a buffer registered at `buffer_addr`. 0 or a negative code.
    fn unregister_memory(&self, py: Python<'_>, buffer_addr: u64) -> i32 {
        let engine = match self.get("unregister_memory") {
            Ok(e) => e,
            Err(code) => return code,
        };
        py.detach(|| engine.unregister_memory(buffer_addr)).map_or_else(|e| fail("unregister_memory", &e), |_| 0)
    }

    /// Registers several buffers at once (all or none). 0 or a negative code.
    #[pyo3(signature = (buffer_addresses, capacities, location = "*"))]
    fn batch_register_memory(
        &self,
        py: Python<'_>,
        buffer_addresses: &Bound<'_, PyAny>,
        capacities: &Bound<'_, PyAny>,
        location: &str,
    ) -> PyResult<i32> {
        let addrs = int_list(buffer_addresses, "buffer_addresses")?;
        let lens = int_list(capacities, "capacities")?;
        let engine = match self.get("batch_register_memory") {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        if addrs.len() != lens.len() {
            tracing::warn!(
                "TransferEngine.batch_register_memory: {} addresses but {} capacities",
                addrs.len(),
                lens.len()
            );
            return Ok(INVALID_ARGUMENT);
        }
        let buffers: Vec<(u64, u64)> = addrs.into_iter().zip(lens).collect();
        for &(addr, len) in &buffers {
            if let Err(e) = Self::check_registrable(engine, addr, len, location) {
                return Ok(fail("batch_register_memory", &e));
            }
        }
        // SAFETY: the Python API contract (module docs): each buffer is the caller's memory, valid until it is
        // unregistered (0 returned); host memory was checked to be mapped just above.
        Ok(py
            .detach(|| unsafe { engine.register_memory_batch(&buffers, location) })
            .map_or_else(|e| fail("batch_register_memory", &e), |_| 0))
    }

    /// Unregisters several buffers. 0 or a negative code.
    fn batch_unregister_memory(&self, py: Python<'_>, buffer_addresses: &Bound<'_, PyAny>) -> PyResult<i32> {
        let addrs = int_list(buffer_addresses, "buffer_addresses")?;
        let engine = match self.get("batch_unregister_memory") {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        Ok(py
            .detach(|| engine.unregister_memory_batch(&addrs))
            .map_or_else(|e| fail("batch_unregister_memory", &e), |_| 0))
    }

    /// Allocates and registers `length` bytes of host memory; its address, or 0 on failure.
    fn allocate_managed_buffer(&self, py: Python<'_>, length_: &Bound<'_, PyAny>) -> PyResult<u64> {
        let Some(len) = length(length_, "length")?.filter(|l| *l > 0) else { return Ok(0) };
        let Ok(engine) = self.get("allocate_managed_buffer") else { return Ok(0) };
        let Some(device) = engine.devices().iter().find(|d| d.kind() == MemoryKind::Host).cloned() else {
            tracing::warn!("TransferEngine.allocate_managed_buffer: no host memory device is linked");
            return Ok(0);
        };
        let allocated = py.detach(|| -> mooncake::Result<Allocation> {
            let a = device.allocate(len, &AllocOptions::default())?;
            if let Err(e) = engine.register_allocation(&device, &a, "*") {
                let _ = device.free(&a);
                return Err(e);
            }
            Ok(a)
        });
        match allocated {
            Ok(a) => {
                let addr = a.addr;
                sync::lock(&self.managed).insert(addr, (device, a));
                Ok(addr)
            }
            Err(e) => {
                fail("allocate_managed_buffer", &e);
                Ok(0)
            }
        }
    }

    /// Unregisters and frees a buffer from `allocate_managed_buffer`. 0 or a negative code.
    fn free_managed_buffer(&self, py: Python<'_>, buffer_addr: u64, length_: &Bound<'_, PyAny>) -> PyResult<i32> {
        let _ = length(length_, "length")?;
        let engine = match self.get("free_managed_buffer") {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        let Some((device, a)) = sync::lock(&self.managed).remove(&buffer_addr) else {
            tracing::warn!(
                "TransferEngine.free_managed_buffer: {buffer_addr:#x} is not a managed buffer of this engine"
            );
            return Ok(INVALID_ARGUMENT);
        };
        Ok(py
            .detach(|| engine.unregister_memory(a.addr).and_then(|_| device.free(&a)))
            .map_or_else(|e| fail("free_managed_buffer", &e), |_| 0))
    }

    /// Blocking write of `length` bytes at `buffer` to `peer_buffer_address` of segment `target_hostname`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let Some(len) = crate::buffers::length(length, "length")? else { return Ok(INVALID_ARGUMENT) };
        self.sync_transfer(
            py,
            "transfer_sync_write",
            target_hostname,
            Opcode::Write,
            &[buffer],
            &[peer_buffer_address],
            &[len],
            None,
        )
    }

    /// Blocking read of `length` bytes from `peer_buffer_address` of `target_hostname` into `buffer`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let Some(len) = crate::buffers::length(length, "length")? else { return Ok(INVALID_ARGUMENT) };
        self.sync_transfer(
            py,
            "transfer_sync_read",
            target_hostname,
            Opcode::Read,
            &[buffer],
            &[peer_buffer_address],
            &[len],
            None,
        )
    }

    /// Blocking transfer in either direction; `notify` is sent to the peer after the bytes land.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, opcode, notify = None, transport_hint = ""))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: &Bound<'_, PyAny>,
        opcode: &Bound<'_, PyAny>,
        notify: Option<TransferNotify>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let op = opcode_arg(opcode)?;
        let Some(len) = crate::buffers::length(length, "length")? else { return Ok(INVALID_ARGUMENT) };
        self.sync_transfer(py, "transfer_sync", target_hostname, op, &[buffer], &[peer_buffer_address], &[len], notify)
    }

    /// Blocking batch of writes to one segment. 0 or the first failure's code.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        self.batch_sync(
            py,
            "batch_transfer_sync_write",
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            Opcode::Write,
            None,
        )
    }

    /// Blocking batch of reads from one segment. 0 or the first failure's code.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        self.batch_sync(
            py,
            "batch_transfer_sync_read",
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            Opcode::Read,
            None,
        )
    }

    /// Blocking batch in either direction, with an optional notification after it.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify = None, transport_hint = ""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        opcode: &Bound<'_, PyAny>,
        notify: Option<TransferNotify>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let op = opcode_arg(opcode)?;
        self.batch_sync(py, "batch_transfer_sync", target_hostname, buffers, peer_buffer_addresses, lengths, op, notify)
    }

    /// Submits a batch of writes; its id (0 on failure). Wait with `get_batch_transfer_status`.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_async_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        self.batch_async(
            py,
            "batch_transfer_async_write",
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            Opcode::Write,
        )
    }

    /// Submits a batch of reads; its id (0 on failure).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_async_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        self.batch_async(
            py,
            "batch_transfer_async_read",
            target_hostname,
            buffers,
            peer_buffer_addresses,
            lengths,
            Opcode::Read,
        )
    }

    /// Submits a batch in either direction; its id (0 on failure).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint = ""))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_async(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        opcode: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let op = opcode_arg(opcode)?;
        self.batch_async(py, "batch_transfer_async", target_hostname, buffers, peer_buffer_addresses, lengths, op)
    }

    /// Submits one write; its batch id (0 on failure). Poll with `transfer_check_status`.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_submit_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let Some(len) = crate::buffers::length(length, "length")? else { return Ok(0) };
        Ok(self.submit_async(
            py,
            "transfer_submit_write",
            target_hostname,
            Opcode::Write,
            &[buffer],
            &[peer_buffer_address],
            &[len],
        ))
    }

    /// Waits for every batch in `batch_ids` and frees them: 0 when all completed, else the first failure's
    /// code (-301 on timeout). A Ctrl-C interrupts the wait.
    fn get_batch_transfer_status(&self, py: Python<'_>, batch_ids: &Bound<'_, PyAny>) -> PyResult<i32> {
        let ids = int_list(batch_ids, "batch_ids")?;
        let engine = match self.get("get_batch_transfer_status") {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        let mut result = 0;
        for id in ids {
            let entry = sync::lock(&self.batches).get(&id).map(|b| (b.batch.clone(), b.started, b.timeout));
            let Some((batch, started, timeout)) = entry else {
                tracing::warn!("TransferEngine.get_batch_transfer_status: unknown batch id {id}");
                if result == 0 {
                    result = Error::UnknownBatch(id).code();
                }
                continue;
            };
            let left = timeout.saturating_sub(started.elapsed());
            if !wait_batch(py, &batch, left)? {
                batch.abort(TransferState::Timeout, Error::Timeout(timeout));
            }
            if let Some(e) = batch.overall().error
                && result == 0
            {
                result = fail("get_batch_transfer_status", &e);
            }
            self.release_batch(engine, id);
        }
        Ok(result)
    }

    /// Polls a batch: 1 done (freed), 0 pending, -1 failed (freed), -2 timed out (freed).
    fn transfer_check_status(&self, batch_id: u64) -> i32 {
        let Ok(engine) = self.get("transfer_check_status") else { return -1 };
        let entry = sync::lock(&self.batches).get(&batch_id).map(|b| (b.batch.clone(), b.started, b.timeout));
        let Some((batch, started, timeout)) = entry else { return -1 };
        if !batch.is_done() {
            if started.elapsed() < timeout {
                return 0;
            }
            batch.abort(TransferState::Timeout, Error::Timeout(timeout));
            self.release_batch(engine, batch_id);
            return -2;
        }
        let status = batch.overall();
        self.release_batch(engine, batch_id);
        match status.state {
            TransferState::Completed => 1,
            TransferState::Timeout => -2,
            _ => -1,
        }
    }

    /// Copies `length` bytes of `src_bytes` into local memory at `dest` (inside memory registered with this
    /// engine). 0 or a negative code.
    fn write_bytes_to_buffer(
        &self,
        dest: u64,
        src_bytes: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<i32> {
        let view = ValueView::new(src_bytes, "src_bytes")?;
        let engine = match self.get("write_bytes_to_buffer") {
            Ok(e) => e,
            Err(code) => return Ok(code),
        };
        let Some(len) = crate::buffers::length(length, "length")? else { return Ok(INVALID_ARGUMENT) };
        let src = view.as_slice();
        if len as usize > src.len() {
            tracing::warn!("TransferEngine.write_bytes_to_buffer: length {len} exceeds the {} source bytes", src.len());
            return Ok(INVALID_ARGUMENT);
        }
        // Only inside memory registered with this engine, through mooncake-raw (which checks the range against
        // the region it holds, and copies device memory through its device).
        let copied = engine
            .regions()
            .check(dest, len, "local")
            .and_then(|region| Span::region(&region, dest, len)?.write_from(0, &src[..len as usize]));
        if let Err(e) = copied {
            return Ok(fail("write_bytes_to_buffer", &e));
        }
        Ok(0)
    }

    /// Returns `length` bytes of local memory at `src` (inside memory registered with this engine).
    fn read_bytes_from_buffer<'py>(
        &self,
        py: Python<'py>,
        src: u64,
        length: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let engine = self.get_or_raise("read_bytes_from_buffer")?;
        let len = crate::buffers::length(length, "length")?
            .ok_or_else(|| PyValueError::new_err("read_bytes_from_buffer: length must be a non-negative int"))?;
        let bad = |e: Error| PyValueError::new_err(format!("read_bytes_from_buffer: {e}"));
        let region = engine.regions().check(src, len, "local").map_err(bad)?;
        let span = Span::region(&region, src, len).map_err(bad)?;
        PyBytes::new_with(py, len as usize, |out| span.read_into(0, out).map_err(bad))
    }

    /// Address of the first registered buffer of segment `segment_name`, 0 if it has none or is unknown.
    fn get_first_buffer_address(&self, py: Python<'_>, segment_name: &str) -> u64 {
        let Ok(engine) = self.get("get_first_buffer_address") else { return 0 };
        py.detach(|| engine.first_buffer_address(segment_name)).unwrap_or_else(|e| {
            fail("get_first_buffer_address", &e);
            0
        })
    }

    /// The engine to share with a store (`setup(..., engine=te.get_engine())`), the same object on every call;
    /// `None` before `initialize`.
    fn get_engine(&self, py: Python<'_>) -> PyResult<Option<Py<PyInnerEngine>>> {
        let Some(engine) = self.engine.get() else { return Ok(None) };
        if let Some(shared) = self.shared.get() {
            return Ok(Some(shared.clone_ref(py)));
        }
        let shared = Py::new(py, PyInnerEngine { engine: engine.clone() })?;
        Ok(Some(self.shared.get_or_init(|| shared).clone_ref(py)))
    }

    /// This host's topology as upstream's JSON matrix: `{"cpu:N": [[preferred NICs], [other NICs]]}`.
    #[pyo3(signature = (device_name = None))]
    fn get_local_topology(&self, device_name: Option<&str>) -> String {
        let _ = device_name;
        local_topology_json()
    }

    /// Notifications received so far (oldest first), each a `TransferNotify`.
    fn get_notifies(&self) -> Vec<TransferNotify> {
        let Ok(engine) = self.get("get_notifies") else { return Vec::new() };
        engine.drain_notifications().into_iter().map(|n| TransferNotify { name: n.name, msg: n.message }).collect()
    }

    /// Checks that `peer_server_name` answers on its handshake socket: 0 reachable, else a negative code.
    fn send_probe(&self, py: Python<'_>, peer_server_name: &str) -> i32 {
        let engine = match self.get("send_probe") {
            Ok(e) => e,
            Err(code) => return code,
        };
        py.detach(|| engine.probe_peer(peer_server_name)).map_or_else(|e| fail("send_probe", &e), |_| 0)
    }

    /// Stops the engine (our addition; also done when the object is collected). Idempotent.
    fn shutdown(&self, py: Python<'_>) {
        if let Some(engine) = self.engine.get() {
            py.detach(|| engine.shutdown());
        }
    }
}

impl PyTransferEngine {
    #[allow(clippy::too_many_arguments)]
    fn batch_sync(
        &self,
        py: Python<'_>,
        what: &str,
        target: &str,
        buffers: &Bound<'_, PyAny>,
        peers: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        opcode: Opcode,
        notify: Option<TransferNotify>,
    ) -> PyResult<i32> {
        match batch_lists(buffers, peers, lengths)? {
            Ok((l, r, n)) => self.sync_transfer(py, what, target, opcode, &l, &r, &n, notify),
            Err(message) => {
                tracing::warn!("TransferEngine.{what}: {message}");
                Ok(INVALID_ARGUMENT)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_async(
        &self,
        py: Python<'_>,
        what: &str,
        target: &str,
        buffers: &Bound<'_, PyAny>,
        peers: &Bound<'_, PyAny>,
        lengths: &Bound<'_, PyAny>,
        opcode: Opcode,
    ) -> PyResult<u64> {
        match batch_lists(buffers, peers, lengths)? {
            Ok((l, r, n)) => Ok(self.submit_async(py, what, target, opcode, &l, &r, &n)),
            Err(message) => {
                tracing::warn!("TransferEngine.{what}: {message}");
                Ok(0)
            }
        }
    }
}

impl Drop for PyTransferEngine {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.get() {
            for (_, (device, a)) in sync::lock(&self.managed).drain() {
                let _ = engine.unregister_memory(a.addr);
                let _ = device.free(&a);
            }
            engine.shutdown();
        }
    }
}

/// One request per (local, remote, length) triple, all to segment `target`.
fn requests_to(
    target: mooncake::SegmentHandle,
    opcode: Opcode,
    locals: &[u64],
    remotes: &[u64],
    lens: &[u64],
) -> Vec<TransferRequest> {
    (0..locals.len())
        .map(|i| TransferRequest { opcode, local_addr: locals[i], target, remote_addr: remotes[i], length: lens[i] })
        .collect()
}

/// True when the environment variable is set to something other than empty, `0` or `false`.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        let v = v.trim();
        !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
    })
}

/// The metadata connection string: `P2PHANDSHAKE` and URLs as given; a bare `host:port` gets the scheme of
/// `metadata_type` (default `etcd`, as upstream).
fn metadata_conn(server: &str, metadata_type: &str) -> String {
    let s = server.trim();
    if s.eq_ignore_ascii_case("P2PHANDSHAKE") || s.contains("://") {
        return s.to_string();
    }
    match metadata_type.trim().to_ascii_lowercase().as_str() {
        "" | "etcd" => format!("etcd://{s}"),
        "p2p" | "p2phandshake" => "P2PHANDSHAKE".to_string(),
        "http" => format!("http://{s}"),
        other => format!("{other}://{s}"),
    }
}

/// Ok when `protocol` is linked and its probe passes; else a message naming what works here.
pub fn check_protocol(protocol: &str) -> Result<(), String> {
    let linked = registry::transports();
    let usable: Vec<&str> = linked.iter().filter(|f| (f.probe)().is_available()).map(|f| f.name).collect();
    let why = match linked.iter().find(|f| f.name == protocol) {
        None => "it is not linked into this build".to_string(),
        Some(f) => match (f.probe)() {
            Availability::Available => return Ok(()),
            Availability::Unavailable(reason) => format!("it is linked but unusable here: {reason}"),
        },
    };
    Err(format!(
        "protocol {protocol:?} cannot be used: {why}. Usable here: {}; linked: {} (see mooncake.engine.available_transports())",
        usable.join(", "),
        linked.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
    ))
}

/// Every transport linked into this build: `{"name", "available", "reason", "summary"}` each.
#[pyfunction]
fn available_transports(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for f in registry::transports() {
        let d = PyDict::new(py);
        d.set_item("name", f.name)?;
        d.set_item("summary", f.summary)?;
        match (f.probe)() {
            Availability::Available => {
                d.set_item("available", true)?;
                d.set_item("reason", py.None())?;
            }
            Availability::Unavailable(reason) => {
                d.set_item("available", false)?;
                d.set_item("reason", reason)?;
            }
        }
        list.append(d)?;
    }
    Ok(list)
}

/// Every memory device linked into this build: `{"name", "available", "reason"}` each (private: the
/// `SUPPORT_*` flags of `mooncake.engine` read it).
#[pyfunction]
#[pyo3(name = "_memory_devices")]
fn memory_devices(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for f in registry::devices() {
        let d = PyDict::new(py);
        d.set_item("name", f.name)?;
        match (f.probe)() {
            Availability::Available => {
                d.set_item("available", true)?;
                d.set_item("reason", py.None())?;
            }
            Availability::Unavailable(reason) => {
                d.set_item("available", false)?;
                d.set_item("reason", reason)?;
            }
        }
        list.append(d)?;
    }
    Ok(list)
}

/// NUMA nodes of this host (from sysfs) as upstream's topology JSON; no NIC lists without an RDMA build.
fn local_topology_json() -> String {
    let mut nodes: Vec<u32> = std::fs::read_dir("/sys/devices/system/node")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name().to_str().and_then(|n| n.strip_prefix("node")).and_then(|n| n.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    if nodes.is_empty() {
        nodes.push(0);
    }
    nodes.sort_unstable();
    let mut map: serde_json::Map<String, serde_json::Value> =
        nodes.into_iter().map(|n| (format!("cpu:{n}"), serde_json::json!([[], []]))).collect();
    map.extend(gpu_topology_entries());
    serde_json::Value::Object(map).to_string()
}

/// Upstream's `cuda:N` entries (the RDMA NICs nearest each GPU first) when a CUDA driver and GPU are here.
#[cfg(feature = "cuda")]
fn gpu_topology_entries() -> serde_json::Map<String, serde_json::Value> {
    use mooncake::device_cuda::CudaDevice;
    if !mooncake::device_cuda::probe().is_available() {
        return serde_json::Map::new();
    }
    match CudaDevice::new().and_then(|d| d.nic_affinity(std::path::Path::new("/sys"))) {
        Ok(serde_json::Value::Object(entries)) => entries,
        Ok(_) => serde_json::Map::new(),
        Err(e) => {
            tracing::warn!(error = %e, "get_local_topology: no GPU entries");
            serde_json::Map::new()
        }
    }
}

/// Without the `cuda` feature there are no GPU entries.
#[cfg(not(feature = "cuda"))]
fn gpu_topology_entries() -> serde_json::Map<String, serde_json::Value> {
    serde_json::Map::new()
}

/// Adds the engine's classes and functions to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TransferOpcode>()?;
    m.add_class::<TransferNotify>()?;
    m.add_class::<PyTransferEngine>()?;
    m.add_class::<PyInnerEngine>()?;
    m.add_function(wrap_pyfunction!(available_transports, m)?)?;
    m.add_function(wrap_pyfunction!(memory_devices, m)?)?;
    Ok(())
}

/// The engine a native object (EP buffer, process group) runs on: the caller's `InnerTransferEngine`
/// (`TransferEngine.get_engine()`; not shut down with the object) or a new one with `protocol` (`tcp` when
/// blank), plus the same-host transports when asked. True when the engine is the object's own. `what` names the
/// object in errors.
pub(crate) fn engine_for(
    py: Python<'_>,
    engine: Option<&Bound<'_, PyAny>>,
    protocol: &str,
    local_hostname: &str,
    same_host_transports: bool,
    what: &str,
) -> PyResult<(TransferEngine, bool)> {
    if let Some(e) = engine.filter(|e| !e.is_none()) {
        let inner = e.cast::<PyInnerEngine>().map_err(|_| {
            PyTypeError::new_err(format!(
                "engine: expected an InnerTransferEngine (TransferEngine.get_engine()), got {}",
                crate::buffers::type_name(e)
            ))
        })?;
        return Ok((inner.get().engine.clone(), false));
    }
    let protocol = protocol.trim();
    let protocol = if protocol.is_empty() { "tcp" } else { protocol };
    check_protocol(protocol).map_err(|m| PyValueError::new_err(format!("protocol: {m}")))?;
    let mut config = EngineConfig::new(local_hostname, "P2PHANDSHAKE");
    let auto = if same_host_transports { config.auto_protocols.clone() } else { Vec::new() };
    config = config.with_protocols([protocol]).with_auto_protocols(auto);
    let engine = crate::wait::run_interruptibly(py, "engine-start", move || TransferEngine::new(config))?
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the {what} engine: {e}")))?;
    Ok((engine, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_metadata_servers_get_the_type_as_scheme() {
        assert_eq!(metadata_conn("P2PHANDSHAKE", ""), "P2PHANDSHAKE");
        assert_eq!(metadata_conn("http://h:8080/metadata", "etcd"), "http://h:8080/metadata");
        assert_eq!(metadata_conn("10.0.0.1:2379", ""), "etcd://10.0.0.1:2379");
        assert_eq!(metadata_conn("10.0.0.1:6379", "redis"), "redis://10.0.0.1:6379");
        assert_eq!(metadata_conn("h:8080/metadata", "http"), "http://h:8080/metadata");
        assert_eq!(metadata_conn("anything", "p2p"), "P2PHANDSHAKE");
    }

    #[test]
    fn unknown_protocols_are_refused_naming_what_works() {
        mooncake::link_all();
        assert!(check_protocol("tcp").is_ok());
        let message = check_protocol("carrier-pigeon").unwrap_err();
        assert!(message.contains("not linked"), "{message}");
        assert!(message.contains("Usable here: ") && message.contains("tcp"), "{message}");
    }

    #[test]
    fn topology_lists_at_least_one_numa_node() {
        let v: serde_json::Value = serde_json::from_str(&local_topology_json()).unwrap();
        let map = v.as_object().unwrap();
        assert!(map.keys().any(|k| k.starts_with("cpu:")));
        assert!(map.values().all(|lists| lists.as_array().is_some_and(|l| l.len() == 2)));
    }

    #[test]
    fn env_flags_read_like_upstream() {
        // Setting variables is unsafe in edition 2024 (other threads may read them); read an unset one.
        assert!(!env_flag("MOONCAKE_RS_TEST_UNSET_FLAG"));
    }
}
