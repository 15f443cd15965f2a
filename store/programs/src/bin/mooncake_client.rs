//! `mooncake_client`: a standalone store node (upstream's *real client*). It contributes
//! `--global_segment_size` bytes of memory to the store (upstream's flags), serves reads and writes of it, and
//! serves dummy clients of this host on 127.0.0.1:`--port`, until SIGINT or SIGTERM.

use mooncake_store::client::StoreClient;
use mooncake_store::dummy::RealClientService;
use mooncake_store_programs::client_node::{FLAGS, client_config, dummy_port};
use mooncake_store_programs::flags::{FlagError, Flags};
use mooncake_store_programs::process::{self, init_logging, shutdown_signal};

fn main() {
    init_logging("info");
    mooncake::link_all();
    let about = "Mooncake Store node: contributes memory to the store";
    let flags = match Flags::parse("mooncake_client", about, FLAGS, std::env::args().skip(1)) {
        Ok(f) => f,
        Err(FlagError::Help(text)) => {
            println!("{text}");
            return;
        }
        Err(e) => exit(2, &e.to_string()),
    };
    let config = client_config(&flags).unwrap_or_else(|e| exit(2, &e));
    let dummy_port = dummy_port(&flags).unwrap_or_else(|e| exit(2, &e));
    let size = config.global_segment_size;
    let master = config.master_server_addr.clone();
    let client = StoreClient::setup(config)
        .unwrap_or_else(|e| exit(1, &format!("setup against master {master} failed: {e} (code {})", e.code())));
    println!("mooncake_client segment {} size {size} master {master}", client.hostname());
    // Serving starts now; the segment's pages are faulted in meanwhile. Say when that ends (benchmarks wait
    // for it, so that they do not measure a node whose other core is busy faulting pages).
    let (watcher, started) = (client.clone(), std::time::Instant::now());
    std::thread::spawn(move || {
        if watcher.wait_segment_prefaulted(std::time::Duration::from_secs(600)) {
            println!("mooncake_client segment prefaulted after {:.2} s", started.elapsed().as_secs_f64());
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| exit(1, &format!("cannot start the signal runtime: {e}")));
    runtime.block_on(async {
        let stop = shutdown_signal();
        // Dummy clients (setup_dummy in other processes on this host) attach here.
        let service = match dummy_port {
            0 => None,
            port => match RealClientService::start(client.clone(), port).await {
                Ok(s) => {
                    println!("mooncake_client serving dummy clients on {}", s.local_addr());
                    Some(s)
                }
                Err(e) => exit(1, &e),
            },
        };
        stop.await;
        if let Some(s) = service {
            s.shutdown().await;
        }
    });
    tracing::info!("shutting down: unmounting the segment");
    if let Err(e) = client.close() {
        exit(1, &format!("close: {e}"));
    }
}

fn exit(code: i32, message: &str) -> ! {
    process::exit("mooncake_client", code, message)
}
