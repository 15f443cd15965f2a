//! Engine and RPC errors as store [`Error`]s: the code upstream gives them, the original error kept as the cause
//! (and logged).

use mooncake_store_rpc::RpcError;

use crate::error::{Cause, Error};
use crate::types::ErrorCode;

/// An engine, transport or device error: `TransferFail`, with the engine's error and `context` as its cause.
pub(crate) fn engine(context: &str, e: &mooncake_core::Error) -> Error {
    engine_as(ErrorCode::TransferFail, context, e)
}

/// An engine error reported as `kind` (an argument the engine refused, say), with the engine's error as its cause.
pub(crate) fn engine_as(kind: ErrorCode, context: &str, e: &mooncake_core::Error) -> Error {
    tracing::warn!(error = %e, "{context}");
    Error::with_cause(kind, Cause::Engine { context: context.to_string(), source: e.clone() })
}

/// The code of an RPC error: `RpcTimeout` for a timeout, `RpcFail` otherwise.
pub(crate) fn rpc_kind(e: &RpcError) -> ErrorCode {
    match e {
        RpcError::Timeout { .. } => ErrorCode::RpcTimeout,
        _ => ErrorCode::RpcFail,
    }
}

/// A failed master call, with the RPC error as its cause, logged with the request name.
pub(crate) fn rpc(request: &str, e: &RpcError) -> Error {
    tracing::warn!(request, error = %e, "master RPC failed");
    Error::with_cause(rpc_kind(e), Cause::Master { request: request.to_string(), source: e.clone() })
}
