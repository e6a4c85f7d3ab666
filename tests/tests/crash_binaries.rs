//! kill -9 of the real daemon: mid-rewrap at random points, and right after acknowledged reads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::time::Duration;

use khlang_tests::*;

/// Pseudo-random milliseconds in `lo..hi` (no RNG crate needed for test timing).
fn jitter_ms(lo: u64, hi: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    lo + u64::from(nanos) % (hi - lo)
}

/// kill -9 during the rewrap, at random points, several times: after each restart the job resumes
/// from its last committed step; at the end every data key was rewrapped exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_survives_kill_9_at_random_points_and_counts_exactly() {
    const RECORDS: usize = 400;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let data_s = data.to_str().unwrap().to_owned();
    // Small paced steps so kills land mid-job.
    let args = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_s,
        "--key-job-batch",
        "8",
        "--key-job-pause-ms",
        "15",
    ];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut app = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..RECORDS {
        let subject = format!("kill-{}", i % 8);
        let email = format!("person{i}@example.go.th");
        let id = app.put(&subject, [("email", email.clone())]).await.unwrap();
        expected.insert(id, (subject, email));
    }
    let mut admin = khlang_client::Client::connect(&url, &dev_token(&data, "key-admin")).await.unwrap();
    admin.rotate_key().await.unwrap();

    let mut last_done = 0;
    let mut kills_mid_job = 0;
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(jitter_ms(40, 250))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (next, url) = spawn_khlangd(&args);
        child = next;
        let url = url.unwrap();
        admin = khlang_client::Client::connect(&url, &dev_token(&data, "key-admin")).await.unwrap();
        let job = admin.key_status(false).await.unwrap().job.unwrap();
        assert!(job.done() >= last_done, "round {round}: progress went back: {job:?}");
        assert!(job.changed <= RECORDS as u64, "round {round}: {job:?}");
        if job.finished_ms.is_none() {
            kills_mid_job += 1;
        }
        last_done = job.done();
    }
    assert!(kills_mid_job >= 2, "only {kills_mid_job} kills landed during the job");
    let status = loop {
        let k = admin.key_status(false).await.unwrap();
        if k.job.as_ref().unwrap().finished_ms.is_some() {
            break admin.key_status(true).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let job = status.job.clone().unwrap();
    assert_eq!(
        (job.changed, job.skipped, job.total),
        (RECORDS as u64, 0, RECORDS as u64),
        "every data key rewrapped exactly once"
    );
    let per_version: Vec<_> = status.versions.iter().map(|v| (v.version, v.data_keys)).collect();
    assert_eq!(per_version, [(1, Some(0)), (2, Some(RECORDS as u64))]);
    // Every record readable with its value (the data-protection officer exports in full).
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut dpo =
        khlang_client::Client::connect(&url, &dev_token(&data, "data-protection-officer")).await.unwrap();
    let mut seen = 0;
    for s in 0..8 {
        for r in dpo.export_subject(&format!("kill-{s}")).await.unwrap() {
            let (subject, email) = &expected[&r.record_id];
            assert_eq!(r.subject_id.expose_secret(), subject);
            assert_eq!(r.fields["email"].expose_secret(), email);
            seen += 1;
        }
    }
    assert_eq!(seen, RECORDS);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A read is answered only once its audit entry is on disk: kill -9 right after the last of 300,
/// and every one of them is still on the record, the chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_reads_survive_kill_9_in_the_audit_log() {
    const READS: usize = 300;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut app = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let id = app.put("journal", [("email", CANARY_EMAIL)]).await.unwrap();
    for _ in 0..READS {
        app.get(&id, &[], Some("contact")).await.unwrap();
    }
    child.kill().unwrap(); // SIGKILL, straight after the last acknowledgement
    child.wait().unwrap();

    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut sec = khlang_client::Client::connect(&url, &dev_token(&data, "security-officer")).await.unwrap();
    let q = khlang_client::AuditQuery { identity: "registration-app".into(), ..Default::default() };
    let reads = sec.query_audit(&q).await.unwrap().iter().filter(|e| e.rpc == "GetRecord").count();
    assert_eq!(reads, READS, "every acknowledged read is in the log");
    let report = sec.verify_audit(&[]).await.unwrap().report;
    assert!(report.first_break.is_none(), "{report:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Group commit (issue 26): 64 writers in flight over 4 connections, kill -9 at a random moment
/// while groups are being committed, three times. Every put acknowledged before a kill is still
/// there with its value and its `Ok` entry; nothing is stored that the log does not account for;
/// the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_kill_9_mid_group_at_64_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for round in 0..3 {
        let (mut child, url) = spawn_khlangd(&args);
        let url = url.unwrap();
        let mut connections = Vec::new();
        for _ in 0..4 {
            connections.push(
                khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap(),
            );
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let mut writers = Vec::new();
        for w in 0..64 {
            let mut c = connections[w % 4].clone();
            let tx = tx.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let email = format!("r{round}w{w}i{i}@example.go.th");
                    match c.put(&format!("crowd-{}", w % 8), [("email", email.clone())]).await {
                        Ok(id) => {
                            if tx.send((id, email)).is_err() {
                                return;
                            }
                        }
                        Err(_) => return, // the server is gone
                    }
                }
            }));
        }
        drop(tx);
        // Under load first (a debug build on a busy machine starts slowly), then a random moment.
        let before = acknowledged.len();
        let loaded = tokio::time::timeout(Duration::from_secs(60), async {
            while acknowledged.len() - before < 128 {
                match rx.recv().await {
                    Some(ack) => acknowledged.push(ack),
                    None => break,
                }
            }
        })
        .await;
        assert!(loaded.is_ok(), "round {round}: 128 puts acknowledged within a minute");
        tokio::time::sleep(Duration::from_millis(jitter_ms(0, 300))).await;
        child.kill().unwrap(); // SIGKILL, with groups in flight
        child.wait().unwrap();
        for w in writers {
            let _ = w.await;
        }
        while let Ok(ack) = rx.try_recv() {
            acknowledged.push(ack);
        }
    }

    let (mut child, url) = spawn_khlangd(&args);
    let url = url.unwrap();
    let mut dpo =
        khlang_client::Client::connect(&url, &dev_token(&data, "data-protection-officer")).await.unwrap();
    let mut stored = std::collections::BTreeMap::new();
    for s in 0..8 {
        for r in dpo.export_subject(&format!("crowd-{s}")).await.unwrap() {
            stored.insert(r.record_id.clone(), r.fields["email"].expose_secret().to_owned());
        }
    }
    for (id, email) in &acknowledged {
        assert_eq!(stored.get(id), Some(email), "acknowledged put {id} survives with its value");
    }
    let mut sec = khlang_client::Client::connect(&url, &dev_token(&data, "security-officer")).await.unwrap();
    let verified = sec.verify_audit(&[]).await.unwrap();
    assert!(verified.report.first_break.is_none(), "{:?}", verified.report);
    assert!(verified.records.holds(), "{:?}", verified.records);
    assert_eq!(verified.records.matched, stored.len() as u64, "{:?}", verified.records);
    child.kill().unwrap();
    child.wait().unwrap();
}
