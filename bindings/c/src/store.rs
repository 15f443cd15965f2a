//! Upstream's `store_c.h` over [`mooncake_store::client::StoreClient`].
//!
//! Return values follow upstream: `0` (or a count, size or `1`/`0` for existence) on success and a negative
//! store error code ([`mooncake_store::ErrorCode`], e.g. `-704` object not found, `-600` invalid params) on
//! failure; `-1` for null pointers, a dead handle or a handle not set up yet, as upstream's C wrapper answers
//! them. Batch calls return `0` and one result per key in `results_out`, or `-1` for bad arguments.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::ReplicateConfig;
use mooncake_store::{ErrorCode, Result};

use crate::handles::Table;
use crate::util::{guard, slice_arg, slice_out, str_arg, write_str};

/// A store handle (a generation-checked table index, never a pointer).
pub type mooncake_store_t = *mut c_void;

/// Replication settings of a put (upstream `struct mooncake_replicate_config`); a null config means one
/// replica, no pin, no preference.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct mooncake_replicate_config {
    /// Replicas, each on a distinct segment.
    pub replica_num: usize,
    /// Non-zero: soft-pin the object.
    pub with_soft_pin: c_int,
    /// Segment names to place replicas on first (`preferred_segments_count` entries; null entries skipped).
    pub preferred_segments: *mut *const c_char,
    /// Entries in `preferred_segments`.
    pub preferred_segments_count: usize,
}
/// Upstream's typedef of `struct mooncake_replicate_config`.
pub type mooncake_replicate_config_t = mooncake_replicate_config;

/// Upstream's answer to null pointers and dead handles.
const FAIL: c_int = -1;

/// One C store handle: the client once set up.
pub(crate) struct CStore {
    client: OnceLock<StoreClient>,
    setup_lock: Mutex<()>,
}

static STORES: Table<CStore> = Table::new();

/// The Rust client behind a set-up C handle (for benchmarks comparing a C call with the Rust call it wraps).
/// Not part of the C ABI.
#[doc(hidden)]
pub fn rust_client(store: mooncake_store_t) -> Option<StoreClient> {
    lookup(store).and_then(|s| s.client.get().cloned())
}

fn lookup(store: mooncake_store_t) -> Option<Arc<CStore>> {
    STORES.get(store as u64)
}

/// Runs `f` with the set-up client behind `store`: `-1` for a dead or not-set-up handle.
fn with_client<T: From<i32>>(store: mooncake_store_t, f: impl FnOnce(&StoreClient) -> T) -> T {
    guard(T::from(FAIL), || match lookup(store) {
        Some(s) => match s.client.get() {
            Some(c) => f(c),
            None => T::from(FAIL),
        },
        None => T::from(FAIL),
    })
}

fn code(r: Result<()>) -> c_int {
    r.map_or_else(|e| e.code(), |()| 0)
}

fn config(c: *const mooncake_replicate_config_t) -> Option<ReplicateConfig> {
    let mut rc = ReplicateConfig::default();
    if c.is_null() {
        return Some(rc);
    }
    // SAFETY: non-null, and by contract a readable `mooncake_replicate_config_t`.
    let c = unsafe { &*c };
    rc.replica_num = c.replica_num;
    rc.with_soft_pin = c.with_soft_pin != 0;
    let names = slice_arg(c.preferred_segments.cast_const(), c.preferred_segments_count)?;
    for p in names {
        if !p.is_null() {
            rc.preferred_segments.push(str_arg(*p)?.to_string());
        }
    }
    Some(rc)
}

/// Creates a store handle, not set up yet (upstream `mooncake_store_create`); `NULL` only if the handle table
/// is full.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_create() -> mooncake_store_t {
    guard(std::ptr::null_mut(), || {
        mooncake::link_all();
        STORES
            .insert(CStore { client: OnceLock::new(), setup_lock: Mutex::new(()) })
            .map_or(std::ptr::null_mut(), |h| h as mooncake_store_t)
    })
}

/// Closes the client (unmounting its segment) and frees the handle (upstream `mooncake_store_destroy`). A dead
/// or null handle is ignored; later calls with the handle return `-1`.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_destroy(store: mooncake_store_t) {
    guard((), || {
        if let Some(s) = STORES.remove(store as u64)
            && let Some(c) = s.client.get()
        {
            let _ = c.close();
        }
    })
}

fn setup(store: mooncake_store_t, config: ClientConfig) -> c_int {
    guard(FAIL, || {
        let Some(s) = lookup(store) else { return FAIL };
        let _once = s.setup_lock.lock().unwrap_or_else(|p| p.into_inner());
        if s.client.get().is_some() {
            return ErrorCode::InvalidParams.code();
        }
        match StoreClient::setup(config) {
            Ok(c) => {
                let _ = s.client.set(c);
                0
            }
            Err(e) => e.code(),
        }
    })
}

/// Connects to the master and mounts `global_segment_size` bytes (upstream `mooncake_store_setup`). Null strings
/// take upstream's defaults (`protocol` `tcp`, `master_server_addr` `127.0.0.1:50051`, `metadata_server`
/// `P2PHANDSHAKE`, `local_hostname` `localhost`). A second setup of one handle fails with `-600`.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_setup(
    store: mooncake_store_t,
    local_hostname: *const c_char,
    metadata_server: *const c_char,
    global_segment_size: u64,
    local_buffer_size: u64,
    protocol: *const c_char,
    device_name: *const c_char,
    master_server_addr: *const c_char,
) -> c_int {
    let arg = |p: *const c_char, default: &str| -> Option<String> {
        if p.is_null() { Some(default.to_string()) } else { str_arg(p).map(str::to_string) }
    };
    let fields = guard(None, || {
        Some((
            arg(local_hostname, "localhost")?,
            arg(metadata_server, "P2PHANDSHAKE")?,
            arg(protocol, "tcp")?,
            arg(device_name, "")?,
            arg(master_server_addr, "127.0.0.1:50051")?,
        ))
    });
    let Some((local_hostname, metadata_server, protocol, device_name, master_server_addr)) = fields else {
        return FAIL;
    };
    setup(
        store,
        ClientConfig {
            local_hostname,
            metadata_server,
            protocol,
            device_name,
            master_server_addr,
            global_segment_size,
            local_buffer_size,
            ..Default::default()
        },
    )
}

/// Upstream `mooncake_store_init_all`: setup with upstream's defaults (host `localhost`, `P2PHANDSHAKE`, master
/// `127.0.0.1:50051`, 16 MiB staging), the given protocol and device, mounting `mount_segment_size` bytes.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_init_all(
    store: mooncake_store_t,
    protocol: *const c_char,
    device_name: *const c_char,
    mount_segment_size: u64,
) -> c_int {
    let protocol = if protocol.is_null() { Some("tcp") } else { str_arg(protocol) };
    let device = if device_name.is_null() { Some("") } else { str_arg(device_name) };
    let (Some(protocol), Some(device)) = (protocol, device) else { return FAIL };
    setup(
        store,
        ClientConfig {
            protocol: protocol.to_string(),
            device_name: device.to_string(),
            global_segment_size: mount_segment_size,
            local_buffer_size: 16 << 20,
            ..Default::default()
        },
    )
}

/// `0` when the client is set up and its master answers (upstream `mooncake_store_health_check`); a positive
/// value when it is not set up or the master is unreachable; `-1` for a dead handle.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_health_check(store: mooncake_store_t) -> c_int {
    guard(FAIL, || match lookup(store) {
        Some(s) => s.client.get().map_or(mooncake_store::client::HEALTH_NOT_INITIALIZED, StoreClient::health),
        None => FAIL,
    })
}

/// Stores the `size` bytes at `value` under `key` (upstream `mooncake_store_put`); `value` needs no
/// registration.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_put(
    store: mooncake_store_t,
    key: *const c_char,
    value: *const c_void,
    size: usize,
    config: *const mooncake_replicate_config_t,
) -> c_int {
    with_client(store, |c| {
        let (Some(key), Some(value), Some(rc)) =
            (str_arg(key), slice_arg(value.cast::<u8>(), size), self::config(config))
        else {
            return FAIL;
        };
        code(c.put(key, value, &rc))
    })
}

/// Stores the `size` bytes at `buffer` (inside a buffer registered with `mooncake_store_register_buffer`) under
/// `key` (upstream `mooncake_store_put_from`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_put_from(
    store: mooncake_store_t,
    key: *const c_char,
    buffer: *mut c_void,
    size: usize,
    config: *const mooncake_replicate_config_t,
) -> c_int {
    with_client(store, |c| {
        let (Some(key), Some(rc)) = (str_arg(key), self::config(config)) else { return FAIL };
        if buffer.is_null() && size > 0 {
            return FAIL;
        }
        code(c.put_from(key, buffer as u64, size as u64, &rc))
    })
}

/// The `count` keys, or `None` for a null array or entry.
fn keys_arg<'a>(keys: *mut *const c_char, count: usize) -> Option<Vec<&'a str>> {
    slice_arg(keys.cast_const(), count)?.iter().map(|k| str_arg(*k)).collect()
}

/// Buffers and sizes of a batch; `None` for null arrays or a null buffer with a non-zero size.
fn buffers_arg(buffers: *mut *mut c_void, sizes: *const usize, count: usize) -> Option<(Vec<u64>, Vec<u64>)> {
    let bufs = slice_arg(buffers.cast_const(), count)?;
    let sizes = slice_arg(sizes, count)?;
    if bufs.iter().zip(sizes).any(|(b, s)| b.is_null() && *s > 0) {
        return None;
    }
    Some((bufs.iter().map(|b| *b as u64).collect(), sizes.iter().map(|s| *s as u64).collect()))
}

/// [`mooncake_store_put_from`] for `count` keys (upstream `mooncake_store_batch_put_from`): `0` and one code
/// per key in `results_out[..count]`, or `-1` for bad arguments (nothing written).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_batch_put_from(
    store: mooncake_store_t,
    keys: *mut *const c_char,
    buffers: *mut *mut c_void,
    sizes: *const usize,
    count: usize,
    config: *const mooncake_replicate_config_t,
    results_out: *mut c_int,
) -> c_int {
    with_client(store, |c| {
        let (Some(keys), Some((ptrs, lens)), Some(rc), Some(out)) = (
            keys_arg(keys, count),
            buffers_arg(buffers, sizes, count),
            self::config(config),
            slice_out(results_out, count),
        ) else {
            return FAIL;
        };
        for (o, r) in out.iter_mut().zip(c.batch_put_from(&keys, &ptrs, &lens, &rc)) {
            *o = code(r);
        }
        0
    })
}

/// Reads `key` into `buffer[..size]` (inside a registered buffer) (upstream `mooncake_store_get_into`): the
/// object's size, or a negative code (`-10` buffer overflow when it does not fit, `-704` not found).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_get_into(
    store: mooncake_store_t,
    key: *const c_char,
    buffer: *mut c_void,
    size: usize,
) -> i64 {
    with_client(store, |c| {
        let Some(key) = str_arg(key) else { return -1 };
        if buffer.is_null() && size > 0 {
            return -1;
        }
        c.get_into(key, buffer as u64, size as u64).map_or_else(|e| i64::from(e.code()), |n| n as i64)
    })
}

/// [`mooncake_store_get_into`] for `count` keys (upstream `mooncake_store_batch_get_into`): `0` and one size
/// or code per key in `results_out[..count]`, or `-1` for bad arguments.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_batch_get_into(
    store: mooncake_store_t,
    keys: *mut *const c_char,
    buffers: *mut *mut c_void,
    sizes: *const usize,
    count: usize,
    results_out: *mut i64,
) -> c_int {
    with_client(store, |c| {
        let (Some(keys), Some((ptrs, lens)), Some(out)) =
            (keys_arg(keys, count), buffers_arg(buffers, sizes, count), slice_out(results_out, count))
        else {
            return FAIL;
        };
        for (o, r) in out.iter_mut().zip(c.batch_get_into(&keys, &ptrs, &lens)) {
            *o = r.map_or_else(|e| i64::from(e.code()), |n| n as i64);
        }
        0
    })
}

/// `1` when `key` exists, `0` when not, a negative code on failure (upstream `mooncake_store_is_exist`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_is_exist(store: mooncake_store_t, key: *const c_char) -> c_int {
    with_client(store, |c| match str_arg(key) {
        Some(key) => c.is_exist(key).map_or_else(|e| e.code(), c_int::from),
        None => FAIL,
    })
}

/// [`mooncake_store_is_exist`] for `count` keys (upstream `mooncake_store_batch_is_exist`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_batch_is_exist(
    store: mooncake_store_t,
    keys: *mut *const c_char,
    count: usize,
    results_out: *mut c_int,
) -> c_int {
    with_client(store, |c| {
        let (Some(keys), Some(out)) = (keys_arg(keys, count), slice_out(results_out, count)) else { return FAIL };
        for (o, r) in out.iter_mut().zip(c.batch_is_exist(&keys)) {
            *o = r.map_or_else(|e| e.code(), c_int::from);
        }
        0
    })
}

/// The size of `key` in bytes, or a negative code (upstream `mooncake_store_get_size`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_get_size(store: mooncake_store_t, key: *const c_char) -> i64 {
    with_client(store, |c| match str_arg(key) {
        Some(key) => c.get_size(key).map_or_else(|e| i64::from(e.code()), |n| n as i64),
        None => -1,
    })
}

/// Writes the client's segment name and a NUL into `buf_out[..buf_len]` (upstream
/// `mooncake_store_get_hostname`); `-1` when it does not fit.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_get_hostname(store: mooncake_store_t, buf_out: *mut c_char, buf_len: usize) -> c_int {
    with_client(store, |c| if write_str(c.hostname(), buf_out, buf_len) { 0 } else { FAIL })
}

/// Removes `key`; a leased object needs `force != 0` (upstream `mooncake_store_remove`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_remove(store: mooncake_store_t, key: *const c_char, force: c_int) -> c_int {
    with_client(store, |c| match str_arg(key) {
        Some(key) => code(c.remove(key, force != 0)),
        None => FAIL,
    })
}

/// Removes every key matching `pattern` (Rust `regex` syntax, close to upstream's ECMAScript for ordinary
/// patterns): how many, or a negative code (upstream `mooncake_store_remove_by_regex`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_remove_by_regex(store: mooncake_store_t, pattern: *const c_char, force: c_int) -> i64 {
    with_client(store, |c| match str_arg(pattern) {
        Some(p) => c.remove_by_regex(p, force != 0).map_or_else(|e| i64::from(e.code()), |n| n as i64),
        None => -1,
    })
}

/// Removes every key: how many, or a negative code (upstream `mooncake_store_remove_all`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_remove_all(store: mooncake_store_t, force: c_int) -> i64 {
    with_client(store, |c| c.remove_all(force != 0).map_or_else(|e| i64::from(e.code()), |n| n as i64))
}

/// Registers `buffer[..size]` for the zero-copy calls (upstream `mooncake_store_register_buffer`). The memory
/// must stay mapped until `mooncake_store_unregister_buffer` for it returns; peers write it meanwhile.
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_register_buffer(store: mooncake_store_t, buffer: *mut c_void, size: usize) -> c_int {
    with_client(store, |c| {
        if buffer.is_null() || size == 0 {
            return FAIL;
        }
        // SAFETY: the C caller guarantees the range is memory of this process that stays mapped while registered
        // (the documented contract of this function, as upstream's).
        code(unsafe { c.register_buffer(buffer as u64, size as u64) })
    })
}

/// Unregisters a buffer registered with `mooncake_store_register_buffer` (upstream
/// `mooncake_store_unregister_buffer`).
#[unsafe(no_mangle)]
pub extern "C" fn mooncake_store_unregister_buffer(store: mooncake_store_t, buffer: *mut c_void) -> c_int {
    with_client(store, |c| code(c.unregister_buffer(buffer as u64)))
}
