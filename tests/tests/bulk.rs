//! Many records in one request (`PutRecords`, issue 26) and `khlang import`: each record is put
//! as if alone (its own data key, its own entry, the same checks), a refused one does not sink the
//! others unless the caller asks for all or nothing, and the batch is bounded. Run on sled here
//! and on PostgreSQL by `on_postgres_bulk.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::{Code, NewRecord, PutOutcome};
use khlang_tests::*;

fn record(subject: &str, fields: &[(&str, &str)]) -> NewRecord {
    NewRecord {
        subject: subject.to_owned(),
        fields: fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    }
}

fn refused(o: &PutOutcome) -> Code {
    match o {
        PutOutcome::Refused(code, why) => {
            assert!(!why.contains("4111111111111112") && !why.contains("pin"), "no value in {why}");
            *code
        }
        PutOutcome::Stored(id) => panic!("stored {id}, expected refused"),
    }
}

fn puts(server: &TestServer) -> Vec<khlang_server::audit::AuditEntry> {
    server.audit_entries().into_iter().filter(|e| e.rpc == "PutRecord").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stores_each_record_as_if_alone_and_a_refused_one_sinks_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let batch = vec![
        record("bulk-1", &canary_fields()),
        record("bulk-2", &[("card_number", "4111111111111112")]), // fails the Luhn check
        record("bulk-3", &[("email", "three@example.go.th")]),
        record("bulk-4", &[]),
        record("bulk-5", &[("interests", "pin 1234")]), // authentication data in free text
        record("bulk-6", &[("name", "หก")]),
    ];
    let out = app.put_many(&batch, false).await.unwrap();
    assert_eq!(out.len(), 6);
    assert_eq!(
        [refused(&out[1]), refused(&out[3]), refused(&out[4])],
        [Code::InvalidArgument, Code::InvalidArgument, Code::InvalidArgument]
    );
    let stored: Vec<String> = [0, 2, 5]
        .iter()
        .map(|i| match &out[*i] {
            PutOutcome::Stored(id) => id.clone(),
            other => panic!("record {i}: {other:?}"),
        })
        .collect();
    let mut dpo = server.client_as("data-protection-officer").await;
    let one = dpo.export_subject("bulk-1").await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].fields["card_number"].expose_secret(), CANARY_CARD);
    assert_eq!(dpo.export_subject("bulk-6").await.unwrap()[0].fields["name"].expose_secret(), "หก");
    assert!(dpo.export_subject("bulk-2").await.unwrap().is_empty());
    // One PutRecord entry per record, stored or refused, all under the batch's request id, and
    // each stored record under a data key of its own.
    let entries = puts(&server);
    assert_eq!(entries.len(), 6, "{entries:?}");
    assert!(entries.iter().all(|e| e.request_id == entries[0].request_id));
    let ok: Vec<&str> =
        entries.iter().filter(|e| e.outcome.as_str() == "Ok").map(|e| e.record_id.as_str()).collect();
    assert_eq!(ok.len(), 3);
    for id in &stored {
        assert!(ok.contains(&id.as_str()));
    }
    // Who may not write gets a refusal per record, each on the record.
    let mut clerk = server.client_as("billing-clerk").await;
    let out = clerk.put_many(&[record("bulk-7", &[("name", "เจ็ด")])], false).await.unwrap();
    assert_eq!(refused(&out[0]), Code::PermissionDenied);
    server.stop().await;
    let store = open_store(dir.path()).await;
    let mut wrapped = std::collections::BTreeSet::new();
    for id in &stored {
        wrapped.insert(store.get_record(id).await.unwrap().unwrap().0.wrapped_key);
    }
    assert_eq!(wrapped.len(), 3, "a data key per record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_or_nothing_stores_none_when_one_is_refused_and_the_batch_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let batch = vec![
        record("whole-1", &[("name", "หนึ่ง")]),
        record("whole-2", &[("phone", "not a phone")]),
        record("whole-3", &[("email", "three@example.go.th")]),
    ];
    let out = app.put_many(&batch, true).await.unwrap();
    assert_eq!(
        [refused(&out[0]), refused(&out[1]), refused(&out[2])],
        [Code::Aborted, Code::InvalidArgument, Code::Aborted]
    );
    let mut dpo = server.client_as("data-protection-officer").await;
    for s in ["whole-1", "whole-2", "whole-3"] {
        assert!(dpo.export_subject(s).await.unwrap().is_empty(), "{s} stored");
    }
    let entries = puts(&server);
    let outcomes: Vec<&str> = entries.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == "Aborted").count(), 2, "{outcomes:?}");
    assert!(entries.iter().all(|e| e.record_id.is_empty() || e.outcome.as_str() != "Ok"));
    // A refusal by the regulations is on the record as the decision it was, rule and all.
    let mut clerk = server.client_as("billing-clerk").await;
    let out = clerk.put_many(&[record("whole-4", &[("name", "สี่")])], true).await.unwrap();
    assert_eq!(refused(&out[0]), Code::PermissionDenied);
    let denied = puts(&server).into_iter().last().unwrap();
    assert_eq!((denied.decision.as_str(), denied.outcome.as_str()), ("deny", "PermissionDenied"));
    assert!(!denied.rule.is_empty() && !denied.subject.is_empty(), "{denied:?}");
    // The same batch made valid: all stored.
    let mut fixed = batch;
    fixed[1] = record("whole-2", &[("phone", "0812345678")]);
    let out = app.put_many(&fixed, true).await.unwrap();
    assert!(out.iter().all(|o| matches!(o, PutOutcome::Stored(_))), "{out:?}");
    // Bounded: empty and over the limit are refused whole, with nothing stored or half-done.
    let e = app.put_many(&[], false).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    let many: Vec<NewRecord> = (0..1001).map(|i| record(&format!("over-{i}"), &[("name", "x")])).collect();
    let e = app.put_many(&many, false).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("at most 1000"), "{e}");
    assert!(dpo.export_subject("over-0").await.unwrap().is_empty());
    server.stop().await;
}

/// `khlang import`: a JSON Lines file in batches, malformed lines and refused records named by
/// line (never a value), and a run that stopped part-way resumed after its last line done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn khlang_import_loads_a_file_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = server.tokens["registration-app"].clone();
    let file = dir.path().join("register.jsonl");
    let mut lines = Vec::new();
    for i in 1..=1200 {
        lines.push(match i {
            7 => "{not json".to_owned(),
            8 => r#"{"subject_id": "citizen-8", "fields": {"card_number": "4111111111111112"}}"#.to_owned(),
            _ => format!(
                r#"{{"subject_id": "citizen-{i}", "fields": {{"name": "คน {i}", "postal_code": "80000"}}}}"#
            ),
        });
    }
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let url = server.url();
    let path = file.to_str().unwrap().to_owned();
    // As if a first run had stopped after line 1000 (and recorded nothing of its ids).
    let size = std::fs::metadata(&file).unwrap().len();
    std::fs::write(
        dir.path().join("register.jsonl.progress"),
        format!(r#"{{"lines_done": 1000, "input_bytes": {size}}}"#),
    )
    .unwrap();
    let resumed = {
        let (url, token, path) = (url.clone(), token.clone(), path.clone());
        tokio::task::spawn_blocking(move || khlang(&url, &token, &["import", &path, "--batch", "64"]))
            .await
            .unwrap()
    };
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(stdout(&resumed).contains("200 lines: 200 stored, 0 refused (resumed after line 1000)"));
    let ids = std::fs::read_to_string(dir.path().join("register.jsonl.ids")).unwrap();
    assert_eq!(ids.lines().count(), 200);
    assert!(ids.lines().next().unwrap().starts_with("1001\t"));
    // The input changed since the recorded position: refused, not resumed at a wrong line.
    let grown = dir.path().join("register.jsonl");
    let mut text = std::fs::read_to_string(&grown).unwrap();
    text.push_str(r#"{"subject_id": "citizen-1201", "fields": {"name": "คน 1201"}}"#);
    text.push('\n');
    std::fs::write(&grown, &text).unwrap();
    let changed = {
        let (url, token, path) = (url.clone(), token.clone(), path.clone());
        tokio::task::spawn_blocking(move || khlang(&url, &token, &["import", &path])).await.unwrap()
    };
    assert!(!changed.status.success());
    let said = String::from_utf8_lossy(&changed.stderr);
    assert!(said.contains("changed since the import") && said.contains("--restart"), "{said}");
    text.truncate(text.len() - text.lines().last().unwrap().len() - 1);
    std::fs::write(&grown, &text).unwrap();
    // From the start: the two bad lines are named, every other line stored.
    let whole = tokio::task::spawn_blocking(move || {
        khlang(&url, &token, &["import", &path, "--batch", "500", "--restart"])
    })
    .await
    .unwrap();
    assert_eq!(whole.status.code(), Some(1), "records were refused");
    let said = String::from_utf8_lossy(&whole.stdout);
    assert!(said.contains("1200 lines: 1198 stored, 2 refused"), "{said}");
    let refused = std::fs::read_to_string(dir.path().join("register.jsonl.refused")).unwrap();
    let named: Vec<&str> = refused.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(named, ["7", "8"], "{refused}");
    assert!(!refused.contains("4111111111111112"), "{refused}");
    let stored = server
        .audit_entries()
        .into_iter()
        .filter(|e| e.rpc == "PutRecord" && e.outcome.as_str() == "Ok")
        .count();
    assert_eq!(stored, 200 + 1198);
    let mut dpo = server.client_as("data-protection-officer").await;
    let back = dpo.export_subject("citizen-1200").await.unwrap();
    assert_eq!(back.len(), 2, "imported twice: resumed run, then --restart");
    assert_eq!(back[0].fields["name"].expose_secret(), "คน 1200");
    server.stop().await;
}
