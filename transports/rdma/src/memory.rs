//! Memory registration: one memory region (MR) per NIC for every registered buffer, host memory
//! through `ibv_reg_mr` and device (GPU) memory through `ibv_reg_dmabuf_mr` when the memory
//! device can export a dmabuf, else through `ibv_reg_mr` on the device pointer (peer-memory
//! drivers such as nvidia-peermem).
//!
//! The verbs calls sit behind [`MrBackend`]; the bookkeeping (all-or-nothing registration over
//! every NIC, key lookup, the dmabuf/peer-memory choice) is tested with a fake backend.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, RwLock};

use mooncake_core::{Error, MemoryDevice, MemoryKind, Region, RegionGuard, Result, sync};

/// Where the bytes of a registration come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrSource {
    /// A virtual address range of this process (host memory, or device memory through a
    /// peer-memory kernel module).
    Address,
    /// A dmabuf: `fd`, and the offset of the region's first byte inside it.
    Dmabuf {
        /// The dmabuf file descriptor.
        fd: RawFd,
        /// Offset of `addr` inside the dmabuf.
        offset: u64,
    },
}

/// The verbs side of registration.
pub trait MrBackend: Send + Sync {
    /// A registered memory region; deregistered when dropped.
    type Mr: Send + Sync;
    /// Registers `[addr, addr+len)` on NIC `device` (index in the transport's device list).
    fn register(&self, device: usize, addr: u64, len: u64, source: MrSource) -> Result<Self::Mr>;
    /// `(lkey, rkey)` of a region.
    fn keys(mr: &Self::Mr) -> (u32, u32);
}

/// A dmabuf exported by a memory device for a registered range.
#[derive(Debug, Clone)]
pub struct Dmabuf {
    /// The dmabuf.
    pub fd: Arc<OwnedFd>,
    /// Offset of the range's first byte inside the dmabuf.
    pub offset: u64,
}

/// Asks the device that owns `region` (GPU memory; host memory is registered by address) for a
/// dmabuf covering it. `None` when no device claims the region or it cannot export one, in which
/// case the region is registered by address (peer-memory path).
pub fn device_dmabuf(devices: &[Arc<dyn MemoryDevice>], region: &Region) -> Option<Dmabuf> {
    let kind = region.location.kind()?;
    if kind == MemoryKind::Host {
        return None;
    }
    let device = devices.iter().find(|d| d.kind() == kind)?;
    match device.export_dmabuf(region.addr, region.len) {
        Ok(export) => Some(Dmabuf { fd: Arc::new(export.fd), offset: export.offset }),
        Err(e) => {
            tracing::debug!(device = device.name(), error = %e, "no dmabuf export; using the peer-memory path");
            None
        }
    }
}

struct Registered<M> {
    len: u64,
    lkeys: Vec<u32>,
    rkeys: Vec<u32>,
    _mrs: Vec<M>,
    _dmabuf: Option<Arc<OwnedFd>>,
    /// The NICs let peers reach the memory with the keys alone: the region stays registered (its memory
    /// allocated) until this registration is dropped.
    _region: RegionGuard,
}

/// Keys of a registration, one per NIC in the transport's device order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Remote keys (published as `rkey`).
    pub rkey: Vec<u32>,
    /// Local keys (published as `lkey`, used in scatter/gather entries).
    pub lkey: Vec<u32>,
}

/// Registered buffers and their per-NIC keys.
pub struct MemoryRegistry<B: MrBackend> {
    backend: B,
    devices: usize,
    regions: RwLock<BTreeMap<u64, Registered<B::Mr>>>,
}

impl<B: MrBackend> MemoryRegistry<B> {
    /// A registry over `devices` NICs.
    pub fn new(backend: B, devices: usize) -> Self {
        MemoryRegistry { backend, devices, regions: RwLock::new(BTreeMap::new()) }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn register_all(&self, addr: u64, len: u64, source: MrSource) -> Result<Vec<B::Mr>> {
        (0..self.devices).map(|d| self.backend.register(d, addr, len, source)).collect()
    }

    /// Registers `region` on every NIC (all or nothing). Device memory uses `dmabuf` when given,
    /// falling back to the address path when the dmabuf registration fails.
    pub fn register(&self, region: &RegionGuard, dmabuf: Option<Dmabuf>) -> Result<Keys> {
        if self.devices == 0 {
            return Err(Error::unavailable("no RDMA device to register memory with"));
        }
        let is_device = region.location.kind().is_some_and(|k| k != MemoryKind::Host);
        let (mrs, keep) = match dmabuf {
            Some(d) if is_device => {
                let source = MrSource::Dmabuf { fd: d.fd.as_raw_fd(), offset: d.offset };
                match self.register_all(region.addr, region.len, source) {
                    Ok(mrs) => (mrs, Some(d.fd)),
                    Err(dmabuf_err) => {
                        let mrs = self.register_all(region.addr, region.len, MrSource::Address).map_err(|e| {
                            Error::unavailable(format!(
                                "cannot register {} memory at {:#x}+{}: dmabuf: {dmabuf_err}; peer memory: {e}",
                                region.location, region.addr, region.len
                            ))
                        })?;
                        (mrs, None)
                    }
                }
            }
            _ => (self.register_all(region.addr, region.len, MrSource::Address)?, None),
        };
        let (lkeys, rkeys): (Vec<u32>, Vec<u32>) = mrs.iter().map(B::keys).unzip();
        let keys = Keys { rkey: rkeys.clone(), lkey: lkeys.clone() };
        let entry = Registered { len: region.len, lkeys, rkeys, _mrs: mrs, _dmabuf: keep, _region: region.clone() };
        sync::write(&self.regions).insert(region.addr, entry);
        Ok(keys)
    }

    /// Deregisters the buffer starting at `addr` on every NIC.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        sync::write(&self.regions).remove(&addr).map(drop).ok_or(Error::AddressNotRegistered {
            addr,
            len: 0,
            context: "no RDMA registration starts here".into(),
        })
    }

    /// The local key of NIC `device` for `[addr, addr+len)`, which must lie in one registration.
    pub fn lkey(&self, addr: u64, len: u64, device: usize) -> Option<u32> {
        let end = addr.checked_add(len)?;
        let map = sync::read(&self.regions);
        let (start, r) = map.range(..=addr).next_back()?;
        (end <= start + r.len).then(|| r.lkeys.get(device).copied()).flatten()
    }

    /// Both keys of the registration starting at `addr`.
    pub fn keys(&self, addr: u64) -> Option<Keys> {
        let map = sync::read(&self.regions);
        map.get(&addr).map(|r| Keys { rkey: r.rkeys.clone(), lkey: r.lkeys.clone() })
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        sync::read(&self.regions).len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every registration.
    pub fn clear(&self) {
        sync::write(&self.regions).clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mooncake_core::Location;

    use super::*;

    #[derive(Default)]
    struct FakeBackend {
        live: Arc<AtomicUsize>,
        calls: Mutex<Vec<(usize, MrSource)>>,
        fail_device: Option<usize>,
        fail_dmabuf: bool,
        fail_address: bool,
    }

    struct FakeMr {
        keys: (u32, u32),
        live: Arc<AtomicUsize>,
    }

    impl Drop for FakeMr {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl MrBackend for FakeBackend {
        type Mr = FakeMr;
        fn register(&self, device: usize, addr: u64, _len: u64, source: MrSource) -> Result<FakeMr> {
            self.calls.lock().unwrap().push((device, source));
            let fails = self.fail_device == Some(device)
                || (self.fail_dmabuf && matches!(source, MrSource::Dmabuf { .. }))
                || (self.fail_address && source == MrSource::Address);
            if fails {
                return Err(Error::Io(Arc::new(std::io::Error::from_raw_os_error(libc::EFAULT))));
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(FakeMr { keys: (addr as u32 + device as u32, 1000 + device as u32), live: self.live.clone() })
        }
        fn keys(mr: &FakeMr) -> (u32, u32) {
            mr.keys
        }
    }

    /// A registered region at a made-up address (the fake backend never touches memory).
    fn region(addr: u64, len: u64, loc: &str) -> mooncake_core::RegionGuard {
        let table = mooncake_core::RegionTable::new();
        // SAFETY: the fake NIC backend of these tests records keys only; nothing reads or writes the range.
        unsafe { table.insert(addr, len, loc.parse::<Location>().unwrap()) }.unwrap();
        table.get(addr).unwrap()
    }

    fn dmabuf() -> Dmabuf {
        let file = tempfile::tempfile().unwrap();
        Dmabuf { fd: Arc::new(OwnedFd::from(file)), offset: 512 }
    }

    #[test]
    fn host_memory_gets_one_key_pair_per_nic() {
        let reg = MemoryRegistry::new(FakeBackend::default(), 2);
        let keys = reg.register(&region(0x1000, 0x2000, "cpu:0"), None).unwrap();
        assert_eq!(keys, Keys { rkey: vec![1000, 1001], lkey: vec![0x1000, 0x1001] });
        assert_eq!(reg.keys(0x1000), Some(keys));
        assert_eq!(reg.lkey(0x1800, 0x100, 1), Some(0x1001));
        assert_eq!(reg.lkey(0x2fff, 2, 0), None, "crosses the end");
        assert_eq!(reg.lkey(0xfff, 1, 0), None);
        assert_eq!(reg.lkey(0x1000, 1, 2), None, "no such NIC");
        assert_eq!(reg.lkey(u64::MAX, 2, 0), None);
        assert_eq!(reg.backend().live.load(Ordering::SeqCst), 2);
        reg.unregister(0x1000).unwrap();
        assert_eq!(reg.backend().live.load(Ordering::SeqCst), 0, "MRs deregistered");
        assert!(matches!(reg.unregister(0x1000), Err(Error::AddressNotRegistered { .. })));
    }

    #[test]
    fn registration_is_all_or_nothing() {
        let backend = FakeBackend { fail_device: Some(1), ..Default::default() };
        let reg = MemoryRegistry::new(backend, 3);
        assert!(reg.register(&region(0x1000, 16, "cpu:0"), None).is_err());
        assert!(reg.is_empty());
        assert_eq!(reg.backend().live.load(Ordering::SeqCst), 0, "the MR on NIC 0 was released");
        let none = MemoryRegistry::new(FakeBackend::default(), 0);
        assert!(matches!(none.register(&region(0x1000, 16, "cpu:0"), None), Err(Error::Unavailable { .. })));
    }

    #[test]
    fn gpu_memory_prefers_dmabuf_and_falls_back_to_peer_memory() {
        let reg = MemoryRegistry::new(FakeBackend::default(), 2);
        let d = dmabuf();
        let raw = d.fd.as_raw_fd();
        reg.register(&region(0x10000, 4096, "cuda:0"), Some(d)).unwrap();
        let calls = reg.backend().calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![(0, MrSource::Dmabuf { fd: raw, offset: 512 }), (1, MrSource::Dmabuf { fd: raw, offset: 512 })]
        );

        let reg = MemoryRegistry::new(FakeBackend { fail_dmabuf: true, ..Default::default() }, 1);
        reg.register(&region(0x10000, 4096, "cuda:0"), Some(dmabuf())).unwrap();
        let calls = reg.backend().calls.lock().unwrap().clone();
        assert_eq!(calls.last().unwrap().1, MrSource::Address);

        let reg = MemoryRegistry::new(FakeBackend { fail_dmabuf: true, fail_address: true, ..Default::default() }, 1);
        let err = reg.register(&region(0x10000, 4096, "cuda:0"), Some(dmabuf())).unwrap_err();
        assert!(err.to_string().contains("dmabuf") && err.to_string().contains("peer memory"), "{err}");

        // Host memory never uses a dmabuf, even if one is offered.
        let reg = MemoryRegistry::new(FakeBackend::default(), 1);
        reg.register(&region(0x10000, 4096, "cpu:1"), Some(dmabuf())).unwrap();
        assert_eq!(reg.backend().calls.lock().unwrap()[0].1, MrSource::Address);
    }

    /// A GPU-like device that exports a real (memfd) fd as its "dmabuf", or refuses to.
    struct ExportingDevice {
        kind: MemoryKind,
        refuse: bool,
        asked: std::sync::Mutex<Vec<(u64, u64)>>,
    }

    impl MemoryDevice for ExportingDevice {
        fn name(&self) -> &str {
            "exporting"
        }
        fn kind(&self) -> MemoryKind {
            self.kind
        }
        fn capabilities(&self) -> mooncake_core::DeviceCapabilities {
            Default::default()
        }
        fn classify(&self, _addr: u64, _len: u64) -> Option<mooncake_core::Location> {
            None
        }
        fn allocate(&self, _len: u64, _o: &mooncake_core::AllocOptions) -> Result<mooncake_core::Allocation> {
            Err(Error::unsupported("allocate", "exporting"))
        }
        fn free(&self, _a: &mooncake_core::Allocation) -> Result<()> {
            Ok(())
        }
        fn copy_to_host(&self, _a: &mooncake_core::Allocation, _o: u64, _d: &mut [u8]) -> Result<()> {
            Err(Error::unsupported("copy_to_host", "exporting"))
        }
        fn copy_from_host(&self, _s: &[u8], _a: &mooncake_core::Allocation, _o: u64) -> Result<()> {
            Err(Error::unsupported("copy_from_host", "exporting"))
        }
        fn export_dmabuf(&self, addr: u64, len: u64) -> Result<mooncake_core::DmabufExport> {
            self.asked.lock().unwrap().push((addr, len));
            if self.refuse {
                return Err(Error::unsupported("export_dmabuf", "exporting"));
            }
            Ok(mooncake_core::DmabufExport { fd: OwnedFd::from(tempfile::tempfile().unwrap()), offset: addr % 4096 })
        }
    }

    #[test]
    fn dmabufs_come_from_the_device_that_owns_the_memory() {
        let cuda = Arc::new(ExportingDevice { kind: MemoryKind::Cuda, refuse: false, asked: Default::default() });
        let devices: Vec<Arc<dyn MemoryDevice>> = vec![cuda.clone()];
        let d = device_dmabuf(&devices, &region(0x10200, 4096, "cuda:0")).expect("exported");
        assert_eq!(d.offset, 0x200);
        assert_eq!(*cuda.asked.lock().unwrap(), vec![(0x10200, 4096)]);
        // Host memory never asks; memory of a kind no device manages gets none.
        assert!(device_dmabuf(&devices, &region(0x1000, 1, "cpu:0")).is_none());
        assert!(device_dmabuf(&devices, &region(0x1000, 1, "rocm:0")).is_none());
        assert_eq!(cuda.asked.lock().unwrap().len(), 1);
        // A device that cannot export leaves the region to the peer-memory path.
        let refusing: Vec<Arc<dyn MemoryDevice>> =
            vec![Arc::new(ExportingDevice { kind: MemoryKind::Cuda, refuse: true, asked: Default::default() })];
        assert!(device_dmabuf(&refusing, &region(0x10000, 4096, "cuda:0")).is_none());
    }
}
