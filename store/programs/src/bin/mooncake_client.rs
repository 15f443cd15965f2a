//! `mooncake_client`: a standalone store node. It contributes `--global_segment_size` bytes of
//! memory to the store (upstream's flags) and serves reads and writes of it until SIGINT or SIGTERM.

use mooncake_store::client::StoreClient;
use mooncake_store_programs::client_node::{FLAGS, client_config};
use mooncake_store_programs::flags::{FlagError, Flags};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
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
    let size = config.global_segment_size;
    let master = config.master_server_addr.clone();
    let client = StoreClient::setup(config)
        .unwrap_or_else(|e| exit(1, &format!("setup against master {master} failed: {e} (code {})", e.code())));
    println!("mooncake_client segment {} size {size} master {master}", client.hostname());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| exit(1, &format!("cannot start the signal runtime: {e}")));
    runtime.block_on(wait_for_signal());
    tracing::info!("shutting down: unmounting the segment");
    if let Err(e) = client.close() {
        exit(1, &format!("close: {e}"));
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn exit(code: i32, message: &str) -> ! {
    eprintln!("mooncake_client: {message}");
    std::process::exit(code)
}
