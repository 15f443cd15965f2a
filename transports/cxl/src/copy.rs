//! One copy between a local range and the region, with the checks that make it safe: the target's buffer is
//! still published (and its owner live), the range lies inside it and inside the allocatable part of the region.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use mooncake_core::{
    BufferDesc, Error, LocalRange, Opcode, PeerEvents, PieceDone, RemoteSegment, Result, SegmentDescriptor,
};
use mooncake_device_cxl::{Identity, OwnerRef, OwnerStatus, PidWatch, Publication, Refusal, Region, flush};
use mooncake_raw::Span;

use crate::section::{CxlBuffer, CxlSegment};

/// What every copy needs: this process's mapping of the region, the flush setting, where to report failed peers.
pub(crate) struct Ctx {
    pub(crate) region: Arc<Region>,
    pub(crate) flush: bool,
    pub(crate) events: Arc<dyn PeerEvents>,
}

/// One buffer a target publishes for cxl.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerBuf {
    /// The address requests name it by (its offset for a cxl-primary segment, else the owner's address).
    addr: u64,
    len: u64,
    /// Its offset in the region.
    offset: u64,
    publication: Option<Publication>,
}

/// What the initiator knows about one target segment.
#[derive(Debug)]
pub(crate) struct PeerEntry {
    /// The segment version this entry was built from.
    pub(crate) seg: Arc<RemoteSegment>,
    /// The target engine's owner entry (peers of ours; upstream peers have none).
    owner: Option<OwnerRef>,
    /// Exit notification of the target process, when it runs on this host.
    watch: Option<PidWatch>,
    /// Published buffers, by address.
    buffers: Vec<PeerBuf>,
}

/// Whether `target` publishes the region `region` maps: same region id, or (upstream peers, which publish no id)
/// the same device path.
pub(crate) fn same_region(region: &Region, seg: &SegmentDescriptor) -> Result<CxlSegment> {
    let s = seg
        .section::<CxlSegment>()?
        .ok_or_else(|| Error::unavailable(format!("segment {:?} publishes no CXL region (no cxl_name)", seg.name)))?;
    let ours = region.path().display().to_string();
    let same = match s.region_id {
        Some(id) => id == region.id(),
        None => s.name == ours || std::fs::canonicalize(&s.name).ok() == std::fs::canonicalize(region.path()).ok(),
    };
    if !same {
        return Err(Error::unavailable(format!(
            "segment {:?} maps CXL region {} (id {}), this engine maps {ours} (id {:032x})",
            seg.name,
            s.name,
            s.region_id.map_or_else(|| "none".to_string(), |i| format!("{i:032x}")),
            region.id()
        )));
    }
    Ok(s)
}

/// Whether a published buffer is one the cxl transport reaches: it carries its region offset.
pub(crate) fn cxl_buffer(b: &BufferDesc) -> Option<CxlBuffer> {
    b.section::<CxlBuffer>().ok().flatten()
}

impl PeerEntry {
    /// Reads what the transport needs from `seg`; a target whose owner entry is gone, or whose process on this
    /// host has exited, is `RemoteDisconnected`.
    pub(crate) fn new(region: &Region, seg: Arc<RemoteSegment>) -> Result<PeerEntry> {
        let s = same_region(region, &seg.descriptor)?;
        let mut watch = None;
        if let Some(owner) = s.owner {
            match region.owner_status(owner) {
                OwnerStatus::Gone => return Err(gone(&seg.name, "its engine shut down (its owner entry is retired)")),
                OwnerStatus::Live(id) if id.host == Identity::current().host => {
                    watch =
                        Some(PidWatch::open(id.pid, id.start).ok_or_else(|| gone(&seg.name, "its process exited"))?);
                }
                OwnerStatus::Live(_) => {}
            }
        }
        let mut buffers: Vec<PeerBuf> = seg
            .descriptor
            .buffers
            .iter()
            .filter_map(|b| {
                let c = cxl_buffer(b)?;
                Some(PeerBuf { addr: b.addr, len: b.length, offset: c.offset, publication: c.publication })
            })
            .collect();
        buffers.sort_by_key(|b| b.addr);
        Ok(PeerEntry { seg, owner: s.owner, watch, buffers })
    }

    /// The published buffer holding `[addr, addr+len)` entirely.
    pub(crate) fn find(&self, addr: u64, len: u64) -> Option<PeerBuf> {
        let end = addr.checked_add(len)?;
        let i = self.buffers.partition_point(|b| b.addr <= addr).checked_sub(1)?;
        let b = self.buffers[i];
        (len > 0 && end <= b.addr.saturating_add(b.len)).then_some(b)
    }

    /// `RemoteDisconnected` once the target process (on this host) has exited.
    pub(crate) fn check_alive(&self, ctx: &Ctx) -> Result<()> {
        match &self.watch {
            Some(w) if w.exited() => {
                ctx.events.peer_failed(&self.seg.name);
                Err(gone(&self.seg.name, "its process exited"))
            }
            _ => Ok(()),
        }
    }
}

fn gone(peer: &str, reason: &str) -> Error {
    Error::RemoteDisconnected { peer: peer.to_string(), reason: reason.to_string() }
}

/// The error for a remote range no buffer published for cxl holds.
pub(crate) fn not_published(segment: &str, addr: u64, len: u64) -> Error {
    if len == 0 {
        Error::InvalidArgument("zero-length request".into())
    } else if addr.checked_add(len).is_none() {
        Error::InvalidArgument(format!("remote address {addr:#x} + length {len} overflows"))
    } else {
        Error::AddressNotRegistered {
            addr,
            len,
            context: format!("not inside any buffer segment {segment} publishes for cxl"),
        }
    }
}

/// A piece of a request (or all of it) for a copy thread.
pub(crate) struct Piece {
    pub(crate) op: Opcode,
    pub(crate) local: LocalRange,
    /// The remote address as the request names it.
    pub(crate) remote: u64,
    pub(crate) peer: Arc<PeerEntry>,
    pub(crate) buf: PeerBuf,
    pub(crate) done: PieceDone,
}

impl Piece {
    /// Copies (unless the request was canceled or timed out meanwhile) and reports.
    pub(crate) fn run(self, ctx: &Ctx) {
        if self.done.is_final() {
            self.done.finish(Err(Error::Canceled));
            return;
        }
        let r = copy(ctx, &self.peer, self.buf, self.op, &self.local, self.remote);
        self.done.finish(r);
    }
}

/// Copies `local.len()` bytes between `local` and the target's buffer `buf` at remote address `remote`.
///
/// # Ordering
/// A write ends with a release fence (with `MC_CXL_FLUSH`, the written lines are written back and an `sfence`
/// orders that first): the completion this returns to is published after the bytes, so a peer that learns of it
/// through another channel and reads with acquire ordering sees them. A read starts with an acquire fence (with
/// `MC_CXL_FLUSH`, the lines are invalidated first) so that it is not served from lines cached before the
/// writer's completion was observed.
pub(crate) fn copy(
    ctx: &Ctx,
    peer: &PeerEntry,
    buf: PeerBuf,
    op: Opcode,
    local: &LocalRange,
    remote: u64,
) -> Result<u64> {
    let len = local.len();
    peer.check_alive(ctx)?;
    let offset = remote
        .checked_sub(buf.addr)
        .and_then(|d| buf.offset.checked_add(d))
        .ok_or_else(|| not_published(&peer.seg.name, remote, len))?;
    let _access = match (buf.publication, peer.owner) {
        (Some(p), Some(owner)) => {
            Some(ctx.region.access(p, owner, offset, len).map_err(|r| refused(ctx, &peer.seg.name, r, remote, len))?)
        }
        _ => None,
    };
    let addr = ctx.region.addr_of(offset, len).ok_or_else(|| Error::AddressNotRegistered {
        addr: remote,
        len,
        context: format!(
            "offset {offset:#x} + {len} of segment {} is not inside the allocatable part of the CXL region ({} bytes \
             from {:#x})",
            peer.seg.name,
            ctx.region.size(),
            ctx.region.layout().data_offset
        ),
    })?;
    match op {
        Opcode::Write => {
            let span = Span::local(local)?;
            let bytes = span.bytes()?;
            // SAFETY: [addr, addr+len) lies inside this process's shared read-write mapping of the region
            // (addr_of checked it against the region's allocatable part), which `ctx.region` keeps mapped for the
            // call; the target keeps it allocated while its publication is live, and the slot access (when the
            // target publishes one) keeps the publication from being withdrawn until the copy is done. No Rust
            // reference to region memory is held here; other processes writing the same bytes at once is the race
            // on registered memory that mooncake-raw's memory model leaves to the application.
            unsafe { mooncake_raw::copy_to_raw(addr, &bytes) };
            if ctx.flush {
                flush::write_back(addr, len);
            }
            fence(Ordering::Release);
        }
        Opcode::Read => {
            fence(Ordering::Acquire);
            if ctx.flush {
                flush::invalidate(addr, len);
            }
            let mut span = Span::local(local)?;
            let mut sink = span.sink();
            // SAFETY: as for the write: the source range lies inside the live mapping, kept published meanwhile;
            // the destination is the sink's exclusive buffer of exactly `len` bytes.
            unsafe { mooncake_raw::copy_from_raw(addr, sink.bytes()) };
            sink.commit()?;
        }
    }
    Ok(len)
}

fn refused(ctx: &Ctx, segment: &str, r: Refusal, addr: u64, len: u64) -> Error {
    match r {
        Refusal::OwnerGone => {
            ctx.events.peer_failed(segment);
            gone(segment, "its engine shut down (its owner entry in the CXL region is retired)")
        }
        Refusal::Withdrawn => {
            // The descriptor we hold is stale: have the engine read it again.
            ctx.events.peer_failed(segment);
            Error::AddressNotRegistered {
                addr,
                len,
                context: format!(
                    "segment {segment} unregistered this buffer (its publication in the CXL region is withdrawn)"
                ),
            }
        }
        Refusal::OutOfRange => Error::AddressNotRegistered {
            addr,
            len,
            context: format!("outside the range segment {segment} published in the CXL region"),
        },
    }
}
