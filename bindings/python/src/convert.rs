//! Argument conversion with upstream's rules. Upstream's classes are pybind11 bindings, and scripts rely on
//! how pybind11 converts: an unsigned field refuses negative and oversized ints with `TypeError` (not
//! `OverflowError`), and a `bool` field takes `None` (false) and anything with a number truth value (ints,
//! floats, numpy bools) but not strings.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};

use crate::buffers::type_name;

/// An unsigned 64-bit value: an int (bools count, as in Python) in `[0, 2**64)`, else `TypeError`.
pub fn unsigned(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<u64>() {
            return Ok(v);
        }
        return Err(PyTypeError::new_err(format!("{what}: {obj} is not an unsigned 64-bit integer")));
    }
    Err(PyTypeError::new_err(format!("{what}: expected an int, got {}", type_name(obj))))
}

/// An unsigned 64-bit argument converted by [`unsigned`]'s rules (negative ints are a `TypeError`), for
/// parameters with an integer default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsigned(pub u64);

impl<'a, 'py> FromPyObject<'a, 'py> for Unsigned {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        unsigned(&obj, "argument").map(Unsigned)
    }
}

/// A bool as pybind11 reads one: `True`/`False`, `None` (false), or a number's truth value.
pub fn truth(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<bool> {
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(b.is_true());
    }
    if obj.is_none() {
        return Ok(false);
    }
    let numeric = obj.is_instance_of::<PyInt>()
        || obj.is_instance_of::<PyFloat>()
        || type_name(obj) == "bool_" // numpy.bool_
        || obj.hasattr("__index__").unwrap_or(false);
    if numeric {
        return obj.is_truthy();
    }
    Err(PyTypeError::new_err(format!("{what}: expected a bool, got {}", type_name(obj))))
}

/// Gives simple pyo3 enums the `name` and `value` attributes pybind11 enums have (upstream's enums are
/// pybind11 ones: `ReplicaStatus.COMPLETE.name == "COMPLETE"`, `.value == 3`).
macro_rules! name_and_value {
    ($ty:ty { $($variant:ident),* $(,)? }) => {
        #[pyo3::pymethods]
        impl $ty {
            /// The member's name, as upstream's enums have it.
            #[getter]
            fn name(&self) -> &'static str {
                match self {
                    $(Self::$variant => stringify!($variant)),*
                }
            }

            /// The member's integer value, as upstream's enums have it.
            #[getter]
            fn value(&self) -> i64 {
                *self as i64
            }
        }
    };
}

pub(crate) use name_and_value;
