//! `mooncake.ep`: the expert-parallel buffer of `mooncake-ep` ([`EpBuffer`]) for the Python
//! `mooncake.mooncake_ep_buffer.Buffer`, with upstream's native names (`Buffer`, `get_ep_buffer_size_hint`).
//!
//! torch is not a dependency: the Python layer passes each tensor as a descriptor tuple
//! `(data_ptr, shape, strides, dtype, device)` (strides in elements, dtype and device as torch prints them
//! without the `torch.` prefix). Every descriptor is checked here against what the call needs (dtype, rank,
//! shape, row-major layout, CPU memory, alignment) before any memory is touched; a bad one raises
//! `TypeError` (dtype) or `ValueError` (anything else) naming the argument, and nothing is written. Argument
//! errors found by `mooncake-ep` (expert indices out of range, more tokens than the buffer was sized for, a
//! buffer smaller than the call needs) raise `ValueError` naming the argument too.
//!
//! Dispatch and combine run with the GIL released: on the calling thread, or (`background=True`, for
//! upstream's `async_finish` / `return_recv_hook`) on a thread of their own whose [`PendingCall`] keeps the
//! tensors alive and is joined by `wait()` or when it is dropped.
//!
//! The memory contract is upstream's: the tensors passed in stay alive and unmoved for the call (the Python
//! layer holds them; a background call holds them itself).

use std::ffi::{CStr, c_int};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mooncake::sync;
use mooncake_ep::{
    BufferLayout, CombineArgs, CombineInput, DispatchArgs, DispatchHandle, DispatchOutput, EpBuffer, PeerInfo, RecvX,
    Tokens,
};
use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::buffers::type_name;
use crate::engine::engine_for;

/// A `timeout_us` below 0 waits this long (upstream: no timeout).
const NO_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// One tensor argument as the Python layer describes it.
#[derive(Debug, Clone)]
struct TensorArg {
    name: &'static str,
    ptr: usize,
    shape: Vec<usize>,
    strides: Vec<i64>,
    dtype: String,
    device: String,
}

fn item_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "bfloat16" => 2,
        "float8_e4m3fn" | "uint8" | "int8" => 1,
        "int64" => 8,
        "int32" | "float32" => 4,
        _ => return None,
    })
}

impl TensorArg {
    /// Reads a descriptor tuple; `TypeError` naming `name` when it is not one.
    fn parse(obj: &Bound<'_, PyAny>, name: &'static str) -> PyResult<Self> {
        let bad = || {
            PyTypeError::new_err(format!(
                "{name}: expected a tensor descriptor (data_ptr, shape, strides, dtype, device), got {}",
                type_name(obj)
            ))
        };
        let t = obj.cast::<PyTuple>().map_err(|_| bad())?;
        if t.len() != 5 {
            return Err(bad());
        }
        let ptr: usize = t.get_item(0)?.extract().map_err(|_| bad())?;
        let shape: Vec<usize> = t.get_item(1)?.extract().map_err(|_| bad())?;
        let strides: Vec<i64> = t.get_item(2)?.extract().map_err(|_| bad())?;
        let dtype: String = t.get_item(3)?.extract().map_err(|_| bad())?;
        let device: String = t.get_item(4)?.extract().map_err(|_| bad())?;
        if strides.len() != shape.len() {
            return Err(bad());
        }
        Ok(TensorArg { name, ptr, shape, strides, dtype, device })
    }

    fn parse_opt(obj: Option<&Bound<'_, PyAny>>, name: &'static str) -> PyResult<Option<Self>> {
        match obj {
            None => Ok(None),
            Some(o) if o.is_none() => Ok(None),
            Some(o) => Self::parse(o, name).map(Some),
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> usize {
        self.numel() * item_size(&self.dtype).unwrap_or(1)
    }

    /// Checks device, dtype (one of `dtypes`), rank `dims`, then the memory: row-major, aligned, non-null.
    fn expect(&self, dtypes: &[&str], dims: usize) -> PyResult<()> {
        let name = self.name;
        if self.device != "cpu" {
            return Err(PyValueError::new_err(format!(
                "{name}: a tensor on {} reached the native EP buffer, which takes CPU tensors",
                self.device
            )));
        }
        if !dtypes.contains(&self.dtype.as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{name}: dtype {}, expected {}",
                self.dtype,
                dtypes.join(" or ")
            )));
        }
        if self.shape.len() != dims {
            return Err(PyValueError::new_err(format!(
                "{name}: {} dimensions (shape {:?}), expected {dims}",
                self.shape.len(),
                self.shape
            )));
        }
        if !self.row_major() {
            return Err(PyValueError::new_err(format!(
                "{name}: the tensor must be contiguous (strides {:?} for shape {:?})",
                self.strides, self.shape
            )));
        }
        self.check_memory()
    }

    fn check_memory(&self) -> PyResult<()> {
        let size = item_size(&self.dtype).unwrap_or(1);
        if self.numel() > 0 && (self.ptr == 0 || self.ptr % size != 0) {
            return Err(PyValueError::new_err(format!(
                "{}: data pointer {:#x} is null or not aligned to its {size}-byte elements",
                self.name, self.ptr
            )));
        }
        Ok(())
    }

    fn row_major(&self) -> bool {
        let mut want = 1i64;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n > 1 && s != want {
                return false;
            }
            want *= n as i64;
        }
        true
    }

    fn expect_shape(&self, shape: &[usize], what: &str) -> PyResult<()> {
        if self.shape != shape {
            return Err(PyValueError::new_err(format!(
                "{}: shape {:?}, expected {shape:?} ({what})",
                self.name, self.shape
            )));
        }
        Ok(())
    }
}

/// A raw output range the call writes (kept as integers so that a background thread can own it).
#[derive(Debug, Clone, Copy)]
struct Out {
    ptr: usize,
    len: usize,
}

impl Out {
    fn of(t: &TensorArg) -> Self {
        Out { ptr: t.ptr, len: t.numel() }
    }

    /// The range as a typed slice.
    ///
    /// # Safety
    /// `ptr` must be valid for `len` values of `T`, aligned, and not otherwise accessed during the borrow.
    unsafe fn slice_mut<'a, T>(self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the caller's contract (a checked, live, aligned tensor of `len` elements of `T`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len) }
    }

    /// # Safety
    /// As [`Out::slice_mut`], for reading.
    unsafe fn slice<'a, T>(self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller's contract (a checked, live, aligned tensor of `len` elements of `T`).
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) }
    }
}

/// The buffer and its reused outputs, shared with background calls.
struct Shared {
    buffer: EpBuffer,
    /// The dispatch output the EP buffer unpacks into. Its received rows are moved out into an
    /// [`OutputStorage`] after a call (they become the returned tensor) and refilled from `pool`.
    dispatch_out: Mutex<DispatchOutput>,
    /// Received-row storages whose tensors are gone, for the next calls (their pages are already mapped).
    pool: Mutex<Vec<Storage>>,
    /// The last combine's output.
    combined: Mutex<Vec<u16>>,
}

/// Storages kept in the pool (one per in-flight result is enough for a dispatch/combine loop).
const POOL_SIZE: usize = 2;

/// The received rows of a dispatch, owned by the tensor that views them.
#[derive(Debug)]
enum Storage {
    Bf16(Vec<u16>),
    Fp8(Vec<u8>),
}

impl Storage {
    fn ptr_len(&self) -> (*const u8, usize) {
        match self {
            Storage::Bf16(v) => (v.as_ptr().cast(), v.len() * 2),
            Storage::Fp8(v) => (v.as_ptr(), v.len()),
        }
    }
}

impl Shared {
    /// Puts a pooled storage of the right kind and size into the dispatch output (so that the call reuses
    /// mapped pages instead of a fresh zeroed allocation), unless it already holds one.
    fn refill(&self, out: &mut DispatchOutput, fp8: bool, values: usize) {
        let empty = match &out.packed_recv_x {
            RecvX::Bf16(v) => v.is_empty() || fp8,
            RecvX::Fp8 { codes, .. } => codes.is_empty() || !fp8,
        };
        if !empty {
            return;
        }
        let mut pool = sync::lock(&self.pool);
        let found = pool.iter().position(|s| match s {
            Storage::Bf16(v) => !fp8 && v.len() == values,
            Storage::Fp8(v) => fp8 && v.len() == values,
        });
        let Some(at) = found else { return };
        let scales = match std::mem::take(&mut out.packed_recv_x) {
            RecvX::Fp8 { scales, .. } => scales,
            RecvX::Bf16(_) => Vec::new(),
        };
        out.packed_recv_x = match pool.swap_remove(at) {
            Storage::Bf16(v) => RecvX::Bf16(v),
            Storage::Fp8(codes) => RecvX::Fp8 { codes, scales },
        };
    }

    /// Moves the received rows out of the dispatch output (leaving the FP8 scales for reuse).
    fn take_rows(out: &mut DispatchOutput) -> Storage {
        match &mut out.packed_recv_x {
            RecvX::Bf16(v) => Storage::Bf16(std::mem::take(v)),
            RecvX::Fp8 { codes, .. } => Storage::Fp8(std::mem::take(codes)),
        }
    }
}

/// The received rows of one dispatch as a writable bytes buffer (buffer protocol): the Python layer makes
/// `packed_recv_x` of it with `torch.frombuffer`, so the rows are not copied. When the last view is gone the
/// storage goes back to the buffer's pool for a later dispatch.
#[pyclass(module = "mooncake.ep", name = "OutputStorage", frozen)]
pub struct OutputStorage {
    storage: Option<Storage>,
    /// `[len]`, for the buffer protocol's shape and strides (a one-byte item each).
    shape: [ffi::Py_ssize_t; 2],
    shared: Arc<Shared>,
}

#[pymethods]
impl OutputStorage {
    fn __len__(&self) -> usize {
        self.shape[0] as usize
    }

    /// Exposes the rows, writable, through the buffer protocol.
    ///
    /// # Safety
    /// Called by Python with a valid `view` to fill.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null view"));
        }
        let this = slf.get();
        let (ptr, _) = this.storage.as_ref().map(Storage::ptr_len).unwrap_or((std::ptr::null(), 0));
        static FORMAT: &CStr = c"B";
        // SAFETY: `view` is non-null and points to a Py_buffer Python asked us to fill. Every pointer stored in
        // it points into `this` (a frozen object: its storage is never moved or resized while it lives), which
        // the view keeps alive through `obj` (a new strong reference that Python releases with the view).
        unsafe {
            (*view).obj = slf.clone().into_any().into_ptr();
            (*view).buf = ptr as *mut std::ffi::c_void;
            (*view).len = this.shape[0];
            (*view).readonly = 0;
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

    /// Nothing to release per view: the storage goes back to the pool when the object goes.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

impl Drop for OutputStorage {
    fn drop(&mut self) {
        if let Some(storage) = self.storage.take() {
            let mut pool = sync::lock(&self.shared.pool);
            if pool.len() < POOL_SIZE {
                pool.push(storage);
            }
        }
    }
}

/// Errors of a call, carried across a background thread.
#[derive(Debug)]
enum CallError {
    Ep(mooncake_ep::Error),
    Panicked,
}

/// Maps an EP error to a Python exception naming the Python argument.
fn ep_err(e: mooncake_ep::Error) -> PyErr {
    use mooncake_ep::Error as E;
    match &e {
        E::InvalidArgument { arg, reason } => {
            // `hidden` is `x.shape[1]` in Python; the others keep their names.
            let py_arg = if *arg == "hidden" { "x" } else { arg };
            PyValueError::new_err(format!("{py_arg}: {reason}"))
        }
        E::BufferTooSmall { .. } => PyValueError::new_err(format!("num_ep_buffer_bytes: {e}")),
        E::PeerBufferTooSmall { .. } => PyValueError::new_err(format!("num_ep_buffer_bytes: {e}")),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

fn call_err(e: CallError) -> PyErr {
    match e {
        CallError::Ep(e) => ep_err(e),
        CallError::Panicked => PyRuntimeError::new_err("the EP call panicked (a bug: see the log)"),
    }
}

fn timeout_of(timeout_us: i64) -> Duration {
    u64::try_from(timeout_us).map(Duration::from_micros).unwrap_or(NO_TIMEOUT).min(NO_TIMEOUT)
}

/// A dispatch or combine running on its own thread (upstream's `async_finish` / `return_recv_hook`):
/// `wait()` joins it and raises its error. Holds the call's tensors until then; dropping it joins too.
#[pyclass(module = "mooncake.ep", name = "PendingCall")]
pub struct PendingCall {
    thread: Mutex<Option<JoinHandle<Result<(), CallError>>>>,
    /// The tensors the thread reads and writes (released after the join).
    _keep: Vec<Py<PyAny>>,
}

impl PendingCall {
    fn join(&self) -> Option<Result<(), CallError>> {
        let thread = sync::lock(&self.thread).take()?;
        Some(thread.join().unwrap_or(Err(CallError::Panicked)))
    }
}

#[pymethods]
impl PendingCall {
    /// Waits for the call (GIL released) and raises its error; later calls return at once.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        match py.detach(|| self.join()) {
            Some(Err(e)) => Err(call_err(e)),
            _ => Ok(()),
        }
    }

    /// True when the call has finished (or was waited for).
    fn done(&self) -> bool {
        sync::lock(&self.thread).as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        // The thread writes into tensors `_keep` holds: they must outlive it.
        let _ = self.join();
    }
}

/// Runs `f` on the calling thread with the GIL released, or on a new thread (`background`).
fn run_call<F>(py: Python<'_>, background: bool, keep: Vec<Py<PyAny>>, f: F) -> PyResult<Option<PendingCall>>
where
    F: FnOnce() -> Result<(), CallError> + Send + 'static,
{
    if !background {
        return py.detach(f).map(|()| None).map_err(call_err);
    }
    let thread = std::thread::Builder::new()
        .name("mooncake-ep-call".into())
        .spawn(f)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the EP call's thread: {e}")))?;
    Ok(Some(PendingCall { thread: Mutex::new(Some(thread)), _keep: keep }))
}

/// A checked dispatch call, ready to run on any thread.
struct DispatchJob {
    shared: Arc<Shared>,
    x: Out,
    topk_idx: Out,
    active: Out,
    hidden: usize,
    num_topk: usize,
    n: usize,
    num_experts: usize,
    timeout: Duration,
    use_fp8: bool,
    /// The caller's `packed_recv_x` tensor, or None: the rows are moved out and returned.
    recv_x: Option<Out>,
    /// The scales tensor's address and strides (elements), with FP8.
    scales: Option<(usize, [usize; 3])>,
    count: Out,
    src_info: Out,
    layout_range: Out,
}

impl DispatchJob {
    /// Runs the dispatch and fills the outputs; the received rows when no `recv_x` tensor was given.
    fn run(self) -> Result<Option<Storage>, CallError> {
        let (hidden, n, r) = (self.hidden, self.n, self.shared.buffer.num_ranks());
        let rows = r * n;
        // SAFETY: every range below is a tensor the descriptors were checked for (dtype, shape, row-major,
        // aligned, CPU) and that the caller keeps alive for the call (the Python layer holds it; a background
        // call's PendingCall holds it and joins this thread before letting go).
        let (x_bytes, idx, active) =
            unsafe { (self.x.slice::<u8>(), self.topk_idx.slice::<i64>(), self.active.slice_mut::<i32>()) };
        let mut mask = active.to_vec();
        let args = DispatchArgs {
            x: Tokens::Bf16Bytes(x_bytes),
            hidden,
            topk_idx: idx,
            num_topk: self.num_topk,
            num_max_dispatch_tokens_per_rank: n,
            num_experts: self.num_experts,
            timeout: self.timeout,
            use_fp8: self.use_fp8,
        };
        let mut out = sync::lock(&self.shared.dispatch_out);
        if self.recv_x.is_none() {
            let nl = self.num_experts / r.max(1);
            self.shared.refill(&mut out, self.use_fp8, nl * rows * hidden);
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.shared.buffer.dispatch_into(&args, &mut mask, &mut out)
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CallError::Ep(e)),
            Err(_) => return Err(CallError::Panicked),
        }
        // SAFETY: as above.
        unsafe {
            self.count.slice_mut::<i32>().copy_from_slice(&out.packed_recv_count);
            self.src_info.slice_mut::<i32>().copy_from_slice(&out.handle.packed_recv_src_info);
            self.layout_range.slice_mut::<i64>().copy_from_slice(&out.handle.packed_recv_layout_range);
        }
        if let (RecvX::Fp8 { scales: sc, .. }, Some((ptr, [s0, s1, s2]))) = (&out.packed_recv_x, self.scales) {
            let spr = hidden / 128;
            for (le, &c) in out.packed_recv_count.iter().enumerate() {
                for row in le * rows..le * rows + c.max(0) as usize {
                    for j in 0..spr {
                        let at = le * s0 + (row - le * rows) * s1 + j * s2;
                        // SAFETY: `at` indexes the checked [nl, rows, spr] tensor with its own (checked)
                        // strides, so it stays inside its allocation.
                        unsafe { (ptr as *mut f32).add(at).write(sc[row * spr + j]) };
                    }
                }
            }
        }
        active.copy_from_slice(&mask);
        let Some(recv_x) = self.recv_x else {
            return Ok(Some(Shared::take_rows(&mut out)));
        };
        // Only the rows each expert received (the rest is unspecified, as upstream's torch.empty).
        match &out.packed_recv_x {
            RecvX::Bf16(values) => {
                // SAFETY: as above.
                let dst = unsafe { recv_x.slice_mut::<u16>() };
                for (le, &c) in out.packed_recv_count.iter().enumerate() {
                    let span = le * rows * hidden..(le * rows + c.max(0) as usize) * hidden;
                    dst[span.clone()].copy_from_slice(&values[span]);
                }
            }
            RecvX::Fp8 { codes, .. } => {
                // SAFETY: as above.
                let dst = unsafe { recv_x.slice_mut::<u8>() };
                for (le, &c) in out.packed_recv_count.iter().enumerate() {
                    let span = le * rows * hidden..(le * rows + c.max(0) as usize) * hidden;
                    dst[span.clone()].copy_from_slice(&codes[span]);
                }
            }
        }
        Ok(None)
    }
}

/// Upstream's native `mooncake.ep.Buffer`: one rank's registered EP buffer on a transfer engine.
#[pyclass(module = "mooncake.ep", name = "Buffer", frozen)]
pub struct PyEpBuffer {
    shared: Arc<Shared>,
    /// True when this object created the engine (then `shutdown()` stops it).
    own_engine: bool,
}

fn peer_list(peers: &Bound<'_, PyAny>) -> PyResult<Vec<PeerInfo>> {
    let mut out = Vec::new();
    for item in peers.try_iter()? {
        let item = item?;
        let (segment, addr, len, seq): (String, u64, u64, u64) = item.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "peers: each entry must be (segment, addr, len, seq) from get_local_info(), got {}",
                type_name(&item)
            ))
        })?;
        out.push(PeerInfo { segment, addr, len, seq });
    }
    Ok(out)
}

impl PyEpBuffer {
    fn buffer(&self) -> &EpBuffer {
        &self.shared.buffer
    }

    /// Reads and checks the `active_ranks` descriptor (`int32`, one per rank).
    fn active_arg(&self, active_ranks: &Bound<'_, PyAny>) -> PyResult<Out> {
        let a = TensorArg::parse(active_ranks, "active_ranks")?;
        a.expect(&["int32"], 1)?;
        a.expect_shape(&[self.buffer().num_ranks()], "one entry per rank")?;
        Ok(Out::of(&a))
    }
}

#[pymethods]
impl PyEpBuffer {
    /// Registers a buffer of `num_ep_buffer_bytes` for rank `rank` of `num_ranks`. `engine` (an
    /// `InnerTransferEngine` from `TransferEngine.get_engine()`) is used when given; otherwise the buffer
    /// starts an engine of its own on `local_hostname` in P2P mode over `protocol`, with the same-host
    /// transports (shm) next to it unless `same_host_transports` is false.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (rank, num_ranks, num_ep_buffer_bytes, engine = None, protocol = "tcp",
                        local_hostname = "127.0.0.1", same_host_transports = true))]
    fn new(
        py: Python<'_>,
        rank: usize,
        num_ranks: usize,
        num_ep_buffer_bytes: u64,
        engine: Option<&Bound<'_, PyAny>>,
        protocol: &str,
        local_hostname: &str,
        same_host_transports: bool,
    ) -> PyResult<Self> {
        let (engine, own_engine) =
            engine_for(py, engine, protocol, local_hostname, same_host_transports, "EP buffer's")?;
        let buffer = EpBuffer::new(&engine, rank, num_ranks, num_ep_buffer_bytes).map_err(ep_err)?;
        Ok(PyEpBuffer {
            shared: Arc::new(Shared {
                buffer,
                dispatch_out: Mutex::new(DispatchOutput::default()),
                pool: Mutex::new(Vec::new()),
                combined: Mutex::new(Vec::new()),
            }),
            own_engine,
        })
    }

    /// This rank.
    #[getter]
    fn rank(&self) -> usize {
        self.buffer().rank()
    }

    /// Ranks in the group.
    #[getter]
    fn num_ranks(&self) -> usize {
        self.buffer().num_ranks()
    }

    /// Bytes of the registered buffer.
    #[getter]
    fn num_ep_buffer_bytes(&self) -> u64 {
        self.buffer().num_ep_buffer_bytes()
    }

    /// The engine's segment name (`host:port`).
    #[getter]
    fn segment_name(&self) -> String {
        self.buffer().engine().local_segment_name().to_string()
    }

    /// The transports the engine runs.
    fn protocols(&self) -> Vec<String> {
        self.buffer().engine().protocols()
    }

    /// Calls made so far in step with the group.
    fn sequence(&self) -> u64 {
        self.buffer().sequence()
    }

    /// What the other ranks need: `(segment, addr, len, seq)`; exchange it and pass every rank's to `connect`.
    fn get_local_info(&self) -> (String, u64, u64, u64) {
        let p = self.buffer().local_info();
        (p.segment, p.addr, p.len, p.seq)
    }

    /// Takes every rank's `get_local_info()` (index = rank).
    fn connect(&self, peers: &Bound<'_, PyAny>) -> PyResult<()> {
        self.buffer().connect(&peer_list(peers)?).map_err(ep_err)
    }

    /// Upstream's `update_ep_member`: every rank passes the new list after a rank was replaced.
    fn update_ep_member(&self, peers: &Bound<'_, PyAny>) -> PyResult<()> {
        self.buffer().update_ep_member(&peer_list(peers)?).map_err(ep_err)
    }

    /// Upstream's low-latency dispatch into the given output tensors (allocated by the caller as upstream's
    /// Python does): `packed_recv_x` `[L, R*N, hidden]` bfloat16 (float8_e4m3fn with `use_fp8`; None: the
    /// rows are returned as an `OutputStorage`, without a copy, and the call must not be `background`),
    /// `packed_recv_x_scales` `[L, R*N, hidden/128]` float32 (row-major or upstream's transposed layout; FP8
    /// only), `packed_recv_count` `[L]` int32, `packed_recv_src_info` `[L, R*N]` int32,
    /// `packed_recv_layout_range` `[L, R]` int64. Rows past an expert's count are left as they were.
    /// `active_ranks` (int32, one per rank) is read and updated. `timeout_us < 0` waits without a limit.
    /// Returns `(PendingCall or None, OutputStorage or None)`: `background=True` gives a `PendingCall` (which
    /// holds `keep`, the tensors, until joined).
    #[pyo3(signature = (x, topk_idx, active_ranks, num_max_dispatch_tokens_per_rank, num_experts, timeout_us,
                        use_fp8, packed_recv_x, packed_recv_x_scales, packed_recv_count, packed_recv_src_info,
                        packed_recv_layout_range, background = false, keep = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        topk_idx: &Bound<'_, PyAny>,
        active_ranks: &Bound<'_, PyAny>,
        num_max_dispatch_tokens_per_rank: usize,
        num_experts: usize,
        timeout_us: i64,
        use_fp8: bool,
        packed_recv_x: Option<&Bound<'_, PyAny>>,
        packed_recv_x_scales: Option<&Bound<'_, PyAny>>,
        packed_recv_count: &Bound<'_, PyAny>,
        packed_recv_src_info: &Bound<'_, PyAny>,
        packed_recv_layout_range: &Bound<'_, PyAny>,
        background: bool,
        keep: Vec<Py<PyAny>>,
    ) -> PyResult<(Option<PendingCall>, Option<Py<OutputStorage>>)> {
        let r = self.buffer().num_ranks();
        let n = num_max_dispatch_tokens_per_rank;
        let xa = TensorArg::parse(x, "x")?;
        xa.expect(&["bfloat16"], 2)?;
        let (num_tokens, hidden) = (xa.shape[0], xa.shape[1]);
        // Scalar arguments first (experts divisible by ranks, hidden, N), so that a bad one is named
        // rather than the output shapes derived from it.
        let layout = BufferLayout::new(n, hidden, r, num_experts).map_err(ep_err)?;
        if use_fp8 && hidden % 128 != 0 {
            return Err(PyValueError::new_err(format!("x: hidden = {hidden} is not a multiple of 128 (use_fp8)")));
        }
        if num_tokens > n {
            return Err(PyValueError::new_err(format!(
                "x: {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank = {n}"
            )));
        }
        let idx = TensorArg::parse(topk_idx, "topk_idx")?;
        idx.expect(&["int64"], 2)?;
        if idx.shape[0] != num_tokens || idx.shape[1] == 0 {
            return Err(PyValueError::new_err(format!(
                "topk_idx: shape {:?}, expected [{num_tokens}, num_topk >= 1] (one row per token of x)",
                idx.shape
            )));
        }
        let num_topk = idx.shape[1];
        let active = self.active_arg(active_ranks)?;

        let nl = layout.num_local_experts;
        let rows = r * n;
        let recv = TensorArg::parse_opt(packed_recv_x, "packed_recv_x")?;
        if let Some(recv) = &recv {
            recv.expect(&[if use_fp8 { "float8_e4m3fn" } else { "bfloat16" }], 3)?;
            recv.expect_shape(&[nl, rows, hidden], "[num_local_experts, num_ranks * N, hidden]")?;
        }
        let scales = TensorArg::parse_opt(packed_recv_x_scales, "packed_recv_x_scales")?;
        let scales = match (use_fp8, scales) {
            (true, Some(s)) => {
                if s.device != "cpu" || s.dtype != "float32" {
                    return Err(PyTypeError::new_err(format!(
                        "packed_recv_x_scales: a float32 CPU tensor is needed, got {} on {}",
                        s.dtype, s.device
                    )));
                }
                let spr = hidden / 128;
                s.expect_shape(&[nl, rows, spr], "[num_local_experts, num_ranks * N, hidden / 128]")?;
                let (a, b, c) = (s.strides[0], s.strides[1], s.strides[2]);
                let contiguous = s.row_major();
                let transposed = a == (spr * rows) as i64 && b == 1 && c == rows as i64;
                if !contiguous && !transposed {
                    return Err(PyValueError::new_err(format!(
                        "packed_recv_x_scales: strides {:?} are neither row-major nor upstream's transposed layout",
                        s.strides
                    )));
                }
                s.check_memory()?;
                Some((s.ptr, [a as usize, b as usize, c as usize]))
            }
            (true, None) => return Err(PyValueError::new_err("packed_recv_x_scales: needed with use_fp8")),
            (false, _) => None,
        };
        let count = TensorArg::parse(packed_recv_count, "packed_recv_count")?;
        count.expect(&["int32"], 1)?;
        count.expect_shape(&[nl], "[num_local_experts]")?;
        let src = TensorArg::parse(packed_recv_src_info, "packed_recv_src_info")?;
        src.expect(&["int32"], 2)?;
        src.expect_shape(&[nl, rows], "[num_local_experts, num_ranks * N]")?;
        let range = TensorArg::parse(packed_recv_layout_range, "packed_recv_layout_range")?;
        range.expect(&["int64"], 2)?;
        range.expect_shape(&[nl, r], "[num_local_experts, num_ranks]")?;

        let job = DispatchJob {
            shared: self.shared.clone(),
            x: Out { ptr: xa.ptr, len: xa.bytes() },
            topk_idx: Out::of(&idx),
            active,
            hidden,
            num_topk,
            n,
            num_experts,
            timeout: timeout_of(timeout_us),
            use_fp8,
            recv_x: recv.as_ref().map(Out::of),
            scales,
            count: Out::of(&count),
            src_info: Out::of(&src),
            layout_range: Out::of(&range),
        };
        if recv.is_none() {
            if background {
                return Err(PyValueError::new_err("packed_recv_x: needed for a background call"));
            }
            let shared = self.shared.clone();
            let storage = py.detach(move || job.run()).map_err(call_err)?;
            let storage = storage.ok_or_else(|| PyRuntimeError::new_err("the dispatch returned no rows"))?;
            let (_, len) = storage.ptr_len();
            let out = OutputStorage { storage: Some(storage), shape: [len as ffi::Py_ssize_t, 1], shared };
            return Ok((None, Some(Py::new(py, out)?)));
        }
        let pending = run_call(py, background, keep, move || job.run().map(|_| ()))?;
        Ok((pending, None))
    }

    /// Upstream's low-latency combine into `out` (`[num_tokens, hidden]` bfloat16). `x` is the expert
    /// output `[L, R*N, hidden]` bfloat16, or None with `zero_copy` (the rows were written into
    /// `get_next_combine_buffer`). `src_info`, `layout_range`, `num_max_dispatch_tokens_per_rank`, `hidden`
    /// and `num_experts` are the dispatch's handle. `active_ranks`, `timeout_us`, `background` as for dispatch.
    #[pyo3(signature = (x, topk_idx, topk_weights, src_info, layout_range, active_ranks,
                        num_max_dispatch_tokens_per_rank, hidden, num_experts, timeout_us, zero_copy, out,
                        background = false, keep = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        py: Python<'_>,
        x: Option<&Bound<'_, PyAny>>,
        topk_idx: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        src_info: &Bound<'_, PyAny>,
        layout_range: &Bound<'_, PyAny>,
        active_ranks: &Bound<'_, PyAny>,
        num_max_dispatch_tokens_per_rank: usize,
        hidden: usize,
        num_experts: usize,
        timeout_us: i64,
        zero_copy: bool,
        out: &Bound<'_, PyAny>,
        background: bool,
        keep: Vec<Py<PyAny>>,
    ) -> PyResult<Option<PendingCall>> {
        let r = self.buffer().num_ranks();
        let n = num_max_dispatch_tokens_per_rank;
        let layout = BufferLayout::new(n, hidden, r, num_experts).map_err(|e| match e {
            mooncake_ep::Error::InvalidArgument { reason, .. } => {
                PyValueError::new_err(format!("handle: {reason} (the handle is not a dispatch's)"))
            }
            e => ep_err(e),
        })?;
        let (nl, rows) = (layout.num_local_experts, r * n);
        let x_in = match (zero_copy, TensorArg::parse_opt(x, "x")?) {
            (true, _) => None,
            (false, None) => return Err(PyValueError::new_err("x: the expert outputs are needed unless zero_copy")),
            (false, Some(xa)) => {
                xa.expect(&["bfloat16"], 3)?;
                xa.expect_shape(&[nl, rows, hidden], "[num_local_experts, num_ranks * N, hidden] of the handle")?;
                Some(Out::of(&xa))
            }
        };
        let idx = TensorArg::parse(topk_idx, "topk_idx")?;
        idx.expect(&["int64"], 2)?;
        let (num_tokens, num_topk) = (idx.shape[0], idx.shape[1]);
        if num_topk == 0 {
            return Err(PyValueError::new_err("topk_idx: num_topk = 0"));
        }
        let w = TensorArg::parse(topk_weights, "topk_weights")?;
        w.expect(&["float32"], 2)?;
        w.expect_shape(&idx.shape, "the shape of topk_idx")?;
        let si = TensorArg::parse(src_info, "handle")?;
        si.expect(&["int32"], 2)?;
        si.expect_shape(&[nl, rows], "src_info [num_local_experts, num_ranks * N]")?;
        let lr = TensorArg::parse(layout_range, "handle")?;
        lr.expect(&["int64"], 2)?;
        lr.expect_shape(&[nl, r], "layout_range [num_local_experts, num_ranks]")?;
        let active = self.active_arg(active_ranks)?;
        let o = TensorArg::parse(out, "out")?;
        o.expect(&["bfloat16"], 2)?;
        o.expect_shape(&[num_tokens, hidden], "[num_tokens, hidden]")?;

        let (idx_in, w_in, si_in, lr_in, out_t) = (Out::of(&idx), Out::of(&w), Out::of(&si), Out::of(&lr), Out::of(&o));
        let shared = self.shared.clone();
        let timeout = timeout_of(timeout_us);
        run_call(py, background, keep, move || {
            // SAFETY: every range is a tensor checked above and kept alive by the caller for the call (see
            // `dispatch`).
            let (idx, weights, active) =
                unsafe { (idx_in.slice::<i64>(), w_in.slice::<f32>(), active.slice_mut::<i32>()) };
            // SAFETY: as above.
            let (src_info, ranges) = unsafe { (si_in.slice::<i32>().to_vec(), lr_in.slice::<i64>().to_vec()) };
            let handle = DispatchHandle {
                packed_recv_src_info: src_info,
                packed_recv_layout_range: ranges,
                num_max_dispatch_tokens_per_rank: n,
                hidden,
                num_experts,
            };
            let input = match x_in {
                // SAFETY: as above.
                Some(x) => CombineInput::Rows(unsafe { x.slice::<u16>() }),
                None => CombineInput::ZeroCopy,
            };
            let args =
                CombineArgs { x: input, topk_idx: idx, topk_weights: weights, num_topk, handle: &handle, timeout };
            let mut mask = active.to_vec();
            let mut combined = sync::lock(&shared.combined);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                shared.buffer.combine_into(&args, &mut mask, &mut combined)
            }));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(CallError::Ep(e)),
                Err(_) => return Err(CallError::Panicked),
            }
            // SAFETY: as above.
            unsafe { out_t.slice_mut::<u16>() }.copy_from_slice(&combined);
            active.copy_from_slice(&mask);
            Ok(())
        })
    }

    /// Upstream's `get_next_combine_buffer`: `(address, bytes)` of the zero-copy combine rows for the
    /// combine following the dispatch whose handle this is, `[L, R*N, hidden]` bfloat16 inside the
    /// registered buffer. Write them between that dispatch and `combine(..., zero_copy=True)`.
    fn get_next_combine_buffer(
        &self,
        num_max_dispatch_tokens_per_rank: usize,
        hidden: usize,
        num_experts: usize,
    ) -> PyResult<(u64, u64)> {
        let handle = DispatchHandle { num_max_dispatch_tokens_per_rank, hidden, num_experts, ..Default::default() };
        let addr = self.buffer().next_combine_buffer_addr(&handle).map_err(ep_err)?;
        let r = self.buffer().num_ranks() as u64;
        let bytes = (num_experts as u64 / r) * r * num_max_dispatch_tokens_per_rank as u64 * hidden as u64 * 2;
        Ok((addr, bytes))
    }

    /// Stops the engine this buffer started (an engine passed in is left running). Later calls fail.
    fn shutdown(&self, py: Python<'_>) {
        if self.own_engine {
            let engine = self.buffer().engine().clone();
            py.detach(move || engine.shutdown());
        }
    }

    fn __repr__(&self) -> String {
        let b = self.buffer();
        format!(
            "mooncake.ep.Buffer(rank={}, num_ranks={}, num_ep_buffer_bytes={}, segment={:?})",
            b.rank(),
            b.num_ranks(),
            b.num_ep_buffer_bytes(),
            b.engine().local_segment_name()
        )
    }
}

/// Upstream's `get_ep_buffer_size_hint`: bytes of the EP buffer for these call parameters.
#[pyfunction]
fn get_ep_buffer_size_hint(
    num_max_dispatch_tokens_per_rank: usize,
    hidden: usize,
    num_ranks: usize,
    num_experts: usize,
) -> PyResult<u64> {
    BufferLayout::new(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).map_err(ep_err)?;
    Ok(mooncake_ep::size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts))
}

/// Adds the EP classes and functions to the extension module (re-exported by `mooncake.ep`).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let ep = PyModule::new(m.py(), "ep")?;
    ep.add_class::<PyEpBuffer>()?;
    ep.add_class::<PendingCall>()?;
    ep.add_class::<OutputStorage>()?;
    ep.add_function(wrap_pyfunction!(get_ep_buffer_size_hint, &ep)?)?;
    m.add_submodule(&ep)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(shape: &[usize], strides: &[i64]) -> TensorArg {
        TensorArg {
            name: "x",
            ptr: 64,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            dtype: "bfloat16".into(),
            device: "cpu".into(),
        }
    }

    #[test]
    fn row_major_ignores_unit_dimensions() {
        assert!(arg(&[4, 8], &[8, 1]).row_major());
        assert!(arg(&[1, 8], &[999, 1]).row_major());
        assert!(!arg(&[4, 8], &[1, 4]).row_major());
        assert!(arg(&[0, 8], &[8, 1]).row_major());
    }

    #[test]
    fn negative_timeouts_wait_without_limit() {
        assert_eq!(timeout_of(-1), NO_TIMEOUT);
        assert_eq!(timeout_of(1500), Duration::from_micros(1500));
        assert_eq!(timeout_of(i64::MAX), NO_TIMEOUT);
    }
}
