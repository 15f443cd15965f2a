//! Test buffers on any memory device: host memory by default, or an allocation of a GPU (or any other
//! [`MemoryDevice`]) that the suite fills and reads only through the device's copies, so a device the CPU
//! cannot dereference is never touched by the CPU here either.

use std::sync::Arc;

use mooncake_core::{AllocOptions, Allocation, MemoryDevice, MemoryKind, TransferEngine};

use crate::util::{HostBuf, OrFail, pattern};

/// Where a test buffer is allocated.
#[derive(Clone)]
pub(crate) enum Memory {
    /// Host memory from the heap ([`HostBuf`]), registered as `cpu:0`: what every suite used before memory
    /// pairs existed, and still the default.
    Host,
    /// An allocation of this device, registered with `TransferEngine::register_allocation` at the
    /// location the device reports.
    Device(Arc<dyn MemoryDevice>),
}

impl Memory {
    /// The kind of memory buffers made here are.
    pub(crate) fn kind(&self) -> MemoryKind {
        match self {
            Memory::Host => MemoryKind::Host,
            Memory::Device(d) => d.kind(),
        }
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Memory::Host => f.write_str("Host"),
            Memory::Device(d) => write!(f, "Device({})", d.name()),
        }
    }
}

/// A buffer the suite hands to engines: read and written by copy, and only while no transfer into it is in
/// flight. A device allocation is freed when the buffer is dropped (a registration still holding it keeps
/// it valid until it is unregistered).
pub(crate) struct TestBuffer {
    mem: Mem,
    /// The address the segment it was last registered with publishes it at (see [`TestBuffer::remote_addr`]).
    published: std::sync::Mutex<Option<u64>>,
}

enum Mem {
    Host(HostBuf),
    Device { device: Arc<dyn MemoryDevice>, alloc: Allocation },
}

impl TestBuffer {
    fn new(mem: Mem) -> Self {
        TestBuffer { mem, published: std::sync::Mutex::new(None) }
    }

    /// `len` zero bytes (at least 1) on `memory`.
    pub(crate) fn zeroed(memory: &Memory, len: u64) -> Result<Self, String> {
        match memory {
            Memory::Host => Ok(TestBuffer::new(Mem::Host(HostBuf::zeroed(len as usize)))),
            Memory::Device(device) => {
                let len = len.max(1);
                let alloc = device
                    .allocate(len, &AllocOptions::default())
                    .or_fail(&format!("allocating {len} bytes on {}", device.name()))?;
                let buf = TestBuffer::new(Mem::Device { device: device.clone(), alloc });
                // Device memory comes uninitialised: zero it, in bounded pieces.
                const PIECE: u64 = 8 << 20;
                let zeros = vec![0u8; PIECE.min(len) as usize];
                let mut off = 0;
                while off < len {
                    let n = PIECE.min(len - off) as usize;
                    buf.write(off, &zeros[..n])?;
                    off += n as u64;
                }
                Ok(buf)
            }
        }
    }

    /// `len` bytes (at least 1) of pattern `seed` on `memory`.
    pub(crate) fn with_pattern(memory: &Memory, seed: u64, len: u64) -> Result<Self, String> {
        match memory {
            Memory::Host => Ok(TestBuffer::new(Mem::Host(HostBuf::with_pattern(seed, len as usize)))),
            Memory::Device(_) => {
                let buf = TestBuffer::zeroed(memory, len)?;
                buf.write(0, &pattern(seed, len.max(1) as usize))?;
                Ok(buf)
            }
        }
    }

    pub(crate) fn addr(&self) -> u64 {
        match &self.mem {
            Mem::Host(h) => h.addr(),
            Mem::Device { alloc, .. } => alloc.addr,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        match &self.mem {
            Mem::Host(h) => h.len(),
            Mem::Device { alloc, .. } => alloc.len,
        }
    }

    /// A copy of all the bytes.
    pub(crate) fn bytes(&self) -> Result<Vec<u8>, String> {
        match &self.mem {
            Mem::Host(h) => Ok(h.bytes()),
            Mem::Device { .. } => self.read(0, self.len()),
        }
    }

    /// A copy of `len` bytes at `offset`.
    pub(crate) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; len as usize];
        match &self.mem {
            Mem::Host(h) => h.read(offset, &mut out)?,
            Mem::Device { device, alloc } => device
                .copy_to_host(alloc, offset, &mut out)
                .or_fail(&format!("{}: copy_to_host of {len} bytes at offset {offset}", device.name()))?,
        }
        Ok(out)
    }

    /// Copies `data` into the buffer at `offset`.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        match &self.mem {
            Mem::Host(h) => {
                h.write(offset, data);
                Ok(())
            }
            Mem::Device { device, alloc } => device.copy_from_host(data, alloc, offset).or_fail(&format!(
                "{}: copy_from_host of {} bytes at offset {offset}",
                device.name(),
                data.len()
            )),
        }
    }

    /// Registers the buffer with `engine`: host memory as `cpu:0` (held by the engine), a device allocation
    /// through its device at the location the device reports.
    ///
    /// Remembers the address `engine`'s segment publishes the buffer at ([`TestBuffer::remote_addr`]).
    pub(crate) fn register(&self, engine: &TransferEngine) -> mooncake_core::Result<()> {
        let before = engine.local_descriptor().buffers;
        match &self.mem {
            Mem::Host(h) => engine.register_owned(h.owned(), "cpu:0")?,
            Mem::Device { device, alloc } => engine.register_allocation(device, alloc, "*")?,
        }
        let after = engine.local_descriptor().buffers;
        let new = after
            .iter()
            .find(|b| b.length == self.len() && !before.iter().any(|o| o.addr == b.addr && o.length == b.length));
        *mooncake_core::sync::lock(&self.published) = new.map(|b| b.addr);
        Ok(())
    }

    /// The address peers name this buffer by in the segment it was last registered with: where that segment
    /// publishes it, which is its own address, or its offset in the shared region for region-offset protocols
    /// (cxl); its own address when the segment does not publish it.
    pub(crate) fn remote_addr(&self) -> u64 {
        mooncake_core::sync::lock(&self.published).unwrap_or_else(|| self.addr())
    }
}

impl Drop for TestBuffer {
    fn drop(&mut self) {
        if let Mem::Device { device, alloc } = &self.mem {
            let _ = device.free(alloc);
        }
    }
}
