//! What the vault reports to Prometheus (through the `metrics` facade; `khlangd --metrics-listen`
//! installs the exporter, and without it every call here is a no-op). Labels are names the
//! server or the regulations define — RPCs, statuses, roles, purposes, decisions — never an
//! identity, a subject, a record id or a value; a purpose the regulations do not know is
//! counted as `other`, so a caller cannot grow the label set (or slip data into it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

/// Whether an exporter was installed ([`enable`]): without one, nothing here builds labels or
/// reads the store for gauges nobody scrapes.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Called by whoever installs a `metrics` recorder (`khlangd --metrics-listen`).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A TLS handshake that failed (a client without the CA, with no or a wrong certificate, or
/// speaking plaintext to the TLS port).
pub(crate) fn tls_handshake_failed() {
    if enabled() {
        metrics::counter!("khlang_tls_handshake_failures_total").increment(1);
    }
}

/// An audit entry the SIEM sink could not take (its queue full, its receiver away): the log
/// still has it.
pub(crate) fn audit_sink_dropped() {
    if enabled() {
        metrics::counter!("khlang_audit_sink_dropped_total").increment(1);
    }
}

/// Handles for the per-request series, registered once each and then reused: a request costs
/// a map lookup on names it already holds, not a registry lookup and label allocations.
#[derive(Default)]
struct RequestSeries {
    /// (rpc, status) → requests counter; rpc → latency histogram.
    requests: RwLock<HashMap<(&'static str, &'static str), metrics::Counter>>,
    latency: RwLock<HashMap<&'static str, metrics::Histogram>>,
    /// role → purpose → decision → counter.
    decisions: RwLock<HashMap<Box<str>, PurposeSeries>>,
}

/// purpose → decision → counter, for one role.
type PurposeSeries = HashMap<Box<str>, HashMap<&'static str, metrics::Counter>>;

static SERIES: OnceLock<RequestSeries> = OnceLock::new();

/// The handle `key` names in `map`, registered by `make` the first time.
fn cached<K, Q, V: Clone>(
    map: &RwLock<HashMap<K, V>>,
    key: &Q,
    own: impl FnOnce() -> K,
    make: impl FnOnce() -> V,
) -> V
where
    K: Eq + std::hash::Hash + std::borrow::Borrow<Q>,
    Q: Eq + std::hash::Hash + ?Sized,
{
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return v.clone();
    }
    map.write().unwrap_or_else(|p| p.into_inner()).entry(own()).or_insert_with(make).clone()
}

/// One request, as its audit entry ended it. (Public for the metrics benchmark.)
pub fn request(
    rpc: &'static str,
    status: &'static str,
    role: &str,
    purpose: &str,
    decision: &'static str,
    took: Duration,
) {
    if !enabled() {
        return;
    }
    let series = SERIES.get_or_init(RequestSeries::default);
    cached(
        &series.requests,
        &(rpc, status),
        || (rpc, status),
        || metrics::counter!("khlang_requests_total", "rpc" => rpc, "status" => status),
    )
    .increment(1);
    cached(
        &series.latency,
        rpc,
        || rpc,
        || metrics::histogram!("khlang_request_duration_seconds", "rpc" => rpc),
    )
    .record(took.as_secs_f64());
    if decision != "none" {
        let counter = {
            let roles = series.decisions.read().unwrap_or_else(|p| p.into_inner());
            roles.get(role).and_then(|p| p.get(purpose)).and_then(|d| d.get(decision)).cloned()
        };
        let counter = counter.unwrap_or_else(|| {
            let mut roles = series.decisions.write().unwrap_or_else(|p| p.into_inner());
            roles
                .entry(role.into())
                .or_default()
                .entry(purpose.into())
                .or_default()
                .entry(decision)
                .or_insert_with(|| {
                    metrics::counter!(
                        "khlang_decisions_total",
                        "role" => role.to_owned(),
                        "purpose" => purpose.to_owned(),
                        "decision" => decision
                    )
                })
                .clone()
        });
        counter.increment(1);
    }
}

/// One group commit of the audit log: how many requests it carried and how long it took (on a
/// shared chain, how long it held the head lock).
pub fn audit_batch(requests: usize, took: Duration) {
    if !enabled() {
        return;
    }
    metrics::histogram!("khlang_audit_batch_requests").record(requests as f64);
    metrics::histogram!("khlang_audit_batch_seconds").record(took.as_secs_f64());
}

/// One sync of the audit log's files.
pub fn audit_sync(took: Duration) {
    if !enabled() {
        return;
    }
    metrics::histogram!("khlang_audit_sync_seconds").record(took.as_secs_f64());
}
