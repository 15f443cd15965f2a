//! Memory registration: regions enter the engine's table, every transport registers them, and the descriptor
//! is republished.

use std::sync::Arc;
use std::time::Duration;

use super::{Inner, TransferEngine};
use crate::descriptor::BufferDesc;
use crate::device::{Allocation, MemoryDevice};
use crate::error::{Error, Result};
use crate::memory::{DeviceMemory, OwnedMemory};
use crate::sync;
use crate::types::{Location, MemoryKind};

/// One buffer to register.
enum Registration {
    /// Raw memory the caller of an `unsafe` registration vouched for.
    Vouched { addr: u64, len: u64 },
    /// Memory the region table holds itself, and the device that owns it when known.
    Held { memory: OwnedMemory, owner: Option<DeviceMemory> },
}

impl Registration {
    fn range(&self) -> (u64, u64) {
        match self {
            Registration::Vouched { addr, len } => (*addr, *len),
            Registration::Held { memory, .. } => (memory.addr(), memory.len()),
        }
    }
}

impl TransferEngine {
    // ---- memory registration -------------------------------------------------------------

    /// Registers `[addr, addr+len)` at `location` (`cpu:N`, `cuda:N`, `*` = detect) and
    /// republishes the descriptor. Zero length and overlap are typed errors.
    ///
    /// Memory a linked non-host device claims (a GPU allocation it can find with
    /// [`MemoryDevice::allocation_of`]) is never dereferenced by the CPU: CPU transports copy it through
    /// the device. To register memory this process holds safely, use [`TransferEngine::register_allocation`]
    /// or [`TransferEngine::register_owned`].
    ///
    /// # Safety
    /// `[addr, addr+len)` must be memory of this process at that address (host memory: mapped readable
    /// and writable) that is not freed or unmapped until [`TransferEngine::unregister_memory`] for it
    /// returns `Ok` (an error such as `Timeout` means transfers or peers may still use it: keep it). While
    /// it is registered, peers and this process's transfers read and write it at any time, so the caller
    /// keeps no Rust reference to it, and transfers over the same bytes at once race (the bytes are then
    /// unspecified, as with RDMA).
    #[allow(unsafe_code)]
    pub unsafe fn register_memory(&self, addr: u64, len: u64, location: &str) -> Result<()> {
        self.register(vec![Registration::Vouched { addr, len }], location)
    }

    /// Registers several buffers; all or none.
    ///
    /// # Safety
    /// Each buffer as for [`TransferEngine::register_memory`].
    #[allow(unsafe_code)]
    pub unsafe fn register_memory_batch(&self, buffers: &[(u64, u64)], location: &str) -> Result<()> {
        self.register(buffers.iter().map(|&(addr, len)| Registration::Vouched { addr, len }).collect(), location)
    }

    /// Registers memory `device` allocated, holding it ([`MemoryDevice::hold`]) so that it stays valid
    /// while registered even if it is freed meanwhile: no `unsafe` needed. Memory of a device the CPU
    /// cannot read is copied through `device` by CPU transports, never dereferenced.
    pub fn register_allocation(
        &self,
        device: &Arc<dyn MemoryDevice>,
        allocation: &Allocation,
        location: &str,
    ) -> Result<()> {
        let memory = device.hold(allocation)?;
        if (memory.addr(), memory.len()) != (allocation.addr, allocation.len) {
            return Err(Error::InvalidArgument(format!(
                "device {} holds [{:#x}, +{}) for an allocation of [{:#x}, +{}]",
                device.name(),
                memory.addr(),
                memory.len(),
                allocation.addr,
                allocation.len
            )));
        }
        let owner = DeviceMemory { device: device.clone(), allocation: allocation.clone() };
        self.register(vec![Registration::Held { memory, owner: Some(owner) }], location)
    }

    /// Registers memory the engine holds from now on ([`OwnedMemory`]: e.g. a leaked slice, or memory
    /// another crate vouched for when it made the `OwnedMemory`); it stays valid while registered.
    pub fn register_owned(&self, memory: OwnedMemory, location: &str) -> Result<()> {
        self.register(vec![Registration::Held { memory, owner: None }], location)
    }

    fn register(&self, items: Vec<Registration>, location: &str) -> Result<()> {
        let location: Location = location.parse()?;
        let inner = &self.inner;
        let mut done: Vec<u64> = Vec::with_capacity(items.len());
        let result = (|| {
            for item in items {
                let (addr, len) = item.range();
                let loc = match &item {
                    Registration::Held { owner: Some(o), .. } if location == Location::Detect => {
                        o.device.classify(addr, len).map_or_else(|| inner.resolve_location(addr, len, &location), Ok)?
                    }
                    _ => inner.resolve_location(addr, len, &location)?,
                };
                match item {
                    Registration::Vouched { addr, len } => {
                        let owner = inner.device_owner(addr, len);
                        // The caller of `register_memory(_batch)` vouched for the range (their `# Safety`).
                        inner.regions.insert_by_contract(addr, len, loc.clone(), owner)?;
                    }
                    Registration::Held { memory, owner } => {
                        let owner = owner.or_else(|| inner.device_owner(addr, len));
                        inner.regions.insert_held(memory, loc.clone(), owner)?;
                    }
                }
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

    /// Unregisters the buffer starting at `addr`, waiting (up to `unregister_wait`) for in-flight accesses:
    /// peers' and this process's own transfers (a transfer holds its local region until it is finished).
    /// `Timeout` means some are still running: memory registered by address must not be freed then.
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
            self.check_device_claim(addr, len, requested)?;
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

    /// Refuses a host location for memory a device the CPU cannot read claims (a GPU pointer registered as
    /// `cpu:0`), and a device location of another kind or index than the owning device reports: publishing
    /// either would send peers and NICs to the wrong memory.
    fn check_device_claim(&self, addr: u64, len: u64, requested: &Location) -> Result<()> {
        let far = self.devices.iter().filter(|d| d.kind() != MemoryKind::Host && !d.capabilities().host_accessible);
        for d in far {
            let Some(actual) = d.classify(addr, len) else { continue };
            let mismatch = match requested {
                Location::Cpu(_) => true,
                Location::Device(..) => *requested != actual,
                Location::Detect | Location::Other(_) => false,
            };
            if mismatch {
                return Err(Error::InvalidArgument(format!(
                    "[{addr:#x}, +{len}) was registered at location {requested} but it is {} memory at {actual} \
                     (pass location \"{actual}\" or \"*\")",
                    d.name()
                )));
            }
        }
        Ok(())
    }

    /// The non-host device that owns `[addr, addr+len)`, with the allocation to copy it through.
    pub(super) fn device_owner(&self, addr: u64, len: u64) -> Option<DeviceMemory> {
        self.devices.iter().filter(|d| d.kind() != MemoryKind::Host).find_map(|d| {
            d.classify(addr, len)?;
            let allocation = d.allocation_of(addr, len)?;
            Some(DeviceMemory { device: d.clone(), allocation })
        })
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
