//! A transfer holds its local region until it is finished, so `unregister_memory` of a local buffer waits for the
//! transfers using it, as it waits for peers' accesses. A `gate` transport (this test binary's own) holds every
//! task until the test releases it, which makes the wait deterministic.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake::registry::{Availability, TransportFactory};
use mooncake::{
    BackendConfig, Capabilities, EngineConfig, Error, HostBuffer, Opcode, RemoteSegment, Result, SegmentDescriptor,
    TransferEngine, TransferRequest, TransferTask, Transport, TransportContext,
};

/// Tasks the gate holds, until `release`.
static HELD: Mutex<Vec<TransferTask>> = Mutex::new(Vec::new());

struct Gate(Capabilities);

#[async_trait]
impl Transport for Gate {
    fn name(&self) -> &str {
        "gate"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.0
    }
    async fn start(&self, _ctx: &TransportContext) -> Result<()> {
        Ok(())
    }
    fn describe(&self, _desc: &mut SegmentDescriptor) {}
    fn submit(&self, _target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        HELD.lock().unwrap().extend(tasks);
    }
    async fn shutdown(&self) {}
}

fn create(_: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(Gate(Capabilities::default())))
}

mooncake::inventory::submit! {
    TransportFactory { name: "gate", summary: "test: holds every task until released", probe: || Availability::Available, create }
}

/// Finishes and drops every held task (moving no bytes).
fn release() -> usize {
    let tasks: Vec<TransferTask> = std::mem::take(&mut *HELD.lock().unwrap());
    let n = tasks.len();
    for t in tasks {
        let len = t.length();
        t.completion.finish(Ok(len));
    }
    n
}

#[test]
fn unregister_waits_for_a_transfer_using_the_local_buffer() {
    mooncake::link_all();
    let e = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["gate"])).unwrap();
    let (local, remote) = (HostBuffer::zeroed(4096), HostBuffer::zeroed(4096));
    e.register_owned(local.owned(), "cpu:0").unwrap();
    e.register_owned(remote.owned(), "cpu:0").unwrap();
    let me = e.open_segment(e.local_segment_name()).unwrap();
    let req = TransferRequest {
        opcode: Opcode::Write,
        local_addr: local.addr(),
        target: me,
        remote_addr: remote.addr(),
        length: 4096,
    };
    let id = e.allocate_batch(1).unwrap();
    e.submit_transfer(id, &[req]).unwrap();
    assert_eq!(HELD.lock().unwrap().len(), 1, "the gate holds the task");

    let (e2, addr) = (e.clone(), local.addr());
    let started = Instant::now();
    let unregister = std::thread::spawn(move || (e2.unregister_memory(addr), started.elapsed()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!unregister.is_finished(), "unregister_memory returned while a transfer still held the local buffer");
    // New transfers from the buffer being unregistered are refused meanwhile.
    let again = e.submit_transfer(e.allocate_batch(1).unwrap(), &[req]);
    assert!(matches!(again, Err(Error::AddressNotRegistered { .. })), "{again:?}");
    assert_eq!(release(), 1);
    let (result, waited) = unregister.join().unwrap();
    result.unwrap();
    assert!(waited >= Duration::from_millis(200), "returned after {waited:?}");
    assert!(e.batch(id).unwrap().is_done());
    e.shutdown();
}
