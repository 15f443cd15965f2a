//! [`RocmError`]: what can go wrong loading or calling the HIP runtime, and how it maps onto
//! [`mooncake_core::Error`].

use std::sync::Arc;

use mooncake_core::Error;

use crate::ffi;

/// An error of the HIP runtime or of loading it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RocmError {
    /// No candidate file name of the HIP runtime could be loaded.
    #[error("libamdhip64.so not found (no ROCm runtime on this machine); tried {tried}")]
    LibraryNotFound {
        /// Each name tried, with the loader's reason.
        tried: String,
    },
    /// The library loaded but lacks an entry point this crate needs (a ROCm older than 6.0, or not HIP).
    #[error("{library} has no symbol {symbol} (ROCm 6.0 or newer is required)")]
    MissingSymbol {
        /// The library that was loaded.
        library: String,
        /// The missing entry point.
        symbol: &'static str,
    },
    /// The runtime loaded but sees no GPU.
    #[error("no AMD GPU: {0}")]
    NoDevice(String),
    /// A HIP call returned an error.
    #[error("{call} failed: {name} ({code}): {message}")]
    Hip {
        /// The HIP function that failed.
        call: &'static str,
        /// Its `hipError_t`.
        code: i32,
        /// `hipGetErrorName`.
        name: String,
        /// `hipGetErrorString`.
        message: String,
    },
}

impl RocmError {
    /// The `hipError_t` of a failed HIP call.
    pub fn hip_code(&self) -> Option<i32> {
        match self {
            RocmError::Hip { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<RocmError> for Error {
    fn from(e: RocmError) -> Self {
        let code = match &e {
            RocmError::LibraryNotFound { .. } | RocmError::MissingSymbol { .. } | RocmError::NoDevice(_) => {
                return Error::unavailable(e.to_string());
            }
            RocmError::Hip { code, .. } => *code,
        };
        match code {
            ffi::hipErrorOutOfMemory => Error::NoSpace(e.to_string()),
            ffi::hipErrorNoDevice | ffi::hipErrorInvalidDevice => Error::DeviceNotFound(e.to_string()),
            ffi::hipErrorNotSupported => match e {
                RocmError::Hip { call, .. } => Error::unsupported(call, crate::DEVICE_NAME),
                _ => unreachable!("only Hip errors carry a code"),
            },
            ffi::hipErrorInvalidValue
            | ffi::hipErrorInvalidDevicePointer
            | ffi::hipErrorInvalidHandle
            | ffi::hipErrorNotFound
            | ffi::hipErrorMapFailed => Error::InvalidArgument(e.to_string()),
            ffi::hipErrorNotInitialized | ffi::hipErrorInsufficientDriver => Error::unavailable(e.to_string()),
            _ => Error::Io(Arc::new(std::io::Error::other(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hip(code: i32) -> RocmError {
        RocmError::Hip { call: "hipMalloc", code, name: "hipErrorX".into(), message: "what".into() }
    }

    #[test]
    fn messages_name_the_library_and_the_call() {
        let e = RocmError::LibraryNotFound { tried: "libamdhip64.so (nope)".into() };
        assert!(e.to_string().starts_with("libamdhip64.so not found (no ROCm runtime on this machine)"));
        let e = RocmError::MissingSymbol { library: "libamdhip64.so.6".into(), symbol: "hipMemcpy" };
        assert!(e.to_string().contains("libamdhip64.so.6") && e.to_string().contains("hipMemcpy"));
        assert_eq!(hip(2).to_string(), "hipMalloc failed: hipErrorX (2): what");
        assert_eq!(hip(2).hip_code(), Some(2));
        assert_eq!(RocmError::NoDevice("x".into()).hip_code(), None);
    }

    #[test]
    fn maps_onto_core_errors_a_caller_can_act_on() {
        let e: Error = RocmError::LibraryNotFound { tried: String::new() }.into();
        assert!(matches!(e, Error::Unavailable { .. }));
        assert!(matches!(Error::from(RocmError::NoDevice("0".into())), Error::Unavailable { .. }));
        assert!(matches!(Error::from(hip(ffi::hipErrorOutOfMemory)), Error::NoSpace(_)));
        assert!(matches!(Error::from(hip(ffi::hipErrorInvalidDevice)), Error::DeviceNotFound(_)));
        assert!(matches!(Error::from(hip(ffi::hipErrorNotSupported)), Error::Unsupported { .. }));
        assert!(matches!(Error::from(hip(ffi::hipErrorInvalidValue)), Error::InvalidArgument(_)));
        assert!(matches!(Error::from(hip(ffi::hipErrorNotInitialized)), Error::Unavailable { .. }));
        match Error::from(hip(999)) {
            Error::Io(io) => {
                let inner = io.get_ref().and_then(|s| s.downcast_ref::<RocmError>());
                assert_eq!(inner, Some(&hip(999)), "the HIP error stays reachable as the source");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
