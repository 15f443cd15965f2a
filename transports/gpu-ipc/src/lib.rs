//! GPU IPC transports (in progress).
