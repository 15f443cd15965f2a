//! Routing between engines that offer several transports on one host.

use mooncake::{EngineConfig, Opcode, TransferEngine};

/// Two engines offering tcp and shm on this host: registered memory moves (shm is preferred by
/// the cost model). A source range that is not registered is refused by the safe calls, and through
/// the `unsafe` unchecked calls (the caller vouches for it, as the Python binding does) it is routed to
/// tcp, which can send it, instead of shm, which cannot.
#[test]
fn same_host_peers_with_tcp_and_shm() {
    mooncake::link_all();
    let engine = || {
        TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["tcp", "shm"]))
            .expect("starting an engine with tcp and shm")
    };
    let (a, b) = (engine(), engine());
    let mut local = vec![7u8; 8192];
    let mut remote = vec![0u8; 4096];
    let (l, r) = (local.as_mut_ptr() as u64, remote.as_mut_ptr() as u64);
    // SAFETY: `local` and `remote` are neither resized nor dropped before both engines are shut down below,
    // and are read only between transfers.
    unsafe { a.register_memory(l, 4096, "cpu:0") }.unwrap();
    // SAFETY: as above.
    unsafe { b.register_memory(r, 4096, "cpu:0") }.unwrap();
    let peer = b.local_segment_name().to_string();
    a.transfer_sync(&peer, Opcode::Write, l, r, 4096).expect("write to a same-host peer");
    assert!(remote.iter().all(|x| *x == 7), "the write did not arrive");
    local[4096..].fill(9);
    let refused = a.transfer_sync(&peer, Opcode::Write, l + 4096, r, 4096);
    assert!(matches!(refused, Err(mooncake::Error::AddressNotRegistered { .. })), "{refused:?}");
    // SAFETY: `local[4096..]` is alive, unborrowed and unchanged until the call returns.
    let unchecked = unsafe { a.unchecked() };
    unchecked
        .transfer_sync(&peer, Opcode::Write, l + 4096, r, 4096)
        .expect("unregistered source to a same-host peer did not fall back to tcp");
    assert!(remote.iter().all(|x| *x == 9), "the write from unregistered memory did not arrive");
    a.unregister_memory(l).unwrap();
    b.unregister_memory(r).unwrap();
    a.shutdown();
    b.shutdown();
}
