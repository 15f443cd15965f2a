//! The store as a cluster of processes: a `mooncake_master`, three `mooncake_client` nodes and in-process
//! drivers, on 127.0.0.1 with TCP transfers. Placement, reads from every node, eviction under pressure,
//! leases, a node killed with SIGKILL, and master restarts. Every value is derived from its key
//! (`value_for`), so every read is checked byte for byte.
//!
//! Timings (read failures after a kill, segment expiry, remount) are printed; run with `--nocapture` to see
//! them. Nothing asserts on speed: time-based waits poll for up to 20 s, and calls that must not hang are
//! bounded at 10 s.

mod cluster_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster_harness::{Cluster, MIB, Registered, SETTLE, Setup, bounded, on, replicas, value_for, verify, wait_until};
use mooncake_store::client::{HEALTH_MASTER_UNREACHABLE, HEALTH_OK, StoreClient};
use mooncake_store::types::{ErrorCode, ReplicaStatus, ReplicateConfig};

/// No call may take this long: it would be a hang.
const HANG: Duration = Duration::from_secs(10);

fn put_checked(cluster: &Cluster, key: &str, len: usize, config: &ReplicateConfig) {
    cluster.driver().put(key, &value_for(key, len), config).unwrap_or_else(|e| panic!("put {key}: {e:?}"));
}

fn get_checked(client: &StoreClient, key: &str, len: usize) {
    let bytes = client.get(key).unwrap_or_else(|e| panic!("get {key}: {e:?} ({})", e.code()));
    verify(key, &bytes, len).unwrap();
}

/// Segment names of the replicas of `key`, in the master's order.
fn replica_segments(cluster: &Cluster, key: &str) -> Vec<String> {
    let replicas = cluster.driver().get_replica_desc(key).unwrap_or_else(|e| panic!("replicas of {key}: {e:?}"));
    for r in &replicas {
        assert_eq!(r.status, ReplicaStatus::Complete, "{key}: {r:?}");
        assert_eq!(r.transport_endpoint, r.segment, "a node's segment is named after its endpoint: {r:?}");
    }
    replicas.into_iter().map(|r| r.segment).collect()
}

// ---- 1. placement -----------------------------------------------------------------------------------------

#[test]
fn replicas_land_on_distinct_nodes_and_random_placement_uses_every_node() {
    let cluster = Cluster::start(Setup::default());
    let nodes: BTreeSet<String> = cluster.node_segments().into_iter().collect();
    let driver = cluster.driver();

    // replica_num = 3: one replica on each of the three nodes, each readable.
    for i in 0..12 {
        let key = format!("r3-{i}");
        let len = 1000 + i * 7919;
        put_checked(&cluster, &key, len, &replicas(3));
        let segments = replica_segments(&cluster, &key);
        let distinct: BTreeSet<String> = segments.iter().cloned().collect();
        assert_eq!(segments.len(), 3, "{key}: {segments:?}");
        assert_eq!(distinct, nodes, "{key}: replicas on {segments:?}");
        get_checked(driver, &key, len);
    }
    // Batched puts too, and replica_num = 2: two distinct nodes.
    let keys: Vec<String> = (0..8).map(|i| format!("r2-{i}")).collect();
    let values: Vec<Vec<u8>> = keys.iter().map(|k| value_for(k, 64 << 10)).collect();
    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    assert_eq!(driver.put_batch(&keys, &refs, &replicas(2)), vec![Ok(()); 8]);
    for key in &keys {
        let segments = replica_segments(&cluster, key);
        assert_eq!(segments.len(), 2, "{key}: {segments:?}");
        assert_ne!(segments[0], segments[1], "{key}");
        assert!(segments.iter().all(|s| nodes.contains(s)), "{segments:?}");
        get_checked(driver, key, 64 << 10);
    }
    // More replicas than nodes: best effort, one per node (as upstream).
    put_checked(&cluster, "r5", 5000, &replicas(5));
    let distinct: BTreeSet<String> = replica_segments(&cluster, "r5").into_iter().collect();
    assert_eq!(distinct, nodes);

    // replica_num = 1 over many puts: the random strategy uses every node.
    let mut per_node: BTreeMap<String, usize> = nodes.iter().map(|n| (n.clone(), 0)).collect();
    for i in 0..90 {
        let key = format!("r1-{i}");
        put_checked(&cluster, &key, 4096 + i, &replicas(1));
        let segments = replica_segments(&cluster, &key);
        assert_eq!(segments.len(), 1, "{key}: {segments:?}");
        *per_node.get_mut(&segments[0]).unwrap_or_else(|| panic!("{key} on an unknown segment {segments:?}")) += 1;
    }
    println!("replica_num=1 placement over 90 puts: {per_node:?}");
    assert!(per_node.values().all(|&n| n > 0), "a node got no object: {per_node:?}");
    for i in 0..90 {
        get_checked(driver, &format!("r1-{i}"), 4096 + i);
    }
    assert_eq!(cluster.metric("master_key_count"), 12 + 8 + 1 + 90);
}

// ---- 2. reads from every node -----------------------------------------------------------------------------

#[test]
fn objects_on_each_node_read_back_through_every_read_call() {
    let cluster = Cluster::start(Setup::default());
    // Sizes: tiny, unaligned, larger than the driver's 4 MiB staging buffer.
    let sizes = [1usize, 4095, 100_003, MIB as usize, 6 * MIB as usize];
    let mut all: Vec<(String, usize)> = Vec::new();
    for node in &cluster.nodes {
        for (j, &len) in sizes.iter().enumerate() {
            let key = format!("on-{}-{j}", node.segment);
            put_checked(&cluster, &key, len, &on(&[&node.segment], 1));
            assert_eq!(replica_segments(&cluster, &key), vec![node.segment.clone()], "{key}");
            all.push((key, len));
        }
    }
    let shm = cluster.new_driver(true);
    println!("second driver's transports: {:?}", shm.engine().protocols());
    for (label, client) in [("tcp", cluster.driver()), ("tcp+shm", &shm)] {
        // get
        for (key, len) in &all {
            get_checked(client, key, *len);
        }
        // get_batch, with a missing key in the middle
        let mut probe: Vec<String> = all.iter().map(|(k, _)| k.clone()).collect();
        probe.insert(3, "missing".into());
        let got = client.get_batch(&probe);
        assert_eq!(got[3], Err(ErrorCode::ObjectNotFound.into()), "{label}");
        let found: Vec<&Result<Vec<u8>, mooncake_store::Error>> =
            got.iter().enumerate().filter(|(i, _)| *i != 3).map(|(_, r)| r).collect();
        for (r, (key, len)) in found.into_iter().zip(&all) {
            let bytes = r.as_ref().unwrap_or_else(|e| panic!("{label} get_batch {key}: {e:?}"));
            verify(key, bytes, *len).unwrap();
        }
        // get_into: into a registered buffer larger than the object
        let total: usize = all.iter().map(|(_, l)| l).sum();
        let mut buf = Registered::new(client, total + 4096);
        for (key, len) in &all {
            buf.fill(0xEE);
            assert_eq!(client.get_into(key, buf.at(0), (len + 4096) as u64), Ok(*len as u64), "{label} {key}");
            verify(key, buf.read(0, *len), *len).unwrap();
        }
        // batch_get_into: every object of all nodes at once, per-key byte counts, plus a miss and a too-small
        // buffer.
        buf.fill(0xEE);
        let mut keys: Vec<String> = Vec::new();
        let mut ptrs = Vec::new();
        let mut lens = Vec::new();
        let mut offsets = Vec::new();
        let mut off = 0;
        for (key, len) in &all {
            keys.push(key.clone());
            ptrs.push(buf.at(off));
            lens.push(*len as u64);
            offsets.push(off);
            off += len;
        }
        keys.push("missing".into());
        ptrs.push(buf.at(off));
        lens.push(4096);
        keys.push(all[2].0.clone()); // 100_003 bytes into 4096: BufferOverflow
        ptrs.push(buf.at(off));
        lens.push(4096);
        let (got, took) = {
            let client = client.clone();
            let (keys, ptrs, lens) = (keys.clone(), ptrs.clone(), lens.clone());
            bounded("batch_get_into", HANG, move || client.batch_get_into(&keys, &ptrs, &lens))
        };
        println!("{label}: batch_get_into of {} keys ({} bytes) took {took:?}", keys.len(), total);
        for (i, (key, len)) in all.iter().enumerate() {
            assert_eq!(got[i], Ok(*len as u64), "{label} {key}");
            verify(key, buf.read(offsets[i], *len), *len).unwrap();
        }
        assert_eq!(got[all.len()], Err(ErrorCode::ObjectNotFound.into()), "{label}");
        assert_eq!(got[all.len() + 1], Err(ErrorCode::BufferOverflow.into()), "{label}");
    }
    let _ = shm.close();
}

// ---- 3. eviction ------------------------------------------------------------------------------------------

#[test]
fn eviction_under_pressure_never_serves_wrong_bytes() {
    let cluster = Cluster::start(Setup { segment_size: 16 * MIB, ..Default::default() });
    let len = MIB as usize;
    let total = (2 * cluster.capacity() / MIB) as usize; // 96 values of 1 MiB: twice the capacity
    assert_eq!(cluster.metric("master_evicted_key_count"), 0);
    assert_eq!(cluster.metric("master_total_capacity_bytes"), cluster.capacity());

    // A second client reads back finished keys while the driver writes; every successful read must be right.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let client = cluster.new_driver(false);
        let (done, stop) = (done.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut gone, mut seed) = (0usize, 0usize, 7u64);
            while !stop.load(Ordering::Relaxed) {
                let n = done.load(Ordering::Acquire);
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let key = format!("ev-{}", (seed >> 33) as usize % n);
                match client.get(&key) {
                    Ok(bytes) => {
                        verify(&key, &bytes, len).unwrap();
                        ok += 1;
                    }
                    Err(e) if e == ErrorCode::ObjectNotFound => gone += 1,
                    Err(e) => panic!("concurrent get {key}: unexpected {e:?} ({})", e.code()),
                }
            }
            let _ = client.close();
            (ok, gone)
        })
    };

    let driver = cluster.driver();
    let mut results: BTreeMap<i32, usize> = BTreeMap::new();
    let mut stored = Vec::new();
    let fits = (cluster.capacity() / MIB) as usize;
    let mut record = |i: usize, key: String, r: Result<(), mooncake_store::Error>| {
        *results.entry(r.as_ref().err().map_or(0, |e| e.code())).or_default() += 1;
        match r {
            Ok(()) => stored.push(key),
            // Until the capacity is used up there is room for every put; after that, a put finding nothing
            // evictable (objects just admitted, or leased by the concurrent reader) may be refused.
            Err(e) if e == ErrorCode::NoAvailableHandle && i >= fits => {}
            Err(e) => panic!("put {key}: {e:?} ({}) is not a documented outcome here", e.code()),
        }
    };
    // The first half one put at a time, the rest in batches of 8.
    for i in 0..total / 2 {
        let key = format!("ev-{i}");
        record(i, key.clone(), driver.put(&key, &value_for(&key, len), &replicas(1)));
        done.store(i + 1, Ordering::Release);
    }
    for start in (total / 2..total).step_by(8) {
        let keys: Vec<String> = (start..(start + 8).min(total)).map(|i| format!("ev-{i}")).collect();
        let values: Vec<Vec<u8>> = keys.iter().map(|k| value_for(k, len)).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        for (j, (key, r)) in keys.iter().zip(driver.put_batch(&keys, &refs, &replicas(1))).enumerate() {
            record(start + j, key.clone(), r);
        }
        done.store(start + keys.len(), Ordering::Release);
    }
    stop.store(true, Ordering::Relaxed);
    let (reader_ok, reader_gone) = reader.join().expect("the concurrent reader failed");
    println!("puts by code: {results:?}; concurrent reads: {reader_ok} right, {reader_gone} evicted");

    // Every key reads back right or is gone; something is gone, something is left.
    let (mut present, mut gone) = (0, 0);
    for i in 0..total {
        let key = format!("ev-{i}");
        match driver.get(&key) {
            Ok(bytes) => {
                verify(&key, &bytes, len).unwrap();
                present += 1;
            }
            Err(e) if e == ErrorCode::ObjectNotFound => gone += 1,
            Err(e) => panic!("get {key}: unexpected {e:?} ({})", e.code()),
        }
    }
    let evicted = cluster.metric("master_evicted_key_count");
    println!(
        "after {total} puts of 1 MiB into {} MiB: {present} present, {gone} gone, {evicted} evicted",
        cluster.capacity() / MIB
    );
    assert!(evicted > 0, "master_evicted_key_count did not grow");
    assert!(present > 0 && gone > 0, "{present} present, {gone} gone");
    assert!(cluster.metric("master_allocated_bytes") <= cluster.capacity());
    assert_eq!(cluster.metric("master_key_count"), present as u64);
}

// ---- 4. a killed node -------------------------------------------------------------------------------------

#[test]
fn a_killed_node_fails_reads_fast_and_leaves_the_cluster_after_client_ttl() {
    let mut cluster = Cluster::start(Setup { master_args: vec!["--client_ttl=2".into()], ..Default::default() });
    let len = 256 << 10;
    let victim = cluster.nodes[0].segment.clone();
    let live: Vec<String> = cluster.nodes[1..].iter().map(|n| n.segment.clone()).collect();
    let only_victim: Vec<String> = (0..6).map(|i| format!("victim-{i}")).collect();
    let only_live: Vec<String> = (0..6).map(|i| format!("live-{i}")).collect();
    let everywhere: Vec<String> = (0..6).map(|i| format!("all-{i}")).collect();
    for k in &only_victim {
        put_checked(&cluster, k, len, &on(&[&victim], 1));
        assert_eq!(replica_segments(&cluster, k), vec![victim.clone()]);
    }
    for (i, k) in only_live.iter().enumerate() {
        put_checked(&cluster, k, len, &on(&[&live[i % 2]], 1));
    }
    for k in &everywhere {
        put_checked(&cluster, k, len, &replicas(3));
        assert_eq!(replica_segments(&cluster, k).len(), 3);
    }
    // The driver talks to every node before the kill (its connections are warm).
    for k in only_victim.iter().chain(&only_live).chain(&everywhere) {
        get_checked(cluster.driver(), k, len);
    }

    let victim_pid = cluster.nodes[0].proc.pid();
    cluster.kill_node(0);
    let killed = Instant::now();
    println!("SIGKILLed node {victim} (pid {victim_pid})");

    // Reads of keys that lived only there fail fast and typed; replicated keys fail over to another node.
    let typed = [ErrorCode::TransferFail, ErrorCode::UnavailableInCurrentStatus, ErrorCode::ObjectNotFound];
    for k in &only_victim {
        let (r, took) = {
            let (client, k) = (cluster.driver().clone(), k.clone());
            bounded(&format!("get {k}"), HANG, move || client.get(&k))
        };
        let e = r.expect_err("a value whose only replica died cannot be read");
        println!("get {k} (only on the killed node) at +{:?}: {e:?} ({}) in {took:?}", killed.elapsed(), e.code());
        assert!(typed.contains(&e.kind()), "{k}: {e:?}");
    }
    {
        let client = cluster.driver().clone();
        let buf = Registered::new(&client, len);
        let ptr = buf.at(0);
        let (r, took) = bounded("get_into victim-0", HANG, move || client.get_into("victim-0", ptr, len as u64));
        println!("get_into victim-0 at +{:?}: {r:?} in {took:?}", killed.elapsed());
        assert!(matches!(&r, Err(e) if typed.contains(&e.kind())), "{r:?}");
        drop(buf);
    }
    for k in &everywhere {
        let (r, took) = {
            let (client, k) = (cluster.driver().clone(), k.clone());
            bounded(&format!("get {k}"), HANG, move || client.get(&k))
        };
        let bytes = r.unwrap_or_else(|e| panic!("{k} has replicas on live nodes, yet: {e:?}"));
        verify(k, &bytes, len).unwrap();
        println!("get {k} (3 replicas) at +{:?}: ok in {took:?}", killed.elapsed());
    }
    let mixed = vec![only_victim[0].clone(), everywhere[0].clone(), only_live[0].clone()];
    let (got, took) = {
        let (client, mixed) = (cluster.driver().clone(), mixed.clone());
        bounded("get_batch", HANG, move || client.get_batch(&mixed))
    };
    println!("get_batch {mixed:?} at +{:?} in {took:?}", killed.elapsed());
    assert!(matches!(&got[0], Err(e) if typed.contains(&e.kind())), "{:?}", got[0]);
    verify(&mixed[1], got[1].as_ref().expect("replicated key"), len).unwrap();
    verify(&mixed[2], got[2].as_ref().expect("key on a live node"), len).unwrap();

    // Puts go on right away without waiting on the dead node. A put placed there before the master heard
    // of the failure fails fast with TransferFail; none lands there.
    let mut failed_early = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let key = format!("after-kill-{i}");
        let (r, took) = {
            let (client, key) = (cluster.driver().clone(), key.clone());
            bounded(&format!("put {key}"), HANG, move || client.put(&key, &value_for(&key, len), &replicas(1)))
        };
        slowest = slowest.max(took);
        match r {
            Ok(()) => {
                let segments = replica_segments(&cluster, &key);
                assert!(segments.len() == 1 && live.contains(&segments[0]), "{key} on {segments:?}");
                get_checked(cluster.driver(), &key, len);
            }
            Err(e) if e == ErrorCode::TransferFail => {
                println!("put {key} at +{:?}: TransferFail in {took:?} (placed on the dead node)", killed.elapsed());
                failed_early += 1;
            }
            Err(e) => panic!("put {key}: {e:?}"),
        }
    }
    println!("30 puts right after the kill: {failed_early} failed (TransferFail), slowest {slowest:?}");
    assert!(failed_early <= 3, "{failed_early} puts were still placed on the dead node");
    // Asking for the dead node explicitly does not put anything there either (placement is best effort).
    let (r, took) = {
        let (client, victim) = (cluster.driver().clone(), victim.clone());
        let key = "prefers-dead";
        bounded("put preferring the dead node", HANG, move || client.put(key, &value_for(key, len), &on(&[&victim], 1)))
    };
    println!("put preferring the dead node at +{:?}: {r:?} in {took:?}", killed.elapsed());
    r.expect("a put preferring a dead node goes to a live one");
    let segments = replica_segments(&cluster, "prefers-dead");
    assert!(segments.len() == 1 && live.contains(&segments[0]), "prefers-dead on {segments:?}");
    get_checked(cluster.driver(), "prefers-dead", len);

    // After client_ttl (2 s) the dead node's segment is gone.
    let gone_after = {
        let live = live.clone();
        let start = Instant::now();
        cluster.wait_segments(&live, SETTLE);
        start.elapsed()
    };
    println!(
        "segment of the killed node left /get_all_segments {:?} after the kill (polled for {gone_after:?})",
        killed.elapsed()
    );
    let (status, health) = cluster_harness::http_get(&cluster.admin_addr, "/health").unwrap();
    assert_eq!(status, 200);
    assert!(health.contains("\"mounted_segments\":2"), "{health}");
    assert_eq!(cluster.metric("master_active_clients"), 2);

    // Its objects are gone; replicated objects keep their two other replicas.
    for k in &only_victim {
        assert_eq!(cluster.driver().get(k), Err(ErrorCode::ObjectNotFound.into()), "{k}");
    }
    for k in &everywhere {
        let segments = replica_segments(&cluster, k);
        assert_eq!(segments.iter().cloned().collect::<BTreeSet<_>>(), live.iter().cloned().collect(), "{k}");
        get_checked(cluster.driver(), k, len);
    }
    for k in &only_live {
        get_checked(cluster.driver(), k, len);
    }

    // New puts all succeed, on the two live nodes only (replica_num 3 gets the two there are).
    for i in 0..40 {
        let key = format!("later-{i}");
        let n = if i % 4 == 0 { 3 } else { 1 };
        put_checked(&cluster, &key, 64 << 10, &replicas(n));
        let segments = replica_segments(&cluster, &key);
        assert_eq!(segments.len(), n.min(2), "{key}: {segments:?}");
        assert!(segments.iter().all(|s| live.contains(s)), "{key} landed on {segments:?}");
        get_checked(cluster.driver(), &key, 64 << 10);
    }

    // A second node dies, and this time a put meets it first: the write to the dead node fails fast
    // (TransferFail, the put is revoked), the node is reported, and later puts go to the last node.
    let second = cluster.kill_node(0);
    let last = cluster.nodes[0].segment.clone();
    let killed = Instant::now();
    let (r, took) = {
        let (client, second) = (cluster.driver().clone(), second.clone());
        let key = "to-second-dead";
        bounded("put onto the second dead node", HANG, move || {
            client.put(key, &value_for(key, len), &on(&[&second], 1))
        })
    };
    println!("put placed on the second killed node: {r:?} in {took:?}");
    match r {
        Err(e) if e == ErrorCode::TransferFail => {
            assert_eq!(cluster.driver().is_exist("to-second-dead"), Ok(false), "a failed put leaves nothing");
        }
        Ok(()) => assert_eq!(replica_segments(&cluster, "to-second-dead"), vec![last.clone()]),
        Err(e) => panic!("put onto a dead node: {e:?}"),
    }
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let key = format!("one-left-{i}");
        let (r, took) = {
            let (client, key) = (cluster.driver().clone(), key.clone());
            bounded(&format!("put {key}"), HANG, move || client.put(&key, &value_for(&key, len), &replicas(2)))
        };
        slowest = slowest.max(took);
        r.unwrap_or_else(|e| panic!("put {key} with one live node left: {e:?}"));
        assert_eq!(replica_segments(&cluster, &key), vec![last.clone()], "{key}");
        get_checked(cluster.driver(), &key, len);
    }
    println!("20 puts after the second kill all succeeded on the last node, slowest {slowest:?}");
    cluster.wait_segments(std::slice::from_ref(&last), SETTLE);
    println!("second killed node left /get_all_segments {:?} after its kill", killed.elapsed());
    for k in &everywhere {
        assert_eq!(replica_segments(&cluster, k), vec![last.clone()], "{k}");
        get_checked(cluster.driver(), k, len);
    }
}

// ---- 5. leases --------------------------------------------------------------------------------------------

#[test]
fn a_leased_object_survives_eviction_pressure() {
    let lease = Duration::from_secs(60);
    let cluster = Cluster::start(Setup {
        segment_size: 16 * MIB,
        master_args: vec![format!("--default_kv_lease_ttl={}s", lease.as_secs())],
        ..Default::default()
    });
    let driver = cluster.driver();
    let len = MIB as usize;
    // C is put first and never read (the least recently used object); K is read, which grants a lease.
    put_checked(&cluster, "control", len, &replicas(1));
    put_checked(&cluster, "leased", len, &replicas(1));
    get_checked(driver, "leased", len);
    let leased_at = Instant::now();
    let (status, info) = cluster.query_key("leased");
    assert_eq!(status, 200, "{info}");
    assert!(info["lease_remaining_ms"].as_u64().unwrap_or(0) > 0, "{info}");

    let total = 2 * cluster.capacity() / MIB;
    let mut refused = 0;
    for i in 0..total {
        let key = format!("fill-{i}");
        match driver.put(&key, &value_for(&key, len), &replicas(1)) {
            Ok(()) => {}
            Err(e) if e == ErrorCode::NoAvailableHandle => refused += 1,
            Err(e) => panic!("put {key}: {e:?}"),
        }
    }
    let evicted = cluster.metric("master_evicted_key_count");
    println!("filled {total} MiB in {:?}: {refused} refused, {evicted} evicted", leased_at.elapsed());
    assert!(evicted > 0, "no eviction happened");
    assert_eq!(driver.get("control"), Err(ErrorCode::ObjectNotFound.into()), "the unleased oldest object is evicted");
    if leased_at.elapsed() >= lease {
        eprintln!("the fill outlasted the lease ({:?}): nothing to check about it", leased_at.elapsed());
        return;
    }
    let (status, info) = cluster.query_key("leased");
    assert_eq!(status, 200, "the leased object was evicted: {info}");
    get_checked(driver, "leased", len);
}

// ---- 6. master restart ------------------------------------------------------------------------------------

#[test]
fn nodes_remount_after_the_master_restarts() {
    let mut cluster = Cluster::start(Setup::default());
    let len = 100_000;
    for i in 0..10 {
        put_checked(&cluster, &format!("before-{i}"), len, &replicas(1));
    }

    let status = cluster.take_master().sigterm(Duration::from_secs(10));
    assert!(status.success(), "mooncake_master exited with {status} on SIGTERM");
    assert_eq!(cluster.segments(), None, "the admin port answers with no master");
    let stopped = Instant::now();
    cluster.start_master();
    println!("new master ready {:?} after the old one stopped", stopped.elapsed());
    let ready = Instant::now();
    let took = cluster.wait_segments(&cluster.node_segments(), SETTLE);
    println!("all 3 nodes remounted {took:?} after the new master was ready");
    let took = wait_until("driver health to be ok", SETTLE, || cluster.driver().health() == HEALTH_OK);
    println!("driver health ok {took:?} later ({:?} after the new master was ready)", ready.elapsed());

    // The new master knows no objects; puts and gets work again, on every node.
    assert_eq!(cluster.driver().get("before-0"), Err(ErrorCode::ObjectNotFound.into()));
    let nodes: BTreeSet<String> = cluster.node_segments().into_iter().collect();
    let mut used = BTreeSet::new();
    for i in 0..60 {
        let key = format!("after-{i}");
        put_checked(&cluster, &key, len, &replicas(1));
        used.extend(replica_segments(&cluster, &key));
        get_checked(cluster.driver(), &key, len);
    }
    assert_eq!(used, nodes, "placement after the restart");
    put_checked(&cluster, "after-r3", len, &replicas(3));
    assert_eq!(replica_segments(&cluster, "after-r3").into_iter().collect::<BTreeSet<_>>(), nodes);
    get_checked(cluster.driver(), "after-r3", len);
}

// ---- 7. health while the master is down -------------------------------------------------------------------

#[test]
fn health_reports_the_master_down_and_recovers_after_restart() {
    let mut cluster = Cluster::start(Setup::default());
    assert_eq!(cluster.driver().health(), HEALTH_OK);
    put_checked(&cluster, "k", 5000, &replicas(1));

    cluster.take_master().sigkill();
    let killed = Instant::now();
    let took = wait_until("health to report the master unreachable", SETTLE, || {
        cluster.driver().health() == HEALTH_MASTER_UNREACHABLE
    });
    println!("health() == 2 {took:?} after SIGKILL of the master");
    // Calls fail typed, without hanging.
    let (r, took) = {
        let client = cluster.driver().clone();
        bounded("put with the master down", HANG, move || client.put("x", b"value", &replicas(1)))
    };
    println!("put with the master down: {r:?} in {took:?}");
    assert!(matches!(r.as_ref().map_err(|e| e.kind()), Err(ErrorCode::RpcFail | ErrorCode::RpcTimeout)), "{r:?}");
    let (r, took) = {
        let client = cluster.driver().clone();
        bounded("get with the master down", HANG, move || client.get("k"))
    };
    println!("get with the master down: {:?} in {took:?}", r.as_ref().map(Vec::len));
    assert!(
        matches!(r.as_ref().map_err(|e| e.kind()), Err(ErrorCode::RpcFail | ErrorCode::RpcTimeout)),
        "{:?}",
        r.map(|v| v.len())
    );
    assert_eq!(cluster.driver().health(), HEALTH_MASTER_UNREACHABLE, "still down");

    cluster.start_master();
    println!("new master ready {:?} after the kill", killed.elapsed());
    let took = wait_until("health to be ok again", SETTLE, || cluster.driver().health() == HEALTH_OK);
    println!("health() == 0 {took:?} after the restart");
    let took = cluster.wait_segments(&cluster.node_segments(), SETTLE);
    println!("3 segments remounted within {took:?} more");
    put_checked(&cluster, "k2", 5000, &replicas(2));
    get_checked(cluster.driver(), "k2", 5000);
}
