//! [`HostDevice`]: the host DRAM implementation of [`MemoryDevice`].

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mooncake_core::device::check_bounds;
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, Error, Location, MemoryDevice, MemoryKind, OwnedMemory, Result,
    SharingHandle, sync,
};

use crate::numa::Topology;
use crate::sys::{self, AnonPages, RawMapping};

/// Driver name of the host device.
pub const DEVICE_NAME: &str = "host";

/// [`SharingHandle::kind`] of handles exported by [`HostDevice`].
pub const MEMFD_HANDLE_KIND: &str = "memfd";

pub use mooncake_core::device::FILE_HANDLE_KIND;

/// Largest alignment [`HostDevice::allocate`] honours (4 GiB); larger requests are rejected.
pub const MAX_ALIGNMENT: u64 = 1 << 32;

/// How the pages of an allocation are backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Ordinary base pages.
    Normal,
    /// Pages from the hugetlbfs pool (`MAP_HUGETLB`).
    HugeTlb,
    /// Ordinary mapping advised to use transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    TransparentHuge,
    /// A shared memory file (`memfd`), exported or imported.
    SharedFile,
}

/// What the device knows about one of its live allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    /// Start address.
    pub addr: u64,
    /// Usable length (as requested).
    pub len: u64,
    /// Length actually mapped (rounded up to the page size, huge page size for `HugeTlb`).
    pub mapped_len: u64,
    /// How its pages are backed.
    pub pages: PageKind,
    /// NUMA binding: `cpu:N` when bound with `mbind`, `cpu` (no node) otherwise.
    pub location: Location,
    /// True when it can be exported ([`HostDevice::allocate_shared`] or imported).
    pub exportable: bool,
    /// True when it was mapped by [`MemoryDevice::import_handle`].
    pub imported: bool,
}

/// One live mapping. The memory stays mapped as long as any `Arc<Mapping>` exists, so a copy that
/// cloned the Arc finishes safely even when `free` runs concurrently.
#[derive(Debug)]
struct Mapping {
    raw: RawMapping,
    len: u64,
    id: u64,
    pages: PageKind,
    location: Location,
    fd: Option<Arc<OwnedFd>>,
    imported: bool,
}

impl Mapping {
    fn info(&self) -> AllocationInfo {
        AllocationInfo {
            addr: self.raw.addr() as u64,
            len: self.len,
            mapped_len: self.raw.len() as u64,
            pages: self.pages,
            location: self.location.clone(),
            exportable: self.fd.is_some(),
            imported: self.imported,
        }
    }

    fn allocation(&self) -> Allocation {
        Allocation { addr: self.raw.addr() as u64, len: self.len, location: self.location.clone(), token: self.id }
    }
}

/// Host DRAM: classifies addresses by NUMA node, allocates page-aligned (optionally huge-page,
/// NUMA-bound) anonymous memory, and shares memfd-backed allocations between processes.
///
/// Every allocation is recorded in a table; freeing, copying or exporting an [`Allocation`] the
/// device does not know (never made here, already freed, or a stale copy whose `token` no longer
/// matches) is a typed [`Error::NotFound`], never undefined behaviour. Dropping the device unmaps
/// every allocation it still holds.
#[derive(Debug)]
pub struct HostDevice {
    table: Mutex<BTreeMap<u64, Arc<Mapping>>>,
    next_id: AtomicU64,
    topology: Topology,
}

impl Default for HostDevice {
    fn default() -> Self {
        HostDevice::new()
    }
}

impl HostDevice {
    /// A device using this machine's NUMA topology.
    pub fn new() -> Self {
        HostDevice::with_topology(Topology::detect())
    }

    /// A device that believes in the given topology (which nodes `cpu:N` may name).
    pub fn with_topology(topology: Topology) -> Self {
        HostDevice { table: Mutex::new(BTreeMap::new()), next_id: AtomicU64::new(1), topology }
    }

    /// The NUMA topology the device validates `cpu:N` locations against.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Allocates `len` bytes backed by a memfd, shareable with [`MemoryDevice::export_handle`].
    pub fn allocate_shared(&self, len: u64) -> Result<Allocation> {
        let len_usize = check_len(len)?;
        const NAME: &CStr = c"mooncake-host";
        let fd = sys::memfd_create(NAME)?;
        let map_len = sys::round_up(len_usize, sys::page_size()).ok_or_else(|| too_large(len))?;
        std::fs::File::from(fd.try_clone()?).set_len(map_len as u64)?;
        let raw = sys::map_shared_fd(fd.as_fd(), map_len)?;
        Ok(self.insert(raw, len, PageKind::SharedFile, Location::Cpu(None), Some(Arc::new(fd)), false))
    }

    /// What the device knows about the live allocation starting at `addr`.
    pub fn allocation_info(&self, addr: u64) -> Option<AllocationInfo> {
        sync::lock(&self.table).get(&addr).map(|m| m.info())
    }

    /// Live allocations (made or imported), sorted by address.
    pub fn allocations(&self) -> Vec<Allocation> {
        sync::lock(&self.table).values().map(|m| m.allocation()).collect()
    }

    /// Number of live allocations.
    pub fn live_allocations(&self) -> usize {
        sync::lock(&self.table).len()
    }

    fn insert(
        &self,
        raw: RawMapping,
        len: u64,
        pages: PageKind,
        location: Location,
        fd: Option<Arc<OwnedFd>>,
        imported: bool,
    ) -> Allocation {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mapping = Arc::new(Mapping { raw, len, id, pages, location, fd, imported });
        let allocation = mapping.allocation();
        sync::lock(&self.table).insert(allocation.addr, mapping);
        allocation
    }

    /// The live mapping `allocation` names, checking address, token and length.
    fn lookup(&self, allocation: &Allocation, op: &str) -> Result<Arc<Mapping>> {
        match sync::lock(&self.table).get(&allocation.addr) {
            Some(m) if m.id == allocation.token && m.len == allocation.len => Ok(Arc::clone(m)),
            _ => Err(unknown(allocation, op)),
        }
    }

    /// The NUMA node the caller asked for, checked against the topology.
    fn requested_node(&self, location: &Location) -> Result<Option<u32>> {
        match location {
            Location::Detect | Location::Cpu(None) => Ok(None),
            Location::Cpu(Some(n)) if self.topology.has_node(*n) => Ok(Some(*n)),
            Location::Cpu(Some(n)) => Err(Error::DeviceNotFound(format!(
                "cpu:{n}: NUMA node {n} is not online on this machine (online nodes: {:?})",
                self.topology.node_ids()
            ))),
            other => Err(Error::InvalidArgument(format!(
                "the host device allocates host memory only (cpu:N or *), not {other}"
            ))),
        }
    }

    fn map_with_pages(&self, len: usize, align: usize, huge: bool) -> Result<(RawMapping, PageKind)> {
        if !huge {
            return Ok((sys::map_anonymous(len, align, AnonPages::Normal)?, PageKind::Normal));
        }
        match sys::map_anonymous(len, align, AnonPages::HugeTlb) {
            Ok(raw) => {
                tracing::debug!(len, huge_page_size = sys::huge_page_size(), "allocated from the hugetlbfs pool");
                return Ok((raw, PageKind::HugeTlb));
            }
            Err(e) => tracing::debug!(len, error = %e, "MAP_HUGETLB failed; trying transparent huge pages"),
        }
        // Align to the huge page size so the kernel can back the range with whole huge pages.
        let raw = sys::map_anonymous(len, align.max(sys::huge_page_size()), AnonPages::Normal)?;
        match sys::madvise_hugepage(&raw) {
            Ok(()) => {
                tracing::debug!(len, "using transparent huge pages (madvise MADV_HUGEPAGE)");
                Ok((raw, PageKind::TransparentHuge))
            }
            Err(e) => {
                tracing::warn!(len, error = %e, "huge pages requested but unavailable; using normal pages");
                Ok((raw, PageKind::Normal))
            }
        }
    }
}

impl MemoryDevice for HostDevice {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Host
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities {
            host_accessible: true,
            export_handles: true,
            huge_pages: true,
            device_count: u32::try_from(self.topology.node_count()).unwrap_or(u32::MAX),
        }
    }

    /// Host memory is whatever no other device claims, so this always answers `cpu:N`.
    ///
    /// `N` is the node of the first page when it is already faulted in (asked with `move_pages`,
    /// which touches nothing); otherwise the node the allocation was bound to, else node 0.
    fn classify(&self, addr: u64, _len: u64) -> Option<Location> {
        if let Some(node) = sys::page_node(addr) {
            return Some(Location::Cpu(Some(node)));
        }
        let bound = sync::lock(&self.table).range(..=addr).next_back().and_then(|(start, m)| match m.location {
            Location::Cpu(Some(n)) if addr - start < m.raw.len() as u64 => Some(n),
            _ => None,
        });
        Some(Location::Cpu(Some(bound.unwrap_or(0))))
    }

    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        if options.shareable {
            if options.alignment > sys::page_size() as u64 || options.huge_pages || options.location != Location::Detect
            {
                return Err(Error::InvalidArgument(
                    "shareable host memory is page-aligned, normal pages, default placement".into(),
                ));
            }
            return self.allocate_shared(len);
        }
        let len_usize = check_len(len)?;
        let align = options.alignment;
        if align != 0 && !align.is_power_of_two() {
            return Err(Error::InvalidArgument(format!("alignment {align} is not a power of two")));
        }
        if align > MAX_ALIGNMENT {
            return Err(Error::InvalidArgument(format!("alignment {align} exceeds the maximum {MAX_ALIGNMENT}")));
        }
        let node = self.requested_node(&options.location)?;
        let align = usize::try_from(align).map_err(|_| too_large(len))?;
        let (raw, pages) = self.map_with_pages(len_usize, align, options.huge_pages)?;
        if let Some(n) = node {
            if let Err(e) = sys::mbind(&raw, n) {
                match e.raw_os_error() {
                    // No NUMA in this kernel, or policy calls filtered (containers): binding is a hint.
                    Some(libc::ENOSYS) | Some(libc::EPERM) => {
                        tracing::warn!(node = n, error = %e, "mbind unavailable; allocation is not NUMA-bound")
                    }
                    _ => return Err(Error::Io(Arc::new(io::Error::new(e.kind(), format!("mbind to node {n}: {e}"))))),
                }
            }
        }
        let location = Location::Cpu(node);
        Ok(self.insert(raw, len, pages, location, None, false))
    }

    fn free(&self, allocation: &Allocation) -> Result<()> {
        let mut table = sync::lock(&self.table);
        match table.get(&allocation.addr) {
            Some(m) if m.id == allocation.token && m.len == allocation.len => {
                // Unmapped when the last user (a copy in progress, at most) drops its Arc.
                table.remove(&allocation.addr);
                Ok(())
            }
            _ => Err(unknown(allocation, "free")),
        }
    }

    fn prefault(&self, allocation: &Allocation) -> Result<()> {
        // The Arc keeps the mapping alive even if `free` runs meanwhile.
        let m = self.lookup(allocation, "prefault")?;
        match sys::populate_write(&m.raw) {
            Ok(()) => Ok(()),
            // Old kernel, or memory the kernel cannot populate (e.g. an imported read-only file):
            // pages then fault in on first use, as without the hint.
            Err(e) => {
                tracing::debug!(addr = allocation.addr, len = allocation.len, error = %e, "prefault not done");
                Ok(())
            }
        }
    }

    /// Holds the mapping itself: it stays mapped (and the memory allocated) until the hold is dropped, even if
    /// [`MemoryDevice::free`] runs first (the unmapping then happens when the hold ends).
    fn hold(&self, allocation: &Allocation) -> Result<OwnedMemory> {
        let m = self.lookup(allocation, "hold")?;
        let (addr, len) = (m.raw.addr() as u64, m.len);
        // SAFETY: `m` is a live mapping of this device (looked up by address, token and length), readable and
        // writable (anonymous or shared PROT_READ|PROT_WRITE mappings), at least `len` bytes long; the boxed
        // Arc keeps it mapped until the OwnedMemory is dropped (Mapping unmaps only when its last Arc goes).
        Ok(unsafe { OwnedMemory::new(addr, len, Box::new(m)) })
    }

    fn copy_to_host(&self, allocation: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        let m = self.lookup(allocation, "copy_to_host")?;
        check_bounds(allocation, offset, dst.len() as u64)?;
        let src = (m.raw.addr() as u64 + offset) as *const u8;
        // SAFETY: `m` keeps the mapping alive for the call; check_bounds and the lookup guarantee
        // [offset, offset+dst.len()) lies within `len <= mapped_len` bytes of it; `dst` is a live
        // exclusive slice; copy_bytes tolerates overlap should the caller's slice alias the mapping.
        unsafe { sys::copy_bytes(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_from_host(&self, src: &[u8], allocation: &Allocation, offset: u64) -> Result<()> {
        let m = self.lookup(allocation, "copy_from_host")?;
        check_bounds(allocation, offset, src.len() as u64)?;
        let dst = (m.raw.addr() as u64 + offset) as *mut u8;
        // SAFETY: as in copy_to_host: the mapping is alive (held by `m`), writable (PROT_WRITE), and
        // the range was bounds-checked; `src` is a live slice.
        unsafe { sys::copy_bytes(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    fn export_handle(&self, allocation: &Allocation) -> Result<SharingHandle> {
        let m = self.lookup(allocation, "export_handle")?;
        let fd = m.fd.clone().ok_or_else(|| {
            Error::unsupported(
                "export_handle of an anonymous allocation (allocate with HostDevice::allocate_shared to share it)",
                DEVICE_NAME,
            )
        })?;
        Ok(SharingHandle { kind: MEMFD_HANDLE_KIND.into(), data: Vec::new(), fd: Some(fd), len: m.len })
    }

    fn import_handle(&self, handle: &SharingHandle) -> Result<Allocation> {
        if handle.kind == FILE_HANDLE_KIND {
            return self.import_file(handle);
        }
        if handle.kind != MEMFD_HANDLE_KIND {
            return Err(Error::unsupported(format!("import_handle of kind {:?}", handle.kind), DEVICE_NAME));
        }
        let fd = handle
            .fd
            .clone()
            .ok_or_else(|| Error::InvalidArgument("memfd sharing handle carries no file descriptor".into()))?;
        let len_usize = check_len(handle.len)?;
        // Mapping past the end of the file would turn accesses into SIGBUS: check the size first.
        let file_len = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if file_len < handle.len {
            return Err(Error::InvalidArgument(format!(
                "memfd handle claims {} bytes but the file holds {file_len}",
                handle.len
            )));
        }
        let raw = sys::map_shared_fd(fd.as_fd(), len_usize)?;
        if (raw.len() as u64) > file_len {
            // The page-rounded tail lies past EOF; only [0, len) is ever accessed through this device.
            tracing::debug!(len = handle.len, file_len, "imported mapping extends past the end of the memfd");
        }
        Ok(self.insert(raw, handle.len, PageKind::SharedFile, Location::Cpu(None), Some(fd), true))
    }
}

impl HostDevice {
    /// Maps the file region a [`FILE_HANDLE_KIND`] handle names.
    fn import_file(&self, handle: &SharingHandle) -> Result<Allocation> {
        let fd = handle
            .fd
            .clone()
            .ok_or_else(|| Error::InvalidArgument("file sharing handle carries no file descriptor".into()))?;
        let offset = match handle.data.as_slice() {
            [] => 0,
            bytes => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| Error::InvalidArgument("file sharing handle: offset must be 8 bytes".into()))?,
            ),
        };
        let len_usize = check_len(handle.len)?;
        let file_len = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        if offset.checked_add(handle.len).is_none_or(|end| end > file_len) {
            return Err(Error::InvalidArgument(format!(
                "file region [{offset}, +{}) exceeds the file's {file_len} bytes",
                handle.len
            )));
        }
        let raw = sys::map_shared_fd_at(fd.as_fd(), len_usize, offset)
            .map_err(|e| Error::InvalidArgument(format!("cannot map the file region at offset {offset}: {e}")))?;
        Ok(self.insert(raw, handle.len, PageKind::SharedFile, Location::Cpu(None), Some(fd), true))
    }
}

fn check_len(len: u64) -> Result<usize> {
    if len == 0 {
        return Err(Error::InvalidArgument("allocation length must be greater than zero".into()));
    }
    usize::try_from(len).ok().filter(|l| *l <= isize::MAX as usize).ok_or_else(|| too_large(len))
}

fn too_large(len: u64) -> Error {
    Error::InvalidArgument(format!("allocation length {len} does not fit in the address space"))
}

fn unknown(allocation: &Allocation, op: &str) -> Error {
    Error::NotFound(format!(
        "{op}: no live host allocation [{:#x}, +{}) with token {} (never allocated by this device, already freed, \
         or a stale copy)",
        allocation.addr, allocation.len, allocation.token
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_allocation_copies_are_rejected() {
        let dev = HostDevice::new();
        let a = dev.allocate(4096, &AllocOptions::default()).unwrap();
        let mut stale = a.clone();
        stale.token += 1000;
        assert!(matches!(dev.free(&stale), Err(Error::NotFound(_))));
        let mut shorter = a.clone();
        shorter.len = 16;
        assert!(matches!(dev.copy_from_host(&[1], &shorter, 0), Err(Error::NotFound(_))));
        dev.free(&a).unwrap();
        assert_eq!(dev.live_allocations(), 0);
    }

    #[test]
    fn a_hold_keeps_the_mapping_after_free() {
        let dev = HostDevice::new();
        let a = dev.allocate(4096, &AllocOptions::default()).unwrap();
        dev.copy_from_host(b"kept", &a, 0).unwrap();
        let held = dev.hold(&a).unwrap();
        assert_eq!((held.addr(), held.len()), (a.addr, a.len));
        dev.free(&a).unwrap();
        assert_eq!(dev.live_allocations(), 0);
        assert!(matches!(dev.hold(&a), Err(Error::NotFound(_))), "a freed allocation cannot be held again");
        // Still mapped while held: read it through a registration of the held memory.
        let t = mooncake_core::RegionTable::new();
        t.insert_held(held, Location::Cpu(None), None).unwrap();
        let region = t.lookup(a.addr, 4).unwrap();
        let span = mooncake_raw::Span::region(&region, a.addr, 4).unwrap();
        assert_eq!(&*span.bytes().unwrap(), b"kept");
    }

    #[test]
    fn bound_node_is_used_for_untouched_pages() {
        let dev = HostDevice::with_topology(Topology::single_node(vec![0]));
        let a = dev.allocate(1 << 20, &AllocOptions { location: Location::Cpu(Some(0)), ..Default::default() });
        let a = a.unwrap();
        assert_eq!(a.location, Location::Cpu(Some(0)));
        assert_eq!(dev.classify(a.addr + 8192, 16), Some(Location::Cpu(Some(0))));
        dev.free(&a).unwrap();
    }

    #[test]
    fn non_host_locations_are_rejected() {
        let dev = HostDevice::new();
        let opts = AllocOptions { location: Location::Device(MemoryKind::Cuda, 0), ..Default::default() };
        assert!(matches!(dev.allocate(4096, &opts), Err(Error::InvalidArgument(_))));
        let opts = AllocOptions { alignment: 3, ..Default::default() };
        assert!(matches!(dev.allocate(4096, &opts), Err(Error::InvalidArgument(_))));
        let opts = AllocOptions { alignment: MAX_ALIGNMENT << 1, ..Default::default() };
        assert!(matches!(dev.allocate(4096, &opts), Err(Error::InvalidArgument(_))));
        assert!(matches!(dev.allocate(u64::MAX, &AllocOptions::default()), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn file_regions_map_shared_at_an_offset() {
        let dev = HostDevice::new();
        let path = std::env::temp_dir().join(format!("mc-host-file-{}", std::process::id()));
        let page = 4096u64;
        std::fs::write(&path, vec![7u8; 4 * page as usize]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let fd = Arc::new(OwnedFd::from(file));
        let handle = |offset: u64, len: u64| SharingHandle {
            kind: FILE_HANDLE_KIND.into(),
            data: offset.to_le_bytes().to_vec(),
            fd: Some(fd.clone()),
            len,
        };
        let a = dev.import_handle(&handle(page, 2 * page)).unwrap();
        dev.copy_from_host(b"hello", &a, 0).unwrap();
        let mut back = [0u8; 5];
        dev.copy_to_host(&a, page, &mut back).unwrap();
        assert_eq!(back, [7; 5]);
        dev.free(&a).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[page as usize..page as usize + 5], b"hello");
        // Past the end of the file, or an offset that is not page aligned: refused.
        assert!(matches!(dev.import_handle(&handle(page, 4 * page)), Err(Error::InvalidArgument(_))));
        assert!(matches!(dev.import_handle(&handle(100, page)), Err(Error::InvalidArgument(_))));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn import_rejects_bad_handles() {
        let dev = HostDevice::new();
        let h = SharingHandle { kind: "cuda_ipc".into(), data: vec![], fd: None, len: 4096 };
        assert!(matches!(dev.import_handle(&h), Err(Error::Unsupported { .. })));
        let h = SharingHandle { kind: MEMFD_HANDLE_KIND.into(), data: vec![], fd: None, len: 4096 };
        assert!(matches!(dev.import_handle(&h), Err(Error::InvalidArgument(_))));
        let a = dev.allocate_shared(4096).unwrap();
        let mut h = dev.export_handle(&a).unwrap();
        h.len = 1 << 20; // larger than the file
        assert!(matches!(dev.import_handle(&h), Err(Error::InvalidArgument(_))));
        dev.free(&a).unwrap();
    }
}
