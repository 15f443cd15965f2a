//! Segments a client mounts after setup, besides its global segment: memory it allocates
//! ([`Inner::allocate_and_mount`]) or a region of a file it maps shared ([`Inner::mount_file`], e.g. a file on
//! `/dev/shm`, a DAX device or a CXL memory file). Each gets a fresh id (`"<u64>-<u64>"`, as upstream's UUIDs),
//! which is also its segment name at the master, so replicas can be placed on it by name. Its memory is
//! registered with the client's engine under the client's transfer endpoint, like the global segment.
//!
//! Unmounting tells the master first (its replicas are dropped and no reader gets its addresses any more), waits
//! the grace period for reads already in flight, then unregisters the memory and, for `free`, gives it back
//! (unmaps the file). An allocated segment can only be unmounted with `free` (otherwise its memory would leak),
//! as upstream.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::device::FILE_HANDLE_KIND;
use mooncake_core::sync;
use mooncake_core::{AllocOptions, Allocation as DeviceAllocation, Location, SharingHandle};

use super::errors;
use super::lifecycle::Inner;
use super::master::wrong_kind;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::{ErrorCode, Segment};

/// Allocated segments are sized in multiples of this (upstream's answer to a 1 MiB request is 16 MiB).
pub const SEGMENT_GRANULE: u64 = 16 << 20;

/// A segment mounted after setup.
pub(crate) struct ExtraSegment {
    pub(crate) memory: DeviceAllocation,
    pub(crate) info: Segment,
    /// Mapped from a file (unmountable without `free`) rather than allocated.
    pub(crate) from_file: bool,
}

impl ExtraSegment {
    /// True when `[addr, addr+len)` lies inside this segment.
    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.memory.addr
            && addr.checked_add(len).is_some_and(|end| end <= self.memory.addr.saturating_add(self.memory.len))
    }
}

impl Inner {
    /// Maps `[offset, offset+size)` of the file at `path` shared (writes reach the file) and mounts it. The
    /// segment's id. A missing or unopenable file, a region past its end, an offset that is not a multiple of
    /// the page size, or a size of 0: `InvalidParams`.
    pub(crate) fn mount_file(&self, path: &str, size: u64, offset: u64) -> Result<String> {
        if size == 0 || path.is_empty() {
            return Err(ErrorCode::InvalidParams.into());
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            tracing::error!(path, error = %e, "cannot open the file to mount");
            ErrorCode::InvalidParams
        })?;
        let handle = SharingHandle {
            kind: FILE_HANDLE_KIND.into(),
            data: offset.to_le_bytes().to_vec(),
            fd: Some(Arc::new(OwnedFd::from(file))),
            len: size,
        };
        let memory = self.device.import_handle(&handle).map_err(|e| {
            tracing::error!(path, offset, size, error = %e, "cannot map the file region");
            ErrorCode::InvalidParams
        })?;
        self.mount_extra(memory, true)
    }

    /// Allocates `size` bytes (rounded up to [`SEGMENT_GRANULE`]) on `location` (`""` for anywhere) and mounts
    /// them. The segment's id and its size.
    pub(crate) fn allocate_and_mount(&self, size: u64, location: &str) -> Result<(String, u64)> {
        let rounded = size.checked_next_multiple_of(SEGMENT_GRANULE).filter(|r| *r > 0 && *r <= isize::MAX as u64);
        let rounded = rounded.ok_or(ErrorCode::InvalidParams)?;
        let mut options = AllocOptions::default();
        if !location.trim().is_empty() {
            options.location = location.trim().parse::<Location>().map_err(|_| {
                tracing::error!(location, "not a memory location (e.g. cpu:0)");
                ErrorCode::InvalidParams
            })?;
        }
        let memory = self.device.allocate(rounded, &options).map_err(|e| {
            tracing::error!(size = rounded, error = %e, "cannot allocate the segment");
            ErrorCode::NoAvailableHandle
        })?;
        let len = memory.len;
        self.mount_extra(memory, false).map(|id| (id, len))
    }

    /// Unmounts segments mounted with [`Inner::mount_file`] (or, with `free`, with either call), waiting
    /// `grace` between telling the master and releasing the memory. An unknown id, or an allocated segment
    /// without `free`, fails the call before anything is unmounted.
    pub(crate) fn unmount_extras(&self, ids: &[String], grace: Duration, free: bool) -> Result<()> {
        let mut taken = Vec::new();
        {
            let mut extras = sync::write(&self.extras);
            for id in ids {
                match extras.iter().find(|s| s.info.name == *id) {
                    Some(s) if s.from_file || free => {}
                    Some(_) => {
                        tracing::error!(id, "an allocated segment is unmounted with unmount_and_free_segment");
                        return Err(ErrorCode::InvalidParams.into());
                    }
                    None => {
                        tracing::error!(id, "no segment with that id was mounted by this client");
                        return Err(ErrorCode::SegmentNotFound.into());
                    }
                }
            }
            for id in ids {
                if let Some(pos) = extras.iter().position(|s| s.info.name == *id) {
                    taken.push(extras.remove(pos));
                }
            }
        }
        for s in &taken {
            self.unmount_at_master(&s.info.name);
        }
        if !grace.is_zero() {
            std::thread::sleep(grace);
        }
        for s in taken {
            self.release_extra(s);
        }
        Ok(())
    }

    /// Unmounts and releases every extra segment (close).
    pub(crate) fn unmount_all_extras(&self) {
        let taken: Vec<ExtraSegment> = std::mem::take(&mut *sync::write(&self.extras));
        for s in taken {
            self.unmount_at_master(&s.info.name);
            self.release_extra(s);
        }
    }

    /// Mounts every extra segment again (after the master asked for a remount).
    pub(crate) fn remount_extras(&self) {
        let infos: Vec<Segment> = sync::read(&self.extras).iter().map(|s| s.info.clone()).collect();
        for info in infos {
            if let Err(e) = self.mount_at_master(&info) {
                tracing::warn!(segment = %info.name, error = %e, "remount failed");
            }
        }
    }

    fn mount_extra(&self, memory: DeviceAllocation, from_file: bool) -> Result<String> {
        if let Err(e) = self.engine.register_allocation(&self.device, &memory, "*") {
            let _ = self.device.free(&memory);
            return Err(errors::engine("cannot register the segment", &e));
        }
        let id = loop {
            let id = crate::types::ClientId::random().0;
            let id = format!("{}-{}", (id >> 64) as u64, id as u64);
            if !sync::read(&self.extras).iter().any(|s| s.info.name == id) {
                break id;
            }
        };
        let host = mooncake_core::split_host_port(&self.config.local_hostname).map(|(h, _)| h).unwrap_or_default();
        let info = Segment {
            name: id.clone(),
            transport_endpoint: self.endpoint.clone(),
            base: memory.addr,
            size: memory.len,
            host,
            // Memory of this process served by the engine's transport; never a view of the CXL pool.
            protocol: if self.config.protocol == "cxl" { String::new() } else { self.config.protocol.clone() },
        };
        let segment = ExtraSegment { memory, info, from_file };
        if let Err(e) = self.mount_at_master(&segment.info) {
            self.release_extra(segment);
            return Err(e);
        }
        sync::write(&self.extras).push(segment);
        Ok(id)
    }

    fn mount_at_master(&self, info: &Segment) -> Result<()> {
        let request = Request::MountSegment { client: self.id, segment: info.clone() };
        match self.master.call(&request)? {
            Response::Done(r) => r.map_err(Error::from),
            other => Err(wrong_kind(request.name(), &other)),
        }
    }

    fn unmount_at_master(&self, name: &str) {
        let request = Request::UnmountSegment { client: self.id, name: name.to_string() };
        match self.master.call(&request) {
            Ok(Response::Done(Ok(()))) => {}
            Ok(Response::Done(Err(e))) => tracing::info!(segment = name, error = %e, "master refused the unmount"),
            Ok(other) => {
                wrong_kind(request.name(), &other);
            }
            Err(e) => tracing::info!(segment = name, error = %e, "could not unmount; the master drops it later"),
        }
    }

    fn release_extra(&self, s: ExtraSegment) {
        match self.engine.unregister_memory(s.memory.addr) {
            Ok(()) => {
                if let Err(e) = self.device.free(&s.memory) {
                    tracing::warn!(segment = %s.info.name, error = %e, "cannot free segment memory");
                }
            }
            Err(e) => {
                tracing::warn!(segment = %s.info.name, error = %e, "cannot unregister segment memory; leaking it")
            }
        }
    }
}
