//! The serving process's life: its PID file, SIGHUP reloads, and the graceful stop on SIGTERM.

use super::*;

/// The PID file while the daemon runs: written once it listens, removed when it stops.
pub(crate) struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the PID file {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) async fn run(
    vault: Vault,
    listener: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    pid_file: Option<&Path>,
) -> anyhow::Result<()> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let _pid = pid_file.map(PidFile::write).transpose()?;
    tracing::info!(address = %listener.local_addr()?, scheme, "serving khlang.v1");
    let vault = Arc::new(vault);
    reload_on_sighup(vault.clone());
    // The daemon owns the process's lifecycle: key jobs start with serving and stop after it,
    // then the final flush.
    let key_jobs = khlang_server::vault::keyops::spawn_key_jobs(&vault);
    let served = api::serve(vault.clone(), listener, tls, shutdown_signal()).await;
    let draining = std::time::Instant::now();
    key_jobs.stop().await;
    let flushed = vault.shut_down().await;
    served?;
    flushed?;
    tracing::info!(final_flush_ms = draining.elapsed().as_millis() as u64, "stopped");
    Ok(())
}

/// SIGHUP re-reads the regulations file; an invalid file is logged and the rules in force stay.
pub(crate) fn reload_on_sighup(vault: Arc<Vault>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match vault.reload_regulations(None).await {
                Ok(info) => tracing::info!(version = %info.version, "SIGHUP: regulations reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: regulations NOT reloaded; the rules in force stay")
                }
            }
        }
    });
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
