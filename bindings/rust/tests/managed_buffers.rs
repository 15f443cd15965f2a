//! Managed buffers against a real engine: slabs are registered once, carved buffers are usable as
//! transfer targets by a peer, and everything is unregistered on drop.

use mooncake::device_host::{ManagedBufferAllocator, ManagedBufferConfig};
use mooncake::{EngineConfig, Error, Opcode, TransferEngine};

fn engine() -> TransferEngine {
    mooncake::link_all();
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE")).expect("engine")
}

#[test]
fn managed_buffers_are_registered_transfer_targets() {
    let owner = engine();
    let peer = engine();
    let config = ManagedBufferConfig { slab_size: 8 << 20, max_class: 4 << 20, ..Default::default() };
    let alloc = ManagedBufferAllocator::new(owner.clone(), config).unwrap();
    let a = alloc.allocate_managed_buffer(4096).unwrap();
    let b = alloc.allocate_managed_buffer(1 << 20).unwrap();
    let big = alloc.allocate_managed_buffer(16 << 20).unwrap(); // above the largest class: dedicated
    assert_eq!(owner.local_descriptor().buffers.len(), 2, "one slab and one dedicated mapping");

    let name = owner.local_segment_name().to_string();
    let src: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    // The peer sends from and reads into unregistered buffers, as upstream's TCP allows.
    // SAFETY: `src` and each `back` are alive, unborrowed and unchanged during the blocking calls that use them.
    let unchecked = unsafe { peer.unchecked() };
    for (addr, len) in [(a, 4096u64), (b, 1 << 20), (big, 1 << 20)] {
        unchecked.transfer_sync(&name, Opcode::Write, src.as_ptr() as u64, addr, len).unwrap();
        let mut back = vec![0u8; len as usize];
        unchecked.transfer_sync(&name, Opcode::Read, back.as_mut_ptr() as u64, addr, len).unwrap();
        assert_eq!(&back[..], &src[..len as usize]);
    }

    // Bad frees are typed errors; a good free makes room for reuse.
    assert!(matches!(alloc.free_managed_buffer(a + 64, 4096), Err(Error::NotFound(_))));
    assert!(alloc.free_managed_buffer(a, 1 << 20).is_err());
    alloc.free_managed_buffer(a, 4096).unwrap();
    assert!(alloc.free_managed_buffer(a, 4096).is_err(), "double free");
    assert!(matches!(alloc.allocate_managed_buffer(0), Err(Error::InvalidArgument(_))));
    drop(alloc);
    assert!(owner.local_descriptor().buffers.is_empty(), "dropping the allocator unregisters its memory");
}
