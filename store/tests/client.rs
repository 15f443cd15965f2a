//! The store client end to end: a master service in-process on 127.0.0.1 and several clients in this process,
//! each with its own transfer engine (P2P handshake, TCP), moving real bytes between their segments.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mooncake_store::client::{ClientConfig, HEALTH_MASTER_UNREACHABLE, HEALTH_NOT_INITIALIZED, HEALTH_OK, StoreClient};
use mooncake_store::types::{ErrorCode, ReplicateConfig};
use mooncake_store_master::{MasterService, ServiceConfig};

const MIB: u64 = 1 << 20;

/// A master on its own runtime.
struct Master {
    rt: tokio::runtime::Runtime,
    service: Option<MasterService>,
    addr: SocketAddr,
}

impl Master {
    fn start() -> Master {
        mooncake::link_all();
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let service = rt.block_on(MasterService::start(service_config("127.0.0.1:0"))).unwrap();
        let addr = service.rpc_addr();
        Master { rt, service: Some(service), addr }
    }

    fn service(&self) -> &MasterService {
        self.service.as_ref().expect("master is running")
    }

    fn stop(&mut self) {
        if let Some(s) = self.service.take() {
            self.rt.block_on(s.shutdown());
        }
    }

    /// Starts a new master on the same port (after `stop`).
    fn restart(&mut self) {
        let addr = self.addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.rt.block_on(MasterService::start(service_config(&addr))) {
                Ok(s) => {
                    self.service = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("port not free yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot restart the master on {addr}: {e}"),
            }
        }
    }

    fn segment_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.service().with_core(|c| c.segments()).into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.stop();
    }
}

fn service_config(addr: &str) -> ServiceConfig {
    ServiceConfig {
        rpc_addr: addr.into(),
        admin_addr: None,
        tick_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

fn config(master: &Master) -> ClientConfig {
    ClientConfig {
        local_hostname: "127.0.0.1".into(),
        metadata_server: "P2PHANDSHAKE".into(),
        protocol: "tcp".into(),
        master_server_addr: master.addr.to_string(),
        global_segment_size: 64 * MIB,
        local_buffer_size: 4 * MIB,
        ping_interval: Duration::from_millis(200),
        same_host_transports: false,
        ..Default::default()
    }
}

fn client(master: &Master) -> StoreClient {
    StoreClient::setup(config(master)).expect("client setup")
}

/// Replicas placed on the given segments first.
fn on(segments: &[&StoreClient], replicas: usize) -> ReplicateConfig {
    ReplicateConfig {
        replica_num: replicas,
        preferred_segments: segments.iter().map(|c| c.hostname().to_string()).collect(),
        ..Default::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A buffer registered with a client for the zero-copy calls; unregistered on drop.
struct Registered {
    data: Vec<u8>,
    ptr: u64,
    client: StoreClient,
}

impl Registered {
    fn new(client: &StoreClient, len: usize, fill: u8) -> Registered {
        let mut data = vec![fill; len];
        let ptr = data.as_mut_ptr() as u64;
        // SAFETY: `data` is never resized and lives in the returned value, whose Drop unregisters it first; the
        // tests read and write it only between the client's calls.
        unsafe { client.register_buffer(ptr, len as u64) }.unwrap();
        Registered { data, ptr, client: client.clone() }
    }

    fn at(&self, offset: usize) -> u64 {
        self.ptr + offset as u64
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.data[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn read(&self, offset: usize, len: usize) -> &[u8] {
        &self.data[offset..offset + len]
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = self.client.unregister_buffer(self.ptr);
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn put_and_get_both_ways_small_and_large() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    assert_ne!(a.hostname(), b.hostname());
    assert_eq!(a.engine().protocols(), vec!["tcp".to_string()], "same_host_transports: false installs tcp only");
    assert_eq!(master.segment_names().len(), 2);
    assert_eq!(a.health(), HEALTH_OK);

    // Written by A into B's segment, and into A's own segment (memcpy); read by both.
    let v1 = pattern(4096, 1);
    a.put("on-b", &v1, &on(&[&b], 1)).unwrap();
    let v2 = pattern(10_000, 2);
    a.put("on-a", &v2, &on(&[&a], 1)).unwrap();
    assert_eq!(a.get_replica_desc("on-b").unwrap()[0].segment, b.hostname());
    assert_eq!(a.get_replica_desc("on-a").unwrap()[0].segment, a.hostname());
    for c in [&a, &b] {
        assert_eq!(c.get("on-b").unwrap(), v1);
        assert_eq!(c.get("on-a").unwrap(), v2);
    }

    // One byte, and 16 MiB (larger than the 4 MiB staging buffer: temporary registration), both directions.
    b.put("tiny", b"x", &on(&[&a], 1)).unwrap();
    assert_eq!(a.get("tiny").unwrap(), b"x");
    assert_eq!(b.get("tiny").unwrap(), b"x");
    assert_eq!(a.get_size("tiny"), Ok(1));
    let big = pattern(16 << 20, 3);
    b.put("big-on-a", &big, &on(&[&a], 1)).unwrap();
    a.put("big-on-b", &big, &on(&[&b], 1)).unwrap();
    for c in [&a, &b] {
        assert!(c.get("big-on-a").unwrap() == big);
        assert!(c.get("big-on-b").unwrap() == big);
    }

    // Parts are concatenated.
    a.put_parts("parts", &[b"ab", b"", b"cde"], &on(&[&b], 1)).unwrap();
    assert_eq!(b.get("parts").unwrap(), b"abcde");
    assert_eq!(a.get("parts").unwrap(), b"abcde");

    // Misses and bad keys are typed.
    assert_eq!(a.get("missing"), Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(a.put("", b"v", &ReplicateConfig::default()), Err(ErrorCode::InvalidKey.into()));
    assert_eq!(a.put("empty", b"", &ReplicateConfig::default()), Err(ErrorCode::InvalidParams.into()));
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn replicas_land_on_distinct_segments_and_survive_an_owner() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let c = client(&master);
    let value = pattern(64 << 10, 7);

    // Two replicas: on two distinct segments.
    for i in 0..4 {
        a.put(&format!("r{i}"), &value, &ReplicateConfig { replica_num: 2, ..Default::default() }).unwrap();
        let replicas = b.get_replica_desc(&format!("r{i}")).unwrap();
        assert_eq!(replicas.len(), 2);
        assert_ne!(replicas[0].segment, replicas[1].segment);
    }
    // C then A hold the replicas of these keys.
    for i in 0..6 {
        a.put(&format!("ca{i}"), &value, &on(&[&c, &a], 2)).unwrap();
    }
    let replicas = b.get_replica_desc("ca0").unwrap();
    let mut segments: Vec<&str> = replicas.iter().map(|r| r.segment.as_str()).collect();
    segments.sort();
    let mut expected = vec![a.hostname(), c.hostname()];
    expected.sort();
    assert_eq!(segments, expected);

    // C's engine dies without C unmounting: reads fail over to A's replica (and report C as unreachable).
    c.engine().shutdown();
    for i in 0..6 {
        assert_eq!(b.get(&format!("ca{i}")).unwrap(), value, "key ca{i}");
    }
    let mut buf = Registered::new(&b, value.len(), 0);
    assert_eq!(b.get_into("ca1", buf.at(0), value.len() as u64), Ok(value.len() as u64));
    assert_eq!(buf.read(0, value.len()), &value[..]);
    buf.write(0, &[0; 16]);
    drop(buf);

    // Once C pings again the master trusts it again: puts placed there fail per key, fast, and are revoked.
    let c_name = c.hostname().to_string();
    wait_until("C to be healthy again", Duration::from_secs(10), || {
        master.service().with_core(|core| core.segments()).iter().any(|s| s.name == c_name && s.healthy)
    });
    let started = Instant::now();
    let results = a.put_batch(&["dead-0", "dead-1"], &[&value[..], &value[..]], &on(&[&c], 1));
    assert_eq!(results, vec![Err(ErrorCode::TransferFail.into()); 2]);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(a.batch_is_exist(&["dead-0", "dead-1"]), vec![Ok(false), Ok(false)]);

    // An owner that closes takes its replicas with it; the other replica still serves.
    a.put("ab", &value, &on(&[&a, &b], 2)).unwrap();
    b.close().unwrap();
    assert_eq!(a.get("ab").unwrap(), value);
    assert_eq!(a.get_replica_desc("ab").unwrap().len(), 1);
    a.close().unwrap();
    c.close().unwrap();
}

#[test]
fn batch_calls_answer_per_key() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let keys: Vec<String> = (0..8).map(|i| format!("batch-{i}")).collect();
    let values: Vec<Vec<u8>> = (0..8).map(|i| pattern(1000 + i * 777, i as u8)).collect();
    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    let results = a.put_batch(&keys, &refs, &ReplicateConfig::default());
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    // A batch mixing present, missing and repeated keys.
    let probe = vec!["batch-0".to_string(), "nope".into(), "batch-7".into(), "".into(), "batch-3".into()];
    let got = b.get_batch(&probe);
    assert_eq!(got[0].as_deref(), Ok(&values[0][..]));
    assert_eq!(got[1], Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(got[2].as_deref(), Ok(&values[7][..]));
    assert_eq!(got[3], Err(ErrorCode::InvalidKey.into()));
    assert_eq!(got[4].as_deref(), Ok(&values[3][..]));
    assert_eq!(a.batch_is_exist(&probe[..3]), vec![Ok(true), Ok(false), Ok(true)]);
    assert_eq!(
        a.batch_get_size(&probe[..3]),
        vec![Ok(1000), Err(ErrorCode::ObjectNotFound.into()), Ok(1000 + 7 * 777)]
    );
    let descs = a.batch_get_replica_desc(&probe[..2]);
    assert_eq!(descs[0].as_ref().unwrap().len(), 1);
    assert_eq!(descs[1], Err(ErrorCode::ObjectNotFound.into()));

    // Putting the batch again: every key exists; a new key in the batch still succeeds.
    let mut again = keys[..2].to_vec();
    again.push("batch-new".into());
    let xyz: Vec<&[u8]> = vec![b"x", b"y", b"z"];
    let results = b.put_batch(&again, &xyz, &ReplicateConfig::default());
    assert_eq!(
        results,
        vec![Err(ErrorCode::ObjectAlreadyExists.into()), Err(ErrorCode::ObjectAlreadyExists.into()), Ok(())]
    );
    let results = b.upsert_batch(&again, &xyz, &ReplicateConfig::default());
    assert_eq!(results, vec![Ok(()), Ok(()), Ok(())]);
    assert_eq!(a.get_batch(&again), vec![Ok(b"x".to_vec()), Ok(b"y".to_vec()), Ok(b"z".to_vec())]);

    // Shape mismatches fail every key, typed; empty batches are empty.
    assert_eq!(
        a.put_batch(&keys[..2], &refs[..1], &ReplicateConfig::default()),
        vec![Err(ErrorCode::InvalidParams.into()); 2]
    );
    assert!(a.get_batch::<String>(&[]).is_empty());
    assert!(a.batch_is_exist::<&str>(&[]).is_empty());

    // Removal per key (leased objects need force).
    let removed = a.batch_remove(&["batch-5", "nope", "batch-6"], false);
    assert_eq!(removed, vec![Ok(()), Err(ErrorCode::ObjectNotFound.into()), Ok(())]);
    assert_eq!(a.batch_remove(&["batch-0"], false), vec![Err(ErrorCode::ObjectHasLease.into())]);
    assert_eq!(a.batch_remove(&["batch-0"], true), vec![Ok(())]);
    assert_eq!(b.batch_is_exist(&["batch-0", "batch-5", "batch-1"]), vec![Ok(false), Ok(false), Ok(true)]);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn zero_copy_calls_with_registered_buffers() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let len = 256 << 10;
    let mut src = Registered::new(&a, 4 * len, 0);
    let dst = Registered::new(&b, 4 * len, 0);
    for i in 0..4 {
        src.write(i * len, &pattern(len, i as u8));
    }

    // Single key both ways: A's buffer into B's segment, read back into B's buffer; into A's own segment too.
    a.put_from("zc-b", src.at(0), len as u64, &on(&[&b], 1)).unwrap();
    a.put_from("zc-a", src.at(len), len as u64, &on(&[&a], 1)).unwrap();
    assert_eq!(b.get_into("zc-b", dst.at(0), len as u64), Ok(len as u64));
    assert_eq!(b.get_into("zc-a", dst.at(len), 2 * len as u64), Ok(len as u64));
    assert_eq!(dst.read(0, 2 * len), src.read(0, 2 * len));
    let local = Registered::new(&a, len, 0);
    assert_eq!(a.get_into("zc-a", local.at(0), len as u64), Ok(len as u64));
    assert_eq!(local.read(0, len), src.read(len, len));

    // Batches: per-key results, sizes read, a missing key in the middle.
    let keys = ["zb-0", "zb-1", "zb-2"];
    let ptrs = [src.at(0), src.at(len), src.at(2 * len)];
    let lens = [len as u64, 1000, len as u64];
    assert_eq!(a.batch_put_from(&keys, &ptrs, &lens, &ReplicateConfig::default()), vec![Ok(()); 3]);
    let out = Registered::new(&b, 4 * len, 0);
    let get_keys = ["zb-0", "missing", "zb-1", "zb-2"];
    let outs = [out.at(0), out.at(len), out.at(2 * len), out.at(3 * len)];
    let got = b.batch_get_into(&get_keys, &outs, &[len as u64; 4]);
    assert_eq!(got, vec![Ok(len as u64), Err(ErrorCode::ObjectNotFound.into()), Ok(1000), Ok(len as u64)]);
    assert_eq!(out.read(0, len), src.read(0, len));
    assert_eq!(out.read(2 * len, 1000), src.read(len, 1000));
    assert_eq!(out.read(3 * len, len), src.read(2 * len, len));

    // Multi-buffer forms: the object is the concatenation, read back split differently.
    let parts_ptrs = vec![vec![src.at(0), src.at(3 * len)], vec![src.at(len)]];
    let parts_lens = vec![vec![100u64, 5000], vec![7u64]];
    let results = a.batch_put_from_multi_buffers(&["mb-0", "mb-1"], &parts_ptrs, &parts_lens, &on(&[&b], 1));
    assert_eq!(results, vec![Ok(()), Ok(())]);
    let mut expected = src.read(0, 100).to_vec();
    expected.extend_from_slice(src.read(3 * len, 5000));
    assert_eq!(b.get("mb-0").unwrap(), expected);
    let out_a = Registered::new(&a, 4 * len, 0);
    let read_ptrs = vec![vec![out_a.at(0), out_a.at(len)], vec![out_a.at(2 * len)], vec![out_a.at(3 * len)]];
    let read_lens = vec![vec![3000u64, 3000], vec![7u64], vec![3u64, 1]];
    let got = a.batch_get_into_multi_buffers(&["mb-0", "mb-1", "mb-0"], &read_ptrs, &read_lens);
    assert_eq!(got[..2], [Ok(5100), Ok(7)]);
    assert_eq!(got[2], Err(ErrorCode::InvalidParams.into()), "shape mismatch inside one key is rejected");
    let mut joined = out_a.read(0, 3000).to_vec();
    joined.extend_from_slice(out_a.read(len, 2100));
    assert_eq!(joined, expected);
    assert_eq!(out_a.read(2 * len, 7), src.read(len, 7));

    // Upsert from a buffer replaces the value.
    a.upsert_from("zc-b", src.at(3 * len), 10, &ReplicateConfig::default()).unwrap();
    assert_eq!(b.get("zc-b").unwrap(), src.read(3 * len, 10));
    assert_eq!(a.batch_upsert_from(&["zc-b"], &[src.at(0)], &[20], &ReplicateConfig::default()), vec![Ok(())]);
    assert_eq!(b.get("zc-b").unwrap(), src.read(0, 20));
    drop((src, dst, out, out_a, local));
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn bad_buffers_are_rejected_without_touching_memory() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    a.put("k", &pattern(4096, 9), &on(&[&b], 1)).unwrap();

    // Too small a buffer: BufferOverflow, nothing read.
    let small = Registered::new(&a, 4095, 0xAB);
    assert_eq!(a.get_into("k", small.at(0), 4095), Err(ErrorCode::BufferOverflow.into()));
    assert!(small.read(0, 4095).iter().all(|&x| x == 0xAB));
    assert_eq!(
        a.batch_get_into_multi_buffers(&["k"], &[vec![small.at(0), small.at(100)]], &[vec![100u64, 100]]),
        vec![Err(ErrorCode::BufferOverflow.into())]
    );

    // Null, zero length, unregistered, or a range running past the registration: InvalidParams.
    let mut plain = vec![0xCDu8; 8192];
    let plain_ptr = plain.as_mut_ptr() as u64;
    assert_eq!(a.get_into("k", 0, 4096), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.get_into("k", small.at(0), 0), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.get_into("k", plain_ptr, 8192), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.get_into("k", small.at(0), 8192), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.get_into("k", u64::MAX - 10, 4096), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.put_from("new", 0, 10, &ReplicateConfig::default()), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.put_from("new", plain_ptr, 10, &ReplicateConfig::default()), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(
        a.batch_get_into(&["k", "k"], &[plain_ptr, small.at(0)], &[4096, 10]),
        vec![Err(ErrorCode::InvalidParams.into()), Err(ErrorCode::BufferOverflow.into())]
    );
    assert_eq!(
        a.batch_put_from(&["x"], &[plain_ptr], &[], &ReplicateConfig::default()),
        vec![Err(ErrorCode::InvalidParams.into())]
    );
    // The client's own segment is registered, but not the caller's to read into or write from.
    a.put("mine", &pattern(4096, 1), &on(&[&a], 1)).unwrap();
    let inside = a.get_replica_desc("mine").unwrap()[0].addr;
    assert_eq!(a.get_into("k", inside, 4096), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.put_from("new", inside, 4096, &ReplicateConfig::default()), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.get("mine").unwrap(), pattern(4096, 1));
    assert!(plain.iter().all(|&x| x == 0xCD));
    assert!(small.read(0, 4095).iter().all(|&x| x == 0xAB));
    assert_eq!(a.is_exist("new"), Ok(false), "a rejected put leaves nothing behind");

    // Registration errors are typed.
    // SAFETY: refused (null address, as the next three: zero length, overlap), so nothing is registered.
    assert_eq!(unsafe { a.register_buffer(0, 10) }, Err(ErrorCode::InvalidParams.into()));
    // SAFETY: as above.
    assert_eq!(unsafe { a.register_buffer(plain_ptr, 0) }, Err(ErrorCode::InvalidParams.into()));
    // SAFETY: as above.
    assert_eq!(unsafe { a.register_buffer(small.at(10), 10) }, Err(ErrorCode::InvalidParams.into()), "overlap");
    // The engine's refusal is kept as the cause, and shown.
    // SAFETY: as above.
    let overlap = unsafe { a.register_buffer(small.at(10), 10) }.unwrap_err();
    assert!(matches!(overlap.cause(), Some(mooncake_store::Cause::Engine { .. })), "{overlap:?}");
    assert!(std::error::Error::source(&overlap).is_some());
    assert!(overlap.to_string().contains("register_buffer"), "{overlap}");
    assert_eq!(overlap.code(), ErrorCode::InvalidParams.code());
    assert_eq!(a.unregister_buffer(plain_ptr), Err(ErrorCode::InvalidParams.into()));
    plain[0] = 1;
    drop(small);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn upsert_conflicts_and_missing_keys() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    a.put("k", b"first", &on(&[&b], 1)).unwrap();
    assert_eq!(a.put("k", b"second", &ReplicateConfig::default()), Err(ErrorCode::ObjectAlreadyExists.into()));
    assert_eq!(b.get("k").unwrap(), b"first");
    b.upsert("k", b"second value", &on(&[&a], 1)).unwrap();
    assert_eq!(a.get("k").unwrap(), b"second value");
    assert_eq!(b.get("k").unwrap(), b"second value");
    assert_eq!(b.get_size("k"), Ok(12));
    a.upsert("fresh", b"new", &ReplicateConfig::default()).unwrap();
    assert_eq!(b.get("fresh").unwrap(), b"new");

    assert_eq!(a.get("absent"), Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(a.is_exist("absent"), Ok(false));
    assert_eq!(a.get_size("absent"), Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(a.get_replica_desc("absent"), Err(ErrorCode::ObjectNotFound.into()));
    let buf = Registered::new(&a, 16, 0);
    assert_eq!(a.get_into("absent", buf.at(0), 16), Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(a.remove("absent", false), Err(ErrorCode::ObjectNotFound.into()));
    drop(buf);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn removal_counts() {
    let master = Master::start();
    let a = client(&master);
    for i in 0..5 {
        a.put(&format!("layer-{i}"), b"v", &ReplicateConfig::default()).unwrap();
        a.put(&format!("other-{i}"), b"v", &ReplicateConfig::default()).unwrap();
    }
    a.put("keep", b"v", &ReplicateConfig::default()).unwrap();
    assert_eq!(a.remove("layer-0", false), Ok(()));
    assert_eq!(a.remove("layer-0", false), Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(a.remove_by_regex("^layer-", false), Ok(4));
    assert_eq!(a.remove_by_regex("^layer-", false), Ok(0));
    assert_eq!(a.remove_by_regex("(", false), Err(ErrorCode::InvalidParams.into()));
    assert!(a.is_exist("keep").unwrap()); // leased now
    assert_eq!(a.remove_all(false), Ok(5), "the leased key stays");
    assert_eq!(a.remove_all(true), Ok(1));
    assert_eq!(a.batch_is_exist(&["keep", "other-1"]), vec![Ok(false), Ok(false)]);
    a.close().unwrap();
}

#[test]
fn absent_master_fails_within_setup_timeout() {
    mooncake::link_all();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let setup_timeout = Duration::from_millis(1500);
    let config = ClientConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: format!("127.0.0.1:{port}"),
        global_segment_size: 8 * MIB,
        local_buffer_size: MIB,
        setup_timeout,
        ..Default::default()
    };
    let started = Instant::now();
    let e = StoreClient::setup(config.clone()).expect_err("no master");
    assert_eq!(e.kind(), ErrorCode::RpcFail);
    assert!(matches!(e.cause(), Some(mooncake_store::Cause::Master { .. })), "the RPC error is the cause: {e:?}");
    assert!(started.elapsed() < setup_timeout * 3, "took {:?}", started.elapsed());

    // A bad config is typed too.
    let r = StoreClient::setup(ClientConfig { local_hostname: String::new(), ..config.clone() });
    assert_eq!(r.err().map(|e| e.kind()), Some(ErrorCode::InvalidParams));
    let r = StoreClient::setup(ClientConfig { global_segment_size: 3, ..config });
    assert_eq!(r.err().map(|e| e.kind()), Some(ErrorCode::InvalidParams));
}

#[test]
fn health_and_remount_after_master_restart() {
    let mut master = Master::start();
    let a = client(&master);
    let b = StoreClient::setup(ClientConfig { global_segment_size: 0, ..config(&master) }).unwrap();
    assert_eq!(master.segment_names(), vec![a.hostname().to_string()], "b contributes nothing");
    assert_eq!(a.health(), HEALTH_OK);

    master.stop();
    wait_until("health to report the master down", Duration::from_secs(10), || a.health() == HEALTH_MASTER_UNREACHABLE);
    wait_until("b's health too", Duration::from_secs(10), || b.health() == HEALTH_MASTER_UNREACHABLE);
    assert!(matches!(
        a.put("k", b"v", &ReplicateConfig::default()).map_err(|e| e.kind()),
        Err(ErrorCode::RpcFail | ErrorCode::RpcTimeout)
    ));
    assert!(matches!(a.get("k").map_err(|e| e.kind()), Err(ErrorCode::RpcFail | ErrorCode::RpcTimeout)));
    let r = a.batch_is_exist(&["a", "b"]);
    assert!(
        r.iter().all(|r| matches!(r.as_ref().map_err(|e| e.kind()), Err(ErrorCode::RpcFail | ErrorCode::RpcTimeout))),
        "{r:?}"
    );

    // A new master on the same port: the client is told to remount, and its segment reappears.
    master.restart();
    wait_until("the segment to be remounted", Duration::from_secs(10), || {
        master.segment_names() == vec![a.hostname().to_string()]
    });
    wait_until("health to recover", Duration::from_secs(10), || a.health() == HEALTH_OK);
    a.put("after-restart", b"value", &ReplicateConfig::default()).unwrap();
    assert_eq!(b.get("after-restart").unwrap(), b"value");
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn close_twice_and_calls_after_close_fail_typed() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    a.put("k", b"v", &on(&[&a], 1)).unwrap();
    let clone = a.clone();
    a.close().unwrap();
    a.close().unwrap();
    assert_eq!(clone.health(), HEALTH_NOT_INITIALIZED);
    assert_eq!(master.segment_names(), vec![b.hostname().to_string()], "close unmounts");
    assert_eq!(b.get("k"), Err(ErrorCode::ObjectNotFound.into()), "the replica left with its segment");
    let closed = Err(ErrorCode::UnavailableInCurrentStatus.into());
    assert_eq!(clone.put("k", b"v", &ReplicateConfig::default()), closed);
    assert_eq!(clone.get("k"), Err(ErrorCode::UnavailableInCurrentStatus.into()));
    assert_eq!(clone.get_into("k", 0x1000, 10), Err(ErrorCode::UnavailableInCurrentStatus.into()));
    assert_eq!(clone.is_exist("k"), Err(ErrorCode::UnavailableInCurrentStatus.into()));
    assert_eq!(clone.remove_all(true), Err(ErrorCode::UnavailableInCurrentStatus.into()));
    assert_eq!(clone.batch_get_into(&["k"], &[1], &[1]), vec![Err(ErrorCode::UnavailableInCurrentStatus.into())]);
    // SAFETY: the client is closed: the call is refused before anything is registered.
    assert_eq!(unsafe { clone.register_buffer(0x1000, 10) }, closed);
    drop(clone);
    drop(a);
    // Dropping the last clone without close also cleans up.
    let c = client(&master);
    let name = c.hostname().to_string();
    drop(c);
    assert!(!master.segment_names().contains(&name));
    b.close().unwrap();
}

#[test]
fn same_host_transports_move_bytes_too() {
    let master = Master::start();
    let mk = || StoreClient::setup(ClientConfig { same_host_transports: true, ..config(&master) }).unwrap();
    let a = mk();
    let b = mk();
    let value = pattern(300_000, 5);
    assert_eq!(a.engine().protocols()[0], "tcp");
    assert!(!config(&master).same_host_transports && a.config().same_host_transports);
    eprintln!("transports: {:?}", a.engine().protocols());
    a.put("shm", &value, &on(&[&b], 1)).unwrap();
    assert_eq!(a.get("shm").unwrap(), value);
    let buf = Registered::new(&a, value.len(), 0);
    assert_eq!(a.get_into("shm", buf.at(0), value.len() as u64), Ok(value.len() as u64));
    assert_eq!(buf.read(0, value.len()), &value[..]);
    drop(buf);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn many_threads_share_one_client_and_close_races_with_calls() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<StoreClient>();
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                for i in 0..40 {
                    let key = format!("t{t}-{i}");
                    let value = pattern(1000 + 997 * i, t as u8);
                    let cfg = if i % 2 == 0 { on(&[&b], 1) } else { on(&[&a], 1) };
                    a.put(&key, &value, &cfg).unwrap();
                    assert_eq!(b.get(&key).unwrap(), value);
                    assert_eq!(a.get(&key).unwrap(), value);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // Calls racing with close either succeed or fail typed; none crashes or hangs.
    a.put("race", b"value", &ReplicateConfig::default()).unwrap();
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                loop {
                    match b.get("race") {
                        Ok(v) => assert_eq!(v, b"value"),
                        Err(e) if e == ErrorCode::UnavailableInCurrentStatus => return,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    b.close().unwrap();
    for r in racers {
        r.join().unwrap();
    }
    a.close().unwrap();
}

#[test]
fn put_and_get_sessions_move_ranges_across_clients() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let len = 300 << 10;
    let mut src = Registered::new(&a, 2 * len, 0);
    src.write(0, &pattern(2 * len, 7));
    let keys = vec!["s-remote".to_string(), "s-own".to_string()];
    // One object on B (remote writes), one on A (memcpy), two replicas each where possible.
    assert_eq!(a.put_session_start(&keys[..1], &[len as u64], &on(&[&b], 1)), vec![Ok(())]);
    assert_eq!(a.put_session_start(&keys[1..], &[len as u64], &on(&[&a], 1)), vec![Ok(())]);
    assert_eq!(a.is_exist("s-remote"), Err(ErrorCode::ReplicaNotReady.into()));
    // Starting an open session again, or a zero size, is refused.
    assert_eq!(
        a.put_session_start(&keys[..1], &[len as u64], &on(&[&b], 1)),
        vec![Err(ErrorCode::InvalidParams.into())]
    );
    assert_eq!(
        a.put_session_start(&["z".to_string()], &[0], &on(&[&b], 1)),
        vec![Err(ErrorCode::InvalidParams.into())]
    );
    // Written in two halves, the second first.
    let half = (len / 2) as u64;
    let ranges = vec![(src.at(len / 2), half, half), (src.at(0), half, 0)];
    assert_eq!(a.put_session_write(&keys, &[ranges.clone(), ranges.clone()]), vec![Ok(len as u64); 2]);
    // Past the end, or outside registered memory: refused per key.
    let bad = vec![vec![(src.at(0), 10, len as u64 - 5)], vec![(4096, 10, 0)]];
    assert_eq!(a.put_session_write(&keys, &bad), vec![Err(ErrorCode::InvalidParams.into()); 2]);
    assert_eq!(a.put_session_end(&keys), vec![Ok(()); 2]);
    assert_eq!(a.put_session_end(&keys), vec![Err(ErrorCode::InvalidParams.into()); 2]);
    for k in &keys {
        assert_eq!(b.get(k).unwrap(), src.read(0, len));
    }

    // Get session on B: ranges of both objects (one on A, read through the engine; one on B, by memcpy).
    let dst = Registered::new(&b, len, 0);
    assert_eq!(b.get_session_start(&keys), vec![Ok(()); 2]);
    assert_eq!(b.get_session_start(&["nope".to_string()]), vec![Err(ErrorCode::ObjectNotFound.into())]);
    let reads = vec![vec![(dst.at(0), 100, 1000)], vec![(dst.at(100), 50, len as u64 - 50), (dst.at(150), 10, 0)]];
    assert_eq!(b.get_session_read(&keys, &reads), vec![Ok(100), Ok(60)]);
    assert_eq!(dst.read(0, 100), src.read(1000, 100));
    assert_eq!(dst.read(100, 50), src.read(len - 50, 50));
    assert_eq!(dst.read(150, 10), src.read(0, 10));
    b.get_session_end(&keys).unwrap();
    assert_eq!(b.get_session_read(&keys[..1], &reads[..1]), vec![Err(ErrorCode::InvalidParams.into())]);

    // A revoked session leaves nothing behind.
    assert_eq!(a.put_session_start(&["r".to_string()], &[4096], &on(&[&b], 1)), vec![Ok(())]);
    assert_eq!(a.put_session_revoke(&["r".to_string()]), vec![Ok(())]);
    assert_eq!(a.is_exist("r"), Ok(false));
}

#[test]
fn copy_and_move_tasks_run_on_the_holder_and_replica_clear_drops_one_segment() {
    use mooncake_store::types::TaskStatus;
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let value = pattern(1 << 20, 3);
    a.put("t", &value, &on(&[&a], 1)).unwrap();
    let finished = |id| {
        let mut info = None;
        wait_until("the task to end", Duration::from_secs(20), || {
            let i = a.query_task(id).unwrap();
            let done = matches!(i.status, TaskStatus::Success | TaskStatus::Failed);
            info = Some(i);
            done
        });
        info.unwrap()
    };
    let segments = |key: &str| {
        let mut s: Vec<String> = a.get_replica_desc(key).unwrap().into_iter().map(|r| r.segment).collect();
        s.sort();
        s
    };
    let mut both = vec![a.hostname().to_string(), b.hostname().to_string()];
    both.sort();

    let copy = a.create_copy_task("t", &[b.hostname().to_string()]).unwrap();
    let info = finished(copy);
    assert_eq!(info.status, TaskStatus::Success, "{}", info.message);
    assert_eq!(info.assigned_client, a.client_id());
    assert_eq!(segments("t"), both);
    // The copy on B holds the same bytes: read it with A's replica gone.
    let mv = b.create_move_task("t", a.hostname(), b.hostname()).unwrap();
    assert_eq!(finished(mv).status, TaskStatus::Success);
    assert_eq!(segments("t"), vec![b.hostname().to_string()]);
    assert_eq!(a.get("t").unwrap(), value);

    assert_eq!(a.create_copy_task("missing", &[b.hostname().to_string()]), Err(ErrorCode::ObjectNotFound.into()));
    assert_eq!(a.create_copy_task("t", &["nosuch:1".to_string()]), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.query_task(mooncake_store::types::TaskId(1, 2)), Err(ErrorCode::TaskNotFound.into()));

    // replica_clear: an object read a moment ago keeps its replicas; one never read goes.
    a.put("c", b"clear me", &on(&[&a, &b], 2)).unwrap();
    assert_eq!(a.replica_clear(&["c".to_string(), "t".to_string()], b.hostname()), Ok(vec!["c".to_string()]));
    assert_eq!(segments("c"), vec![a.hostname().to_string()]);
    assert_eq!(a.replica_clear(&["c".to_string()], ""), Ok(vec![]));
}

#[test]
fn segments_mounted_after_setup_hold_replicas_until_unmounted() {
    let master = Master::start();
    let a = client(&master);
    let b = client(&master);
    let path = std::env::temp_dir().join(format!("mc-client-seg-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 8 * MIB as usize]).unwrap();
    let path_str = path.to_str().unwrap();

    let file_id = a.mount_file_segment(path_str, 4 * MIB, 4 * MIB).unwrap();
    let (alloc_id, size) = a.allocate_and_mount_segment(MIB, "").unwrap();
    assert_eq!(size, 16 * MIB);
    assert!(master.segment_names().contains(&file_id) && master.segment_names().contains(&alloc_id));
    // Replicas placed on them by name; B reads them through A's endpoint, A by memcpy.
    let on_file = ReplicateConfig { preferred_segments: vec![file_id.clone()], ..Default::default() };
    let value = pattern(300 << 10, 9);
    b.put("on-file", &value, &on_file).unwrap();
    let desc = a.get_replica_desc("on-file").unwrap();
    assert_eq!(desc[0].segment, file_id);
    assert_eq!(a.get("on-file").unwrap(), value);
    // The bytes are in the file, at the region's offset.
    let in_file = std::fs::read(&path).unwrap();
    assert!(in_file[4 * MIB as usize..].windows(64).any(|w| w == &value[..64]));

    // Unmount rules: unknown ids fail the call, an allocated segment needs free, nothing half done.
    assert_eq!(
        a.unmount_segments(&["nope".to_string()], Duration::ZERO, false),
        Err(ErrorCode::SegmentNotFound.into())
    );
    assert_eq!(
        a.unmount_segments(&[file_id.clone(), alloc_id.clone()], Duration::ZERO, false),
        Err(ErrorCode::InvalidParams.into())
    );
    a.unmount_segments(std::slice::from_ref(&file_id), Duration::ZERO, false).unwrap();
    assert!(!master.segment_names().contains(&file_id));
    assert!(b.get("on-file").is_err(), "its replica went with the segment");
    a.unmount_segments(std::slice::from_ref(&alloc_id), Duration::ZERO, true).unwrap();
    assert_eq!(a.mount_file_segment(path_str, 4 * MIB, 6 * MIB), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.mount_file_segment(path_str, 4 * MIB, 100), Err(ErrorCode::InvalidParams.into()));
    assert_eq!(a.allocate_and_mount_segment(0, ""), Err(ErrorCode::InvalidParams.into()));
    // Close unmounts whatever is left.
    let left = a.allocate_and_mount_segment(MIB, "").unwrap().0;
    a.close().unwrap();
    assert!(!master.segment_names().contains(&left));
    std::fs::remove_file(&path).unwrap();
}

/// An engine of this test on 127.0.0.1 (P2P handshake, tcp).
fn engine() -> mooncake_core::TransferEngine {
    let mut config = mooncake_core::EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["tcp"]);
    config.name_with_rpc_port = true;
    mooncake_core::TransferEngine::new(config).expect("engine")
}

#[test]
fn a_client_on_a_shared_engine_leaves_it_running_for_direct_transfers() {
    let master = Master::start();
    let shared = engine();
    let a = StoreClient::with_engine(config(&master), shared.clone()).expect("client on the shared engine");
    assert_eq!(a.hostname(), shared.local_segment_name(), "the client's segment is the engine's");
    let b = client(&master);

    // Store traffic both ways through the shared engine.
    let value = pattern(300 << 10, 9);
    a.put("shared-a", &value, &on(&[&a], 1)).unwrap();
    b.put("shared-b", &value, &on(&[&b], 1)).unwrap();
    assert_eq!(b.get("shared-a").unwrap(), value);
    assert_eq!(a.get("shared-b").unwrap(), value);

    // Direct engine traffic on the same engine, to a second plain engine, while the store client is open.
    let peer = engine();
    let mut remote = vec![0u8; 64 << 10];
    // SAFETY: `remote` and `local` are neither resized nor dropped before both engines are shut down at the end
    // of this test; they are read only between transfers.
    unsafe { peer.register_memory(remote.as_mut_ptr() as u64, remote.len() as u64, "*") }.unwrap();
    let mut local = pattern(64 << 10, 3);
    let local_addr = local.as_mut_ptr() as u64;
    // SAFETY: as above.
    unsafe { shared.register_memory(local_addr, local.len() as u64, "*") }.unwrap();
    let write = |len: u64| {
        shared.transfer_sync(
            peer.local_segment_name(),
            mooncake_core::Opcode::Write,
            local_addr,
            remote.as_ptr() as u64,
            len,
        )
    };
    write(1000).unwrap();
    assert_eq!(remote[..1000], local[..1000]);

    // Closing the store client unregisters its memory and keeps the engine serving.
    a.close().unwrap();
    assert_eq!(a.get("shared-b"), Err(ErrorCode::UnavailableInCurrentStatus.into()));
    write(local.len() as u64).expect("the shared engine still transfers after the client closed");
    assert_eq!(remote, local);
    let c = StoreClient::with_engine(config(&master), shared.clone()).expect("a second client on the same engine");
    assert_eq!(c.get("shared-b").unwrap(), value);
    c.close().unwrap();
    b.close().unwrap();
    shared.unregister_memory(local_addr).unwrap();
    shared.shutdown();
    peer.shutdown();
}
