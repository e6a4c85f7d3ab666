//! Key jobs on PostgreSQL across nodes (a throwaway cluster per test, see
//! `khlang_server::storage::test_postgres`; skipped loudly without server binaries, a failure
//! with `KHLANG_REQUIRE_POSTGRES=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_server::storage::test_postgres::TestPostgres;
use khlang_tests::*;

/// Background key jobs run on one node of a database at a time (a lease the database drops with
/// the node's session): a rotation started on A, run there, finishes on B after A is killed
/// mid-job and mid-burst; every write A acknowledged reads on B, every data key is rewrapped
/// exactly once (exact counts), and the old version is destroyed from B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_started_on_a_finishes_on_b_after_a_is_killed() {
    let Some(pg) = TestPostgres::start("a_rotation_started_on_a_finishes_on_b") else { return };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // Slow steps (5 records, 250 ms apart), so the job is still running when A dies.
    let node = |data: &std::path::Path| {
        let data = data.to_str().unwrap().to_owned();
        let url = url.clone();
        move || {
            spawn_khlangd(&[
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                &data,
                "--storage",
                &url,
                "--key-job-batch",
                "5",
                "--key-job-pause-ms",
                "250",
            ])
        }
    };
    let (mut daemon_a, addr_a) = node(&a)();
    let addr_a = addr_a.expect("node A starts");
    let mut app = khlang_client::Client::connect(&addr_a, &dev_token(&a, "registration-app")).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..120 {
        ids.push(app.put(&format!("rotation-subject-{i}"), [("email", CANARY_EMAIL)]).await.unwrap());
    }
    let mut admin_a = khlang_client::Client::connect(&addr_a, &dev_token(&a, "key-admin")).await.unwrap();
    // A is the only node yet: it holds the lease, and its rotation runs there.
    let started = admin_a.rotate_key().await.unwrap();
    assert_eq!(started.job.as_ref().unwrap().total, 120);
    let (_daemon_b, addr_b) = node(&b)();
    let addr_b = addr_b.expect("node B starts beside A");
    let mut admin_b = khlang_client::Client::connect(&addr_b, &dev_token(&b, "key-admin")).await.unwrap();
    // A record written on A under the new version reads on B (B loaded v2 when it unsealed).
    let fresh = app.put("rotation-subject-fresh", [("email", CANARY_EMAIL)]).await.unwrap();
    let mut reader_b =
        khlang_client::Client::connect(&addr_b, &dev_token(&b, "registration-app")).await.unwrap();
    reader_b.get(&fresh, &[], Some("contact")).await.unwrap();
    // A burst of writes on A while its job runs, until A dies.
    let acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let mut writers = Vec::new();
    for w in 0..2 {
        let (acknowledged, addr, token) =
            (acknowledged.clone(), addr_a.clone(), dev_token(&a, "registration-app"));
        writers.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&addr, &token).await.unwrap();
            for i in 0.. {
                match c.put(&format!("burst-subject-{w}-{i}"), [("email", CANARY_EMAIL)]).await {
                    Ok(id) => acknowledged.lock().unwrap().push(id),
                    Err(_) => break,
                }
            }
        }));
    }
    // Ten more records rewrapped once the burst is under way (however long B took to start).
    let at_burst = admin_b.key_status(false).await.unwrap().job.unwrap().done();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let done_at_kill = loop {
        let job = admin_b.key_status(false).await.unwrap().job.unwrap();
        if job.done() >= at_burst + 10 && acknowledged.lock().unwrap().len() > 10 {
            break job.done();
        }
        assert!(std::time::Instant::now() < deadline, "the rewrap on A does not move: {job:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(done_at_kill < 120, "the job ended before A was killed ({done_at_kill})");
    daemon_a.kill().unwrap();
    daemon_a.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let burst = acknowledged.lock().unwrap().clone();
    assert!(burst.len() > 10, "the burst was under way ({} writes)", burst.len());
    for id in &burst {
        reader_b
            .get(id, &[], Some("contact"))
            .await
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
    }
    let job = loop {
        let job = admin_b.key_status(false).await.unwrap().job.unwrap();
        if job.finished_ms.is_some() {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "B never finished A's rotation: {job:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // Records written after the rotation were wrapped under v2 already: those the walk met were
    // skipped, not rewrapped; each of the 120 was rewrapped exactly once.
    assert_eq!((job.changed, job.total), (120, 120), "each data key rewrapped once: {job:?}");
    assert!(job.skipped >= 1 && job.skipped <= 1 + burst.len() as u64, "{job:?}");
    let status = admin_b.key_status(true).await.unwrap();
    let per_version: Vec<(u32, Option<u64>)> =
        status.versions.iter().map(|v| (v.version, v.data_keys)).collect();
    // A write A committed but died before acknowledging (one per writer at most) is there too.
    let acked = 121 + burst.len() as u64;
    assert_eq!(per_version[0], (1, Some(0)), "no data key left under v1: {per_version:?}");
    let under_v2 = per_version[1].1.unwrap();
    assert!(
        per_version[1].0 == 2 && (acked..=acked + 2).contains(&under_v2),
        "{per_version:?}, {acked} acknowledged"
    );
    for id in &ids {
        let r = reader_b.get(id, &[], Some("contact")).await.unwrap();
        assert!(r.fields["email"].expose_secret().ends_with("@example.go.th"));
    }
    admin_b.retire_key(1).await.unwrap();
    let status = admin_b.key_status(false).await.unwrap();
    assert_eq!(status.versions[0].state, "retired", "{status:?}");
}
