//! The vault's state as metrics gauges, read every second while it serves (health's watcher
//! calls it). Here, above the vault, so the metrics recorders below depend on no layer.

use std::sync::Arc;

use crate::Vault;
use crate::metrics::enabled;

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The vault's state as gauges, every second while it serves (health's watcher calls it):
/// sealed, audit chain intact / broken / unverified, writable, age of the newest checkpoint,
/// key job progress, lockouts, durable flushes; with `with_store_size`, the records stored (a
/// count the store may have to scan for: the watcher asks rarely).
pub async fn observe(vault: &Arc<Vault>, with_store_size: bool) {
    if !enabled() {
        return;
    }
    let sealed = vault.is_sealed();
    metrics::gauge!("khlang_sealed").set(flag(sealed));
    let broken = matches!(vault.audit_state(), crate::audit::LogState::Broken(_));
    let verified = vault.audit_history_checked();
    for (state, on) in
        [("intact", !broken && verified), ("broken", broken), ("unverified", !broken && !verified)]
    {
        metrics::gauge!("khlang_audit_chain_state", "state" => state).set(flag(on));
    }
    metrics::gauge!("khlang_audit_writable").set(flag(vault.audit_writable().await));
    if let Some(age) = vault.audit_checkpoint_age().await {
        metrics::gauge!("khlang_audit_checkpoint_age_seconds").set(age.as_secs_f64());
    }
    if let Ok(Some(job)) = vault.store.job().await {
        let running = job.finished_ms.is_none();
        metrics::gauge!("khlang_key_job_running").set(flag(running));
        metrics::gauge!("khlang_key_job_done_records").set((job.changed + job.skipped) as f64);
        metrics::gauge!("khlang_key_job_total_records").set(job.total as f64);
    }
    // Values deciding access found changed outside the vault since unseal (each read that
    // refused one is also counted in khlang_authority_failures_total, by key space).
    metrics::gauge!("khlang_authority_refused").set(vault.authority_refused() as f64);
    metrics::gauge!("khlang_records_lost").set(vault.records_lost() as f64);
    metrics::gauge!("khlang_locked_out_credentials")
        .set(vault.auth_guard.locked_now(crate::clock::now_ms()) as f64);
    let stats = vault.flush_stats();
    metrics::counter!("khlang_durable_flushes_total")
        .absolute(stats.flushes.load(std::sync::atomic::Ordering::Relaxed));
    metrics::counter!("khlang_durable_writes_total")
        .absolute(stats.writes.load(std::sync::atomic::Ordering::Relaxed));
    if with_store_size && let Ok(n) = vault.store.count(crate::storage::KeySpace::Records).await {
        metrics::gauge!("khlang_records").set(n as f64);
    }
}
