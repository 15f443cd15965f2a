//! The one place mooncake-rs turns addresses into bytes.
//!
//! Addresses travel through the engine as plain `u64`s. Before a byte is read or written, the address must
//! come with a proof that this process may touch it (see `mooncake_core::memory`):
//!
//! - a [`RegionGuard`]: the range is registered memory (a peer's request, checked by the serving transport),
//! - a [`LocalRange`]: the local side of a transfer (registered, or vouched for by the caller of an `unsafe`
//!   entry point such as the Python binding's).
//!
//! [`Span`] checks that the range lies inside its proof and decides how the CPU reaches it. Host memory is
//! viewed in place (no copy, no allocation). Memory of a device the CPU must not dereference (GPU memory,
//! [`Access::Device`]) is never touched by the CPU: its bytes move through the owning device's
//! `copy_to_host` / `copy_from_host` into a staging buffer. Memory no device can reach
//! ([`Access::Unreachable`]) is refused with a typed error. Every transport that moves bytes with the CPU
//! (tcp, shm, the example plugin) and the store's local copies go through here; nothing else in the workspace
//! turns an address into a slice, apart from this crate's `unsafe` functions for callers that vouch for raw
//! addresses themselves ([`copy_to_raw`], [`copy_from_raw`]).
//!
//! # The memory model of registered memory
//! Registered memory is shared memory: peers write it over the network, NICs by DMA and the kernel through
//! `process_vm_writev`, at any time while it is registered. Whoever registers it gives up Rust references to
//! it (the registration contracts say so). The views this crate hands out live only while the bytes of one
//! request move; two requests over the same bytes at the same time race on those bytes (the result is
//! unspecified bytes, as with RDMA), which the registration contracts leave to the application, as upstream
//! Mooncake does. A view never extends past its proof's range, and the proof keeps the region registered
//! (unregistering waits for it), so a view never reaches memory the process does not own.
//!
//! [`HostBuffer`] is host memory a program owns and may register without `unsafe`
//! (`TransferEngine::register_owned(buffer.owned(), ..)`), reading and writing it by copy.

use std::borrow::Cow;
use std::ptr::NonNull;
use std::sync::Arc;

use mooncake_core::{Access, DeviceMemory, Error, LocalRange, OwnedMemory, RegionGuard, Result};

/// How the CPU reaches a span's bytes.
#[derive(Clone, Copy)]
enum Reach<'a> {
    /// Directly: host memory.
    Host,
    /// Through the owning device, staged in host memory.
    Device(&'a DeviceMemory),
}

/// `len` bytes at `addr` of this process, checked against a proof, that a transport reads or writes.
pub struct Span<'a> {
    addr: u64,
    len: u64,
    reach: Reach<'a>,
}

impl std::fmt::Debug for Span<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Span")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("host", &self.is_host())
            .finish()
    }
}

impl<'a> Span<'a> {
    /// The whole local side of a transfer.
    pub fn local(range: &'a LocalRange) -> Result<Span<'a>> {
        Span::with_access(range.addr(), range.len(), range.access())
    }

    /// `len` bytes at `offset` into the local side of a transfer (a stripe or piece of it).
    pub fn local_part(range: &'a LocalRange, offset: u64, len: u64) -> Result<Span<'a>> {
        let addr =
            range.addr().checked_add(offset).filter(|_| offset.checked_add(len).is_some_and(|e| e <= range.len()));
        match addr {
            Some(addr) if len > 0 => Span::with_access(addr, len, range.access()),
            _ => Err(outside(range.addr().wrapping_add(offset), len, "outside the transfer's local range")),
        }
    }

    /// `[addr, addr+len)` of a registered region: `AddressNotRegistered` unless it lies inside `region`
    /// (zero length and overflow included).
    pub fn region(region: &'a RegionGuard, addr: u64, len: u64) -> Result<Span<'a>> {
        if len == 0 || !region.contains(addr, len) {
            return Err(outside(addr, len, "outside the registered region it was checked against"));
        }
        Span::with_access(addr, len, region.access())
    }

    fn with_access(addr: u64, len: u64, access: &'a Access) -> Result<Span<'a>> {
        let reach = match access {
            Access::Host => Reach::Host,
            Access::Device(d) => Reach::Device(d),
            Access::Unreachable => {
                return Err(Error::Unsupported {
                    op: format!("moving the bytes of [{addr:#x}, +{len}) with the CPU"),
                    backend: "this process: it is device memory no linked memory device owns".into(),
                });
            }
        };
        if addr == 0 || len == 0 || addr.checked_add(len).is_none() || len > isize::MAX as u64 {
            return Err(Error::InvalidArgument(format!("range [{addr:#x}, +{len}) cannot be viewed as bytes")));
        }
        Ok(Span { addr, len, reach })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes (never zero).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: spans are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True when the CPU reads and writes the bytes in place; false when they are staged through a device.
    pub fn is_host(&self) -> bool {
        matches!(self.reach, Reach::Host)
    }

    /// `len` bytes at `offset` into this span, with the same proof.
    pub fn sub(&self, offset: u64, len: u64) -> Result<Span<'a>> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.len => Ok(Span { addr: self.addr + offset, len, reach: self.reach }),
            _ => Err(outside(self.addr.wrapping_add(offset), len, "outside the span")),
        }
    }

    /// The address to hand the kernel for an I/O on host memory (`process_vm_readv`'s local iovec), or
    /// `None` for device memory, which must be staged instead ([`Span::bytes`], [`Span::sink`]).
    pub fn host_addr(&self) -> Option<u64> {
        self.is_host().then_some(self.addr)
    }

    /// The bytes, to send: a view of host memory, or a copy staged by the owning device.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        match self.reach {
            Reach::Host => Ok(Cow::Borrowed(self.host_slice())),
            Reach::Device(d) => {
                let mut staged = vec![0u8; self.len as usize];
                d.copy_to_host(self.addr, &mut staged)?;
                Ok(Cow::Owned(staged))
            }
        }
    }

    /// Somewhere to receive the bytes: a view of host memory, or a staging buffer the owning device copies
    /// in at [`Sink::commit`].
    pub fn sink(&mut self) -> Sink<'_> {
        match self.reach {
            Reach::Host => Sink { inner: SinkInner::Host(self.host_slice_mut()) },
            Reach::Device(d) => {
                Sink { inner: SinkInner::Staged { buf: vec![0u8; self.len as usize], owner: d, addr: self.addr } }
            }
        }
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    pub fn read_into(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let part = self.sub(offset, dst.len() as u64)?;
        match part.reach {
            Reach::Host => dst.copy_from_slice(part.host_slice()),
            Reach::Device(d) => d.copy_to_host(part.addr, dst)?,
        }
        Ok(())
    }

    /// Copies `src` into the span at `offset`.
    pub fn write_from(&self, offset: u64, src: &[u8]) -> Result<()> {
        let part = self.sub(offset, src.len() as u64)?;
        match part.reach {
            // SAFETY: the span lies inside its proof (checked at construction and by `sub`): registered
            // memory, or memory vouched for, that stays valid while the proof (borrowed for 'a) lives; it is
            // host memory (Reach::Host), mapped writable by the registration contract, and at most
            // isize::MAX bytes. `ptr::copy` tolerates `src` overlapping it; no reference into the span is
            // formed.
            Reach::Host => unsafe { std::ptr::copy(src.as_ptr(), part.addr as usize as *mut u8, src.len()) },
            Reach::Device(d) => d.copy_from_host(src, part.addr)?,
        }
        Ok(())
    }

    /// Appends the bytes to `out` (host memory is copied straight into its spare capacity, without zeroing
    /// it first). Reserve before calling to handle allocation failure yourself.
    pub fn append_to(&self, out: &mut Vec<u8>) -> Result<()> {
        let n = self.len as usize;
        let old = out.len();
        match self.reach {
            Reach::Host => {
                out.reserve(n);
                // SAFETY: the source lies inside its proof (host memory kept valid while the proof is borrowed);
                // the destination is `out`'s spare capacity, at least `n` bytes after `reserve`, owned by `out`,
                // which we borrow exclusively, so it cannot be part of registered memory someone else reaches.
                unsafe { std::ptr::copy(self.addr as usize as *const u8, out.as_mut_ptr().add(old), n) };
                // SAFETY: the `n` bytes after `old` were initialized by the copy above, within the capacity.
                unsafe { out.set_len(old + n) };
            }
            Reach::Device(d) => {
                out.resize(old + n, 0);
                if let Err(e) = d.copy_to_host(self.addr, &mut out[old..]) {
                    out.truncate(old);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn host_slice(&self) -> &[u8] {
        debug_assert!(self.is_host());
        // SAFETY: only called for Reach::Host. The range lies inside its proof (a registered region whose
        // guard is borrowed for 'a, or a vouched local range), which the registration or vouching contract
        // keeps mapped and readable while the proof lives; the length fits isize (checked at construction).
        // Registered memory is shared memory (crate docs): others may write these bytes meanwhile, a race on
        // plain bytes that the registration contract leaves to the application.
        unsafe { std::slice::from_raw_parts(self.addr as usize as *const u8, self.len as usize) }
    }

    fn host_slice_mut(&mut self) -> &mut [u8] {
        debug_assert!(self.is_host());
        // SAFETY: as in `host_slice`, and the memory is writable (registration contract). The view is
        // borrowed from this span mutably, so this span hands out one view at a time.
        unsafe { std::slice::from_raw_parts_mut(self.addr as usize as *mut u8, self.len as usize) }
    }
}

/// Where received bytes go: host memory in place, or a staging buffer for device memory.
#[must_use = "staged bytes reach device memory only at commit()"]
pub struct Sink<'a> {
    inner: SinkInner<'a>,
}

enum SinkInner<'a> {
    Host(&'a mut [u8]),
    Staged { buf: Vec<u8>, owner: &'a DeviceMemory, addr: u64 },
}

impl Sink<'_> {
    /// The bytes to fill.
    pub fn bytes(&mut self) -> &mut [u8] {
        match &mut self.inner {
            SinkInner::Host(s) => s,
            SinkInner::Staged { buf, .. } => buf,
        }
    }

    /// True when the bytes are staged for a device.
    pub fn is_staged(&self) -> bool {
        matches!(self.inner, SinkInner::Staged { .. })
    }

    /// Finishes: staged bytes are copied into the device (host bytes are in place already).
    pub fn commit(self) -> Result<()> {
        match self.inner {
            SinkInner::Host(_) => Ok(()),
            SinkInner::Staged { buf, owner, addr } => owner.copy_from_host(&buf, addr),
        }
    }
}

/// Copies `src` into `dst` (same length): a `memmove` between host spans (overlap allowed), staged through
/// the device when either side is device memory.
pub fn copy(src: &Span<'_>, dst: &Span<'_>) -> Result<()> {
    if src.len != dst.len {
        return Err(Error::InvalidArgument(format!("copy of {} bytes into {}", src.len, dst.len)));
    }
    match (src.reach, dst.reach) {
        // SAFETY: both spans lie inside their proofs (registered or vouched host memory kept valid while the
        // proofs are borrowed) and fit isize; `ptr::copy` is a memmove, so overlap is fine; no reference into
        // either range is formed.
        (Reach::Host, Reach::Host) => unsafe {
            std::ptr::copy(src.addr as usize as *const u8, dst.addr as usize as *mut u8, src.len as usize)
        },
        (Reach::Host, Reach::Device(d)) => d.copy_from_host(src.host_slice(), dst.addr)?,
        (_, _) => {
            let staged = src.bytes()?;
            dst.write_from(0, &staged)?;
        }
    }
    Ok(())
}

fn outside(addr: u64, len: u64, context: &str) -> Error {
    Error::AddressNotRegistered { addr, len, context: context.to_string() }
}

/// Copies `src` to the raw address `dst` of this process.
///
/// # Safety
/// `[dst, dst+src.len())` must be host memory of this process, mapped writable for the whole call, and no
/// Rust reference to it may be live during the call. `src` may overlap it.
pub unsafe fn copy_to_raw(dst: u64, src: &[u8]) {
    // SAFETY: the caller guarantees the destination is valid and writable for `src.len()` bytes (function
    // contract); `ptr::copy` tolerates overlap with `src`.
    unsafe { std::ptr::copy(src.as_ptr(), dst as usize as *mut u8, src.len()) }
}

/// Copies `dst.len()` bytes at the raw address `src` of this process into `dst`.
///
/// # Safety
/// `[src, src+dst.len())` must be host memory of this process, mapped readable for the whole call, with no
/// mutable Rust reference to it live during the call (it may overlap `dst`: the copy is a memmove).
pub unsafe fn copy_from_raw(src: u64, dst: &mut [u8]) {
    // SAFETY: the caller guarantees the source is valid and readable for `dst.len()` bytes (function
    // contract); `dst` is an exclusive slice of that many bytes; `ptr::copy` tolerates overlap.
    unsafe { std::ptr::copy(src as usize as *const u8, dst.as_mut_ptr(), dst.len()) }
}

/// Host memory a program owns and may register without `unsafe`: hand [`HostBuffer::owned`] to
/// `TransferEngine::register_owned`, which keeps the memory alive while it is registered (even if the
/// buffer is dropped first). The program reads and writes it by copy ([`HostBuffer::read`],
/// [`HostBuffer::write`], [`HostBuffer::to_vec`]), never through references, because transfers and peers
/// write it at any time while it is registered.
#[derive(Clone)]
pub struct HostBuffer {
    mem: Arc<Block>,
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .finish()
    }
}

/// A heap block owned through a raw pointer (so that no `Box` or `Vec` claims uniqueness over memory others
/// write), freed when the last holder drops it.
struct Block {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the block is plain heap memory with no thread affinity; it is only accessed through raw-pointer
// copies (HostBuffer) and spans of registered memory, whose races on bytes the crate docs describe.
unsafe impl Send for Block {}
// SAFETY: as above: `&Block` gives no reference into the memory, only the pointer.
unsafe impl Sync for Block {}

impl Drop for Block {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a `Box<[u8]>` of exactly this length (HostBuffer
        // constructors) and are freed only here, once, when the last holder is gone.
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl HostBuffer {
    /// `len` zero bytes (at least one).
    pub fn zeroed(len: usize) -> Self {
        HostBuffer::from_vec(vec![0u8; len.max(1)])
    }

    /// The bytes of `data` (at least one: an empty vector becomes one zero byte).
    pub fn from_vec(mut data: Vec<u8>) -> Self {
        if data.is_empty() {
            data.push(0);
        }
        let boxed: Box<[u8]> = data.into_boxed_slice();
        let len = boxed.len();
        let raw = Box::into_raw(boxed);
        // `Box::into_raw` never returns null.
        let ptr = NonNull::new(raw.cast::<u8>()).unwrap_or(NonNull::dangling());
        HostBuffer { mem: Arc::new(Block { ptr, len }) }
    }

    /// Start address (what peers and transfers name).
    pub fn addr(&self) -> u64 {
        self.mem.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.mem.len as u64
    }

    /// Always false: a buffer holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(outside(self.addr().wrapping_add(offset), len as u64, "outside the host buffer")),
        }
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: the range lies inside the live block (checked above; `self.mem` keeps it allocated); `dst`
        // is an exclusive slice outside it (the block is never exposed as a slice); a memmove is used anyway.
        unsafe { std::ptr::copy(self.mem.ptr.as_ptr().add(offset as usize), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: as in `read`, in the other direction: the destination lies inside the live, writable block.
        unsafe { std::ptr::copy(src.as_ptr(), self.mem.ptr.as_ptr().add(offset as usize), src.len()) };
        Ok(())
    }

    /// A copy of all the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.mem.len];
        // Cannot fail: the whole buffer.
        let _ = self.read(0, &mut out);
        out
    }

    /// The memory, held for a registration: it stays allocated while the registration lives.
    pub fn owned(&self) -> OwnedMemory {
        let keep: Box<Arc<Block>> = Box::new(self.mem.clone());
        // SAFETY: the block is heap memory of this process, readable and writable, and `keep` holds a
        // reference to it, so it is neither freed nor moved while the OwnedMemory lives. Nothing in this
        // crate keeps a Rust reference into it (copies go through raw pointers).
        unsafe { OwnedMemory::new(self.addr(), self.len(), keep) }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use mooncake_core::{Allocation, Location, RegionTable};
    use std::time::Duration;

    fn table_with(buf: &HostBuffer) -> RegionTable {
        let t = RegionTable::new();
        t.insert_held(buf.owned(), Location::Cpu(Some(0)), None).unwrap();
        t
    }

    #[test]
    fn spans_stay_inside_their_proof() {
        let buf = HostBuffer::from_vec((0..64u8).collect());
        let t = table_with(&buf);
        let g = t.lookup(buf.addr(), 1).unwrap();
        let a = buf.addr();
        assert!(matches!(Span::region(&g, a + 60, 5), Err(Error::AddressNotRegistered { .. })));
        assert!(matches!(Span::region(&g, a - 1, 2), Err(Error::AddressNotRegistered { .. })));
        assert!(matches!(Span::region(&g, a, 0), Err(Error::AddressNotRegistered { .. })));
        let s = Span::region(&g, a + 8, 8).unwrap();
        assert!(s.is_host() && s.host_addr() == Some(a + 8));
        assert_eq!(&*s.bytes().unwrap(), &[8, 9, 10, 11, 12, 13, 14, 15]);
        assert!(s.sub(4, 5).is_err() && s.sub(4, 4).is_ok());
        let mut s = Span::region(&g, a, 4).unwrap();
        let mut sink = s.sink();
        sink.bytes().copy_from_slice(b"abcd");
        assert!(!sink.is_staged());
        sink.commit().unwrap();
        assert_eq!(&buf.to_vec()[..5], b"abcd\x04");
        let l = LocalRange::check(&t, a + 16, 16, "local").unwrap();
        assert!(Span::local_part(&l, 8, 9).is_err());
        let part = Span::local_part(&l, 8, 8).unwrap();
        let mut got = [0u8; 8];
        part.read_into(0, &mut got).unwrap();
        assert_eq!(got, [24, 25, 26, 27, 28, 29, 30, 31]);
        let mut out = vec![1u8];
        part.append_to(&mut out).unwrap();
        assert_eq!(out, [1, 24, 25, 26, 27, 28, 29, 30, 31]);
        copy(&Span::region(&g, a + 1, 8).unwrap(), &Span::region(&g, a, 8).unwrap()).unwrap();
        assert_eq!(&buf.to_vec()[..8], b"bcd\x04\x05\x06\x07\x08");
    }

    #[test]
    fn unreachable_device_memory_is_refused() {
        let t = RegionTable::new();
        // SAFETY: the range is never dereferenced: the region is unreachable device memory, which Span refuses.
        unsafe { t.insert(0x10_0000, 4096, Location::Device(mooncake_core::MemoryKind::Cuda, 0)) }.unwrap();
        let g = t.lookup(0x10_0000, 1).unwrap();
        assert!(matches!(Span::region(&g, 0x10_0000, 16), Err(Error::Unsupported { .. })));
    }

    /// Device memory kept in a vector: its addresses are never mapped in this process (non-canonical), so a
    /// CPU access through them would crash this test.
    struct VecDevice(std::sync::Mutex<Vec<u8>>);
    const BASE: u64 = 0x4000_0000_0000_0000;

    impl mooncake_core::MemoryDevice for VecDevice {
        fn name(&self) -> &str {
            "vec"
        }
        fn kind(&self) -> mooncake_core::MemoryKind {
            mooncake_core::MemoryKind::Cuda
        }
        fn capabilities(&self) -> mooncake_core::DeviceCapabilities {
            mooncake_core::DeviceCapabilities::default()
        }
        fn classify(&self, _addr: u64, _len: u64) -> Option<Location> {
            None
        }
        fn allocate(&self, _len: u64, _o: &mooncake_core::AllocOptions) -> Result<Allocation> {
            Err(Error::unsupported("allocate", "vec"))
        }
        fn free(&self, _a: &Allocation) -> Result<()> {
            Ok(())
        }
        fn copy_to_host(&self, a: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
            mooncake_core::device::check_bounds(a, offset, dst.len() as u64)?;
            let v = self.0.lock().unwrap();
            dst.copy_from_slice(&v[offset as usize..offset as usize + dst.len()]);
            Ok(())
        }
        fn copy_from_host(&self, src: &[u8], a: &Allocation, offset: u64) -> Result<()> {
            mooncake_core::device::check_bounds(a, offset, src.len() as u64)?;
            self.0.lock().unwrap()[offset as usize..offset as usize + src.len()].copy_from_slice(src);
            Ok(())
        }
    }

    #[test]
    fn device_memory_is_staged_through_its_device() {
        let dev: Arc<dyn mooncake_core::MemoryDevice> = Arc::new(VecDevice(std::sync::Mutex::new(vec![0u8; 256])));
        let allocation = Allocation {
            addr: BASE,
            len: 256,
            location: Location::Device(mooncake_core::MemoryKind::Cuda, 0),
            token: 0,
        };
        let owner = DeviceMemory { device: dev.clone(), allocation: allocation.clone() };
        let t = RegionTable::new();
        // SAFETY: device memory of VecDevice: the CPU reaches it only through the device's copies.
        unsafe { t.insert_owned_by(BASE, 256, allocation.location.clone(), owner) }.unwrap();
        let g = t.lookup(BASE, 1).unwrap();
        let mut s = Span::region(&g, BASE + 16, 4).unwrap();
        assert!(!s.is_host() && s.host_addr().is_none());
        let mut sink = s.sink();
        assert!(sink.is_staged());
        sink.bytes().copy_from_slice(b"wxyz");
        sink.commit().unwrap();
        assert_eq!(&*Span::region(&g, BASE + 16, 4).unwrap().bytes().unwrap(), b"wxyz");
        let host = HostBuffer::zeroed(4);
        let ht = table_with(&host);
        let hg = ht.lookup(host.addr(), 4).unwrap();
        copy(&Span::region(&g, BASE + 16, 4).unwrap(), &Span::region(&hg, host.addr(), 4).unwrap()).unwrap();
        assert_eq!(host.to_vec(), b"wxyz");
        host.write(0, b"1234").unwrap();
        copy(&Span::region(&hg, host.addr(), 4).unwrap(), &Span::region(&g, BASE + 100, 4).unwrap()).unwrap();
        let mut back = [0u8; 4];
        Span::region(&g, BASE + 100, 4).unwrap().read_into(0, &mut back).unwrap();
        assert_eq!(&back, b"1234");
        Span::region(&g, BASE, 4).unwrap().write_from(0, b"abcd").unwrap();
        assert_eq!(&*Span::region(&g, BASE, 4).unwrap().bytes().unwrap(), b"abcd");
    }

    #[test]
    fn host_buffers_outlive_their_owner_while_registered() {
        let buf = HostBuffer::from_vec(b"hello".to_vec());
        assert!(buf.read(1, &mut [0; 5]).is_err() && buf.write(5, b"x").is_err());
        let t = table_with(&buf);
        let addr = buf.addr();
        drop(buf);
        let g = t.lookup(addr, 5).unwrap();
        assert_eq!(&*Span::region(&g, addr, 5).unwrap().bytes().unwrap(), b"hello");
        drop(g);
        t.remove(addr, Duration::ZERO).unwrap();
        let mut v = *b"abc";
        let p = v.as_mut_ptr() as u64;
        // SAFETY: a local buffer of this test, alive and unborrowed for the calls.
        unsafe { copy_to_raw(p, b"xy") };
        let mut out = [0u8; 3];
        // SAFETY: as above.
        unsafe { copy_from_raw(p, &mut out) };
        assert_eq!(&out, b"xyc");
    }
}
