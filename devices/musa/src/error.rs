//! [`MusaError`]: what went wrong loading or calling the MUSA runtime, and how it maps to
//! [`mooncake_core::Error`].

use std::sync::Arc;

use mooncake_core::Error;

/// A failure of the MUSA runtime or of loading it.
///
/// Every public function of this crate returns [`mooncake_core::Error`]; this type is its source (kept inside
/// [`Error::Io`] for runtime failures that have no better typed variant) and what [`crate::probe`] reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MusaError {
    /// No candidate of the library could be opened.
    #[error("{library} not found (no MUSA runtime on this machine)")]
    LibraryNotFound {
        /// The library looked for (`libmusart.so`).
        library: &'static str,
        /// Every name and path tried, in order.
        tried: Vec<&'static str>,
        /// What the dynamic loader said for each.
        detail: String,
    },
    /// The library opened but lacks an entry point this crate needs.
    #[error("{library} has no symbol {symbol} (not a MUSA runtime, or one too old): {detail}")]
    MissingSymbol {
        /// The library that was opened.
        library: &'static str,
        /// The missing entry point.
        symbol: &'static str,
        /// What the dynamic loader said.
        detail: String,
    },
    /// The runtime sees no device.
    #[error("no MUSA device")]
    NoDevice,
    /// A runtime or driver call returned an error.
    #[error("{call} failed: {name} ({code}): {description}")]
    Call {
        /// The entry point (`musaMalloc`).
        call: &'static str,
        /// The `musaError_t` (or driver `MUresult`) value.
        code: i32,
        /// Its name (`musaErrorMemoryAllocation`), from `musaGetErrorName`.
        name: String,
        /// Its description, from `musaGetErrorString`.
        description: String,
    },
}

/// What a failed call means to a caller, decided from the error's name (its number is not relied upon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    NoSpace,
    NoDevice,
    InvalidArgument,
    Unsupported,
    Unavailable,
    Other,
}

pub(crate) fn call_kind(name: &str) -> CallKind {
    match name {
        "musaErrorMemoryAllocation" | "MUSA_ERROR_OUT_OF_MEMORY" => CallKind::NoSpace,
        "musaErrorInvalidDevice" | "musaErrorNoDevice" | "MUSA_ERROR_INVALID_DEVICE" | "MUSA_ERROR_NO_DEVICE" => {
            CallKind::NoDevice
        }
        "musaErrorInvalidValue"
        | "musaErrorInvalidDevicePointer"
        | "musaErrorInvalidMemcpyDirection"
        | "musaErrorInvalidResourceHandle"
        | "musaErrorMapBufferObjectFailed"
        | "MUSA_ERROR_INVALID_VALUE"
        | "MUSA_ERROR_NOT_FOUND" => CallKind::InvalidArgument,
        "musaErrorNotSupported" | "musaErrorPeerAccessUnsupported" | "MUSA_ERROR_NOT_SUPPORTED" => {
            CallKind::Unsupported
        }
        "musaErrorInsufficientDriver"
        | "musaErrorInitializationError"
        | "musaErrorDevicesUnavailable"
        | "musaErrorMusartUnloading"
        | "musaErrorSystemDriverMismatch"
        | "MUSA_ERROR_NOT_INITIALIZED"
        | "MUSA_ERROR_DEINITIALIZED" => CallKind::Unavailable,
        _ => CallKind::Other,
    }
}

impl From<MusaError> for Error {
    fn from(e: MusaError) -> Self {
        let kind = match &e {
            MusaError::LibraryNotFound { .. } | MusaError::MissingSymbol { .. } | MusaError::NoDevice => {
                CallKind::Unavailable
            }
            MusaError::Call { name, .. } => call_kind(name),
        };
        match kind {
            CallKind::NoSpace => Error::NoSpace(e.to_string()),
            CallKind::NoDevice => Error::DeviceNotFound(e.to_string()),
            CallKind::InvalidArgument => Error::InvalidArgument(e.to_string()),
            CallKind::Unsupported => Error::unsupported(e.to_string(), crate::DEVICE_NAME),
            CallKind::Unavailable => Error::unavailable(e.to_string()),
            CallKind::Other => Error::Io(Arc::new(std::io::Error::other(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str) -> MusaError {
        MusaError::Call { call: "musaMalloc", code: 2, name: name.into(), description: "out of memory".into() }
    }

    #[test]
    fn runtime_errors_map_to_typed_core_errors() {
        assert!(matches!(Error::from(call("musaErrorMemoryAllocation")), Error::NoSpace(_)));
        assert!(matches!(Error::from(call("musaErrorInvalidDevice")), Error::DeviceNotFound(_)));
        assert!(matches!(Error::from(call("musaErrorInvalidValue")), Error::InvalidArgument(_)));
        assert!(matches!(Error::from(call("musaErrorNotSupported")), Error::Unsupported { .. }));
        assert!(matches!(Error::from(call("musaErrorInsufficientDriver")), Error::Unavailable { .. }));
        let e = Error::from(call("musaErrorLaunchFailure"));
        let Error::Io(io) = &e else { panic!("{e:?}") };
        let inner = io.get_ref().and_then(|s| s.downcast_ref::<MusaError>());
        assert_eq!(inner, Some(&call("musaErrorLaunchFailure")), "the MUSA error stays the source");
    }

    #[test]
    fn loader_errors_are_unavailable_and_name_the_library() {
        let e = MusaError::LibraryNotFound { library: "libmusart.so", tried: vec!["libmusart.so"], detail: "x".into() };
        assert_eq!(e.to_string(), "libmusart.so not found (no MUSA runtime on this machine)");
        assert!(matches!(Error::from(e), Error::Unavailable { reason } if reason.contains("libmusart.so")));
        let e = MusaError::MissingSymbol { library: "libmusart.so.1", symbol: "musaMalloc", detail: "y".into() };
        let msg = Error::from(e).to_string();
        assert!(msg.contains("libmusart.so.1") && msg.contains("musaMalloc"), "{msg}");
        assert_eq!(MusaError::NoDevice.to_string(), "no MUSA device");
    }

    #[test]
    fn call_errors_say_what_failed() {
        let e = call("musaErrorMemoryAllocation");
        assert_eq!(e.to_string(), "musaMalloc failed: musaErrorMemoryAllocation (2): out of memory");
    }
}
