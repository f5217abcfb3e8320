//! `coordinator`: serves one lillm job (see `lillm_coordinator::cli`).

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = lillm_proto::process::shutdown_on_signals();
    if let Err(err) = lillm_coordinator::cli::run(lillm_coordinator::cli::Args::parse(), shutdown) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
