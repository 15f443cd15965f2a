//! NVMe-oF / file segments of mooncake-rs (protocol `"nvmeof"`), compatible with upstream Mooncake's.
//!
//! A *file segment* is a list of files (local files, NVMe namespaces, NVMe-oF namespaces a host connected:
//! block devices are files like any other) published in the metadata service under `<prefix>nvmeof/<name>`
//! with upstream's descriptor: protocol `nvmeof`, buffers `{file_path, length, local_path_map: {host: path}}`.
//! A request's remote address is an offset into the concatenation of the files in order, and may span files.
//! Nothing serves the segment: the *initiator* reads and writes the files itself, at the path
//! `local_path_map[<its local server name>]` gives (then its host part, then the machine's host name), falling
//! back to `file_path`, the publisher's own path.
//!
//! # How a transfer works
//! - **Publication**: [`register_file_segment`] (blocking, by metadata connection string) or
//!   [`publish_file_segment`] (any [`MetadataStore`](mooncake_core::MetadataStore)) write upstream's JSON; the
//!   `unregister_`/`unpublish_` forms remove it. Upstream's `register.py`/`mount.py` produce the same JSON.
//! - **Routing**: an engine with this transport installed (`with_protocols(["tcp", "nvmeof"])`) routes requests
//!   for a segment whose descriptor says `nvmeof` here when every file resolves to a path on this host
//!   ([`Transport::can_reach`]).
//! - **I/O**: each request is cut into per-file slices and those into operations of at most `max_io` bytes at
//!   4 KiB file offsets (unaligned head and tail apart), run by I/O threads that each own an io_uring (queue
//!   depth `MC_NVMEOF_QUEUE_DEPTH`, default 32) with fixed files, fixed bounce buffers and the engine's
//!   registered host memory as fixed buffers; synchronous calls that need no bounce buffer submit and reap on
//!   the calling thread instead (docs/nvmeof.md says how and why). Files are opened
//!   O_DIRECT where the file system allows it (not tmpfs: buffered I/O then, see [`io_mode`]); unaligned memory,
//!   offsets or lengths go through aligned bounce buffers (unaligned writes through the page cache). Local host
//!   memory is read and written in place; GPU memory goes through cuFile when `libcufile.so.0` loads (CUDA),
//!   else it is staged through its device. See the `io` module docs.
//! - **Errors** are typed and name the file ([`FileError`], [`file_error`]): a path missing on this host,
//!   permission denied, a write to a read-only file, a file shorter than published (or truncated underneath),
//!   a file removed underneath (re-opened by path before each submission), device errors, ranges past the
//!   end. They fail the requests concerned only.
//!
//! ```no_run
//! use mooncake_transport_nvmeof::{FileSpec, register_file_segment};
//! # fn main() -> mooncake_core::Result<()> {
//! mooncake_transport_nvmeof::link();
//! let conn = "http://10.0.0.1:8080/metadata";
//! let file = FileSpec::from_file("/mnt/nvme0/kv.bin", "node1")?.with_local_path("node2", "/mnt/node1-nvme0/kv.bin");
//! let segment = register_file_segment(conn, "kv", &[file])?; // "nvmeof/kv"
//! let engine = mooncake_core::TransferEngine::new(
//!     mooncake_core::EngineConfig::new("node2", conn).with_protocols(["tcp", "nvmeof"]),
//! )?;
//! let handle = engine.open_segment(&segment)?;
//! # let _ = handle; Ok(()) }
//! ```

mod caller;
mod cufile;
mod error;
pub mod io;
pub mod segment;
mod transport;

use std::sync::{Arc, OnceLock};

use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{BackendConfig, Result, Transport};

pub use error::{FileError, FileErrorKind, file_error};
pub use io::{IoMode, io_mode, testing};
pub use segment::{
    FileSection, FileSpec, PROTOCOL, descriptor_json, publish_file_segment, register_file_segment, segment_name,
    unpublish_file_segment, unregister_file_segment,
};
pub use transport::{NvmeofConfig, NvmeofTransport};

/// Protocol name.
pub const NAME: &str = PROTOCOL;

/// Why cuFile (GPUDirect Storage) is not used in this process, or `None` when it is.
pub fn cufile_unavailable() -> Option<String> {
    cufile::unavailable_reason()
}

/// Whether io_uring works here (checked once): a ring is set up and a no-op goes through it.
fn probe() -> Availability {
    static RESULT: OnceLock<Availability> = OnceLock::new();
    RESULT
        .get_or_init(|| match probe_once() {
            Ok(()) => Availability::Available,
            Err(why) => Availability::Unavailable(why),
        })
        .clone()
}

fn probe_once() -> std::result::Result<(), String> {
    let mut ring = io_uring::IoUring::new(2).map_err(|e| {
        format!(
            "io_uring_setup failed ({e}): io_uring is off in this kernel or sandbox (kernel.io_uring_disabled, \
             seccomp); file segments need it"
        )
    })?;
    let nop = io_uring::opcode::Nop::new().build().user_data(7);
    // SAFETY: a no-op entry references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "io_uring submission queue full".to_string())?;
    ring.submit_and_wait(1).map_err(|e| format!("io_uring_enter failed ({e})"))?;
    match ring.completion().next() {
        Some(c) if c.user_data() == 7 && c.result() >= 0 => Ok(()),
        Some(c) => Err(format!("io_uring no-op completed with {}", c.result())),
        None => Err("io_uring no-op did not complete".into()),
    }
}

fn create(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(NvmeofTransport::new(NvmeofConfig::from_backend(config))))
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "NVMe-oF / file segments: the initiator reads and writes the segment's files with io_uring (O_DIRECT), cuFile for CUDA memory",
        probe,
        create,
    }
}

/// Call from a final binary to make sure the linker keeps this crate's registration.
#[inline(never)]
pub fn link() {}
