//! What the metrics code costs a request, on its own: `cargo bench -p khlang-server --bench metrics`.
//! The per-request path (a request's counter, latency histogram and decision counter, and — as an
//! upper bound, once per request instead of once per group — an audit batch and sync) with the
//! Prometheus recorder installed, against the same calls with metrics off (measured in the same
//! run). `bench/metrics.sh` divides it by the server's CPU time per request.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is its failure report

use std::hint::black_box;
use std::time::{Duration, Instant};

use khlang_server::metrics;

const ROLES: [&str; 3] = ["registration-app", "billing-clerk", "marketing-officer"];
const PURPOSES: [&str; 3] = ["contact", "billing", "service_delivery"];

fn per_request(i: usize) {
    let took = Duration::from_micros(150 + (i % 64) as u64);
    let (role, purpose) = (ROLES[i % 3], PURPOSES[i % 3]);
    metrics::request(
        black_box("GetRecord"),
        "Ok",
        role,
        purpose,
        if i.is_multiple_of(7) { "deny" } else { "allow" },
        took,
    );
    metrics::audit_batch(black_box(17), took);
    metrics::audit_sync(took);
}

fn time(iters: usize) -> f64 {
    for i in 0..iters / 10 {
        per_request(i);
    }
    let t = Instant::now();
    for i in 0..iters {
        per_request(i);
    }
    t.elapsed().as_secs_f64() * 1e9 / iters as f64
}

fn main() {
    let n = 2_000_000;
    let off = time(n);
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).unwrap();
    metrics::enable();
    let on = time(n);
    // A scrape's worth of upkeep, so the histograms' buckets do not only grow.
    let rendered = handle.render();
    println!("metrics off: {off:8.1} ns per request");
    println!("metrics on:  {on:8.1} ns per request ({} bytes of exposition)", rendered.len());
    println!("cost: {:.1} ns per request", on - off);
}
