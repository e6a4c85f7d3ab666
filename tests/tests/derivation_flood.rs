//! The unseal flood, alone in its own test process: it measures the process's peak memory, which
//! tests running beside it (each vault derives keys too) would inflate.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::Code;
use khlang_tests::*;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// 100 unauthenticated Unseal calls at once: two derive at a time (each Argon2id takes its
/// memory), the rest wait briefly or get ResourceExhausted; memory stays bounded and every
/// attempt is on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unseal_calls_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let limits = khlang_server::AuthLimits { max_failures: 10_000, ..Default::default() };
    let server = sealed_server(dir.path(), limits).await;
    let before = peak_rss_kib();
    let calls = (0..100).map(|i| {
        let url = server.url();
        tokio::spawn(async move {
            let mut anon = khlang_client::Client::connect_with(&url, None, None).await.unwrap();
            anon.unseal(1, &format!("guess number {i} is wrong")).await.unwrap_err().code()
        })
    });
    let mut codes = Vec::new();
    for c in calls {
        codes.push(c.await.unwrap());
    }
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        codes.iter().all(|c| matches!(c, Some(Code::PermissionDenied | Code::ResourceExhausted))),
        "{codes:?}"
    );
    assert!((1..=2).contains(&server.vault().derivations_at_once_peak()), "at most two derivations at once");
    // 100 derivations of 19 MiB at once would be ~1.9 GiB.
    assert!(grown_mib < 600, "peak memory grew by {grown_mib} MiB");
    let logged = server.audit_entries().into_iter().filter(|e| e.rpc == "Unseal").count();
    assert_eq!(logged, 100);
    assert!(server.vault().is_sealed());
    server.stop().await;
}
