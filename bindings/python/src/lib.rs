//! The native half of the `mooncake` Python package (`mooncake._mooncake`): the transfer engine, the store
//! client, and the HTTP metadata server, with upstream's names,
//! signatures and return conventions (docs/python-api.md). The pure-Python modules of the package
//! (`mooncake.engine`, `mooncake.store`, ...) re-export these classes and add what needs no Rust.
//!
//! Every call that may block releases the GIL. Waits owned by the bindings (batch completion, sync batch
//! transfers, `setup`, `initialize`) wake every 50 ms to let a Ctrl-C through; single-key store calls and
//! single sync transfers run on the calling thread for latency and end within their own timeouts.

mod buffers;
mod convert;
mod engine;
mod ep;
mod mapped;
mod metadata_server;
mod numa;
mod pg;
mod store;
mod wait;

use pyo3::prelude::*;

/// Starts the Rust log output once per process: `MC_LOG_LEVEL` (or `RUST_LOG`), default `warn`, to stderr.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("MC_LOG_LEVEL")
        .ok()
        .map(|l| EnvFilter::new(l.to_ascii_lowercase()))
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// The extension module `mooncake._mooncake`.
#[pymodule]
fn _mooncake(m: &Bound<'_, PyModule>) -> PyResult<()> {
    mooncake::link_all();
    init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    engine::register(m)?;
    ep::register(m)?;
    pg::register(m)?;
    store::register(m)?;
    metadata_server::register(m)?;
    m.add_function(pyo3::wrap_pyfunction!(numa::bind_to_numa_node, m)?)?;
    Ok(())
}
