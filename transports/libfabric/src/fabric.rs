//! A small safe layer over the libfabric calls this transport needs.
//!
//! [`InfoList`] wraps `fi_getinfo`; [`Rail`] owns everything opened on one domain (fabric,
//! domain, completion queue, address vector, one RDM endpoint and the memory registrations) and
//! closes it in the right order when dropped. Every call that touches a rail's objects takes
//! `&mut self`: the rail is opened with `FI_THREAD_DOMAIN`, so libfabric expects the application
//! to serialize access to a domain, and exclusive borrows (the transport keeps each rail in a
//! `Mutex`) do exactly that.
//!
//! Errors carry the call that failed and `fi_strerror`'s text ([`FiError`]).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_void};
use std::ptr::{self, NonNull};

use mooncake_libfabric_sys as sys;

/// Memory-registration mode bits this wrapper knows how to honour (requested in the hints; the
/// provider answers with the subset it needs).
pub(crate) const SUPPORTED_MR_MODE: u32 = sys::FI_MR_LOCAL
    | sys::FI_MR_VIRT_ADDR
    | sys::FI_MR_ALLOCATED
    | sys::FI_MR_PROV_KEY
    | sys::FI_MR_ENDPOINT
    | sys::FI_MR_RMA_EVENT;

/// The libfabric API version requested: the one of the headers this crate was built against.
pub(crate) const API_VERSION: u32 = sys::FI_VERSION(sys::FI_MAJOR_VERSION, sys::FI_MINOR_VERSION);

/// A failed libfabric call: which call, the (positive) `FI_E*` code and `fi_strerror`'s text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FiError {
    /// The libfabric function that failed.
    pub call: &'static str,
    /// Positive `FI_E*` / errno value.
    pub code: u32,
    /// `fi_strerror(code)`, or the provider's text for completion errors.
    pub message: String,
}

impl std::fmt::Display for FiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (fi errno {})", self.call, self.message, self.code)
    }
}

/// `fi_strerror` for a positive error code.
pub(crate) fn strerror(code: u32) -> String {
    let code = i32::try_from(code).unwrap_or(i32::MAX);
    // SAFETY: fi_strerror accepts any integer and returns a pointer to a static NUL-terminated
    // string (or NULL, handled below); we copy it before returning.
    let p = unsafe { sys::fi_strerror(code) };
    if p.is_null() {
        return format!("unknown error {code}");
    }
    // SAFETY: non-null pointer from fi_strerror to a static C string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl FiError {
    /// The error for a negative libfabric return value.
    pub(crate) fn from_ret(call: &'static str, ret: i64) -> Self {
        let code = u32::try_from(ret.unsigned_abs()).unwrap_or(u32::MAX);
        FiError { call, code, message: strerror(code) }
    }
}

/// `Ok` for a zero (or positive) return, [`FiError`] for a negative one.
fn check(call: &'static str, ret: i32) -> Result<(), FiError> {
    if ret < 0 { Err(FiError::from_ret(call, i64::from(ret))) } else { Ok(()) }
}

/// `CStr` to `String`, empty for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string alive for the duration of the call.
unsafe fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated per this function's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// What to ask `fi_getinfo` for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hints {
    /// Provider name (`efa`, `tcp;ofi_rxm`, `shm`); `None` = any.
    pub provider: Option<String>,
    /// Domain name; `None` = any.
    pub domain: Option<String>,
    /// Node to bind the endpoint to (with `FI_SOURCE`), e.g. the engine's bind address.
    pub source_node: Option<String>,
    /// `mr_mode` bits to offer (defaults to [`SUPPORTED_MR_MODE`] when 0 and `mr_mode_set` is false).
    pub mr_mode: u32,
    /// Offer exactly `mr_mode`, even 0 (the legacy scalable mode).
    pub mr_mode_set: bool,
    /// Ask for `FI_DELIVERY_COMPLETE` as the default transmit flag: a write completes only once
    /// its data is placed in the target's memory.
    pub delivery_complete: bool,
    /// Ask for `FI_RMA_EVENT`: a counter of peers' accesses to our memory, so that a passive
    /// target notices it is being served.
    pub rma_event: bool,
}

/// The result of `fi_getinfo`: a list of matching (provider, fabric, domain) configurations.
pub(crate) struct InfoList {
    head: *mut sys::fi_info,
}

// SAFETY: the list is plain heap data owned exclusively by this value; libfabric does not keep
// references to it, so it may move to and be read from another thread.
unsafe impl Send for InfoList {}

impl InfoList {
    /// Runs `fi_getinfo` for RDM endpoints with one-sided RMA (read and write, both directions).
    /// No match is `Ok` with an empty list (`-FI_ENODATA`).
    pub(crate) fn query(h: &Hints) -> Result<InfoList, FiError> {
        // SAFETY: fi_allocinfo returns a zeroed fi_info with all attribute structs allocated, or NULL.
        let hints = unsafe { sys::fi_allocinfo() };
        let Some(hints) = NonNull::new(hints) else {
            return Err(FiError { call: "fi_allocinfo", code: sys::FI_ENOMEM, message: strerror(sys::FI_ENOMEM) });
        };
        let hints = OwnedInfo(hints);
        let provider = h.provider.as_deref().map(CString::new).transpose();
        let domain = h.domain.as_deref().map(CString::new).transpose();
        let node = h.source_node.as_deref().map(CString::new).transpose();
        let (Ok(provider), Ok(domain), Ok(node)) = (provider, domain, node) else {
            return Err(FiError {
                call: "fi_getinfo",
                code: sys::FI_EINVAL,
                message: "name contains a NUL byte".into(),
            });
        };
        let mr_mode = if h.mr_mode_set || h.mr_mode != 0 { h.mr_mode } else { SUPPORTED_MR_MODE };
        let hp = hints.0.as_ptr();
        // SAFETY: `hp` and its attribute pointers were allocated by fi_allocinfo (non-null for a
        // successful allocation); strings given to it are strdup'ed copies that fi_freeinfo frees.
        unsafe {
            (*hp).caps =
                u64::from(sys::FI_RMA | sys::FI_READ | sys::FI_WRITE | sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE);
            if h.rma_event {
                (*hp).caps |= sys::FI_RMA_EVENT;
            }
            (*hp).mode = sys::FI_CONTEXT | sys::FI_CONTEXT2;
            (*(*hp).ep_attr).type_ = sys::FI_EP_RDM;
            if h.delivery_complete {
                (*(*hp).tx_attr).op_flags = u64::from(sys::FI_DELIVERY_COMPLETE);
            }
            let d = (*hp).domain_attr;
            (*d).mr_mode = mr_mode as i32;
            (*d).threading = sys::FI_THREAD_DOMAIN;
            (*d).av_type = sys::FI_AV_TABLE;
            (*d).resource_mgmt = sys::FI_RM_ENABLED;
            if let Some(p) = &provider {
                (*(*hp).fabric_attr).prov_name = libc::strdup(p.as_ptr());
            }
            if let Some(dn) = &domain {
                (*d).name = libc::strdup(dn.as_ptr());
            }
        }
        let (node_ptr, flags) = match &node {
            Some(n) => (n.as_ptr(), sys::FI_SOURCE),
            None => (ptr::null(), 0),
        };
        let mut out: *mut sys::fi_info = ptr::null_mut();
        // SAFETY: all pointers are valid for the call; `out` receives a list we own (freed in Drop).
        let ret = unsafe { sys::fi_getinfo(API_VERSION, node_ptr, ptr::null(), flags, hp, &mut out) };
        if ret == -(sys::FI_ENODATA as i32) {
            return Ok(InfoList { head: ptr::null_mut() });
        }
        check("fi_getinfo", ret)?;
        Ok(InfoList { head: out })
    }

    /// The entries, in the provider's order of preference.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Info<'_>> {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            let p = NonNull::new(cur)?;
            // SAFETY: `p` is an entry of the list owned by `self`, alive while `self` is borrowed.
            cur = unsafe { (*p.as_ptr()).next };
            Some(Info { ptr: p, _list: std::marker::PhantomData })
        })
    }

    /// True when nothing matched.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }
}

impl Drop for InfoList {
    fn drop(&mut self) {
        if !self.head.is_null() {
            // SAFETY: the list came from fi_getinfo and is freed exactly once.
            unsafe { sys::fi_freeinfo(self.head) };
        }
    }
}

/// One entry of an [`InfoList`].
#[derive(Clone, Copy)]
pub(crate) struct Info<'a> {
    ptr: NonNull<sys::fi_info>,
    _list: std::marker::PhantomData<&'a InfoList>,
}

/// The attributes of an [`Info`] the transport looks at, copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoAttrs {
    /// Provider name as libfabric reports it (`tcp;ofi_rxm`).
    pub provider: String,
    /// Fabric name (e.g. the IP network for tcp).
    pub fabric: String,
    /// Domain name (the NIC or interface).
    pub domain: String,
    /// `mr_mode` bits the provider requires.
    pub mr_mode: u32,
    /// Size of MR keys in bytes.
    pub mr_key_size: usize,
    /// Largest message (and RMA) size.
    pub max_msg_size: u64,
    /// Transmit queue depth.
    pub tx_size: usize,
    /// Address format (`FI_SOCKADDR_IN`, `FI_ADDR_EFA`, ...).
    pub addr_format: u32,
    /// Mode bits the provider requires of us (`FI_CONTEXT`, ...).
    pub mode: u64,
    /// Capabilities granted.
    pub caps: u64,
}

impl InfoAttrs {
    /// Remote addresses are virtual addresses (`FI_MR_VIRT_ADDR`), not offsets into the region.
    pub(crate) fn virt_addr(&self) -> bool {
        self.mr_mode & sys::FI_MR_VIRT_ADDR != 0
    }

    /// Local buffers need their registration's descriptor (`FI_MR_LOCAL`).
    pub(crate) fn local_mr(&self) -> bool {
        self.mr_mode & sys::FI_MR_LOCAL != 0
    }

    /// Registrations must be bound to the endpoint and enabled (`FI_MR_ENDPOINT`).
    pub(crate) fn mr_endpoint(&self) -> bool {
        self.mr_mode & sys::FI_MR_ENDPOINT != 0
    }

    /// Peers' accesses to our memory can be counted (`FI_RMA_EVENT`).
    pub(crate) fn rma_event(&self) -> bool {
        self.caps & sys::FI_RMA_EVENT != 0
    }

    /// Registrations must be bound to the remote-access counter and enabled (`FI_MR_RMA_EVENT`).
    pub(crate) fn mr_rma_event(&self) -> bool {
        self.mr_mode & sys::FI_MR_RMA_EVENT != 0
    }

    /// Endpoint addresses are socket addresses (tcp, udp, sockets, net): they bind an interface.
    pub(crate) fn socket_addressed(&self) -> bool {
        matches!(self.addr_format, sys::FI_SOCKADDR | sys::FI_SOCKADDR_IN | sys::FI_SOCKADDR_IN6)
    }
}

impl Info<'_> {
    /// Copies out the attributes the transport uses.
    pub(crate) fn attrs(&self) -> InfoAttrs {
        let p = self.ptr.as_ptr();
        // SAFETY: `p` is a live entry of a list from fi_getinfo; its attribute pointers are
        // either NULL (checked) or point to structs owned by the same list.
        unsafe {
            let fa = (*p).fabric_attr;
            let da = (*p).domain_attr;
            let ea = (*p).ep_attr;
            let ta = (*p).tx_attr;
            InfoAttrs {
                provider: if fa.is_null() { String::new() } else { cstr((*fa).prov_name) },
                fabric: if fa.is_null() { String::new() } else { cstr((*fa).name) },
                domain: if da.is_null() { String::new() } else { cstr((*da).name) },
                mr_mode: if da.is_null() { 0 } else { (*da).mr_mode as u32 },
                mr_key_size: if da.is_null() { 8 } else { (*da).mr_key_size },
                max_msg_size: if ea.is_null() { 0 } else { (*ea).max_msg_size as u64 },
                tx_size: if ta.is_null() { 0 } else { (*ta).size },
                addr_format: (*p).addr_format,
                mode: (*p).mode,
                caps: (*p).caps,
            }
        }
    }

    fn dup(&self) -> Result<OwnedInfo, FiError> {
        // SAFETY: duplicating a live entry; the copy (a single entry) is owned by OwnedInfo.
        let d = unsafe { sys::fi_dupinfo(self.ptr.as_ptr()) };
        NonNull::new(d).map(OwnedInfo).ok_or(FiError {
            call: "fi_dupinfo",
            code: sys::FI_ENOMEM,
            message: strerror(sys::FI_ENOMEM),
        })
    }
}

/// One `fi_info` we own (from `fi_allocinfo` or `fi_dupinfo`).
struct OwnedInfo(NonNull<sys::fi_info>);

impl Drop for OwnedInfo {
    fn drop(&mut self) {
        // SAFETY: allocated by libfabric, freed exactly once.
        unsafe { sys::fi_freeinfo(self.0.as_ptr()) };
    }
}

/// Closes a fabric object.
///
/// # Safety
/// `fid` is the `fid` member of a live object that is closed exactly once, after every object
/// opened from it.
unsafe fn close(fid: *mut sys::fid, what: &'static str) {
    // SAFETY: per this function's contract.
    let ret = unsafe { sys::fi_close(fid) };
    if ret != 0 {
        tracing::warn!(object = what, error = %FiError::from_ret("fi_close", i64::from(ret)), "closing a libfabric object failed");
    }
}

/// An opened fabric (`fi_fabric`).
struct Fabric(NonNull<sys::fid_fabric>);

impl Drop for Fabric {
    fn drop(&mut self) {
        // SAFETY: opened by fi_fabric; the Rail drops every child before this field.
        unsafe { close(&raw mut (*self.0.as_ptr()).fid, "fabric") };
    }
}

/// An opened domain (`fi_domain`): one NIC or interface.
struct Domain(NonNull<sys::fid_domain>);

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: opened by fi_domain; the Rail drops every child before this field.
        unsafe { close(&raw mut (*self.0.as_ptr()).fid, "domain") };
    }
}

/// A completion queue (`fi_cq_open`, context format).
struct CompletionQueue(NonNull<sys::fid_cq>);

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: opened by fi_cq_open; the endpoint bound to it is dropped first.
        unsafe { close(&raw mut (*self.0.as_ptr()).fid, "completion queue") };
    }
}

/// An address vector (`fi_av_open`, table type).
struct AddressVector(NonNull<sys::fid_av>);

impl Drop for AddressVector {
    fn drop(&mut self) {
        // SAFETY: opened by fi_av_open; the endpoint bound to it is dropped first.
        unsafe { close(&raw mut (*self.0.as_ptr()).fid, "address vector") };
    }
}

/// An RDM endpoint (`fi_endpoint`), bound to the CQ and AV and enabled.
struct Endpoint(NonNull<sys::fid_ep>);

impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: opened by fi_endpoint; memory registrations bound to it are dropped first.
        unsafe { close(&raw mut (*self.0.as_ptr()).fid, "endpoint") };
    }
}

/// A counter of peers' reads and writes of our memory (`fi_cntr_open`, `FI_RMA_EVENT`).
struct Counter(NonNull<sys::fid_cntr>);

impl Drop for Counter {
    fn drop(&mut self) {
        // SAFETY: opened by fi_cntr_open; the endpoint and registrations bound to it are dropped
        // first.
        unsafe { close(&raw mut (*self.0.as_ptr()).fid, "counter") };
    }
}

/// A memory registration (`fi_mr_reg`).
struct MemoryRegion {
    ptr: NonNull<sys::fid_mr>,
    key: u64,
    desc: *mut c_void,
    addr: u64,
    len: u64,
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: opened by fi_mr_reg and closed once, before the endpoint and domain.
        unsafe { close(&raw mut (*self.ptr.as_ptr()).fid, "memory region") };
    }
}

/// What a completion-queue poll found.
#[derive(Debug)]
pub(crate) enum Poll {
    /// This many entries were written to the output slice.
    Done(usize),
    /// Nothing completed.
    Empty,
    /// An operation failed: its context and the error.
    Failed(CqError),
}

/// A failed operation read from the completion queue.
#[derive(Debug, Clone)]
pub(crate) struct CqError {
    /// The context the operation was posted with.
    pub context: *mut c_void,
    /// The error (code is the generic `FI_E*`, message includes the provider's text).
    pub error: FiError,
    /// The provider's own error number (often an errno).
    pub prov_errno: i32,
}

/// One RMA operation to post.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rma {
    /// `fi_write` (local to remote) or `fi_read` (remote to local).
    pub write: bool,
    /// Local address.
    pub local: u64,
    /// Bytes.
    pub len: usize,
    /// Local registration descriptor (or NULL).
    pub desc: *mut c_void,
    /// Peer.
    pub dest: sys::fi_addr_t,
    /// Remote address (virtual address or offset, per the provider's MR mode).
    pub remote: u64,
    /// Remote key.
    pub key: u64,
    /// Operation context.
    pub context: *mut c_void,
}

/// The outcome of posting an operation.
#[derive(Debug)]
pub(crate) enum Post {
    /// Accepted; a completion will follow.
    Posted,
    /// The queue is full (`-FI_EAGAIN`): drive progress and try again.
    Again,
    /// Refused.
    Failed(FiError),
}

/// Everything opened on one domain: one "rail" of the transport (one NIC, or one interface).
///
/// Fields are dropped in declaration order: registrations, endpoint, counter, AV, CQ, domain,
/// fabric.
pub(crate) struct Rail {
    mrs: BTreeMap<u64, MemoryRegion>,
    ep: Endpoint,
    counter: Option<Counter>,
    av: AddressVector,
    cq: CompletionQueue,
    domain: Domain,
    fabric: Fabric,
    _info: OwnedInfo,
    attrs: InfoAttrs,
    name: Vec<u8>,
    wait_fd: Option<i32>,
}

// SAFETY: a Rail exclusively owns its libfabric objects (no handle escapes this module), and
// libfabric allows FI_THREAD_DOMAIN objects to be used from any thread as long as calls are
// serialized, which `&mut self` on every method guarantees.
unsafe impl Send for Rail {}

impl std::fmt::Debug for Rail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rail").field("attrs", &self.attrs).field("registrations", &self.mrs.len()).finish()
    }
}

impl Rail {
    /// Opens fabric, domain, CQ (`cq_size` entries), AV, and an enabled RDM endpoint for `info`.
    /// With `want_wait_fd` the CQ gets a file descriptor to sleep on, when the provider has one.
    pub(crate) fn open(info: Info<'_>, cq_size: usize, want_wait_fd: bool) -> Result<Rail, FiError> {
        let owned = info.dup()?;
        let attrs = info.attrs();
        let ip = owned.0.as_ptr();
        let mut fabric_ptr = ptr::null_mut();
        // SAFETY: `ip` is our own copy of the entry; its fabric_attr is valid (returned by fi_getinfo).
        check("fi_fabric", unsafe { sys::fi_fabric((*ip).fabric_attr, &mut fabric_ptr, ptr::null_mut()) })?;
        let fabric = Fabric(nonnull(fabric_ptr, "fi_fabric")?);
        let mut domain_ptr = ptr::null_mut();
        // SAFETY: live fabric and info.
        check("fi_domain", unsafe { sys::fi_domain(fabric.0.as_ptr(), ip, &mut domain_ptr, ptr::null_mut()) })?;
        let domain = Domain(nonnull(domain_ptr, "fi_domain")?);

        let (cq, wait_fd) = match Self::open_cq(&domain, cq_size, want_wait_fd) {
            Ok(Some(pair)) => pair,
            Ok(None) | Err(_) if want_wait_fd => match Self::open_cq(&domain, cq_size, false)? {
                Some(pair) => pair,
                None => return Err(FiError { call: "fi_cq_open", code: sys::FI_ENOSYS, message: "no CQ".into() }),
            },
            Ok(None) => return Err(FiError { call: "fi_cq_open", code: sys::FI_ENOSYS, message: "no CQ".into() }),
            Err(e) => return Err(e),
        };

        let mut av_attr = sys::fi_av_attr { type_: sys::FI_AV_TABLE, count: 64, ..Default::default() };
        let mut av_ptr = ptr::null_mut();
        // SAFETY: live domain, valid attribute struct.
        check("fi_av_open", unsafe { sys::fi_av_open(domain.0.as_ptr(), &mut av_attr, &mut av_ptr, ptr::null_mut()) })?;
        let av = AddressVector(nonnull(av_ptr, "fi_av_open")?);

        let counter = if attrs.rma_event() {
            let mut attr = sys::fi_cntr_attr {
                events: sys::FI_CNTR_EVENTS_COMP,
                wait_obj: sys::FI_WAIT_NONE,
                ..Default::default()
            };
            let mut c = ptr::null_mut();
            // SAFETY: live domain, valid attribute struct.
            check("fi_cntr_open", unsafe { sys::fi_cntr_open(domain.0.as_ptr(), &mut attr, &mut c, ptr::null_mut()) })?;
            Some(Counter(nonnull(c, "fi_cntr_open")?))
        } else {
            None
        };

        let mut ep_ptr = ptr::null_mut();
        // SAFETY: live domain and info.
        check("fi_endpoint", unsafe { sys::fi_endpoint(domain.0.as_ptr(), ip, &mut ep_ptr, ptr::null_mut()) })?;
        let ep = Endpoint(nonnull(ep_ptr, "fi_endpoint")?);
        let flags = u64::from(sys::FI_TRANSMIT | sys::FI_RECV);
        // SAFETY: live endpoint, CQ, AV and counter, all from the same domain.
        unsafe {
            check("fi_ep_bind(cq)", sys::fi_ep_bind(ep.0.as_ptr(), &raw mut (*cq.0.as_ptr()).fid, flags))?;
            check("fi_ep_bind(av)", sys::fi_ep_bind(ep.0.as_ptr(), &raw mut (*av.0.as_ptr()).fid, 0))?;
            if let Some(c) = &counter {
                let remote = u64::from(sys::FI_REMOTE_WRITE | sys::FI_REMOTE_READ);
                check("fi_ep_bind(cntr)", sys::fi_ep_bind(ep.0.as_ptr(), &raw mut (*c.0.as_ptr()).fid, remote))?;
            }
            check("fi_enable", sys::fi_enable(ep.0.as_ptr()))?;
        }
        let mut rail = Rail {
            mrs: BTreeMap::new(),
            ep,
            counter,
            av,
            cq,
            domain,
            fabric,
            _info: owned,
            attrs,
            name: Vec::new(),
            wait_fd,
        };
        rail.name = rail.query_name()?;
        Ok(rail)
    }

    fn open_cq(domain: &Domain, size: usize, wait_fd: bool) -> Result<Option<(CompletionQueue, Option<i32>)>, FiError> {
        let mut attr = sys::fi_cq_attr {
            size,
            format: sys::FI_CQ_FORMAT_CONTEXT,
            wait_obj: if wait_fd { sys::FI_WAIT_FD } else { sys::FI_WAIT_NONE },
            ..Default::default()
        };
        let mut cq_ptr = ptr::null_mut();
        // SAFETY: live domain, valid attribute struct.
        check("fi_cq_open", unsafe { sys::fi_cq_open(domain.0.as_ptr(), &mut attr, &mut cq_ptr, ptr::null_mut()) })?;
        let cq = CompletionQueue(nonnull(cq_ptr, "fi_cq_open")?);
        if !wait_fd {
            return Ok(Some((cq, None)));
        }
        let mut fd: i32 = -1;
        // SAFETY: FI_GETWAIT on a CQ opened with FI_WAIT_FD writes an int file descriptor.
        let ret = unsafe {
            sys::fi_control(&raw mut (*cq.0.as_ptr()).fid, sys::FI_GETWAIT as i32, (&raw mut fd).cast::<c_void>())
        };
        if ret < 0 || fd < 0 {
            return Ok(None);
        }
        Ok(Some((cq, Some(fd))))
    }

    fn query_name(&mut self) -> Result<Vec<u8>, FiError> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: live endpoint; `buf` has `len` writable bytes.
        let mut ret =
            unsafe { sys::fi_getname(&raw mut (*self.ep.0.as_ptr()).fid, buf.as_mut_ptr().cast::<c_void>(), &mut len) };
        if ret == -(sys::FI_ETOOSMALL as i32) && len > buf.len() && len <= 4096 {
            buf.resize(len, 0);
            // SAFETY: as above, with the size the provider asked for.
            ret = unsafe {
                sys::fi_getname(&raw mut (*self.ep.0.as_ptr()).fid, buf.as_mut_ptr().cast::<c_void>(), &mut len)
            };
        }
        check("fi_getname", ret)?;
        buf.truncate(len.min(buf.len()));
        Ok(buf)
    }

    /// The provider attributes of this rail.
    pub(crate) fn attrs(&self) -> &InfoAttrs {
        &self.attrs
    }

    /// This endpoint's address (`fi_getname`), to publish for peers.
    pub(crate) fn name(&self) -> &[u8] {
        &self.name
    }

    /// A file descriptor that becomes readable when the CQ may have work (`FI_WAIT_FD`).
    pub(crate) fn wait_fd(&self) -> Option<i32> {
        self.wait_fd
    }

    /// `fi_trywait`: true when it is safe to sleep on [`Rail::wait_fd`] (nothing pending).
    pub(crate) fn trywait(&mut self) -> bool {
        // SAFETY: `self.cq` is a live CQ; this only computes the address of its `fid` member.
        let mut fids = [unsafe { &raw mut (*self.cq.0.as_ptr()).fid }];
        // SAFETY: live fabric and CQ; the array holds one valid fid pointer.
        let ret = unsafe { sys::fi_trywait(self.fabric.0.as_ptr(), fids.as_mut_ptr(), 1) };
        ret == 0
    }

    /// Inserts a peer's endpoint address into the address vector.
    pub(crate) fn insert_peer(&mut self, addr: &[u8]) -> Result<sys::fi_addr_t, FiError> {
        if addr.is_empty() {
            return Err(FiError { call: "fi_av_insert", code: sys::FI_EINVAL, message: "empty address".into() });
        }
        let mut out: sys::fi_addr_t = sys::FI_ADDR_NOTAVAIL_VALUE;
        // SAFETY: live AV; `addr` is one address of this provider's format (the provider reads
        // at most its address length from it; short input fails insertion with an error).
        let ret = unsafe {
            sys::fi_av_insert(self.av.0.as_ptr(), addr.as_ptr().cast::<c_void>(), 1, &mut out, 0, ptr::null_mut())
        };
        if ret < 0 {
            return Err(FiError::from_ret("fi_av_insert", i64::from(ret)));
        }
        if ret != 1 || out == sys::FI_ADDR_NOTAVAIL_VALUE {
            return Err(FiError {
                call: "fi_av_insert",
                code: sys::FI_EADDRNOTAVAIL,
                message: "the provider rejected the peer address".into(),
            });
        }
        Ok(out)
    }

    /// Registers `[addr, addr+len)` for local use and remote read/write under `id`.
    /// `requested_key` is used unless the provider picks keys. Returns the key peers must use.
    ///
    /// The memory must stay valid until [`Rail::unregister`] (or the rail is dropped).
    pub(crate) fn register(&mut self, id: u64, addr: u64, len: u64, requested_key: u64) -> Result<u64, FiError> {
        let access = u64::from(sys::FI_READ | sys::FI_WRITE | sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE);
        let mut mr_ptr = ptr::null_mut();
        let len_usize = usize::try_from(len).map_err(|_| FiError {
            call: "fi_mr_reg",
            code: sys::FI_EINVAL,
            message: "length too large".into(),
        })?;
        // SAFETY: live domain; the caller keeps the memory registered until unregister. The
        // region's offset is 0 so that offset-addressed providers see the buffer start at 0.
        check("fi_mr_reg", unsafe {
            sys::fi_mr_reg(
                self.domain.0.as_ptr(),
                addr as *const c_void,
                len_usize,
                access,
                0,
                requested_key,
                0,
                &mut mr_ptr,
                ptr::null_mut(),
            )
        })?;
        let ptr = nonnull(mr_ptr, "fi_mr_reg")?;
        // Wrap at once so that an error below closes it.
        let mut mr = MemoryRegion { ptr, key: requested_key, desc: ptr::null_mut(), addr, len };
        if let (true, Some(c)) = (self.attrs.mr_rma_event(), &self.counter) {
            let remote = u64::from(sys::FI_REMOTE_WRITE | sys::FI_REMOTE_READ);
            // SAFETY: live MR and counter of the same domain.
            check("fi_mr_bind(cntr)", unsafe {
                sys::fi_mr_bind(mr.ptr.as_ptr(), &raw mut (*c.0.as_ptr()).fid, remote)
            })?;
        }
        if self.attrs.mr_endpoint() {
            // SAFETY: live MR and endpoint of the same domain.
            unsafe {
                check("fi_mr_bind", sys::fi_mr_bind(mr.ptr.as_ptr(), &raw mut (*self.ep.0.as_ptr()).fid, 0))?;
            }
        }
        if self.attrs.mr_endpoint() || (self.attrs.mr_rma_event() && self.counter.is_some()) {
            // SAFETY: live MR, bound above as the provider requires.
            check("fi_mr_enable", unsafe { sys::fi_mr_enable(mr.ptr.as_ptr()) })?;
        }
        // SAFETY: live MR.
        let key = unsafe { sys::fi_mr_key(mr.ptr.as_ptr()) };
        if key == sys::FI_KEY_NOTAVAIL_VALUE {
            return Err(FiError {
                call: "fi_mr_key",
                code: sys::FI_ENOKEY,
                message: "the provider has no key for this registration (raw keys are not supported)".into(),
            });
        }
        mr.key = key;
        // SAFETY: live MR.
        mr.desc = unsafe { sys::fi_mr_desc(mr.ptr.as_ptr()) };
        if let Some(old) = self.mrs.insert(id, mr) {
            drop(old);
        }
        Ok(key)
    }

    /// Closes the registration `id` (no-op when unknown).
    pub(crate) fn unregister(&mut self, id: u64) {
        self.mrs.remove(&id);
    }

    /// The local descriptor for `[addr, addr+len)` if one registration covers it.
    pub(crate) fn local_desc(&self, addr: u64, len: u64) -> Option<*mut c_void> {
        let end = addr.checked_add(len)?;
        // Registrations are keyed by start address and do not overlap (the engine refuses it).
        let (_, m) = self.mrs.range(..=addr).next_back()?;
        (end <= m.addr + m.len).then_some(m.desc)
    }

    /// How many of peers' accesses to our memory completed so far (`None` without a counter).
    pub(crate) fn remote_events(&mut self) -> Option<u64> {
        let c = self.counter.as_ref()?;
        // SAFETY: live counter.
        Some(unsafe { sys::fi_cntr_read(c.0.as_ptr()) })
    }

    /// Posts a one-sided write (`fi_write`) or read (`fi_read`).
    ///
    /// # Safety
    /// `[local, local+len)` is readable (write) or writable and otherwise untouched (read) until
    /// the operation's completion is read or the rail is dropped; `desc` is NULL or the
    /// descriptor of a live registration covering it; `context` points to 64 bytes usable as
    /// `fi_context2` that stay valid until the completion.
    pub(crate) unsafe fn post(&mut self, op: &Rma) -> Post {
        let ep = self.ep.0.as_ptr();
        // SAFETY: per this function's contract; `ep` is our live endpoint.
        let ret = unsafe {
            if op.write {
                sys::fi_write(ep, op.local as *const c_void, op.len, op.desc, op.dest, op.remote, op.key, op.context)
            } else {
                sys::fi_read(ep, op.local as *mut c_void, op.len, op.desc, op.dest, op.remote, op.key, op.context)
            }
        };
        post_result(if op.write { "fi_write" } else { "fi_read" }, ret)
    }

    /// Reads completions (drives progress for manual-progress providers).
    pub(crate) fn poll(&mut self, out: &mut [sys::fi_cq_entry]) -> Poll {
        if out.is_empty() {
            return Poll::Empty;
        }
        // SAFETY: live CQ of context format; `out` has room for `out.len()` entries.
        let ret = unsafe { sys::fi_cq_read(self.cq.0.as_ptr(), out.as_mut_ptr().cast::<c_void>(), out.len()) };
        if ret > 0 {
            return Poll::Done(ret as usize);
        }
        if ret == 0 || ret == -(sys::FI_EAGAIN as isize) {
            return Poll::Empty;
        }
        if ret == -(sys::FI_EAVAIL as isize) {
            return self.read_error();
        }
        Poll::Failed(CqError {
            context: ptr::null_mut(),
            error: FiError::from_ret("fi_cq_read", ret as i64),
            prov_errno: 0,
        })
    }

    fn read_error(&mut self) -> Poll {
        let mut e = sys::fi_cq_err_entry::default();
        // SAFETY: live CQ; `e` is a properly sized error entry (err_data left NULL: the
        // provider then points it at its own buffer, valid until the next CQ call).
        let ret = unsafe { sys::fi_cq_readerr(self.cq.0.as_ptr(), &mut e, 0) };
        if ret == -(sys::FI_EAGAIN as isize) || ret == 0 {
            return Poll::Empty;
        }
        if ret < 0 {
            return Poll::Failed(CqError {
                context: ptr::null_mut(),
                error: FiError::from_ret("fi_cq_readerr", ret as i64),
                prov_errno: 0,
            });
        }
        let code = e.err.unsigned_abs();
        let mut buf = [0 as std::os::raw::c_char; 256];
        // SAFETY: live CQ; err_data/err_data_size come from the entry just read (valid until the
        // next CQ call); fi_cq_strerror returns a NUL-terminated string (ours or a static one).
        let prov = unsafe {
            let p = sys::fi_cq_strerror(self.cq.0.as_ptr(), e.prov_errno, e.err_data, buf.as_mut_ptr(), buf.len());
            cstr(p)
        };
        let mut message = strerror(code);
        if !prov.is_empty() && prov != message {
            message = format!("{message}; provider: {prov} (prov errno {})", e.prov_errno);
        }
        Poll::Failed(CqError {
            context: e.op_context,
            error: FiError { call: "completion", code, message },
            prov_errno: e.prov_errno,
        })
    }
}

fn post_result(call: &'static str, ret: isize) -> Post {
    if ret == 0 {
        Post::Posted
    } else if ret == -(sys::FI_EAGAIN as isize) {
        Post::Again
    } else {
        Post::Failed(FiError::from_ret(call, ret as i64))
    }
}

fn nonnull<T>(p: *mut T, call: &'static str) -> Result<NonNull<T>, FiError> {
    NonNull::new(p).ok_or(FiError { call, code: sys::FI_EOTHER, message: "returned a NULL object".into() })
}

/// Lists the provider names that `fi_getinfo` offers RDM + RMA endpoints for.
pub(crate) fn providers() -> Result<Vec<String>, FiError> {
    let list = InfoList::query(&Hints::default())?;
    let mut out: Vec<String> = Vec::new();
    for i in list.iter() {
        let p = i.attrs().provider;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_names_codes() {
        assert!(!strerror(sys::FI_EAGAIN).is_empty());
        assert_ne!(strerror(sys::FI_ENOKEY), strerror(sys::FI_EAGAIN));
        let e = FiError::from_ret("fi_write", -(sys::FI_EAGAIN as i64));
        assert_eq!(e.code, sys::FI_EAGAIN);
        assert!(e.to_string().starts_with("fi_write: "), "{e}");
    }

    #[test]
    fn unknown_provider_matches_nothing() {
        let h = Hints { provider: Some("no-such-provider-xyz".into()), ..Default::default() };
        let list = InfoList::query(&h).expect("fi_getinfo");
        assert!(list.is_empty());
        assert_eq!(list.iter().count(), 0);
    }
}
