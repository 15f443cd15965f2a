//! Upstream's older store header `client_c.h` (`mooncake_client_*`) over [`StoreClient`].
//!
//! Every function returns an `ErrorCode_t`: `MOONCAKE_ERROR_OK` (0) or a store error code. A dead, null or
//! never-issued handle gives `MOONCAKE_ERROR_INVALID_PARAMS`, as upstream answers a null client. `get` and `put`
//! move bytes from and into slices inside memory registered with `mooncake_client_register_local_memory`.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::ReplicateConfig;

use crate::handles::Table;
use crate::util::{guard, slice_arg, str_arg};

/// Upstream's `ErrorCode_t`: 0 or a negative store error code.
pub type ErrorCode_t = i32;
/// A client handle (a generation-checked table index, never a pointer).
pub type client_t = *mut c_void;

/// Success.
pub const MOONCAKE_ERROR_OK: ErrorCode_t = 0;
/// Internal error.
pub const MOONCAKE_ERROR_INTERNAL_ERROR: ErrorCode_t = -1;
/// The destination is too small.
pub const MOONCAKE_ERROR_BUFFER_OVERFLOW: ErrorCode_t = -10;
/// Shard index out of range.
pub const MOONCAKE_ERROR_SHARD_INDEX_OUT_OF_RANGE: ErrorCode_t = -100;
/// Segment not found.
pub const MOONCAKE_ERROR_SEGMENT_NOT_FOUND: ErrorCode_t = -101;
/// Segment already exists.
pub const MOONCAKE_ERROR_SEGMENT_ALREADY_EXISTS: ErrorCode_t = -102;
/// No space for the object.
pub const MOONCAKE_ERROR_NO_AVAILABLE_HANDLE: ErrorCode_t = -200;
/// Version mismatch.
pub const MOONCAKE_ERROR_INVALID_VERSION: ErrorCode_t = -300;
/// Invalid key.
pub const MOONCAKE_ERROR_INVALID_KEY: ErrorCode_t = -400;
/// Write failed.
pub const MOONCAKE_ERROR_WRITE_FAIL: ErrorCode_t = -500;
/// Invalid parameters (null handle, null pointers, unregistered memory).
pub const MOONCAKE_ERROR_INVALID_PARAMS: ErrorCode_t = -600;
/// Invalid write.
pub const MOONCAKE_ERROR_INVALID_WRITE: ErrorCode_t = -700;
/// Invalid read.
pub const MOONCAKE_ERROR_INVALID_READ: ErrorCode_t = -701;
/// Invalid replica.
pub const MOONCAKE_ERROR_INVALID_REPLICA: ErrorCode_t = -702;
/// Replica not ready.
pub const MOONCAKE_ERROR_REPLICA_IS_NOT_READY: ErrorCode_t = -703;
/// No such object.
pub const MOONCAKE_ERROR_OBJECT_NOT_FOUND: ErrorCode_t = -704;
/// The object exists.
pub const MOONCAKE_ERROR_OBJECT_ALREADY_EXISTS: ErrorCode_t = -705;
/// The object is leased.
pub const MOONCAKE_ERROR_OBJECT_HAS_LEASE: ErrorCode_t = -706;
/// A transfer failed.
pub const MOONCAKE_ERROR_TRANSFER_FAIL: ErrorCode_t = -800;
/// The master RPC failed.
pub const MOONCAKE_ERROR_RPC_FAIL: ErrorCode_t = -900;
/// etcd operation failed.
pub const MOONCAKE_ERROR_ETCD_OPERATION_ERROR: ErrorCode_t = -1000;
/// etcd key missing.
pub const MOONCAKE_ERROR_ETCD_KEY_NOT_EXIST: ErrorCode_t = -1001;
/// etcd transaction failed.
pub const MOONCAKE_ERROR_ETCD_TRANSACTION_FAIL: ErrorCode_t = -1002;
/// etcd context cancelled.
pub const MOONCAKE_ERROR_ETCD_CTX_CANCELLED: ErrorCode_t = -1003;
/// Not available in the current status (e.g. after close).
pub const MOONCAKE_ERROR_UNAVAILABLE_IN_CURRENT_STATUS: ErrorCode_t = -1010;
/// Not available in the current mode.
pub const MOONCAKE_ERROR_UNAVAILABLE_IN_CURRENT_MODE: ErrorCode_t = -1011;
/// File not found.
pub const MOONCAKE_ERROR_FILE_NOT_FOUND: ErrorCode_t = -1100;
/// File open failed.
pub const MOONCAKE_ERROR_FILE_OPEN_FAIL: ErrorCode_t = -1101;
/// File read failed.
pub const MOONCAKE_ERROR_FILE_READ_FAIL: ErrorCode_t = -1102;
/// File write failed.
pub const MOONCAKE_ERROR_FILE_WRITE_FAIL: ErrorCode_t = -1103;
/// Invalid file buffer.
pub const MOONCAKE_ERROR_FILE_INVALID_BUFFER: ErrorCode_t = -1104;
/// File lock failed.
pub const MOONCAKE_ERROR_FILE_LOCK_FAIL: ErrorCode_t = -1105;
/// Invalid file handle.
pub const MOONCAKE_ERROR_FILE_INVALID_HANDLE: ErrorCode_t = -1106;

/// Upstream's largest slice: CacheLib's slab (16 MiB) less 16 bytes. Our store does not split objects; the value
/// is what upstream callers size their slices by.
const MAX_SLICE_SIZE: u64 = (16 << 20) - 16;

/// One piece of an object (upstream's anonymous struct behind `Slice_t`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct mooncake_slice {
    /// Start (inside registered memory).
    pub ptr: *mut c_void,
    /// Bytes.
    pub size: usize,
}

/// Replication of `mooncake_client_put` (upstream's anonymous struct behind `ReplicateConfig_t`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct mooncake_client_replicate_config {
    /// Replicas.
    pub replica_num: usize,
    /// A segment to place the first replica on (null or empty: any).
    pub preferred_segment: *const c_char,
}

/// Upstream's `Slice_t`.
pub type Slice_t = mooncake_slice;
/// Upstream's `ReplicateConfig_t`.
pub type ReplicateConfig_t = mooncake_client_replicate_config;

static CLIENTS: Table<StoreClient> = Table::new();

fn lookup(client: client_t) -> Option<Arc<StoreClient>> {
    CLIENTS.get(client as u64)
}

/// Runs `f` with the client behind `client`: `MOONCAKE_ERROR_INVALID_PARAMS` for a dead handle or a panic.
fn with_client(client: client_t, f: impl FnOnce(&StoreClient) -> ErrorCode_t) -> ErrorCode_t {
    guard(MOONCAKE_ERROR_INVALID_PARAMS, || lookup(client).map_or(MOONCAKE_ERROR_INVALID_PARAMS, |c| f(&c)))
}

fn slices(slices: *mut Slice_t, count: usize) -> Option<(Vec<u64>, Vec<u64>)> {
    let list = slice_arg(slices.cast_const(), count)?;
    if list.iter().any(|s| s.ptr.is_null() && s.size > 0) {
        return None;
    }
    Some((list.iter().map(|s| s.ptr as u64).collect(), list.iter().map(|s| s.size as u64).collect()))
}

/// Connects a client to the master at `master_server_entry` (upstream `mooncake_client_create`); it contributes no
/// memory until `mooncake_client_mount_segment`. `NULL` for null strings or when setup fails.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_create(
    local_hostname: *const c_char,
    metadata_connstring: *const c_char,
    protocol: *const c_char,
    rdma_devices: *const c_char,
    master_server_entry: *const c_char,
) -> client_t {
    guard(std::ptr::null_mut(), || {
        mooncake::link_all();
        let devices = if rdma_devices.is_null() { Some("") } else { str_arg(rdma_devices) };
        let (Some(host), Some(meta), Some(proto), Some(devices), Some(master)) = (
            str_arg(local_hostname),
            str_arg(metadata_connstring),
            str_arg(protocol),
            devices,
            str_arg(master_server_entry),
        ) else {
            return std::ptr::null_mut();
        };
        let config = ClientConfig {
            local_hostname: host.to_string(),
            metadata_server: meta.to_string(),
            protocol: proto.to_string(),
            device_name: devices.to_string(),
            master_server_addr: master.to_string(),
            global_segment_size: 0,
            local_buffer_size: 0,
            ..Default::default()
        };
        match StoreClient::setup(config) {
            Ok(c) => CLIENTS.insert(c).map_or(std::ptr::null_mut(), |h| h as client_t),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

/// Registers `[addr, addr+length)` for `get`/`put` (upstream `mooncake_client_register_local_memory`); a null
/// address or zero length is a no-op (`OK`), as upstream. `location`, `remote_accessible` and `update_metadata`
/// are accepted and ignored: every registration is published. The memory must stay mapped while registered.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_register_local_memory(
    client: client_t,
    addr: *mut c_void,
    length: usize,
    location: *const c_char,
    remote_accessible: bool,
    update_metadata: bool,
) -> ErrorCode_t {
    let _ = (location, remote_accessible, update_metadata);
    with_client(client, |c| {
        if addr.is_null() || length == 0 {
            return MOONCAKE_ERROR_OK;
        }
        // SAFETY: the C caller guarantees the range is memory of this process that stays mapped while it is
        // registered (this function's documented contract, as upstream's).
        unsafe { c.register_buffer(addr as u64, length as u64) }.map_or_else(|e| e.code(), |()| MOONCAKE_ERROR_OK)
    })
}

/// Unregisters memory registered at `addr` (upstream `mooncake_client_unregister_local_memory`); null is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_unregister_local_memory(
    client: client_t,
    addr: *mut c_void,
    update_metadata: bool,
) -> ErrorCode_t {
    let _ = update_metadata;
    with_client(client, |c| {
        if addr.is_null() {
            return MOONCAKE_ERROR_OK;
        }
        c.unregister_buffer(addr as u64).map_or_else(|e| e.code(), |()| MOONCAKE_ERROR_OK)
    })
}

/// Allocates `size` bytes (rounded up to 16 MiB) and contributes them to the store (upstream
/// `mooncake_client_mount_segment`); `0` is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_mount_segment(client: client_t, size: usize) -> ErrorCode_t {
    with_client(client, |c| {
        if size == 0 {
            return MOONCAKE_ERROR_OK;
        }
        c.allocate_and_mount_segment(size as u64, "").map_or_else(|e| e.code(), |_| MOONCAKE_ERROR_OK)
    })
}

/// Reads `key` into `slices[..slices_count]` in order (upstream `mooncake_client_get`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_get(
    client: client_t,
    key: *const c_char,
    slices: *mut Slice_t,
    slices_count: usize,
) -> ErrorCode_t {
    with_client(client, |c| {
        let (Some(key), Some((ptrs, lens))) = (str_arg(key), self::slices(slices, slices_count)) else {
            return MOONCAKE_ERROR_INVALID_PARAMS;
        };
        let r = c.batch_get_into_multi_buffers(&[key], &[ptrs], &[lens]).pop();
        r.map_or(MOONCAKE_ERROR_INTERNAL_ERROR, |r| r.map_or_else(|e| e.code(), |_| MOONCAKE_ERROR_OK))
    })
}

/// Stores the concatenation of `slices[..slices_count]` under `key` (upstream `mooncake_client_put`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_put(
    client: client_t,
    key: *const c_char,
    slices: *mut Slice_t,
    slices_count: usize,
    config: ReplicateConfig_t,
) -> ErrorCode_t {
    with_client(client, |c| {
        let (Some(key), Some((ptrs, lens))) = (str_arg(key), self::slices(slices, slices_count)) else {
            return MOONCAKE_ERROR_INVALID_PARAMS;
        };
        let mut rc = ReplicateConfig { replica_num: config.replica_num, ..Default::default() };
        if !config.preferred_segment.is_null() {
            match str_arg(config.preferred_segment) {
                Some("") => {}
                Some(s) => rc.preferred_segments.push(s.to_string()),
                None => return MOONCAKE_ERROR_INVALID_PARAMS,
            }
        }
        let r = c.batch_put_from_multi_buffers(&[key], &[ptrs], &[lens], &rc).pop();
        r.map_or(MOONCAKE_ERROR_INTERNAL_ERROR, |r| r.map_or_else(|e| e.code(), |()| MOONCAKE_ERROR_OK))
    })
}

/// `OK` when `key` exists, `MOONCAKE_ERROR_OBJECT_NOT_FOUND` when not (upstream `mooncake_client_isexist`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_isexist(client: client_t, key: *const c_char) -> ErrorCode_t {
    with_client(client, |c| match str_arg(key) {
        Some(key) => match c.is_exist(key) {
            Ok(true) => MOONCAKE_ERROR_OK,
            Ok(false) => MOONCAKE_ERROR_OBJECT_NOT_FOUND,
            Err(e) => e.code(),
        },
        None => MOONCAKE_ERROR_INVALID_PARAMS,
    })
}

/// Removes `key` (upstream `mooncake_client_remove`; a leased object is refused).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_remove(client: client_t, key: *const c_char) -> ErrorCode_t {
    with_client(client, |c| match str_arg(key) {
        Some(key) => c.remove(key, false).map_or_else(|e| e.code(), |()| MOONCAKE_ERROR_OK),
        None => MOONCAKE_ERROR_INVALID_PARAMS,
    })
}

/// Closes the client and frees the handle (upstream `mooncake_client_destroy`); a dead handle is ignored.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_client_destroy(client: client_t) {
    guard((), || {
        if let Some(c) = CLIENTS.remove(client as u64) {
            let _ = c.close();
        }
    })
}

/// Upstream's largest slice in bytes (`kMaxSliceSize`, 16 MiB - 16); callers split objects into slices of at
/// most this size.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_max_slice_size() -> u64 {
    MAX_SLICE_SIZE
}
