//! [`ManagedBufferAllocator`]: upstream's `allocate_managed_buffer` / `free_managed_buffer`.
//!
//! Buffers of up to [`ManagedBufferConfig::max_class`] bytes are carved by a [`SlabCarver`] from large
//! slabs that are allocated from a [`HostDevice`] and registered with the [`TransferEngine`] once,
//! when the slab is added; handing out and taking back a buffer is then pure bookkeeping. Larger
//! requests get a dedicated mapping registered on its own. Dropping the allocator unregisters and
//! unmaps everything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mooncake_core::{AllocOptions, Allocation, Error, Location, MemoryDevice, Result, TransferEngine, sync};

use crate::carver::{CarveError, SlabCarver};
use crate::device::HostDevice;

/// Sizes and placement of a [`ManagedBufferAllocator`].
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedBufferConfig {
    /// Bytes per slab (rounded up to a multiple of `max_class`); default 256 MiB.
    pub slab_size: u64,
    /// Smallest size class (power of two, at least 64); default 4 KiB.
    pub min_class: u64,
    /// Largest size class (power of two); larger requests get a dedicated mapping. Default 64 MiB.
    pub max_class: u64,
    /// NUMA placement of slabs (`cpu:N` binds with mbind; `*` leaves placement to the kernel).
    pub location: Location,
    /// Ask for huge pages for slabs and dedicated mappings.
    pub huge_pages: bool,
}

impl Default for ManagedBufferConfig {
    fn default() -> Self {
        ManagedBufferConfig {
            slab_size: 256 << 20,
            min_class: 4 << 10,
            max_class: 64 << 20,
            location: Location::Detect,
            huge_pages: false,
        }
    }
}

/// Counters of a [`ManagedBufferAllocator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ManagedBufferStats {
    /// Slabs allocated and registered.
    pub slabs: usize,
    /// Bytes in slabs.
    pub slab_bytes: u64,
    /// Buffers carved from slabs and not freed.
    pub carved_in_use: usize,
    /// Bytes of those buffers (class sizes).
    pub carved_in_use_bytes: u64,
    /// Dedicated mappings (requests above the largest class) not freed.
    pub dedicated: usize,
    /// Bytes of dedicated mappings.
    pub dedicated_bytes: u64,
}

struct State {
    carver: SlabCarver,
    slabs: Vec<Allocation>,
    dedicated: HashMap<u64, Allocation>,
}

/// Hands out registered host buffers by size class (upstream `allocate_managed_buffer`).
///
/// Thread-safe; every method takes `&self`. Errors are typed (the Python layer maps them to 0).
pub struct ManagedBufferAllocator {
    engine: TransferEngine,
    device: Arc<HostDevice>,
    config: ManagedBufferConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for ManagedBufferAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedBufferAllocator").field("config", &self.config).field("stats", &self.stats()).finish()
    }
}

impl ManagedBufferAllocator {
    /// An allocator registering its slabs with `engine`, using its own [`HostDevice`].
    ///
    /// No memory is allocated until the first request.
    pub fn new(engine: TransferEngine, config: ManagedBufferConfig) -> Result<Self> {
        ManagedBufferAllocator::with_device(engine, Arc::new(HostDevice::new()), config)
    }

    /// Like [`Self::new`], allocating from the given device.
    pub fn with_device(engine: TransferEngine, device: Arc<HostDevice>, config: ManagedBufferConfig) -> Result<Self> {
        let carver = SlabCarver::new(config.min_class, config.max_class)?;
        if config.slab_size == 0 {
            return Err(Error::InvalidArgument("managed buffer slab size must be greater than zero".into()));
        }
        let mut config = config;
        config.slab_size = config
            .slab_size
            .checked_next_multiple_of(config.max_class)
            .ok_or_else(|| Error::InvalidArgument(format!("slab size {} is too large", config.slab_size)))?;
        let state = State { carver, slabs: Vec::new(), dedicated: HashMap::new() };
        Ok(ManagedBufferAllocator { engine, device, config, state: Mutex::new(state) })
    }

    /// The configuration in use (slab size already rounded).
    pub fn config(&self) -> &ManagedBufferConfig {
        &self.config
    }

    /// Returns the address of a registered buffer of at least `length` bytes.
    ///
    /// Carved buffers are aligned to their class size (a power of two, at least `min_class`).
    pub fn allocate_managed_buffer(&self, length: u64) -> Result<u64> {
        if length == 0 {
            return Err(CarveError::ZeroLength.into());
        }
        let mut state = sync::lock(&self.state);
        if length > self.config.max_class {
            let a = self.allocate_registered(length, 0)?;
            let addr = a.addr;
            state.dedicated.insert(addr, a);
            return Ok(addr);
        }
        match state.carver.allocate(length) {
            Ok(addr) => return Ok(addr),
            Err(CarveError::Exhausted { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let slab = self.allocate_registered(self.config.slab_size, self.config.max_class)?;
        if let Err(e) = state.carver.add_slab(slab.addr, slab.len) {
            self.release(&slab);
            return Err(e.into());
        }
        tracing::debug!(addr = slab.addr, len = slab.len, slabs = state.slabs.len() + 1, "added managed buffer slab");
        state.slabs.push(slab);
        Ok(state.carver.allocate(length)?)
    }

    /// Takes back a buffer from [`Self::allocate_managed_buffer`]; `length` must be of the same
    /// size class as the one it was allocated with (exactly the same length for dedicated buffers).
    pub fn free_managed_buffer(&self, addr: u64, length: u64) -> Result<()> {
        let mut state = sync::lock(&self.state);
        if let Some(a) = state.dedicated.get(&addr) {
            if a.len != length {
                return Err(Error::InvalidArgument(format!(
                    "managed buffer {addr:#x} has {} bytes; free_managed_buffer was given {length}",
                    a.len
                )));
            }
            if let Some(a) = state.dedicated.remove(&addr) {
                drop(state);
                self.release(&a);
            }
            return Ok(());
        }
        Ok(state.carver.free(addr, length)?)
    }

    /// Current counters.
    pub fn stats(&self) -> ManagedBufferStats {
        let state = sync::lock(&self.state);
        ManagedBufferStats {
            slabs: state.slabs.len(),
            slab_bytes: state.slabs.iter().map(|s| s.len).sum(),
            carved_in_use: state.carver.in_use_count(),
            carved_in_use_bytes: state.carver.in_use_bytes(),
            dedicated: state.dedicated.len(),
            dedicated_bytes: state.dedicated.values().map(|a| a.len).sum(),
        }
    }

    /// Allocates from the device and registers with the engine; undoes the allocation on failure.
    fn allocate_registered(&self, len: u64, alignment: u64) -> Result<Allocation> {
        let options = AllocOptions {
            location: self.config.location.clone(),
            alignment,
            huge_pages: self.config.huge_pages,
            shareable: false,
        };
        let a = self.device.allocate(len, &options)?;
        let location = match &a.location {
            Location::Cpu(Some(n)) => format!("cpu:{n}"),
            _ => self.device.classify(a.addr, a.len).unwrap_or(Location::Cpu(Some(0))).to_string(),
        };
        let device: Arc<dyn MemoryDevice> = self.device.clone();
        if let Err(e) = self.engine.register_allocation(&device, &a, &location) {
            if let Err(fe) = self.device.free(&a) {
                tracing::warn!(addr = a.addr, error = %fe, "freeing an unregistrable buffer failed");
            }
            return Err(e);
        }
        Ok(a)
    }

    /// Unregisters from the engine, then unmaps.
    fn release(&self, a: &Allocation) {
        if let Err(e) = self.engine.unregister_memory(a.addr) {
            tracing::warn!(addr = a.addr, error = %e, "unregistering a managed buffer mapping failed");
        }
        if let Err(e) = self.device.free(a) {
            tracing::warn!(addr = a.addr, error = %e, "freeing a managed buffer mapping failed");
        }
    }
}

impl Drop for ManagedBufferAllocator {
    fn drop(&mut self) {
        let state = sync::get_mut(&mut self.state);
        let slabs = std::mem::take(&mut state.slabs);
        let dedicated: Vec<Allocation> = state.dedicated.drain().map(|(_, a)| a).collect();
        if state.carver.in_use_count() > 0 {
            tracing::warn!(
                in_use = state.carver.in_use_count(),
                "managed buffer allocator dropped with buffers still in use; their memory is unmapped"
            );
        }
        for a in slabs.iter().chain(dedicated.iter()) {
            self.release(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn allocator_is_shareable_between_threads() {
        assert_send_sync::<ManagedBufferAllocator>();
    }

    #[test]
    fn default_config_matches_upstream_shape() {
        let c = ManagedBufferConfig::default();
        assert_eq!((c.min_class, c.max_class, c.slab_size), (4 << 10, 64 << 20, 256 << 20));
        let carver = SlabCarver::new(c.min_class, c.max_class).unwrap();
        assert_eq!(carver.class_size(c.max_class), Some(c.max_class));
        assert_eq!(carver.class_size(c.max_class + 1), None, "dedicated mapping above the largest class");
    }
}
