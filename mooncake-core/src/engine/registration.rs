//! Memory registration: regions enter the engine's table, every transport registers them, and the descriptor
//! is republished.

use std::time::Duration;

use super::{Inner, TransferEngine};
use crate::descriptor::BufferDesc;
use crate::error::{Error, Result};
use crate::sync;
use crate::types::{Location, MemoryKind};

impl TransferEngine {
    // ---- memory registration -------------------------------------------------------------

    /// Registers `[addr, addr+len)` at `location` (`cpu:N`, `cuda:N`, `*` = detect) and
    /// republishes the descriptor. Zero length and overlap are typed errors.
    ///
    /// The memory must stay valid until unregistered: peers read and write it.
    pub fn register_memory(&self, addr: u64, len: u64, location: &str) -> Result<()> {
        self.register_memory_batch(&[(addr, len)], location)
    }

    /// Registers several buffers; all or none.
    pub fn register_memory_batch(&self, buffers: &[(u64, u64)], location: &str) -> Result<()> {
        let location: Location = location.parse()?;
        let inner = &self.inner;
        let mut done: Vec<u64> = Vec::with_capacity(buffers.len());
        let result = (|| {
            for &(addr, len) in buffers {
                let loc = inner.resolve_location(addr, len, &location)?;
                inner.regions.insert(addr, len, loc.clone())?;
                done.push(addr);
                let region = inner.regions.get(addr).ok_or_else(|| Error::NotFound("region just inserted".into()))?;
                let mut desc = BufferDesc { name: loc.to_string(), addr, length: len, ..Default::default() };
                for t in &inner.transports {
                    t.register_memory(&region, &mut desc)?;
                }
                sync::lock(&inner.buffers).insert(addr, desc);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for addr in done {
                inner.forget_region(addr);
                let _ = inner.regions.remove(addr, Duration::ZERO);
            }
            return Err(e);
        }
        self.publish_blocking()
    }

    /// Unregisters the buffer starting at `addr`, waiting for in-flight remote accesses.
    pub fn unregister_memory(&self, addr: u64) -> Result<()> {
        self.unregister_memory_batch(&[addr])
    }

    /// Unregisters several buffers (each must start a registration).
    pub fn unregister_memory_batch(&self, addrs: &[u64]) -> Result<()> {
        let inner = &self.inner;
        for &addr in addrs {
            if inner.regions.get(addr).is_none() {
                return Err(Error::AddressNotRegistered {
                    addr,
                    len: 0,
                    context: "no registration starts at this address".into(),
                });
            }
        }
        let mut first_err = None;
        for &addr in addrs {
            inner.forget_region(addr);
            if let Err(e) = inner.regions.remove(addr, inner.config.unregister_wait) {
                first_err.get_or_insert(e);
            }
        }
        self.publish_blocking()?;
        first_err.map_or(Ok(()), Err)
    }

    pub(super) fn publish_blocking(&self) -> Result<()> {
        let inner = self.inner.clone();
        self.run(async move { inner.publish_after_change().await })
    }
}

impl Inner {
    pub(super) fn resolve_location(&self, addr: u64, len: u64, requested: &Location) -> Result<Location> {
        if *requested != Location::Detect {
            return Ok(requested.clone());
        }
        // Specific devices (GPUs, CXL) first: host memory claims every address it is asked about.
        let specific = self.devices.iter().filter(|d| d.kind() != MemoryKind::Host);
        let host = self.devices.iter().filter(|d| d.kind() == MemoryKind::Host);
        for d in specific.chain(host) {
            if let Some(loc) = d.classify(addr, len) {
                return Ok(loc);
            }
        }
        Ok(Location::Cpu(Some(0)))
    }

    pub(super) fn forget_region(&self, addr: u64) {
        if let Some(region) = self.regions.get(addr) {
            for t in &self.transports {
                if let Err(e) = t.unregister_memory(&region) {
                    tracing::warn!(transport = t.name(), error = %e, "unregister failed");
                }
            }
        }
        sync::lock(&self.buffers).remove(&addr);
    }
}
