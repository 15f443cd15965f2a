//! libibverbs implementation of [`Fabric`] (compile-checked here; runs where RDMA NICs exist).
//!
//! `sideway` provides the device list, device contexts, protection domains and memory regions
//! (its RAII types release cleanly); queue pairs, completion queues, port/GID queries, posting
//! and polling use `rdma-mummy-sys` (the `ibv_*` functions sideway itself binds, resolved from
//! `libibverbs.so.1` at run time) directly, because sideway's queue-pair and completion-queue
//! wrappers assert in `Drop`, panic on unknown enum values, and allocate on every post and poll.

use std::io;
use std::mem::MaybeUninit;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

use mooncake_core::{Error, Opcode, Result, sync};
use rdma_mummy_sys as sys;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use crate::config::RdmaConfig;
use crate::discovery::{self, LinkLayer, NicInfo, PortInfo, PortState, UsableNic, mtu_bytes, mtu_ibv};
use crate::fabric::{Fabric, FabricProvider, PostFailure, WcStatus, WorkCompletion, WorkRequest};
use crate::gid::{Gid, GidEntry, GidType};
use crate::memory::MrSource;
use crate::qp::{InitAttrs, QpOps, QpState, RtrAttrs, RtsAttrs};

/// Largest GID table scanned per port.
const MAX_GIDS: i32 = 256;

fn os_error(code: i32) -> Error {
    Error::Io(Arc::new(io::Error::from_raw_os_error(code)))
}

/// Lists the RDMA devices with the attributes of port `port` (`ibv_get_device_list`,
/// `ibv_query_port`, `ibv_query_gid`). Fails with the OS error of `ibv_get_device_list`
/// (ENOSYS without kernel support, EOPNOTSUPP when libibverbs cannot be loaded).
pub fn list_nics(port: u8, sysfs_root: &Path) -> io::Result<Vec<NicInfo>> {
    let list = DeviceList::new().map_err(|e| match e.0 {
        GetDeviceListErrorKind::Ibverbs(io) => io,
        other => io::Error::other(other.to_string()),
    })?;
    let mut out = Vec::with_capacity(list.len());
    for dev in list.iter() {
        let name = dev.name();
        let port = match dev.open() {
            Ok(ctx) => query_port(&ctx, &name, port, sysfs_root),
            Err(e) => Err(format!("cannot open device: {e}")),
        };
        out.push(NicInfo { name, port });
    }
    Ok(out)
}

fn query_port(ctx: &DeviceContext, name: &str, port: u8, sysfs_root: &Path) -> std::result::Result<PortInfo, String> {
    // SAFETY: `context()` is the live ibv_context owned by `ctx` (kept alive by the borrow).
    let raw = unsafe { ctx.context() }.as_ptr();
    let mut attr = MaybeUninit::<sys::ibv_port_attr>::zeroed();
    // SAFETY: `raw` is a valid open context and `attr` points to writable storage of the
    // ibv_port_attr size that libibverbs fills.
    let rc = unsafe { sys::ibv_query_port(raw, port, attr.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!("ibv_query_port({port}): {}", io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: ibv_query_port returned 0, so it initialized `attr` (and zeroed is a valid value anyway).
    let attr = unsafe { attr.assume_init() };
    let link_layer = LinkLayer::from_ibv(attr.link_layer);
    let mut gids = Vec::new();
    for index in 0..attr.gid_tbl_len.clamp(0, MAX_GIDS) {
        let mut gid = sys::ibv_gid { raw: [0; 16] };
        // SAFETY: valid context; `gid` is a writable 16-byte ibv_gid.
        if unsafe { sys::ibv_query_gid(raw, port, index, &mut gid) } != 0 {
            continue;
        }
        // SAFETY: every variant of the ibv_gid union is 16 plain bytes.
        let bytes = unsafe { gid.raw };
        if bytes.iter().all(|b| *b == 0) {
            continue;
        }
        let mut kind: sys::ibv_gid_type_sysfs = 0;
        let ethernet = link_layer == LinkLayer::Ethernet;
        // SAFETY: valid context; `kind` is a writable u32.
        let kind = match unsafe { sys::ibv_query_gid_type(raw, port, index as u32, &mut kind) } {
            0 if kind == sys::IBV_GID_TYPE_SYSFS_ROCE_V2 => GidType::RoceV2,
            0 if ethernet => GidType::RoceV1,
            0 => GidType::Ib,
            // Older libibverbs: read the type from sysfs.
            _ => {
                let path = sysfs_root.join(format!("class/infiniband/{name}/ports/{port}/gid_attrs/types/{index}"));
                GidType::from_sysfs(&std::fs::read_to_string(path).unwrap_or_default(), ethernet)
            }
        };
        gids.push(GidEntry { index: index as u32, gid: Gid(bytes), kind });
    }
    Ok(PortInfo {
        port,
        state: PortState::from_ibv(attr.state),
        active_mtu: mtu_bytes(attr.active_mtu).unwrap_or(0),
        lid: attr.lid,
        link_layer,
        gids,
    })
}

/// `probe()` of the verbs transport.
pub fn probe(config: &RdmaConfig) -> mooncake_core::registry::Availability {
    discovery::availability(list_nics(config.ib_port, &config.sysfs_root), &config.device_filter, config.gid_index)
}

/// Finds NICs with libibverbs and opens them.
#[derive(Debug, Default, Clone, Copy)]
pub struct VerbsProvider;

impl FabricProvider for VerbsProvider {
    type Fabric = VerbsFabric;

    fn discover(&self, config: &RdmaConfig) -> Result<Vec<UsableNic>> {
        discovery::select_nics(list_nics(config.ib_port, &config.sysfs_root), &config.device_filter, config.gid_index)
    }

    fn open(&self, config: &RdmaConfig, nics: &[UsableNic]) -> Result<VerbsFabric> {
        let list = DeviceList::new().map_err(|e| Error::unavailable(format!("no RDMA devices: {e}")))?;
        let mut opened = Vec::with_capacity(nics.len());
        for nic in nics {
            let dev = list
                .iter()
                .find(|d| d.name() == nic.name)
                .ok_or_else(|| Error::DeviceNotFound(format!("RDMA device {} disappeared", nic.name)))?;
            let ctx = dev.open().map_err(|e| Error::unavailable(format!("{}: cannot open: {e}", nic.name)))?;
            opened.push(VerbsNic::open(ctx, nic, config)?);
        }
        let mut access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        if config.relaxed_ordering {
            access |= AccessFlags::RelaxedOrdering;
        }
        Ok(VerbsFabric { nics: opened, access })
    }
}

/// A completion queue (destroyed on drop, errors logged rather than asserted).
struct RawCq {
    cq: NonNull<sys::ibv_cq>,
    _ctx: Arc<DeviceContext>,
}

// SAFETY: libibverbs objects may be used from any thread; the CQ is polled by one thread at a
// time (its NIC's poller) and only destroyed once every owner is gone.
unsafe impl Send for RawCq {}
// SAFETY: see `Send`; shared access only reads the pointer.
unsafe impl Sync for RawCq {}

impl Drop for RawCq {
    fn drop(&mut self) {
        // SAFETY: `cq` was created by ibv_create_cq and every QP using it holds an `Arc<RawCq>`,
        // so none is left when this runs.
        let rc = unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            tracing::error!(error = %io::Error::from_raw_os_error(rc), "ibv_destroy_cq failed");
        }
    }
}

struct VerbsNic {
    name: String,
    pd: Arc<ProtectionDomain>,
    cq: Arc<RawCq>,
    wc: Mutex<Vec<sys::ibv_wc>>,
    max_wr: u32,
    max_sge: u32,
    max_inline: u32,
    max_rd_atomic: u8,
    max_dest_rd_atomic: u8,
}

impl VerbsNic {
    fn open(ctx: Arc<DeviceContext>, nic: &UsableNic, config: &RdmaConfig) -> Result<VerbsNic> {
        let attr =
            ctx.query_device().map_err(|e| Error::unavailable(format!("{}: ibv_query_device: {e}", nic.name)))?;
        let cap = |v: i32, want: u32| -> u32 { want.min(u32::try_from(v).unwrap_or(0)).max(1) };
        let max_wr = cap(attr.max_qp_wr(), config.max_wr);
        let max_sge = cap(attr.max_sge(), config.max_sge);
        let max_cqe = cap(attr.max_cqe(), config.max_cqe);
        let max_rd_atomic = cap(attr.max_qp_init_rd_atom(), 16) as u8;
        let max_dest_rd_atomic = cap(attr.max_qp_rd_atom(), 16) as u8;
        let pd = ctx.alloc_pd().map_err(|e| Error::unavailable(format!("{}: ibv_alloc_pd: {e}", nic.name)))?;
        // SAFETY: the context is open; no completion channel; the CQ is destroyed by RawCq::drop
        // while `_ctx` keeps the context open.
        let cq =
            unsafe { sys::ibv_create_cq(ctx.context().as_ptr(), max_cqe as i32, ptr::null_mut(), ptr::null_mut(), 0) };
        let cq = NonNull::new(cq).ok_or_else(|| {
            Error::unavailable(format!("{}: ibv_create_cq({max_cqe}): {}", nic.name, io::Error::last_os_error()))
        })?;
        // SAFETY: ibv_wc is plain data (integers and a union of integers); all-zero is valid.
        let zero_wc: sys::ibv_wc = unsafe { MaybeUninit::zeroed().assume_init() };
        Ok(VerbsNic {
            name: nic.name.clone(),
            pd,
            cq: Arc::new(RawCq { cq, _ctx: ctx }),
            wc: Mutex::new(vec![zero_wc; 64]),
            max_wr,
            max_sge,
            max_inline: config.max_inline,
            max_rd_atomic,
            max_dest_rd_atomic,
        })
    }
}

/// Opened NICs.
pub struct VerbsFabric {
    nics: Vec<VerbsNic>,
    access: AccessFlags,
}

/// An RC queue pair with reusable posting buffers.
pub struct VerbsQp {
    qp: NonNull<sys::ibv_qp>,
    wrs: Vec<sys::ibv_send_wr>,
    sges: Vec<sys::ibv_sge>,
    max_rd_atomic: u8,
    max_dest_rd_atomic: u8,
    _cq: Arc<RawCq>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: a QP may be used from any thread; the transport serializes posting and state changes
// on one QP with a mutex.
unsafe impl Send for VerbsQp {}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        // SAFETY: `qp` came from ibv_create_qp and is destroyed exactly once, before the CQ and PD
        // it uses (held by this struct).
        let rc = unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            tracing::error!(error = %io::Error::from_raw_os_error(rc), "ibv_destroy_qp failed");
        }
    }
}

fn zeroed_qp_attr() -> sys::ibv_qp_attr {
    // SAFETY: ibv_qp_attr is plain data (integers, enums as integers, nested plain structs);
    // all-zero is the documented starting point for ibv_modify_qp.
    unsafe { MaybeUninit::zeroed().assume_init() }
}

impl VerbsQp {
    fn modify(&mut self, attr: &mut sys::ibv_qp_attr, mask: sys::ibv_qp_attr_mask) -> io::Result<()> {
        // SAFETY: `qp` is live; `attr` is a valid ibv_qp_attr and `mask` names the fields set.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as i32) };
        if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) }
    }
}

impl QpOps for VerbsQp {
    fn qp_num(&self) -> u32 {
        // SAFETY: `qp` is live for the lifetime of self; qp_num is immutable after creation.
        unsafe { self.qp.as_ref().qp_num }
    }

    fn query_state(&self) -> io::Result<QpState> {
        let mut attr = zeroed_qp_attr();
        // SAFETY: ibv_qp_init_attr is plain data; zeroed is valid.
        let mut init: sys::ibv_qp_init_attr = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: live QP; both out-pointers are valid writable structs.
        let rc = unsafe {
            sys::ibv_query_qp(self.qp.as_ptr(), &mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32, &mut init)
        };
        if rc == 0 { Ok(QpState::from_ibv(attr.qp_state)) } else { Err(io::Error::from_raw_os_error(rc)) }
    }

    fn modify_reset(&mut self) -> io::Result<()> {
        let mut attr = zeroed_qp_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RESET;
        self.modify(&mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE)
    }

    fn modify_init(&mut self, a: &InitAttrs) -> io::Result<()> {
        use sys::ibv_access_flags as acc;
        use sys::ibv_qp_attr_mask as m;
        let mut attr = zeroed_qp_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.port_num = a.port;
        attr.pkey_index = a.pkey_index;
        attr.qp_access_flags = acc::IBV_ACCESS_LOCAL_WRITE.0
            | acc::IBV_ACCESS_REMOTE_READ.0
            | acc::IBV_ACCESS_REMOTE_WRITE.0
            | acc::IBV_ACCESS_REMOTE_ATOMIC.0;
        self.modify(&mut attr, m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS)
    }

    fn modify_rtr(&mut self, a: &RtrAttrs) -> io::Result<()> {
        use sys::ibv_qp_attr_mask as m;
        let mtu = mtu_ibv(a.path_mtu).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut attr = zeroed_qp_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = mtu;
        attr.dest_qp_num = a.dest_qpn;
        attr.rq_psn = a.rq_psn;
        attr.max_dest_rd_atomic = a.max_dest_rd_atomic.min(self.max_dest_rd_atomic);
        attr.min_rnr_timer = a.min_rnr_timer;
        attr.ah_attr = sys::ibv_ah_attr {
            grh: sys::ibv_global_route {
                dgid: sys::ibv_gid { raw: a.dgid.0 },
                flow_label: 0,
                sgid_index: a.sgid_index,
                hop_limit: a.hop_limit,
                traffic_class: a.traffic_class,
            },
            dlid: a.dlid,
            sl: a.service_level,
            src_path_bits: 0,
            static_rate: 0,
            is_global: 1,
            port_num: a.port,
        };
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_MIN_RNR_TIMER
                | m::IBV_QP_AV
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN,
        )
    }

    fn modify_rts(&mut self, a: &RtsAttrs) -> io::Result<()> {
        use sys::ibv_qp_attr_mask as m;
        let mut attr = zeroed_qp_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = a.timeout;
        attr.retry_cnt = a.retry_cnt;
        attr.rnr_retry = a.rnr_retry;
        attr.sq_psn = a.sq_psn;
        attr.max_rd_atomic = a.max_rd_atomic.min(self.max_rd_atomic);
        self.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }
}

impl Fabric for VerbsFabric {
    type Qp = VerbsQp;
    type Mr = Arc<MemoryRegion>;

    fn create_qp(&self, nic: usize) -> Result<VerbsQp> {
        let n = self.nics.get(nic).ok_or_else(|| Error::DeviceNotFound(format!("NIC index {nic}")))?;
        let mut init = sys::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: n.cq.cq.as_ptr(),
            recv_cq: n.cq.cq.as_ptr(),
            srq: ptr::null_mut(),
            cap: sys::ibv_qp_cap {
                max_send_wr: n.max_wr,
                max_recv_wr: 1,
                max_send_sge: n.max_sge,
                max_recv_sge: 1,
                max_inline_data: n.max_inline,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the PD and CQ are live (their Arcs move into the VerbsQp); `init` is valid.
        let qp = unsafe { sys::ibv_create_qp(n.pd.pd().as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| {
            Error::unavailable(format!(
                "{}: ibv_create_qp: {} (check MC_MAX_WR / MC_MAX_SGE)",
                n.name,
                io::Error::last_os_error()
            ))
        })?;
        Ok(VerbsQp {
            qp,
            wrs: Vec::new(),
            sges: Vec::new(),
            max_rd_atomic: n.max_rd_atomic,
            max_dest_rd_atomic: n.max_dest_rd_atomic,
            _cq: n.cq.clone(),
            _pd: n.pd.clone(),
        })
    }

    fn post(&self, qp: &mut VerbsQp, wrs: &[WorkRequest]) -> std::result::Result<(), PostFailure> {
        if wrs.is_empty() {
            return Ok(());
        }
        qp.wrs.clear();
        qp.sges.clear();
        for w in wrs {
            qp.sges.push(sys::ibv_sge { addr: w.local_addr, length: w.length, lkey: w.lkey });
            // SAFETY: ibv_send_wr is plain data (integers, raw pointers, unions of plain structs);
            // all-zero is valid and every field the driver reads for RDMA READ/WRITE is set below.
            let mut wr: sys::ibv_send_wr = unsafe { MaybeUninit::zeroed().assume_init() };
            wr.wr_id = w.wr_id;
            wr.num_sge = 1;
            wr.opcode = match w.opcode {
                Opcode::Read => sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
                Opcode::Write => sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            };
            wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.wr.rdma = sys::rdma_t { remote_addr: w.remote_addr, rkey: w.rkey };
            qp.wrs.push(wr);
        }
        // Link after both vectors are complete so the pointers stay valid.
        let n = qp.wrs.len();
        let base = qp.wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < n, so both element pointers are inside the vectors, which are not
            // resized until the post below returns.
            unsafe {
                let wr = base.add(i);
                (*wr).sg_list = qp.sges.as_mut_ptr().add(i);
                (*wr).next = if i + 1 < n { base.add(i + 1) } else { ptr::null_mut() };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP in RTS; `base` heads a well-formed chain of `n` WRs whose SGEs name
        // memory registered on this QP's PD (checked by the caller through the lkey lookup).
        let rc = unsafe { sys::ibv_post_send(qp.qp.as_ptr(), base, &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        let posted = if bad.is_null() {
            0
        } else {
            // SAFETY: on failure `bad` points into the chain we passed, i.e. into `qp.wrs`.
            usize::try_from(unsafe { bad.offset_from(base) }).unwrap_or(0).min(n)
        };
        Err(PostFailure { posted, error: os_error(rc) })
    }

    fn poll(&self, nic: usize, out: &mut [WorkCompletion]) -> Result<usize> {
        let n = self.nics.get(nic).ok_or_else(|| Error::DeviceNotFound(format!("NIC index {nic}")))?;
        let mut wc = sync::lock(&n.wc);
        let want = out.len().min(wc.len());
        // SAFETY: live CQ; `wc` has room for `want` entries.
        let got = unsafe { sys::ibv_poll_cq(n.cq.cq.as_ptr(), want as i32, wc.as_mut_ptr()) };
        if got < 0 {
            return Err(os_error(-got));
        }
        let got = (got as usize).min(want);
        for (dst, src) in out.iter_mut().zip(&wc[..got]) {
            *dst = WorkCompletion {
                wr_id: src.wr_id,
                status: if src.status == sys::ibv_wc_status::IBV_WC_SUCCESS {
                    WcStatus::Success
                } else {
                    WcStatus::Error { code: src.status, vendor_err: src.vendor_err }
                },
            };
        }
        Ok(got)
    }

    fn register(&self, nic: usize, addr: u64, len: u64, source: MrSource) -> Result<Arc<MemoryRegion>> {
        let n = self.nics.get(nic).ok_or_else(|| Error::DeviceNotFound(format!("NIC index {nic}")))?;
        let len_usize = usize::try_from(len).map_err(|_| Error::InvalidArgument(format!("length {len} too large")))?;
        let r = match source {
            // SAFETY: the engine registered `[addr, addr+len)` as live memory of this process
            // (host, or device memory mapped by a peer-memory driver) and unregisters it from the
            // transport before it is freed.
            MrSource::Address => unsafe { n.pd.reg_mr(addr as usize, len_usize, self.access) },
            // SAFETY: `fd` is a dmabuf exported by the memory device for this range and kept open
            // for the life of the registration; `offset` locates `addr` inside it; iova = addr so
            // peers address the region by its virtual address, like host memory.
            MrSource::Dmabuf { fd, offset } => unsafe { n.pd.reg_dmabuf_mr(offset, len_usize, addr, fd, self.access) },
        };
        r.map_err(|e| Error::unavailable(format!("{}: memory registration of {addr:#x}+{len} failed: {e}", n.name)))
    }

    fn keys(mr: &Arc<MemoryRegion>) -> (u32, u32) {
        (mr.lkey(), mr.rkey())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_on_a_machine_without_rdma_is_a_clean_error_or_a_list() {
        // Without RDMA (this build machine: ENOSYS) listing fails with an OS error and probe says
        // why; with RDMA it lists devices. Neither may panic.
        match list_nics(1, Path::new("/sys")) {
            Err(e) => {
                let a = probe(&RdmaConfig::default());
                let mooncake_core::registry::Availability::Unavailable(reason) = a else {
                    panic!("listing failed ({e}) but probe says available");
                };
                assert!(reason.starts_with("no RDMA devices: "), "{reason}");
                assert!(e.raw_os_error().is_some(), "{e}");
            }
            Ok(list) => {
                for nic in list {
                    assert!(!nic.name.is_empty());
                }
            }
        }
    }

    #[test]
    fn opening_without_devices_fails_typed() {
        if list_nics(1, Path::new("/sys")).is_ok() {
            return;
        }
        let nic = UsableNic {
            name: "mlx5_0".into(),
            port: 1,
            lid: 0,
            gid: GidEntry { index: 0, gid: Gid::default(), kind: GidType::RoceV2 },
            active_mtu: 4096,
            link_layer: LinkLayer::Ethernet,
        };
        let err = VerbsProvider.open(&RdmaConfig::default(), &[nic]).err().expect("no devices here");
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        let err = VerbsProvider.discover(&RdmaConfig::default()).unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    }
}
