//! What is on disk: no plaintext, ciphertext bound to its place, and a vault that survives restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::Code;
use khlang_server::storage::{Durability, SledStore, Storage, StoredRecord};
use khlang_server::{StoreError, Vault, VaultError, VaultOptions};
use khlang_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(c.put(&format!("canary-subject-{i}"), canary_fields()).await.unwrap());
    }
    // Updates write new envelopes too.
    c.update(&ids[0], [("billing_address", CANARY_ADDRESS_TH)], &[]).await.unwrap();
    server.stop().await;

    let files = files_under(dir.path());
    assert!(files.len() >= 2, "expected sled files, found {files:?}");
    let total: usize = files.iter().map(|f| std::fs::metadata(f).unwrap().len() as usize).sum();
    assert!(total > 50 * 200, "the data folder should hold the records ({total} bytes)");
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        for canary in [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL, "canary-subject-1"] {
            assert!(!contains(&bytes, canary.as_bytes()), "{} holds plaintext '{canary}'", file.display());
        }
    }

    // The scan does find plaintext when it is there: the same records on a benchmark-baseline
    // (unencrypted) vault show every canary.
    let plain_dir = tempfile::tempdir().unwrap();
    let baseline = VaultOptions {
        mode: khlang_server::CipherMode::PlaintextBaseline,
        ..TestServer::options(plain_dir.path())
    };
    let plain = TestServer::start_with(plain_dir.path(), baseline).await;
    plain.client().await.put("canary-subject-1", canary_fields()).await.unwrap();
    plain.stop().await;
    let all: Vec<u8> = files_under(plain_dir.path()).iter().flat_map(|f| std::fs::read(f).unwrap()).collect();
    for canary in [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL] {
        assert!(contains(&all, canary.as_bytes()), "the scan should see '{canary}' in a baseline vault");
    }

    // And everything is still readable after a restart.
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let r = c.get(&ids[0], &[], PURPOSE).await.unwrap();
    assert_eq!(r.fields["card_number"].expose_secret(), CANARY_CARD);
    assert_eq!(r.fields["billing_address"].expose_secret(), CANARY_ADDRESS_TH);
    server.stop().await;
}

/// Edits a stored record through the store directly (the server must be stopped).
async fn edit_record(dir: &std::path::Path, id: &str, edit: impl FnOnce(&mut StoredRecord)) {
    let store = SledStore::open(dir, Durability::PerRequest).unwrap();
    let (mut record, _) = store.get_record(id).await.unwrap().unwrap();
    edit(&mut record);
    store.overwrite_record_for_tests(id, &record).unwrap();
    store.flush_now().await.unwrap();
}

fn envelope(r: &StoredRecord, field: &str) -> Vec<u8> {
    r.fields.iter().find(|f| f.name == field).unwrap().envelope.clone()
}

async fn read_record(dir: &std::path::Path, id: &str) -> StoredRecord {
    let store = SledStore::open(dir, Durability::PerRequest).unwrap();
    store.get_record(id).await.unwrap().unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertext_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let a = c.put("subject-a", [("card_number", CANARY_CARD), ("email", CANARY_EMAIL)]).await.unwrap();
    let b = c
        .put("subject-b", [("card_number", "5555555555554444"), ("email", "b@example.go.th")])
        .await
        .unwrap();
    let d = c.put("subject-d", [("name", CANARY_NAME_TH), ("email", "d@example.go.th")]).await.unwrap();
    let untouched = c.put("subject-e", [("name", "ไม่แตะต้อง")]).await.unwrap();
    server.stop().await;

    let rec_a = read_record(dir.path(), &a).await;
    // 1. A's card number envelope copied into record B.
    edit_record(dir.path(), &b, |r| {
        r.fields.iter_mut().find(|f| f.name == "card_number").unwrap().envelope =
            envelope(&rec_a, "card_number");
    })
    .await;
    // 2. A's card number envelope copied into A's email field.
    edit_record(dir.path(), &a, |r| {
        r.fields.iter_mut().find(|f| f.name == "email").unwrap().envelope = envelope(&rec_a, "card_number");
    })
    .await;
    // 3. One flipped bit in D's name.
    edit_record(dir.path(), &d, |r| {
        let f = r.fields.iter_mut().find(|f| f.name == "name").unwrap();
        let last = f.envelope.len() - 20;
        f.envelope[last] ^= 0x04;
    })
    .await;

    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    for (id, field) in [(&b, "card_number"), (&a, "email"), (&d, "name")] {
        let err = c.get(id, &[], PURPOSE).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("field '{field}' failed its integrity check")), "{msg}");
        assert!(msg.contains("no data returned"), "{msg}");
        for canary in [CANARY_CARD, CANARY_EMAIL, CANARY_NAME_TH] {
            assert!(!msg.contains(canary));
        }
    }
    // Fields that were not touched still open when asked for alone; the untouched record is fine.
    let b_email = c.get(&b, &["email".into()], PURPOSE).await.unwrap();
    assert_eq!(b_email.fields["email"].expose_secret(), "b@example.go.th");
    let a_card = c.get(&a, &["card_number".into()], PURPOSE).await.unwrap();
    assert_eq!(a_card.fields["card_number"].expose_secret(), CANARY_CARD);
    assert_eq!(c.get(&untouched, &[], PURPOSE).await.unwrap().fields["name"].expose_secret(), "ไม่แตะต้อง");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_key_swapped_between_records_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let a = c.put("subject-a", [("card_number", CANARY_CARD)]).await.unwrap();
    let b = c.put("subject-b", [("card_number", "5555555555554444")]).await.unwrap();
    server.stop().await;
    let key_a = read_record(dir.path(), &a).await.wrapped_key;
    edit_record(dir.path(), &b, |r| r.wrapped_key = key_a).await;
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let err = c.get(&b, &[], PURPOSE).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DataLoss));
    assert!(err.to_string().contains("data key failed its integrity check"), "{err}");
    assert!(c.get(&a, &[], PURPOSE).await.is_ok());
    server.stop().await;

    // A data key of another generation (as if from a re-encryption) is refused the same way.
    let mut newer = read_record(dir.path(), &a).await.wrapped_key;
    newer[8] ^= 2; // generation 1 -> 3 in the header
    edit_record(dir.path(), &a, |r| r.wrapped_key = newer).await;
    let server = TestServer::start(dir.path()).await;
    let err = server.client().await.get(&a, &[], PURPOSE).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_and_wrong_passphrase_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let id = c.put("subject-r", canary_fields()).await.unwrap();
    server.stop().await;

    let options = TestServer::options(dir.path());
    let err = Vault::open(dir.path(), b"not the passphrase", &options).await.unwrap_err();
    assert_eq!(err.to_string(), "wrong passphrase for custodian 1's share");
    // A baseline (unencrypted) server refuses an encrypted folder, and vice versa.
    let baseline = VaultOptions {
        mode: khlang_server::CipherMode::PlaintextBaseline,
        ..TestServer::options(dir.path())
    };
    let err = Vault::open(dir.path(), PASSPHRASE.as_bytes(), &baseline).await.unwrap_err();
    assert!(matches!(err, VaultError::Storage(StoreError::ModeMismatch { .. })), "{err}");

    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let r = c.get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(r.fields.len(), 4);
    assert_eq!(r.fields["name"].expose_secret(), CANARY_NAME_TH);
    server.stop().await;
}
