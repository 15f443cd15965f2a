//! The HTTP metadata server (docs/wire-formats.md section 5) embedded in the Python process, behind
//! `mooncake.http_metadata_server.KVBootstrapServer`.

use std::sync::Mutex;

use mooncake::metadata_http::{BackgroundServer, HttpMetadataServer, ServerConfig};
use mooncake::sync;
use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;

/// A metadata server running on its own thread: `start()` binds and serves, `stop()` ends it.
#[pyclass(module = "mooncake._mooncake", name = "HttpMetadataServer")]
pub struct PyHttpMetadataServer {
    host: String,
    port: u16,
    running: Mutex<Option<BackgroundServer>>,
}

#[pymethods]
impl PyHttpMetadataServer {
    #[new]
    #[pyo3(signature = (host = "0.0.0.0".to_string(), port = 8080))]
    fn new(host: String, port: u16) -> Self {
        PyHttpMetadataServer { host, port, running: Mutex::new(None) }
    }

    /// Binds and starts serving; returns the URL (`http://host:port/metadata`). OSError when the port is
    /// taken. Starting a running server returns its URL.
    fn start(&self, py: Python<'_>) -> PyResult<String> {
        let mut running = sync::lock(&self.running);
        if let Some(r) = running.as_ref() {
            return Ok(r.url());
        }
        let server = HttpMetadataServer::new(ServerConfig::new(self.host.clone(), self.port))
            .map_err(|e| PyRuntimeError::new_err(format!("HTTP metadata server: {e}")))?;
        let started = py.detach(|| server.spawn()).map_err(|e| {
            PyOSError::new_err(format!("cannot serve HTTP metadata on {}:{}: {e}", self.host, self.port))
        })?;
        let url = started.url();
        *running = Some(started);
        Ok(url)
    }

    /// Stops serving (idempotent).
    fn stop(&self, py: Python<'_>) {
        let taken = sync::lock(&self.running).take();
        if let Some(mut r) = taken {
            py.detach(|| r.stop());
        }
    }

    /// True while serving.
    fn is_running(&self) -> bool {
        sync::lock(&self.running).is_some()
    }

    /// The bound port (the configured one before `start()`; the real one after, also when 0 was asked).
    #[getter]
    fn port(&self) -> u16 {
        sync::lock(&self.running).as_ref().map_or(self.port, |r| r.addr().port())
    }
}

impl Drop for PyHttpMetadataServer {
    fn drop(&mut self) {
        if let Some(mut r) = sync::get_mut(&mut self.running).take() {
            r.stop();
        }
    }
}

/// Adds the server class to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHttpMetadataServer>()
}
