//! Dummy clients end to end: a master and a real client (store client plus its dummy-client service) in this
//! process, and dummy clients that reach them through RPC and a shared-memory pool under /dev/shm.

use std::time::{Duration, Instant};

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::dummy::{DummyClient, DummyConfig, DummyRequest, DummyResponse, RealClientService, service_id};
use mooncake_store::types::{ErrorCode, ReplicateConfig};
use mooncake_store_master::{MasterService, ServiceConfig};
use mooncake_store_rpc::{BlockingClient, ClientOptions};

const MIB: u64 = 1 << 20;

struct Cluster {
    rt: tokio::runtime::Runtime,
    _master: MasterService,
    real: StoreClient,
    service: Option<RealClientService>,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        mooncake::link_all();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let master = rt
            .block_on(MasterService::start(ServiceConfig {
                rpc_addr: "127.0.0.1:0".into(),
                admin_addr: None,
                tick_interval: Duration::from_millis(50),
                ..Default::default()
            }))
            .unwrap();
        let real = StoreClient::setup(ClientConfig {
            local_hostname: "127.0.0.1".into(),
            metadata_server: "P2PHANDSHAKE".into(),
            protocol: "tcp".into(),
            master_server_addr: master.rpc_addr().to_string(),
            global_segment_size: 64 * MIB,
            local_buffer_size: 4 * MIB,
            ..Default::default()
        })
        .unwrap();
        let service = rt.block_on(RealClientService::start(real.clone(), 0)).unwrap();
        let port = service.local_addr().port();
        Cluster { rt, _master: master, real, service: Some(service), port }
    }

    fn dummy(&self, pool: u64, local: u64) -> DummyClient {
        DummyClient::attach(DummyConfig {
            server_address: format!("127.0.0.1:{}", self.port),
            mem_pool_size: pool,
            local_buffer_size: local,
            rpc_timeout: Duration::from_secs(2),
        })
        .unwrap()
    }

    fn stop_service(&mut self) {
        if let Some(s) = self.service.take() {
            self.rt.block_on(s.shutdown());
        }
    }

    fn restart_service(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.rt.block_on(RealClientService::start(self.real.clone(), self.port)) {
                Ok(s) => {
                    self.service = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("port not free yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
}

#[test]
fn a_dummy_reads_and_writes_through_the_real_client() {
    let cluster = Cluster::start();
    let d = cluster.dummy(8 * MIB, 4 * MIB);
    let cfg = ReplicateConfig::default();
    let value = pattern(300 << 10, 1);
    d.put_parts("d-bytes", &[&value[..1000], &value[1000..]], &cfg, false).unwrap();
    assert_eq!(d.get("d-bytes").unwrap(), value);
    assert_eq!(cluster.real.get("d-bytes").unwrap(), value, "the real client sees what the dummy put");
    assert_eq!(d.get("missing"), Err(ErrorCode::ObjectNotFound.into()));
    // Values larger than the local buffer are refused up front.
    assert_eq!(d.put_parts("big", &[&vec![0u8; 5 * MIB as usize]], &cfg, false), Err(ErrorCode::InvalidParams.into()));

    // Zero copy: buffers from the pool.
    let src = d.alloc(MIB).unwrap();
    let dst = d.alloc(MIB).unwrap();
    assert!(d.in_pool(src, MIB) && d.in_pool(dst, MIB) && src != dst);
    cluster.real.put("from-real", &value, &cfg).unwrap();
    let keys = vec!["from-real".to_string(), "missing".to_string()];
    let got = d.get_into(&keys, &[dst, dst + 512 * 1024], &[MIB, 1000]);
    assert_eq!(got, vec![Ok(value.len() as u64), Err(ErrorCode::ObjectNotFound.into())]);
    assert_eq!(d.put_from(&["zc".to_string()], &[dst], &[value.len() as u64], &cfg, false), vec![Ok(())]);
    assert_eq!(cluster.real.get("zc").unwrap(), value);
    // Outside the pool: refused per key, nothing touched.
    assert_eq!(d.get_into(&["zc".to_string()], &[4096], &[100]), vec![Err(ErrorCode::InvalidParams.into())]);
    assert!(d.free(src) && !d.free(src));

    assert_eq!(d.exist(&keys), vec![Ok(true), Ok(false)]);
    assert_eq!(d.get_size(&keys[..1]), vec![Ok(value.len() as u64)]);
    // The real client's get above leased "zc": removal without force is refused, as for any client.
    assert_eq!(d.remove(&["zc".to_string()], false), vec![Err(ErrorCode::ObjectHasLease.into())]);
    assert_eq!(d.remove(&["zc".to_string()], true), vec![Ok(())]);
    assert!(d.remove_all(true).unwrap() >= 2);
    let (name, health) = d.status().unwrap();
    assert_eq!((name.as_str(), health), (cluster.real.hostname(), 0));
    d.close();
    assert_eq!(d.get("d-bytes"), Err(ErrorCode::UnavailableInCurrentStatus.into()));
}

#[test]
fn a_dummy_fails_fast_while_the_real_client_is_gone_and_reattaches() {
    let mut cluster = Cluster::start();
    let d = cluster.dummy(2 * MIB, 2 * MIB);
    let cfg = ReplicateConfig::default();
    d.put_parts("before", &[b"one"], &cfg, false).unwrap();
    cluster.stop_service();
    let started = Instant::now();
    let err = d.get("before").unwrap_err();
    assert!(matches!(err.kind(), ErrorCode::RpcFail | ErrorCode::RpcTimeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "a typed error, within a bound");
    cluster.restart_service();
    // Another dummy attaches to the restarted real client first: the first dummy's old session must not name the
    // newcomer's pool (its zero-copy writes would read the other process's memory).
    let other = cluster.dummy(2 * MIB, 2 * MIB);
    let buf = d.alloc(4096).unwrap();
    let mine = vec![0xA5u8; 4096];
    d.put_parts("mine-staged", &[&mine], &cfg, false).unwrap();
    assert_eq!(d.get_into(&["mine-staged".to_string()], &[buf], &[4096]), vec![Ok(4096)]);
    assert_eq!(d.put_from(&["mine".to_string()], &[buf], &[4096], &cfg, false), vec![Ok(())]);
    assert_eq!(cluster.real.get("mine").unwrap(), mine);
    other.close();
    assert_eq!(d.get("before").unwrap(), b"one");
    d.put_parts("after", &[b"two"], &cfg, false).unwrap();
    assert_eq!(cluster.real.get("after").unwrap(), b"two");
}

#[test]
fn the_service_maps_only_pools_it_named() {
    let cluster = Cluster::start();
    let rpc: BlockingClient<DummyRequest, DummyResponse> =
        BlockingClient::new(format!("127.0.0.1:{}", cluster.port), service_id(), ClientOptions::default());
    for path in ["/etc/passwd", "/dev/shm/mooncake-dummy-../x", "/dev/shm/mooncake-dummy-a/b", "/tmp/x"] {
        let resp = rpc.call(&DummyRequest::Attach { path: path.into(), size: 4096 }).unwrap();
        assert_eq!(resp, DummyResponse::Attached(Err(ErrorCode::InvalidParams)), "{path}");
    }
    let resp = rpc.call(&DummyRequest::Read { session: 99, keys: vec!["k".into()], ranges: vec![(0, 1)] }).unwrap();
    assert_eq!(resp, DummyResponse::Sizes(vec![Err(ErrorCode::ClientNotFound)]));
    assert_eq!(
        rpc.call(&DummyRequest::Detach { session: 99 }).unwrap(),
        DummyResponse::Done(Err(ErrorCode::ClientNotFound))
    );
}
