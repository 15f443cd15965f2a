//! `mooncake_http_metadata_server`: the standalone HTTP metadata server, flag-compatible with
//! upstream's (`--host`, `--port`, `--log-level`), plus `--persist PATH` to keep keys across
//! restarts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mooncake_metadata_http::{DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOTAL_BYTES, HttpMetadataServer, ServerConfig};

/// HTTP metadata server for Mooncake transfer engines (GET/PUT/DELETE /metadata?key=...).
#[derive(Parser, Debug)]
#[command(name = "mooncake_http_metadata_server", version)]
struct Cli {
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Log level (debug, info, warning, error).
    #[arg(long = "log-level", default_value = "info")]
    log_level: String,
    /// Keep every key in this append-only file so a restarted server still knows them.
    #[arg(long, env = "MC_HTTP_METADATA_PERSIST")]
    persist: Option<PathBuf>,
    /// Largest PUT body in bytes (larger ones get 413).
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Largest total size of all keys and values in bytes (PUTs past it get 507).
    #[arg(long, default_value_t = DEFAULT_MAX_TOTAL_BYTES)]
    max_total_bytes: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.log_level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_string(),
        "critical" => "error".to_string(),
        other => other.to_string(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    let config = ServerConfig {
        host: cli.host,
        port: cli.port,
        persist: cli.persist,
        max_body_bytes: cli.max_body_bytes,
        max_total_bytes: cli.max_total_bytes,
    };
    let server = match HttpMetadataServer::new(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mooncake_http_metadata_server: {e}");
            return ExitCode::from(2);
        }
    };
    let keys = server.len();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mooncake_http_metadata_server: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match server.serve().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mooncake_http_metadata_server: binding: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Scripts wait for this line to know the server is up.
        println!("mooncake_http_metadata_server listening on {} ({keys} keys loaded)", running.addr());
        wait_for_signal().await;
        running.shutdown().await;
        ExitCode::SUCCESS
    })
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
