//! Small helpers shared by the entry points: panic fences and C string reading.

use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f`, turning a panic into `on_panic` so no unwind crosses into C.
pub(crate) fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// The UTF-8 string at `p`; `None` for null or invalid UTF-8.
///
/// The caller of the C function guarantees that a non-null `p` points at a NUL-terminated string that lives
/// for the call (upstream's convention: "char *" parameters are not used after the call returns).
pub(crate) fn str_arg<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, and by the C API's contract a NUL-terminated string valid for the duration of the call.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// Copies `s` and a NUL into `buf[..len]`; false when null, empty or too small.
pub(crate) fn write_str(s: &str, buf: *mut c_char, len: usize) -> bool {
    if buf.is_null() || len == 0 || s.len() >= len {
        return false;
    }
    // SAFETY: `buf` is non-null and by contract holds `len` writable bytes; we write `s.len() + 1 <= len` of them.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
    }
    true
}

/// The `n` elements at `p` as a slice; `None` for null with `n > 0` (an empty slice for `n == 0`).
///
/// The caller of the C function guarantees that a non-null `p` points at `n` initialized elements.
pub(crate) fn slice_arg<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if n == 0 {
        return Some(&[]);
    }
    if p.is_null() || n > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return None;
    }
    // SAFETY: non-null, size checked against isize::MAX, and by contract `n` initialized elements of `T`.
    Some(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Writable view of the `n` elements at `p`; `None` for null with `n > 0`.
pub(crate) fn slice_out<'a, T>(p: *mut T, n: usize) -> Option<&'a mut [T]> {
    if n == 0 {
        return Some(&mut []);
    }
    if p.is_null() || n > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return None;
    }
    // SAFETY: non-null, size checked, and by contract `n` writable elements of `T` not aliased during the call.
    Some(unsafe { std::slice::from_raw_parts_mut(p, n) })
}
