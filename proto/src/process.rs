//! What every binary's `main` (and only `main`) does with signals: SIGTERM and SIGINT cancel
//! one shutdown token that is passed into the roles' `run(config, shutdown)`. After the
//! first, both signals get their default action back, so a second one ends the process at
//! once for a user who will not wait.

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
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tracing::info!(
                    signal = name,
                    "shutting down (send it again to stop at once)"
                );
                cancel.cancel();
                // SAFETY: sigaction-level reset to the default disposition; no handler of ours
                // runs afterwards, and tokio only stops receiving these two signals.
                unsafe {
                    libc::signal(libc::SIGTERM, libc::SIG_DFL);
                    libc::signal(libc::SIGINT, libc::SIG_DFL);
                }
            });
        })
        .expect("spawn the signal thread");
    let _ = ready_rx.recv();
    token
}
