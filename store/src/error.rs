//! The client's error: what went wrong, as one of upstream's codes ([`ErrorCode`]), and why, when something
//! underneath failed (the transfer engine, a transport, a memory device, the master's RPC, the real client of a
//! dummy). The code is what the Python and C boundaries return; the cause is what a person debugging needs
//! (which peer, which transport error) and is shown by `Display` and `std::error::Error::source`.

use std::fmt;
use std::sync::Arc;

use mooncake_store_rpc::RpcError;

use crate::types::ErrorCode;

/// Result type of the store client.
pub type Result<T> = std::result::Result<T, Error>;

/// A store client error: a code, plus the cause when one exists. Cheap to clone (batch calls repeat one error per
/// key); two errors compare equal when their codes do, and an error equals its bare [`ErrorCode`].
#[derive(Clone)]
pub struct Error {
    kind: ErrorCode,
    cause: Option<Arc<Cause>>,
}

/// Why an operation failed, when the failure came from below the store.
#[derive(Debug)]
#[non_exhaustive]
pub enum Cause {
    /// The transfer engine, a transport or a memory device failed while doing `context` (which names the key and
    /// the peer segment where there is one).
    Engine {
        /// What the client was doing.
        context: String,
        /// The engine's error (its variants name the peer and the transport's reason).
        source: mooncake_core::Error,
    },
    /// A call to the master failed (it was unreachable, timed out, or its answer could not be read).
    Master {
        /// The request's name.
        request: String,
        /// The RPC error.
        source: RpcError,
    },
    /// A dummy client's call to its real client (`mooncake_client`) failed.
    RealClient {
        /// The RPC error.
        source: RpcError,
    },
}

impl Error {
    /// An error with a code and no further cause (the master's answers, argument checks).
    pub fn new(kind: ErrorCode) -> Error {
        Error { kind, cause: None }
    }

    /// An error with its cause.
    pub fn with_cause(kind: ErrorCode, cause: Cause) -> Error {
        Error { kind, cause: Some(Arc::new(cause)) }
    }

    /// What went wrong, as one of upstream's error kinds.
    pub fn kind(&self) -> ErrorCode {
        self.kind
    }

    /// Upstream's integer code (negative), what the Python and C APIs return.
    pub fn code(&self) -> i32 {
        self.kind.code()
    }

    /// The failure underneath, if any.
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_deref()
    }
}

impl From<ErrorCode> for Error {
    fn from(kind: ErrorCode) -> Error {
        Error::new(kind)
    }
}

impl From<Error> for ErrorCode {
    fn from(e: Error) -> ErrorCode {
        e.kind
    }
}

impl PartialEq for Error {
    fn eq(&self, other: &Error) -> bool {
        self.kind == other.kind
    }
}

impl Eq for Error {}

impl PartialEq<ErrorCode> for Error {
    fn eq(&self, other: &ErrorCode) -> bool {
        self.kind == *other
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            None => write!(f, "{:?}", self.kind),
            Some(cause) => write!(f, "{:?} ({cause:?})", self.kind),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Engine { context, source } => write!(f, "{context}: {source}"),
            Cause::Master { request, source } => write!(f, "master call {request}: {source}"),
            Cause::RealClient { source } => write!(f, "call to the real client: {source}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.kind.code())?;
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Cause::Engine { source, .. } => Some(source),
            Cause::Master { source, .. } | Cause::RealClient { source } => Some(source),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// Client results as bare codes (for a wire that carries only codes: the dummy protocol).
pub(crate) fn codes<T>(results: Vec<Result<T>>) -> Vec<std::result::Result<T, ErrorCode>> {
    results.into_iter().map(|r| r.map_err(|e| e.kind)).collect()
}

/// Results of a batch from the master (one code per key) as client results.
pub(crate) fn from_codes<T>(results: Vec<std::result::Result<T, ErrorCode>>) -> Vec<Result<T>> {
    results.into_iter().map(|r| r.map_err(Error::from)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_kept_and_shown_and_the_code_is_upstreams() {
        let engine_error = mooncake_core::Error::Timeout(std::time::Duration::from_millis(5));
        let e = Error::with_cause(
            ErrorCode::TransferFail,
            Cause::Engine { context: "reading \"k\" from 10.0.0.2:1234".into(), source: engine_error },
        );
        assert_eq!(e.code(), ErrorCode::TransferFail.code());
        assert_eq!(e, ErrorCode::TransferFail);
        assert_eq!(e, Error::new(ErrorCode::TransferFail), "equality is by code");
        let shown = e.to_string();
        assert!(shown.contains("10.0.0.2:1234") && shown.contains(&e.code().to_string()), "{shown}");
        let source = std::error::Error::source(&e).expect("a cause");
        assert!(std::error::Error::source(source).is_some(), "the engine error is reachable");
        assert!(matches!(e.cause(), Some(Cause::Engine { .. })));
        let plain = Error::from(ErrorCode::ObjectNotFound);
        assert!(plain.cause().is_none() && std::error::Error::source(&plain).is_none());
        assert_eq!(ErrorCode::from(plain.clone()), ErrorCode::ObjectNotFound);
        assert_eq!(format!("{plain:?}"), "ObjectNotFound");
    }
}
