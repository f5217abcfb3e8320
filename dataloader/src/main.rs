//! `dataloader`: a dataloader actor (see `lillm_dataloader::actor`).

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = lillm_proto::process::shutdown_on_signals();
    if let Err(err) = lillm_dataloader::actor::run(lillm_dataloader::actor::Args::parse(), shutdown)
    {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
