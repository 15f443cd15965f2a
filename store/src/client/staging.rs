//! Registered scratch memory for the bytes API.
//!
//! A Rust slice or `Vec` is not registered memory, so bytes moved to or from a remote replica pass through
//! registered memory of ours: the staging buffer (`local_buffer_size` bytes, registered once at setup and
//! carved per call with an [`OffsetAllocator`]). When it cannot hold a call's values (a value larger than the
//! buffer, or concurrent calls using it), the rest of the call gets one temporary allocation from the host
//! memory device, registered for the call and released when it ends. That costs a registration (cheap in P2P
//! mode, a metadata update otherwise) but never fails a call for lack of staging space, and every transfer of a
//! call still goes into one engine batch.

use std::sync::{Arc, Mutex};

use mooncake_core::sync;
use mooncake_core::{Allocation as DeviceAllocation, MemoryDevice, TransferEngine};

use crate::allocator::{ALIGNMENT, Allocation, OffsetAllocator};

/// The registered staging buffer.
pub(crate) struct Staging {
    pub(crate) memory: DeviceAllocation,
    carve: Mutex<OffsetAllocator>,
}

impl Staging {
    /// Staging over `memory` (already registered with the engine).
    pub(crate) fn new(memory: DeviceAllocation) -> Self {
        let carve = Mutex::new(OffsetAllocator::new(memory.len));
        Staging { memory, carve }
    }
}

/// Scratch ranges of one call; released (and a temporary registration undone) on drop.
pub(crate) struct Scratch<'a> {
    staging: Option<&'a Staging>,
    taken: Vec<Allocation>,
    temp: Option<DeviceAllocation>,
    engine: &'a TransferEngine,
    device: &'a Arc<dyn MemoryDevice>,
}

impl<'a> Scratch<'a> {
    /// Nothing reserved yet.
    pub(crate) fn new(
        staging: Option<&'a Staging>,
        engine: &'a TransferEngine,
        device: &'a Arc<dyn MemoryDevice>,
    ) -> Self {
        Scratch { staging, taken: Vec::new(), temp: None, engine, device }
    }

    /// Reserves one registered range per length (each > 0); `None` where neither the staging buffer nor a
    /// temporary registration could provide one (logged). Call at most once per scratch.
    pub(crate) fn reserve(&mut self, lens: &[u64]) -> Vec<Option<u64>> {
        let mut out = vec![None; lens.len()];
        let mut overflow = Vec::new();
        match self.staging {
            Some(st) => {
                let mut carve = sync::lock(&st.carve);
                for (i, &len) in lens.iter().enumerate() {
                    match carve.allocate(len) {
                        Some(a) => {
                            out[i] = Some(st.memory.addr + a.offset());
                            self.taken.push(a);
                        }
                        None => overflow.push(i),
                    }
                }
            }
            None => overflow.extend(0..lens.len()),
        }
        if overflow.is_empty() || self.temp.is_some() {
            return out;
        }
        let rounded = |len: u64| len.div_ceil(ALIGNMENT).saturating_mul(ALIGNMENT);
        let total = overflow.iter().fold(0u64, |acc, &i| acc.saturating_add(rounded(lens[i])));
        let memory = match self.device.allocate(total, &super::lifecycle::memory_options()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(bytes = total, error = %e, "cannot allocate temporary staging memory");
                return out;
            }
        };
        if let Err(e) = self.engine.register_allocation(self.device, &memory, "*") {
            tracing::warn!(bytes = total, error = %e, "cannot register temporary staging memory");
            if let Err(e) = self.device.free(&memory) {
                tracing::warn!(error = %e, "cannot free temporary staging memory");
            }
            return out;
        }
        tracing::debug!(bytes = total, "using temporary staging memory (staging buffer too small or busy)");
        let mut offset = 0;
        for i in overflow {
            out[i] = Some(memory.addr + offset);
            offset += rounded(lens[i]);
        }
        self.temp = Some(memory);
        out
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Some(st) = self.staging {
            if !self.taken.is_empty() {
                let mut carve = sync::lock(&st.carve);
                for a in self.taken.drain(..) {
                    if let Err(e) = carve.free(a) {
                        tracing::error!(error = %e, "staging allocator refused a free");
                    }
                }
            }
        }
        if let Some(memory) = self.temp.take() {
            if let Err(e) = self.engine.unregister_memory(memory.addr) {
                tracing::warn!(error = %e, "cannot unregister temporary staging memory; leaking it");
                return;
            }
            if let Err(e) = self.device.free(&memory) {
                tracing::warn!(error = %e, "cannot free temporary staging memory");
            }
        }
    }
}
