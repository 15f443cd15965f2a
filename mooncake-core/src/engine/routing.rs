//! Segments and routing: opening and refreshing remote segments, choosing the transport for each request, and
//! validating a submission into a [`Plan`].

use std::sync::Arc;
use std::time::Duration;

use super::{Inner, TransferEngine, spawn_on};
use crate::descriptor::BufferDesc;
use crate::error::{Error, Result};
use crate::memory::{Access, LocalRange};
use crate::sync;
use crate::transport::RemoteSegment;
use crate::types::{MemoryKind, SegmentHandle, TransferRequest};

impl TransferEngine {
    // ---- segments --------------------------------------------------------------------------

    /// Opens (or returns the cached handle of) the segment `name`.
    pub async fn open_segment_async(&self, name: &str) -> Result<SegmentHandle> {
        let inner = self.inner.clone();
        let name = name.to_string();
        spawn_on(&self.inner.handle, async move { inner.open_segment(&name).await.map(|s| s.handle) }).await
    }

    /// Blocking form of [`TransferEngine::open_segment_async`] (upstream `openSegment`).
    pub fn open_segment(&self, name: &str) -> Result<SegmentHandle> {
        if let Some(seg) = self.inner.segments.cached_fresh(name) {
            return Ok(seg.handle);
        }
        let inner = self.inner.clone();
        let name = name.to_string();
        self.run(async move { inner.open_segment(&name).await.map(|s| s.handle) })
    }

    /// Re-reads a segment's descriptor from metadata (after the peer restarted or re-registered).
    pub fn refresh_segment(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        let inner = self.inner.clone();
        self.run(async move { inner.refresh(handle).await })
    }

    /// The cached descriptor of an opened segment.
    pub fn segment(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        self.inner.segments.get(handle)
    }

    /// Address of the first buffer of segment `name` (0 when it has none), as upstream.
    pub fn first_buffer_address(&self, name: &str) -> Result<u64> {
        let h = self.open_segment(name)?;
        Ok(self.inner.segments.get(h)?.descriptor.buffers.first().map_or(0, |b| b.addr))
    }
}

/// Whether a submission's local ranges must lie in registered memory (the safe calls) or may be vouched for
/// by the caller of an `unsafe` entry point ([`TransferEngine::unchecked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LocalCheck {
    /// Every local range must lie inside one registered region.
    Registered,
    /// Unregistered local ranges are host memory the caller vouched for (transports that need registered
    /// local memory still refuse them).
    Vouched,
}

/// Where one validated request goes.
pub(super) struct Route {
    /// Index of the transport.
    pub(super) transport: usize,
    /// The target segment.
    pub(super) seg: Arc<RemoteSegment>,
    /// The local range with its proof (it holds the local region until the request is finished).
    pub(super) local: LocalRange,
}

/// A validated submission: one route per request.
pub(super) struct Plan {
    pub(super) routes: Vec<Route>,
}

pub(super) enum Retry {
    /// These segments must be re-read from metadata first.
    Refresh(Vec<SegmentHandle>),
    Fail(Error),
}

impl Retry {
    pub(super) fn into_error(self) -> Error {
        match self {
            Retry::Fail(e) => e,
            Retry::Refresh(_) => Error::Metadata("segment descriptor is still stale after a refresh".into()),
        }
    }
}

impl From<Error> for Retry {
    fn from(e: Error) -> Self {
        Retry::Fail(e)
    }
}

impl Inner {
    pub(super) async fn open_segment(&self, name: &str) -> Result<Arc<RemoteSegment>> {
        if let Some(seg) = self.segments.cached_fresh(name) {
            return Ok(seg);
        }
        let handle = self.segments.handle_for(name);
        self.refresh(handle).await
    }

    pub(super) async fn refresh(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        let name = self.segments.name_of(handle)?;
        let descriptor = self.peers.fetch_descriptor(&name).await?;
        // A transport whose section publishes its own data host (upstream tcp's) prefers that itself.
        let host = self.peers.data_host(&name).await?;
        let seg = Arc::new(RemoteSegment { handle, name: name.clone(), host, descriptor });
        let changed = self.segments.store(seg.clone());
        if changed {
            for t in &self.transports {
                t.forget_peer(&name);
            }
        }
        Ok(seg)
    }

    /// Picks the transport for a request to `seg` by the target's protocols and the cost model.
    /// A transport that needs registered local memory ranks last when the local range is not
    /// registered, so another transport that can send from anywhere takes the request.
    /// A transport that cannot move local memory of `local_kind` (its `memory_kinds`) ranks last too.
    fn route(
        &self,
        seg: &RemoteSegment,
        buffer: &BufferDesc,
        local_registered: bool,
        local_kind: MemoryKind,
        length: u64,
    ) -> Result<usize> {
        let priority = &self.config.protocol_priority;
        let mut best: Option<(usize, (bool, usize, Duration, usize))> = None;
        for (i, t) in self.transports.iter().enumerate() {
            let Some(order) = seg.descriptor.protocol_rank(t.name()) else { continue };
            if !t.can_reach(seg) || !t.can_reach_buffer(seg, buffer) {
                continue;
            }
            let caps = t.capabilities();
            let unmet =
                (caps.requires_local_registration && !local_registered) || !caps.memory_kinds.contains(local_kind);
            // Listed protocols first, in list order; unlisted ones after them.
            let rank = priority.iter().position(|n| n == t.name()).unwrap_or(priority.len());
            let key = (unmet, rank, caps.model.estimate(length), order);
            if best.as_ref().is_none_or(|(_, k)| key < *k) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| i).ok_or_else(|| {
            Error::unavailable(format!(
                "segment {:?} offers {:?}; this engine has {:?} and none of them can reach its buffer at {:#x} ({})",
                seg.name,
                seg.descriptor.protocols(),
                self.transports.iter().map(|t| t.name()).collect::<Vec<_>>(),
                buffer.addr,
                buffer.name
            ))
        })
    }

    /// Validates and routes `requests`; every local range is looked up in the region table once (the guard
    /// travels with the request), and must be registered unless `check` is [`LocalCheck::Vouched`].
    pub(super) fn plan(
        &self,
        requests: &[TransferRequest],
        may_refresh: bool,
        check: LocalCheck,
    ) -> std::result::Result<Plan, Retry> {
        let stale: Vec<String> = std::mem::take(&mut *sync::lock(&self.shared.stale_peers));
        for name in stale {
            self.segments.mark_stale(&name);
        }
        let mut routes = Vec::with_capacity(requests.len());
        let mut refresh = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if r.length == 0 {
                return Err(Error::InvalidArgument(format!("request {i} has zero length")).into());
            }
            if r.local_addr.checked_add(r.length).is_none() || r.remote_addr.checked_add(r.length).is_none() {
                return Err(Error::InvalidArgument(format!("request {i}: address + length overflows")).into());
            }
            let (seg, fresh) = self.segments.get_with_freshness(r.target)?;
            let buffer = seg.descriptor.locate(r.remote_addr, r.length);
            let inside = buffer.is_some();
            if may_refresh && (!fresh || !inside) {
                // The descriptor may be outdated (peer restarted or registered more memory).
                if !refresh.contains(&r.target) {
                    refresh.push(r.target);
                }
                continue;
            }
            let Some(buffer) = buffer else {
                return Err(Error::AddressNotRegistered {
                    addr: r.remote_addr,
                    len: r.length,
                    context: format!("request {i}: not inside any buffer of segment {}", seg.name),
                }
                .into());
            };
            let region = self.regions.lookup(r.local_addr, r.length);
            let local_kind = region.as_ref().map_or(MemoryKind::Host, |g| match g.access() {
                Access::Device(d) => d.device.kind(),
                _ => g.location.kind().unwrap_or(MemoryKind::Host),
            });
            let t = self.route(&seg, buffer, region.is_some(), local_kind, r.length)?;
            let caps = self.transports[t].capabilities();
            let unregistered = || Error::AddressNotRegistered {
                addr: r.local_addr,
                len: r.length,
                context: format!("request {i}: local buffer (register it first)"),
            };
            let local = match region {
                Some(g) => LocalRange::in_region(g, r.local_addr, r.length, "local buffer")?,
                None if check == LocalCheck::Vouched && !caps.requires_local_registration => {
                    // The caller of `unchecked()` vouched for its local ranges (its `# Safety`). GPU memory a linked
                    // device claims is moved through that device, as upstream's TCP transport does with
                    // cudaMemcpy, never dereferenced.
                    match self.device_owner(r.local_addr, r.length) {
                        Some(owner) => LocalRange::vouched_device_by_contract(r.local_addr, r.length, owner),
                        None => LocalRange::vouched_by_contract(r.local_addr, r.length),
                    }
                }
                None => return Err(unregistered().into()),
            };
            if r.length > caps.max_request_size {
                return Err(Error::InvalidArgument(format!(
                    "request {i}: {} bytes exceeds {}'s limit of {}",
                    r.length,
                    self.transports[t].name(),
                    caps.max_request_size
                ))
                .into());
            }
            routes.push(Route { transport: t, seg, local });
        }
        if !refresh.is_empty() {
            // A refresh happened already in this call if the caller retries; report the range then.
            return Err(Retry::Refresh(refresh));
        }
        Ok(Plan { routes })
    }
}
