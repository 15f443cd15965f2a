//! Mapping of engine and RPC errors to store [`ErrorCode`]s, with a log line carrying the original message.

use mooncake_store_rpc::RpcError;

use crate::types::ErrorCode;

/// An engine, transport or device error: `TransferFail`, logged with `context`.
pub(crate) fn engine(context: &str, e: &mooncake_core::Error) -> ErrorCode {
    tracing::warn!(error = %e, "{context}");
    ErrorCode::TransferFail
}

/// An RPC error: `RpcTimeout` for a timeout, `RpcFail` otherwise, logged with the request name.
pub(crate) fn rpc(request: &str, e: &RpcError) -> ErrorCode {
    match e {
        RpcError::Timeout { .. } => {
            tracing::warn!(request, error = %e, "master RPC timed out");
            ErrorCode::RpcTimeout
        }
        _ => {
            tracing::warn!(request, error = %e, "master RPC failed");
            ErrorCode::RpcFail
        }
    }
}

/// True when `e` says the peer cannot be reached at all (as opposed to a rejected request): the master
/// should hear about it so it stops placing on and serving that peer.
pub(crate) fn is_connection_level(e: &mooncake_core::Error) -> bool {
    use mooncake_core::Error as E;
    matches!(e, E::RemoteDisconnected { .. } | E::Unavailable { .. } | E::Timeout(_) | E::Io(_))
}
