//! Python objects as memory: integer addresses (upstream's convention) and objects with the buffer protocol
//! (bytes, bytearray, memoryview, numpy arrays), and lengths that must not be negative.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyMemoryView};

/// Exports `obj`'s buffer. Objects that leave `strides` out of their export (ctypes arrays do, meaning
/// C-contiguous) are read through a `memoryview`, which fills them in; `None` when `obj` has no buffer.
fn export(obj: &Bound<'_, PyAny>) -> Option<PyUntypedBuffer> {
    if let Ok(buf) = PyUntypedBuffer::get(obj) {
        return Some(buf);
    }
    let view = PyMemoryView::from(obj).ok()?;
    PyUntypedBuffer::get(view.as_any()).ok()
}

/// The bytes of a value argument (`put(key, value)`): a `bytes` object is read in place, anything else
/// through the buffer protocol (which must be C-contiguous). The view holds the exporter until dropped.
pub struct ValueView {
    ptr: usize,
    len: usize,
    /// Keeps a buffer-protocol export (and so the memory) alive; `None` for `bytes`.
    _export: Option<PyUntypedBuffer>,
    /// Keeps a `bytes` object alive.
    _bytes: Option<Py<PyBytes>>,
}

impl ValueView {
    /// Views `obj`; a TypeError names the argument when it is neither bytes nor a contiguous buffer.
    pub fn new(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Self> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            let s = b.as_bytes();
            return Ok(ValueView {
                ptr: s.as_ptr() as usize,
                len: s.len(),
                _export: None,
                _bytes: Some(b.clone().unbind()),
            });
        }
        let buf = export(obj).ok_or_else(|| {
            PyTypeError::new_err(format!(
                "{arg}: expected bytes, bytearray, memoryview or another object with the buffer protocol, got {}",
                type_name(obj)
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err(format!("{arg}: the buffer must be C-contiguous")));
        }
        Ok(ValueView { ptr: buf.buf_ptr() as usize, len: buf.len_bytes(), _export: Some(buf), _bytes: None })
    }

    /// The viewed bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr`/`len` describe the memory of a `bytes` object or of a buffer export that `self` keeps
        // alive (`_bytes` / `_export`), so the range stays valid and unmoved for the borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

/// An address argument: a non-negative int (upstream's convention), or an object with the buffer protocol,
/// meaning its first byte (it must be C-contiguous, and writable when the call writes into it). The object
/// stays exported while the value lives.
pub struct AddrArg {
    /// The address.
    pub addr: u64,
    /// Length of the exported buffer, when one was given.
    pub buffer_len: Option<u64>,
    _export: Option<PyUntypedBuffer>,
}

impl AddrArg {
    /// Reads `obj` as an address; `writable` refuses read-only buffers (a destination).
    pub fn new(obj: &Bound<'_, PyAny>, arg: &str, writable: bool) -> PyResult<Self> {
        if obj.is_instance_of::<PyInt>() {
            let addr = obj.extract::<u64>().map_err(|_| {
                PyTypeError::new_err(format!("{arg}: an address must be an int in [0, 2**64), got {obj}"))
            })?;
            return Ok(AddrArg { addr, buffer_len: None, _export: None });
        }
        let buf = export(obj).ok_or_else(|| {
            PyTypeError::new_err(format!(
                "{arg}: expected an int address or an object with the buffer protocol, got {}",
                type_name(obj)
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err(format!("{arg}: the buffer must be C-contiguous")));
        }
        if writable && buf.readonly() {
            return Err(PyBufferError::new_err(format!("{arg}: the buffer is read-only but the call writes into it")));
        }
        Ok(AddrArg { addr: buf.buf_ptr() as u64, buffer_len: Some(buf.len_bytes() as u64), _export: Some(buf) })
    }
}

impl AddrArg {
    /// False when a buffer object was given and `len` runs past its end.
    pub fn fits(&self, len: u64) -> bool {
        self.buffer_len.is_none_or(|cap| len <= cap)
    }
}

/// Reads a length argument: ints only; negative lengths give `None` (callers turn that into their error code).
pub fn length(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Option<u64>> {
    if !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!("{arg}: expected an int, got {}", type_name(obj))));
    }
    match obj.extract::<i128>() {
        Ok(v) if v < 0 => Ok(None),
        Ok(v) => Ok(u64::try_from(v).ok()),
        Err(_) => Ok(None),
    }
}

/// The Python type name of `obj`, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}
