//! What every store program does around its main work: logging to stderr, waiting for SIGINT or
//! SIGTERM, and exiting with a message.

/// Logs to stderr, filtered by `RUST_LOG`, else by `default_filter` (`info`, `warn`, ...).
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Installs the SIGTERM handler now and returns a future that completes on SIGINT (Ctrl-C) or SIGTERM. Call it
/// (inside the runtime) before the program starts serving: a SIGTERM that arrives after that, while the program
/// still starts up, then ends it cleanly instead of killing it with the signal's default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    async move {
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Prints `program: message` to stderr and exits with `code` (2 = usage error, 1 = failure).
pub fn exit(program: &str, code: i32, message: &str) -> ! {
    eprintln!("{program}: {message}");
    std::process::exit(code)
}
