//! Graceful shutdown: a signal becomes a cancellation, and each phase drains
//! its tasks against a deadline.
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; SIGINT only");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Closes `tasks` and waits for them; warns and returns false past `deadline`.
pub async fn drain(phase: &str, tasks: &TaskTracker, deadline: Duration) -> bool {
    tasks.close();
    if tokio::time::timeout(deadline, tasks.wait()).await.is_ok() {
        tracing::info!(phase, "drained");
        true
    } else {
        tracing::warn!(
            phase,
            remaining = tasks.len(),
            ?deadline,
            "drain deadline passed"
        );
        false
    }
}
