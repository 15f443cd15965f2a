//! `mooncake_master`: the store's metadata master (upstream's flags and defaults), optionally with
//! the transfer engine's HTTP metadata server embedded. Runs until SIGINT or SIGTERM.

use mooncake_store_master::MasterService;
use mooncake_store_programs::flags::{FlagError, Flags};
use mooncake_store_programs::master::{FLAGS, settings};
use mooncake_store_programs::process::{self, init_logging, shutdown_signal};

fn main() {
    init_logging("info");
    let about = "Mooncake Store master: keeps object metadata; clients hold the data";
    let mut flags = match Flags::parse("mooncake_master", about, FLAGS, std::env::args().skip(1)) {
        Ok(f) => f,
        Err(FlagError::Help(text)) => {
            println!("{text}");
            return;
        }
        Err(e) => exit(2, &e.to_string()),
    };
    let config_path = flags.text("config_path").to_string();
    if !config_path.is_empty() {
        if let Err(e) = flags.merge_config_file(&config_path) {
            exit(2, &e.to_string());
        }
    }
    let ipv6 = std::env::var("MC_USE_IPV6").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
    let settings = settings(&flags, ipv6).unwrap_or_else(|e| exit(2, &e));
    let _http = settings.http_metadata.as_ref().map(|(host, port)| {
        let config = mooncake::metadata_http::ServerConfig::new(host.clone(), *port);
        let server = mooncake::metadata_http::HttpMetadataServer::new(config)
            .unwrap_or_else(|e| exit(1, &format!("HTTP metadata server: {e}")));
        let running =
            server.spawn().unwrap_or_else(|e| exit(1, &format!("cannot serve HTTP metadata on {host}:{port}: {e}")));
        println!("http_metadata_server {}", running.url());
        running
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .thread_name("mooncake-master")
        .enable_all()
        .build()
        .unwrap_or_else(|e| exit(1, &format!("cannot start the runtime: {e}")));
    runtime.block_on(async {
        let stop = shutdown_signal();
        let service = MasterService::start(settings.service.clone()).await.unwrap_or_else(|e| exit(1, &e.to_string()));
        println!(
            "mooncake_master rpc {} admin {}",
            service.rpc_addr(),
            service.admin_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        stop.await;
        tracing::info!("shutting down");
        service.shutdown().await;
    });
}

fn exit(code: i32, message: &str) -> ! {
    process::exit("mooncake_master", code, message)
}
