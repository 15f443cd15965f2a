#![doc = include_str!("../README.md")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{
    BackendConfig, Capabilities, Error, MemoryKinds, Opcode, PerfModel, RegionTable, RemoteSegment, Result,
    SegmentDescriptor, TransferTask, Transport, TransportContext, sync,
};
use mooncake_raw::Span;

/// The protocol string this plugin registers (`EngineConfig::with_protocols(["loopback"])`).
pub const NAME: &str = "loopback";

/// Descriptor field naming the process that owns a loopback segment (only that process can reach it).
pub const PID_FIELD: &str = "loopback_pid";

/// How long `shutdown` waits for copies already running.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Process-global directory: segment name -> the owning engine's registered-memory table.
/// An engine's transport adds itself at `start` and removes itself at `shutdown`.
static SEGMENTS: LazyLock<Mutex<HashMap<String, Arc<RegionTable>>>> = LazyLock::new(Default::default);

// Registers the factory with the core registry at link time.
mooncake_core::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "example plugin: memcpy between engines of one process",
        probe,
        create,
    }
}

fn probe() -> Availability {
    // Pure memcpy: needs nothing from the machine.
    Availability::Available
}

fn create(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(LoopbackTransport::new(config)))
}

/// Call this once from a final binary (or test) that must see the `loopback` transport in the
/// registry. Referencing the crate keeps the linker from dropping its `inventory` registration.
#[inline(never)]
pub fn link() {
    std::hint::black_box(NAME);
}

/// What this transport declares: in-process only, host memory, memcpy speed.
pub fn capabilities() -> Capabilities {
    Capabilities {
        read: true,
        write: true,
        notify: false,
        memory_kinds: MemoryKinds::HOST,
        reports_peer_failure: true,
        // We hold a guard on the local buffer during the copy, so local memory must be registered.
        requires_local_registration: true,
        cross_process: false,
        same_host_only: true,
        // `ptr::copy` takes an `isize`-bounded count.
        max_request_size: isize::MAX as u64,
        min_request_size: 1,
        optimal_request_size: 256 << 10,
        alignment: 1,
        max_batch_size: 0,
        model: PerfModel {
            // One memcpy stream on a blocking thread.
            bandwidth_bytes_per_sec: 8e9,
            // Hand-off to the blocking pool.
            latency: Duration::from_micros(5),
            per_request_overhead: Duration::from_nanos(100),
        },
    }
}

/// The `loopback` transport: copies bytes between engines living in the same process.
pub struct LoopbackTransport {
    caps: Capabilities,
    inner: Arc<Inner>,
}

struct Inner {
    ctx: OnceLock<TransportContext>,
    stopped: AtomicBool,
    /// Jobs handed to the blocking pool and not finished yet.
    running: AtomicUsize,
}

impl LoopbackTransport {
    /// A transport not started yet (the engine calls [`Transport::start`]).
    pub fn new(_config: &BackendConfig) -> Self {
        LoopbackTransport {
            caps: capabilities(),
            inner: Arc::new(Inner {
                ctx: OnceLock::new(),
                stopped: AtomicBool::new(false),
                running: AtomicUsize::new(0),
            }),
        }
    }
}

impl Inner {
    /// Runs one task to completion (called on a blocking thread).
    fn run(&self, ctx: &TransportContext, target: &RemoteSegment, task: TransferTask) {
        if task.completion.is_final() {
            return; // canceled or timed out meanwhile
        }
        let result = self.copy(ctx, target, &task);
        if let Err(Error::RemoteDisconnected { .. }) = &result {
            ctx.peer_events.peer_failed(&target.name);
        }
        task.completion.finish(result);
    }

    fn copy(&self, ctx: &TransportContext, target: &RemoteSegment, task: &TransferTask) -> Result<u64> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::Canceled);
        }
        let length = task.length();
        let remote_table = sync::lock(&SEGMENTS).get(&target.name).cloned().ok_or_else(|| {
            Error::disconnected(&target.name, "loopback peer has shut down (or lives in another process)")
        })?;
        // Both guards are held until the copy is done: neither side can unregister meanwhile. The task's local
        // range holds its region already when it is registered; a range the engine's caller vouched for must
        // be registered here too (this transport declares `requires_local_registration`).
        let _local_guard = task.local.registered_in(&ctx.regions, "local buffer")?;
        let remote = remote_table.lookup(task.remote_addr, length).ok_or_else(|| Error::RemoteRejected {
            peer: target.name.clone(),
            addr: task.remote_addr,
            len: length,
        })?;
        // Bytes are touched only through mooncake-raw: it checks each range against its proof, and moves
        // device memory through its device instead of dereferencing it. No `unsafe` in a plugin.
        let local = Span::local(&task.local)?;
        let remote_span = Span::region(&remote, task.remote_addr, length)?;
        match task.opcode {
            Opcode::Read => mooncake_raw::copy(&remote_span, &local)?,
            Opcode::Write => mooncake_raw::copy(&local, &remote_span)?,
        }
        // The guards (`local_guard`, `remote`) are dropped here, after the copy.
        Ok(length)
    }
}

#[async_trait]
impl Transport for LoopbackTransport {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        self.inner
            .ctx
            .set(ctx.clone())
            .map_err(|_| Error::InvalidArgument("loopback transport started twice".into()))?;
        sync::lock(&SEGMENTS).insert(ctx.local_name.clone(), ctx.regions.clone());
        Ok(())
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        desc.fields.insert(PID_FIELD, std::process::id());
    }

    fn can_reach(&self, target: &RemoteSegment) -> bool {
        target.descriptor.fields.get(PID_FIELD).and_then(|v| v.as_u64()) == Some(u64::from(std::process::id()))
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let Some(ctx) = self.inner.ctx.get().cloned() else {
            TransferTask::fail_all(tasks, &Error::NotInitialized("loopback transport was never started".into()));
            return;
        };
        if self.inner.stopped.load(Ordering::Acquire) {
            TransferTask::fail_all(tasks, &Error::Canceled);
            return;
        }
        let inner = self.inner.clone();
        let target = target.clone();
        inner.running.fetch_add(1, Ordering::AcqRel);
        // Never copy on the caller's thread or a runtime worker: large copies would block them.
        ctx.runtime.clone().spawn_blocking(move || {
            for task in tasks {
                inner.run(&ctx, &target, task);
            }
            inner.running.fetch_sub(1, Ordering::AcqRel);
        });
    }

    async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        if let Some(ctx) = self.inner.ctx.get() {
            let mut map = sync::lock(&SEGMENTS);
            if map.get(&ctx.local_name).is_some_and(|t| Arc::ptr_eq(t, &ctx.regions)) {
                map.remove(&ctx.local_name);
            }
        }
        // Let copies already running finish (each checks `stopped` before starting another).
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.inner.running.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_and_declares_in_process_only() {
        link();
        let f = mooncake_core::registry::transport(NAME).expect("loopback registered");
        assert!((f.probe)().is_available());
        let t = (f.create)(&BackendConfig::default()).unwrap();
        assert_eq!(t.name(), NAME);
        assert!(!t.capabilities().cross_process);
        assert!(t.capabilities().requires_local_registration);
    }
}
