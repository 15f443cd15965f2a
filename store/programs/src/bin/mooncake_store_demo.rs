//! Store demo on one machine, nothing to install: a master with its built-in HTTP metadata server,
//! a store node contributing memory, and an application client doing put/get against them,
//! printing what happened.

use std::time::Instant;

use mooncake_store::client::{ClientConfig, StoreClient};
use mooncake_store::types::{ErrorCode, ReplicateConfig};
use mooncake_store_master::{MasterService, ServiceConfig};

fn main() {
    mooncake_store_programs::process::init_logging("warn");
    if let Err(e) = run() {
        eprintln!("store demo failed: {e}");
        std::process::exit(1);
    }
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

fn run() -> Result<(), String> {
    mooncake::link_all();
    let metadata =
        mooncake::metadata_http::HttpMetadataServer::new(mooncake::metadata_http::ServerConfig::new("127.0.0.1", 0))
            .map_err(|e| e.to_string())?
            .spawn()
            .map_err(|e| format!("HTTP metadata server: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("demo-master")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let service = runtime
        .block_on(MasterService::start(ServiceConfig {
            rpc_addr: "127.0.0.1:0".into(),
            admin_addr: Some("127.0.0.1:0".into()),
            ..Default::default()
        }))
        .map_err(|e| e.to_string())?;
    let master = service.rpc_addr().to_string();
    println!(
        "master: RPC {master}, admin http://{}/metrics",
        service.admin_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    println!("transfer engine metadata: {} (built-in HTTP metadata server)", metadata.url());

    // In metadata mode segment names must be unique: two loopback names for two engines.
    let config = |name: &str, segment: u64| ClientConfig {
        local_hostname: name.into(),
        metadata_server: metadata.url(),
        master_server_addr: master.clone(),
        global_segment_size: segment,
        local_buffer_size: 16 << 20,
        ..ClientConfig::default()
    };
    let node = StoreClient::setup(config("127.0.0.1", 64 << 20)).map_err(|e| format!("store node: {e}"))?;
    println!("store node {} contributes 64 MiB (protocols {:?})", node.hostname(), node.engine().protocols());
    let app = StoreClient::setup(config("localhost", 0)).map_err(|e| format!("application client: {e}"))?;
    println!("application client {} contributes no memory: its data lives on the node", app.hostname());

    let cfg = ReplicateConfig::default();
    let t = Instant::now();
    app.put("greeting", b"hello from mooncake-rs", &cfg).map_err(|e| e.to_string())?;
    println!("put greeting ({:.0} us)", us(t));
    let t = Instant::now();
    let back = app.get("greeting").map_err(|e| e.to_string())?;
    println!("get greeting -> {:?} ({:.0} us)", String::from_utf8_lossy(&back), us(t));
    let replicas = app.get_replica_desc("greeting").map_err(|e| e.to_string())?;
    for r in &replicas {
        println!("  replica on segment {} at {:#x}, {} bytes, {:?}", r.transport_endpoint, r.addr, r.len, r.status);
    }

    let big: Vec<u8> = (0..8usize << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let t = Instant::now();
    app.put("big", &big, &cfg).map_err(|e| e.to_string())?;
    let put_us = us(t);
    let t = Instant::now();
    let got = app.get("big").map_err(|e| e.to_string())?;
    println!(
        "8 MiB value: put {:.1} ms, get {:.1} ms, bytes {}",
        put_us / 1e3,
        us(t) / 1e3,
        if got == big { "identical" } else { "MISMATCH" }
    );

    let keys: Vec<String> = (0..32).map(|i| format!("page-{i}")).collect();
    let pages: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i; 4096]).collect();
    let values: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let t = Instant::now();
    let put = app.put_batch(&keys, &values, &cfg);
    println!("put_batch 32 x 4 KiB: {} ok ({:.0} us)", put.iter().filter(|r| r.is_ok()).count(), us(t));
    let t = Instant::now();
    let exist = app.batch_is_exist(&keys);
    println!(
        "batch_is_exist: {} of 32 present ({:.0} us)",
        exist.iter().filter(|r| matches!(r, Ok(true))).count(),
        us(t)
    );
    let got = app.get_batch(&keys);
    let right = got.iter().zip(&pages).filter(|(g, p)| g.as_ref().is_ok_and(|g| g == *p)).count();
    println!("get_batch: {right} of 32 values identical");

    match app.get("never-written") {
        Err(e) if e == ErrorCode::ObjectNotFound => {
            println!("get of a missing key: ObjectNotFound ({})", ErrorCode::ObjectNotFound.code())
        }
        other => return Err(format!("a missing key answered {other:?}")),
    }
    let removed = app.remove_all(true).map_err(|e| e.to_string())?;
    println!("remove_all: {removed} objects removed");
    let ok = back == b"hello from mooncake-rs" && got.len() == 32 && right == 32;
    app.close().map_err(|e| e.to_string())?;
    node.close().map_err(|e| e.to_string())?;
    runtime.block_on(service.shutdown());
    println!("{}", if ok { "store demo: all checks passed" } else { "store demo: MISMATCH" });
    if ok { Ok(()) } else { Err("data mismatch".into()) }
}
