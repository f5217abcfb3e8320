//! What every binary's `main` (and only `main`) does with signals: SIGTERM and SIGINT cancel
//! one shutdown token that is passed into the roles' `run(config, shutdown)`; a second
//! signal ends the process at once (exit status 130) for a user who will not wait.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. Call it once, from `main`.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    // Installed before returning, so a signal that arrives right after start is not lost.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("start the signal thread's runtime");
            rt.block_on(async move {
                let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
                let mut int = signal(SignalKind::interrupt()).expect("install a SIGINT handler");
                let _ = ready_tx.send(());
                let mut received = 0;
                loop {
                    let name = tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                    };
                    received += 1;
                    if received > 1 {
                        eprintln!("{name} again: stopping now");
                        std::process::exit(130);
                    }
                    tracing::info!(signal = name, "shutting down");
                    cancel.cancel();
                }
            });
        })
        .expect("spawn the signal thread");
    let _ = ready_rx.recv();
    token
}
