//! The store on CXL: a master with a CXL pool (`MasterConfig::cxl`, `--enable_cxl`) and clients with
//! `protocol = "cxl"` that map one shared region (a sparse file on /dev/shm standing in for a DAX device), all in
//! this process. Objects land in the region and every client reads and writes them in its own mapping.
//!
//! One test function: the region is named by `MC_CXL_DEV_PATH`, read once per process, so the cases run in
//! order (the "no region configured" case first, before the variable is set).

use std::time::Duration;

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::{CXL_POOL_SEGMENT, CxlPoolConfig, ErrorCode, MasterConfig, ReplicateConfig};
use mooncake_store_master::{MasterService, ServiceConfig};

const MIB: u64 = 1 << 20;

struct Master {
    rt: tokio::runtime::Runtime,
    service: Option<MasterService>,
}

impl Master {
    fn start(cxl: Option<CxlPoolConfig>) -> Master {
        mooncake::link_all();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let config = ServiceConfig {
            rpc_addr: "127.0.0.1:0".into(),
            admin_addr: None,
            tick_interval: Duration::from_millis(50),
            master: MasterConfig { cxl, ..Default::default() },
            ..Default::default()
        };
        let service = rt.block_on(MasterService::start(config)).unwrap();
        Master { rt, service: Some(service) }
    }

    fn service(&self) -> &MasterService {
        self.service.as_ref().unwrap()
    }

    fn config(&self, protocol: &str) -> ClientConfig {
        ClientConfig {
            local_hostname: "127.0.0.1".into(),
            metadata_server: "P2PHANDSHAKE".into(),
            protocol: protocol.into(),
            master_server_addr: self.service().rpc_addr().to_string(),
            global_segment_size: 64 * MIB,
            local_buffer_size: 4 * MIB,
            ping_interval: Duration::from_millis(200),
            same_host_transports: false,
            ..Default::default()
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Some(s) = self.service.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed)).collect()
}

#[test]
fn store_on_a_shared_cxl_region() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let pool = CxlPoolConfig { path: "/dev/dax0.0".into(), size: 8 << 30 };

    // No region configured: a cxl client cannot start, and says so with a typed error.
    let master = Master::start(Some(pool.clone()));
    let Err(e) = StoreClient::setup(master.config("cxl")) else { panic!("setup without MC_CXL_DEV_PATH worked") };
    assert!(matches!(e.kind(), ErrorCode::InvalidParams | ErrorCode::TransferFail), "{e}");

    let dir = tempdir_in_shm();
    let region = dir.join("tmp_dax_sim");
    std::fs::File::create(&region).unwrap().set_len(256 * MIB).unwrap();
    // SAFETY: set before any engine of this test process reads the environment, from the only test function
    // (no other thread of this process reads or writes the environment meanwhile).
    unsafe {
        std::env::set_var("MC_CXL_DEV_PATH", &region);
        std::env::set_var("MC_CXL_DEV_SIZE", (256 * MIB).to_string());
    }

    // A master without a pool refuses cxl clients (their segments would overlap).
    let plain = Master::start(None);
    let Err(e) = StoreClient::setup(plain.config("cxl")) else { panic!("a cxl client on a plain master worked") };
    assert_eq!(e.kind(), ErrorCode::InvalidParams, "{e}");
    drop(plain);

    let a = StoreClient::setup(master.config("cxl")).unwrap();
    let b = StoreClient::setup(master.config("cxl")).unwrap();
    let segments = master.service().with_core(|c| c.segments());
    let pool_info = segments.iter().find(|s| s.name == CXL_POOL_SEGMENT).expect("the pool is a segment");
    // The pool took the shared area's size (the region minus its header), below --cxl_size.
    assert!(pool_info.size > 200 * MIB && pool_info.size < 256 * MIB, "{}", pool_info.size);
    assert!(pool_info.healthy);

    // Written by A, read by B; one replica in the pool whatever was asked, addressed by offset.
    let small = pattern(4096, 1);
    let large = pattern(8 * MIB as usize + 123, 2);
    let three = ReplicateConfig { replica_num: 3, ..Default::default() };
    a.put("small", &small, &three).unwrap();
    a.put("large", &large, &ReplicateConfig::default()).unwrap();
    let desc = b.get_replica_desc("large").unwrap();
    assert_eq!(desc.len(), 1);
    assert_eq!(desc[0].segment, CXL_POOL_SEGMENT);
    assert!(desc[0].addr < 256 * MIB, "an offset in the region, not an address: {:#x}", desc[0].addr);
    assert_eq!(b.get("small").unwrap(), small);
    assert_eq!(b.get("large").unwrap(), large);
    assert_eq!(a.get("large").unwrap(), large);

    // The bytes really are in the region file, at the replica's offset.
    let on_disk = std::fs::read(&region).unwrap();
    let at = desc[0].addr as usize;
    assert_eq!(&on_disk[at..at + large.len()], &large[..]);

    // Zero-copy calls and batches.
    let mut buf = vec![0u8; 2 * MIB as usize];
    let ptr = buf.as_mut_ptr() as u64;
    // SAFETY: `buf` outlives the registration (unregistered below) and is not resized meanwhile.
    unsafe { b.register_buffer(ptr, buf.len() as u64) }.unwrap();
    buf[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 3));
    b.put_from("from-b", ptr, MIB, &ReplicateConfig::default()).unwrap();
    assert_eq!(a.get("from-b").unwrap(), pattern(MIB as usize, 3));
    assert_eq!(b.get_into("small", ptr + MIB, MIB).unwrap(), 4096);
    assert_eq!(&buf[MIB as usize..MIB as usize + 4096], &small[..]);
    b.unregister_buffer(ptr).unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("batch-{i}")).collect();
    let values: Vec<Vec<u8>> = (0..20).map(|i| pattern(1000 + i * 100, i as u8)).collect();
    let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
    assert!(a.put_batch(&keys, &refs, &ReplicateConfig::default()).iter().all(|r| r.is_ok()));
    for (got, want) in b.get_batch(&keys).into_iter().zip(&values) {
        assert_eq!(&got.unwrap(), want);
    }

    // The writer going away leaves its objects readable by the others: the pool outlives views.
    a.close().unwrap();
    assert_eq!(b.get("large").unwrap(), large);
    assert_eq!(b.get("batch-7").unwrap(), values[7]);
    b.remove("small", true).unwrap();
    assert_eq!(b.get("small").unwrap_err().kind(), ErrorCode::ObjectNotFound);

    // A client started afterwards maps the same area and sees the same objects.
    let c = StoreClient::setup(master.config("cxl")).unwrap();
    assert_eq!(c.get("from-b").unwrap(), pattern(MIB as usize, 3));
    let area = std::fs::metadata(&region).unwrap();
    assert_eq!(area.len(), 256 * MIB, "the region file keeps its size");
    c.close().unwrap();
    b.close().unwrap();
    drop(master);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory on /dev/shm (tmpfs: the region's pages are memory, as a DAX device's would be).
fn tempdir_in_shm() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(format!("/dev/shm/mooncake-store-cxl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
