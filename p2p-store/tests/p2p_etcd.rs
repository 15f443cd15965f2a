//! The P2P store against a real etcd (started on a free 127.0.0.1 port by `mooncake-testkit`, stopped by PID when
//! the guard drops): fan-out to 4 readers, bad input, a holder that goes away. Skipped, saying so, when `etcd` is
//! not installed (`apt-get install etcd-server`; CI installs it).

use std::time::{Duration, Instant};

use mooncake::{EngineConfig, HostBuffer, TransferEngine};
use mooncake_p2p_store::{Error, Options, P2PStore};
use mooncake_testkit::EtcdServer;

const MIB: usize = 1 << 20;

fn etcd() -> Option<EtcdServer> {
    if mooncake_testkit::which("etcd").is_none() {
        eprintln!("SKIPPED: `etcd` is not installed (apt-get install etcd-server)");
        return None;
    }
    Some(EtcdServer::start().expect("starting etcd"))
}

fn store(server: &EtcdServer) -> P2PStore {
    mooncake::link_all();
    let engine = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE")).expect("engine");
    P2PStore::new(engine, &[server.endpoint()]).expect("store")
}

/// Bytes that differ at every position and between checkpoints.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ salt).collect()
}

#[test]
fn four_readers_fan_out_and_serve_each_other() {
    let Some(server) = etcd() else { return };
    let started = Instant::now();
    let source = store(&server);
    // 256 MiB in two buffers of different sizes, 16 MiB shards: 16 shards.
    let parts = [pattern(192 * MIB, 1), pattern(64 * MIB, 2)];
    let src_bufs: Vec<HostBuffer> = parts.iter().map(|p| HostBuffer::from_vec(p.clone())).collect();
    let refs: Vec<&HostBuffer> = src_bufs.iter().collect();
    source.register_buffers("ckpt/fan", &refs, 16 * MIB as u64, false).unwrap();
    let listed = source.list("ckpt/").unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, 256 * MIB as u64);
    assert_eq!(listed[0].size_list, vec![192 * MIB as u64, 64 * MIB as u64]);
    assert_go_layout(&server, "ckpt/fan");
    assert_eq!(listed[0].shards.len(), 16);

    let readers: Vec<P2PStore> = (0..4).map(|_| store(&server)).collect();
    let bufs: Vec<Vec<HostBuffer>> =
        (0..4).map(|_| vec![HostBuffer::zeroed(192 * MIB), HostBuffer::zeroed(64 * MIB)]).collect();
    // The first reader goes alone; then three at once, which find it as a holder.
    let first = readers[0].get_replica_buffers("ckpt/fan", &[&bufs[0][0], &bufs[0][1]]).unwrap();
    assert!(first.shard_sources.iter().all(|s| s == source.engine().local_segment_name()));
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..4)
            .map(|k| {
                let (r, b) = (&readers[k], &bufs[k]);
                s.spawn(move || r.get_replica_buffers("ckpt/fan", &[&b[0], &b[1]]).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let payload = source.list("ckpt/fan").unwrap().remove(0);
    let from_replicas: usize = reports.iter().map(|r| r.shards_from_replicas(&payload)).sum();
    assert!(from_replicas > 0, "no shard came from a reader: {reports:?}");
    for (k, b) in bufs.iter().enumerate() {
        assert!(b[0].to_vec() == parts[0] && b[1].to_vec() == parts[1], "reader {k} has wrong bytes");
    }
    // Every shard now lists the four readers.
    assert!(payload.shards.iter().all(|s| s.replica_list.len() == 4 && s.gold.len() == 1));
    eprintln!(
        "fan-out: 256 MiB to 4 readers, {from_replicas} of 48 later shards from readers, cas retries {:?}, {:?} total",
        reports.iter().map(|r| r.cas_retries).collect::<Vec<_>>(),
        started.elapsed()
    );

    for r in &readers {
        r.delete_replica("ckpt/fan").unwrap();
    }
    let p = source.list("ckpt/fan").unwrap().remove(0);
    assert!(p.shards.iter().all(|s| s.replica_list.is_empty()));
    source.unregister("ckpt/fan").unwrap();
    assert!(source.list("ckpt/").unwrap().is_empty(), "the key goes with its last holder");
}

/// The raw etcd value under upstream's key has upstream's JSON field names.
fn assert_go_layout(server: &EtcdServer, name: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let raw = rt.block_on(async {
        let mut c = etcd_client::Client::connect([format!("http://{}", server.endpoint())], None).await.unwrap();
        let resp = c.get(format!("mooncake/checkpoint/{name}"), None).await.unwrap();
        resp.kvs()[0].value().to_vec()
    });
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    for field in ["name", "size", "size_list", "max_shard_size", "shards"] {
        assert!(v.get(field).is_some(), "{field} missing: {v}");
    }
    let shard = &v["shards"][0];
    for field in ["size", "gold", "replica_list"] {
        assert!(shard.get(field).is_some(), "shard {field} missing: {v}");
    }
    assert!(shard["gold"][0]["segment_name"].is_string() && shard["gold"][0]["offset"].is_u64(), "{v}");
}

#[test]
fn bad_input() {
    let Some(server) = etcd() else { return };
    let a = store(&server);
    let b = store(&server);
    let data = HostBuffer::from_vec(pattern(MIB, 3));
    a.register_buffers("bad/x", &[&data], 256 << 10, false).unwrap();

    // The same name again: from this process, and from another without and with force.
    assert!(matches!(a.register_buffers("bad/x", &[&data], 256 << 10, false), Err(Error::AlreadyOpened(_))));
    let other = HostBuffer::from_vec(pattern(2 * MIB, 4));
    assert!(matches!(b.register_buffers("bad/x", &[&other], 256 << 10, false), Err(Error::AlreadyExists(_))));
    // The failed register left nothing registered: the same buffer registers under another name.
    b.register_buffers("bad/y", &[&other], 256 << 10, false).unwrap();
    b.unregister("bad/y").unwrap();

    // Unknown name, wrong sizes, nothing held, empty input.
    let c = store(&server);
    let dst = HostBuffer::zeroed(MIB);
    assert!(matches!(c.get_replica_buffers("bad/none", &[&dst]), Err(Error::NotFound(_))));
    let small = HostBuffer::zeroed(MIB / 2);
    assert!(matches!(c.get_replica_buffers("bad/x", &[&small]), Err(Error::SizeMismatch { .. })));
    assert!(matches!(c.delete_replica("bad/x"), Err(Error::NotOpened(_))));
    assert!(matches!(c.unregister("bad/x"), Err(Error::NotOpened(_))));
    assert!(matches!(c.get_replica_buffers("bad/x", &[]), Err(Error::InvalidArgument(_))));
    assert!(matches!(a.register_buffers("bad/z", &[&dst], 0, false), Err(Error::InvalidArgument(_))));
    // After the failures the right buffer still works.
    c.get_replica_buffers("bad/x", &[&dst]).unwrap();
    assert_eq!(dst.to_vec(), data.to_vec());
    assert!(matches!(c.get_replica_buffers("bad/x", &[&dst]), Err(Error::AlreadyOpened(_))));

    // Force overwrites the entry with b's buffer.
    b.register_buffers("bad/x", &[&other], 256 << 10, true).unwrap();
    let p = b.list("bad/x").unwrap().remove(0);
    assert_eq!(p.size, 2 * MIB as u64);
    assert!(p.shards.iter().all(|s| s.gold[0].segment_name == b.engine().local_segment_name()));
}

#[test]
fn holder_that_went_away_is_skipped() {
    let Some(server) = etcd() else { return };
    let source = store(&server);
    let data = pattern(8 * MIB, 5);
    let src = HostBuffer::from_vec(data.clone());
    source.register_buffers("gone/x", &[&src], MIB as u64, false).unwrap();

    // Reader A becomes a holder of every shard, then its engine shuts down without leaving the catalogue.
    let a = store(&server);
    let a_buf = HostBuffer::zeroed(8 * MIB);
    a.get_replica_buffers("gone/x", &[&a_buf]).unwrap();
    let a_name = a.engine().local_segment_name().to_string();
    a.engine().shutdown();

    // Reader B prefers A (a replica) for every shard, fails there and reads the source instead.
    let b = P2PStore::with_options(
        TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE")).unwrap(),
        &[server.endpoint()],
        Options { fetch_threads: 2, ..Options::default() },
    )
    .unwrap();
    let b_buf = HostBuffer::zeroed(8 * MIB);
    let t = Instant::now();
    let report = b.get_replica_buffers("gone/x", &[&b_buf]).unwrap();
    assert!(report.failed_reads >= 1, "{report:?}");
    assert!(report.shard_sources.iter().all(|s| s == source.engine().local_segment_name() && s != &a_name));
    assert_eq!(b_buf.to_vec(), data);
    assert!(t.elapsed() < Duration::from_secs(30), "falling back took {:?}", t.elapsed());

    // Mid-fetch: reader C reads 1 MiB shards one at a time while B's engine shuts down under it.
    let c = P2PStore::with_options(
        TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE")).unwrap(),
        &[server.endpoint()],
        Options { fetch_threads: 1, ..Options::default() },
    )
    .unwrap();
    let c_buf = HostBuffer::zeroed(8 * MIB);
    let report = std::thread::scope(|s| {
        let fetch = s.spawn(|| c.get_replica_buffers("gone/x", &[&c_buf]).unwrap());
        std::thread::sleep(Duration::from_millis(5));
        b.engine().shutdown();
        fetch.join().unwrap()
    });
    assert_eq!(c_buf.to_vec(), data, "{report:?}");
    eprintln!("mid-fetch shutdown: {report:?}");
}

/// The raw-address calls (upstream's shape) on memory the test owns and keeps alive.
#[test]
fn raw_address_calls() {
    let Some(server) = etcd() else { return };
    let source = store(&server);
    let reader = store(&server);
    let data = pattern(3 * MIB + 123, 6);
    let src = data.clone().into_boxed_slice();
    let mut dst = vec![0u8; data.len()].into_boxed_slice();
    let (s_addr, d_addr) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
    let len = data.len() as u64;
    #[allow(unsafe_code)]
    // SAFETY: `src` and `dst` live until the end of the test, after unregister/delete_replica; no reference to
    // `dst` is used until delete_replica returned.
    let report = unsafe {
        source.register("raw/x", &[(s_addr, len)], MIB as u64, false).unwrap();
        reader.get_replica("raw/x", &[(d_addr, len)]).unwrap()
    };
    assert_eq!(report.shard_sources.len(), 4);
    reader.delete_replica("raw/x").unwrap();
    source.unregister("raw/x").unwrap();
    assert_eq!(&dst[..], &data[..]);
    assert!(source.list("raw/").unwrap().is_empty());
}
