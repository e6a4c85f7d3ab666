//! Key lifecycle end to end over real gRPC: k-of-n unseal, seal, passphrase change and rekey;
//! rotation under load with retirement by proof; re-encryption; the key admin's duties.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use khlang_client::{Client, Code, KeysStatus, ReencryptTarget};
use khlang_keys::{SealParams, WrappedDataKey};
use khlang_server::storage::{Durability, SledStore, Storage, StoredRecord};
use khlang_server::vault::keyops::JobPacing;
use khlang_server::{Vault, VaultOptions};
use khlang_tests::*;

const CUSTODIANS: [&str; 3] =
    ["custodian one: mango sticky rice", "custodian two: tom yum goong", "custodian three: som tam thai"];

fn code<T: std::fmt::Debug>(r: Result<T, khlang_client::ClientError>) -> (Code, String) {
    let e = r.expect_err("expected an error");
    (e.code().expect("a status"), e.to_string())
}

async fn anonymous(server: &TestServer) -> Client {
    Client::connect_with(&server.url(), None, None).await.unwrap()
}

async fn token_for(server: &TestServer, identity: &str) -> String {
    let vault = server.vault();
    match vault.bootstrap_identity(identity, identity).await {
        Ok(t) => t.expose_secret().to_owned(),
        Err(_) => vault.issue_token(identity).await.unwrap().expose_secret().to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custodians_unseal_k_of_n_seal_change_passphrase_and_rekey() {
    let dir = tempfile::tempdir().unwrap();
    let options = TestServer::options(dir.path());
    let passes: Vec<&[u8]> = CUSTODIANS.iter().map(|p| p.as_bytes()).collect();
    let vault = Vault::init_custodians(dir.path(), 2, &passes, SealParams::MINIMUM, &options).await.unwrap();
    let server = TestServer::start_vault(dir.path(), options.clone(), vault).await;
    let mut anon = anonymous(&server).await;
    let s = anon.seal_status().await.unwrap();
    assert_eq!((s.sealed, s.threshold, s.custodians, s.received.clone()), (true, 2, 3, vec![]));
    // Sealed: everything but status and unseal answers FailedPrecondition.
    let mut stranger = server.client_with_token("khl_0000.AAAA").await;
    let (c, m) = code(stranger.get("00000000-0000-4000-8000-000000000000", &[], PURPOSE).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("sealed"), "{m}");
    assert_eq!(code(stranger.rotate_key().await).0, Code::FailedPrecondition);

    // A wrong passphrase is refused without saying which part was wrong.
    let (c, m) = code(anon.unseal(2, "custodian two: wrong soup").await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.ends_with("wrong passphrase for custodian 2's share"), "{m}");
    assert_eq!(code(anon.unseal(9, CUSTODIANS[0]).await).0, Code::InvalidArgument);
    // K-1 shares: still sealed, even if the same custodian tries twice.
    let s = anon.unseal(2, CUSTODIANS[1]).await.unwrap();
    assert_eq!((s.sealed, s.received.clone()), (true, vec![2]));
    let s = anon.unseal(2, CUSTODIANS[1]).await.unwrap();
    assert_eq!((s.sealed, s.received.clone()), (true, vec![2]));
    assert_eq!(
        code(stranger.get("00000000-0000-4000-8000-000000000000", &[], PURPOSE).await).0,
        Code::FailedPrecondition
    );
    // K shares: serving.
    let s = anon.unseal(3, CUSTODIANS[2]).await.unwrap();
    assert!(!s.sealed, "{s:?}");
    assert_eq!(code(anon.unseal(1, CUSTODIANS[0]).await).0, Code::FailedPrecondition, "already unsealed");

    let mut tester = server.client_with_token(&token_for(&server, "tester").await).await;
    let mut admin = server.client_with_token(&token_for(&server, "key-admin").await).await;
    let mut sec = server.client_with_token(&token_for(&server, "security-officer").await).await;
    let id = tester.put("custody-subject", canary_fields()).await.unwrap();
    let public_key = sec.audit_public_key().await.unwrap();

    // Sealing wipes the keys; only a key admin may.
    assert_eq!(code(tester.seal().await).0, Code::PermissionDenied);
    assert!(admin.seal().await.unwrap().sealed);
    assert_eq!(code(tester.get(&id, &[], PURPOSE).await).0, Code::FailedPrecondition);

    // Custodian 1 changes passphrase while sealed; the old one stops working.
    let new_one = "custodian one: khao man gai";
    assert_eq!(code(anon.change_passphrase(1, "not it at all", new_one).await).0, Code::PermissionDenied);
    assert_eq!(code(anon.change_passphrase(1, CUSTODIANS[0], "short").await).0, Code::InvalidArgument);
    anon.change_passphrase(1, CUSTODIANS[0], new_one).await.unwrap();
    assert_eq!(code(anon.unseal(1, CUSTODIANS[0]).await).0, Code::PermissionDenied);
    assert!(anon.unseal(1, new_one).await.unwrap().sealed);
    assert!(!anon.unseal(3, CUSTODIANS[2]).await.unwrap().sealed);
    assert_eq!(tester.get(&id, &[], PURPOSE).await.unwrap().fields["name"].expose_secret(), CANARY_NAME_TH);

    // Rekey: a new root key for two new custodians (2 of 2). Tokens, blind indexes and the audit
    // key survive (they come from the derivation key, rewrapped, not from the root key).
    let fresh = ["new custodian A: pad see ew", "new custodian B: khao soi gai"];
    let holders = ["security-officer", "data-protection-officer"];
    let mut first = server.client_with_token(&token_for(&server, holders[0]).await).await;
    let mut second = server.client_with_token(&token_for(&server, holders[1]).await).await;
    assert_eq!(code(tester.rekey(2, &holders).await).0, Code::PermissionDenied);
    assert_eq!(code(admin.rekey(3, &holders).await).0, Code::InvalidArgument);
    let nonce = admin.rekey(2, &holders).await.unwrap().nonce.unwrap();
    let nonce = nonce.expose_secret();
    assert_eq!(code(first.rekey_passphrase(nonce, 1, "short").await).0, Code::InvalidArgument);
    let s = first.rekey_passphrase(nonce, 1, fresh[0]).await.unwrap();
    assert_eq!((s.passphrases_set.clone(), s.approvals_needed, s.done), (vec![1], 2, false));
    let s = second.rekey_passphrase(nonce, 2, fresh[1]).await.unwrap();
    assert_eq!(s.passphrases_set, vec![1, 2]);
    let s = anon.rekey_approve(nonce, 1, new_one).await.unwrap();
    assert_eq!((s.approved.clone(), s.done), (vec![1], false));
    let s = anon.rekey_approve(nonce, 3, CUSTODIANS[2]).await.unwrap();
    assert!(s.done, "{s:?}");
    let st = anon.seal_status().await.unwrap();
    assert_eq!((st.sealed, st.threshold, st.custodians, st.rekey.is_none()), (false, 2, 2, true));
    assert_eq!(tester.list("custody-subject").await.unwrap().len(), 1);
    assert_eq!(sec.audit_public_key().await.unwrap(), public_key);
    assert!(admin.seal().await.unwrap().sealed);
    assert_eq!(code(anon.unseal(1, new_one).await).0, Code::PermissionDenied, "old shares are gone");
    assert!(anon.unseal(1, fresh[0]).await.unwrap().sealed);
    assert!(!anon.unseal(2, fresh[1]).await.unwrap().sealed);
    assert_eq!(tester.get(&id, &[], PURPOSE).await.unwrap().fields["email"].expose_secret(), CANARY_EMAIL);

    // Every custodian action is on the record, never a passphrase.
    let log = sec.query_audit(&khlang_client::AuditQuery::default()).await.unwrap();
    let count =
        |rpc: &str, outcome: &str| log.iter().filter(|e| e.rpc == rpc && e.outcome == outcome).count();
    assert_eq!(count("Unseal", "PermissionDenied"), 3);
    assert_eq!(count("ChangePassphrase", "Ok"), 1);
    assert_eq!(count("Seal", "Ok"), 2);
    assert_eq!(count("Rekey", "Ok"), 1);
    assert_eq!(count("RekeyPassphrase", "Ok"), 2);
    assert_eq!(count("RekeyApprove", "Ok"), 2);
    assert!(sec.verify_audit(&[]).await.unwrap().report.first_break.is_none());
    let all = format!("{log:?}");
    for secret in CUSTODIANS.iter().chain(&fresh).chain([&new_one]) {
        assert!(!all.contains(secret), "a passphrase reached the audit log");
    }
    server.stop().await;
}

/// Every stored record (server stopped), by id.
async fn stored_records(dir: &std::path::Path) -> BTreeMap<String, StoredRecord> {
    let store = SledStore::open(dir, Durability::PerRequest).unwrap();
    let ids: Vec<String> = store
        .vault_tree_for_tests()
        .scan_prefix(b"r")
        .map(|kv| String::from_utf8(kv.unwrap().0[1..].to_vec()).unwrap())
        .collect();
    let mut out = BTreeMap::new();
    for id in ids {
        let record = store.get_record(&id).await.unwrap().unwrap().0;
        out.insert(id, record);
    }
    out
}

async fn wait_for_job(admin: &mut Client) -> KeysStatus {
    for _ in 0..600 {
        let k = admin.key_status(false).await.unwrap();
        if k.job.as_ref().is_some_and(|j| j.finished_ms.is_some()) {
            return admin.key_status(true).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the key job did not finish");
}

fn counts(k: &KeysStatus) -> Vec<(u32, String, u64)> {
    k.versions.iter().map(|v| (v.version, v.state.clone(), v.data_keys.unwrap_or(u64::MAX))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_then_retirement_by_proof() {
    sled_only!("reads sled's tree and restores a record into it");
    let dir = tempfile::tempdir().unwrap();
    // Small, paced steps so the rewrap is still running while requests flow.
    let options = VaultOptions {
        job_pacing: JobPacing { batch: 16, pause: Duration::from_millis(15), ..JobPacing::default() },
        ..TestServer::options(dir.path())
    };
    let server = TestServer::start_with(dir.path(), options.clone()).await;
    let mut tester = server.client().await;
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(
            tester.put(&format!("rot-{}", i % 20), [("email", format!("p{i}@example.go.th"))]).await.unwrap(),
        );
    }
    let backup_id = ids[0].clone();
    server.stop().await;
    let backup = stored_records(dir.path()).await.remove(&backup_id).unwrap();
    assert_eq!(WrappedDataKey::from_bytes(backup.wrapped_key.clone()).kek_version().unwrap(), 1);

    let server = TestServer::start_with(dir.path(), options.clone()).await;
    let mut admin = server.client_as("key-admin").await;
    let mut tester = server.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (mut w, mut r) = (server.client().await, server.client().await);
    let writer = {
        let (stop, failures, written) = (stop.clone(), failures.clone(), written.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match w.put("rot-live", [("phone", format!("08{:08}", i))]).await {
                    Ok(id) => written.lock().unwrap().push((id, format!("08{:08}", i))),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        })
    };
    let reader = {
        let (stop, failures, ids) = (stop.clone(), failures.clone(), ids.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[n % ids.len()];
                if r.get(id, &[], PURPOSE).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let k = admin.rotate_key().await.unwrap();
    assert_eq!(
        k.versions.iter().map(|v| (v.version, v.state.as_str())).collect::<Vec<_>>(),
        [(1, "decrypt-only"), (2, "active")]
    );
    // Retirement while references remain is refused, with the count.
    let (c, m) = code(admin.retire_key(1).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("data keys still reference KEK v1"), "{m}");
    assert_eq!(code(admin.retire_key(2).await).0, Code::FailedPrecondition, "the active version");
    assert_eq!(code(admin.retire_key(7).await).0, Code::NotFound);
    // A second rotation waits for the first job.
    assert_eq!(code(admin.rotate_key().await).0, Code::FailedPrecondition);
    let mid = admin.key_status(false).await.unwrap();
    let job = mid.job.unwrap();
    assert!(job.finished_ms.is_none() && job.done() < job.total, "still running: {job:?}");
    wait_for_job(&mut admin).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let reads = reader.await.unwrap();
    let k = admin.key_status(true).await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request failed during the rotation");
    let written = written.lock().unwrap().clone();
    assert!(reads > 20 && written.len() > 20, "load ran: {reads} reads, {} writes", written.len());
    let total = (ids.len() + written.len()) as u64;
    assert_eq!(counts(&k), [(1, "decrypt-only".into(), 0), (2, "active".into(), total)]);
    let job = k.job.unwrap();
    // Records under v1: the 200 written first, and those the writer added before the rotation.
    // (Exact counts across kills are shown by the kill -9 test, which has no concurrent writer.)
    assert!(job.changed >= ids.len() as u64 && job.changed <= total, "{job:?}");
    // Every record readable, values intact.
    for (i, id) in ids.iter().enumerate() {
        let rec = tester.get(id, &[], PURPOSE).await.unwrap();
        assert_eq!(rec.fields["email"].expose_secret(), format!("p{i}@example.go.th"));
    }
    for (id, phone) in &written {
        assert_eq!(tester.get(id, &[], PURPOSE).await.unwrap().fields["phone"].expose_secret(), phone);
    }

    // Retirement by proof; then v1 is gone and status says so.
    admin.retire_key(1).await.unwrap();
    assert_eq!(code(admin.retire_key(1).await).0, Code::FailedPrecondition);
    let k = admin.key_status(true).await.unwrap();
    assert_eq!(counts(&k), [(1, "retired".into(), 0), (2, "active".into(), total)]);
    // The key admin manages keys and cannot read a field.
    let (c, _) = code(admin.get(&ids[1], &[], PURPOSE).await);
    assert_eq!(c, Code::PermissionDenied);
    server.stop().await;

    // Restore a copy of a record taken before the rotation (a backup): its data key is under the
    // destroyed v1, so nothing can open it — and the KEK is gone from the store.
    {
        let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
        assert!(store.keks().await.unwrap().iter().all(|(v, _)| *v == 2));
        store.overwrite_record_for_tests(&backup_id, &backup).unwrap();
        store.flush_now().await.unwrap();
    }
    let server = TestServer::start_with(dir.path(), options).await;
    let mut tester = server.client().await;
    let (c, m) = code(tester.get(&backup_id, &[], PURPOSE).await);
    assert_eq!(c, Code::DataLoss, "{m}");
    assert_eq!(tester.get(&ids[1], &[], PURPOSE).await.unwrap().fields.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencryption_renews_every_key_and_ciphertext_and_keeps_values() {
    sled_only!("reads every stored record from sled's tree");
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut tester = server.client().await;
    let a1 = tester.put("reenc-a", canary_fields()).await.unwrap();
    let a2 = tester.put("reenc-a", [("phone", "0812345678")]).await.unwrap();
    let b = tester.put("reenc-b", canary_fields()).await.unwrap();
    let c = tester.put("reenc-c", [("age", "40")]).await.unwrap();
    server.stop().await;
    let before = stored_records(dir.path()).await;

    let server = TestServer::start(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    assert_eq!(admin.reencrypt(ReencryptTarget::Record(b.clone())).await.unwrap(), 1);
    assert_eq!(admin.reencrypt(ReencryptTarget::Subject("reenc-a".into())).await.unwrap(), 2);
    assert_eq!(
        code(admin.reencrypt(ReencryptTarget::Record("not-an-id".into())).await).0,
        Code::InvalidArgument
    );
    let missing = "00000000-0000-4000-8000-000000000000".to_owned();
    assert_eq!(code(admin.reencrypt(ReencryptTarget::Record(missing)).await).0, Code::NotFound);
    let mut tester = server.client().await;
    assert_eq!(code(tester.reencrypt(ReencryptTarget::All).await).0, Code::PermissionDenied);
    server.stop().await;
    let after = stored_records(dir.path()).await;

    let renewed = |id: &str, old: &BTreeMap<String, StoredRecord>, new: &BTreeMap<String, StoredRecord>| {
        let (o, n) = (&old[id], &new[id]);
        let (og, ng) = (
            WrappedDataKey::from_bytes(o.wrapped_key.clone()).header().unwrap().1,
            WrappedDataKey::from_bytes(n.wrapped_key.clone()).header().unwrap().1,
        );
        assert_eq!(ng, og + 1, "next data-key generation");
        assert_ne!(o.wrapped_key, n.wrapped_key);
        assert_ne!(o.subject, n.subject);
        assert_eq!(o.fields.len(), n.fields.len());
        for (fo, fnew) in o.fields.iter().zip(&n.fields) {
            assert_eq!(fo.name, fnew.name);
            assert_ne!(fo.envelope, fnew.envelope, "field {} re-encrypted", fo.name);
        }
    };
    for id in [&a1, &a2, &b] {
        renewed(id, &before, &after);
    }
    assert_eq!(before[&c].wrapped_key, after[&c].wrapped_key, "untouched record unchanged");

    // Everything, by the background job; values stay the same.
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    assert_eq!(admin.reencrypt(ReencryptTarget::All).await.unwrap(), 4);
    let k = wait_for_job(&mut admin).await;
    let job = k.job.unwrap();
    assert_eq!((job.kind.as_str(), job.changed, job.total), ("reencrypt", 4, 4));
    let mut tester = server.client().await;
    let rec = tester.get(&a1, &[], PURPOSE).await.unwrap();
    for (name, value) in canary_fields() {
        assert_eq!(rec.fields[name].expose_secret(), value);
    }
    assert_eq!(rec.subject_id.expose_secret(), "reenc-a");
    assert_eq!(tester.get(&c, &[], PURPOSE).await.unwrap().fields["age"].expose_secret(), "40");
    server.stop().await;
    let last = stored_records(dir.path()).await;
    for id in [&a1, &a2, &b, &c] {
        renewed(id, &after, &last);
    }
    // No canary value at rest after all this.
    for file in files_under(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        for (_, value) in canary_fields() {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{} in {}",
                value,
                file.display()
            );
        }
    }
}

/// Malformed key-lifecycle requests get precise statuses (sent raw, as any gRPC client could).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_key_requests_are_refused_precisely() {
    use khlang_proto::pb;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = server.tokens["key-admin"].clone();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut keys = pb::keys_client::KeysClient::connect(server.url()).await.unwrap();
    let mut operator = pb::operator_client::OperatorClient::connect(server.url()).await.unwrap();
    fn with<T>(msg: T, bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("authorization", bearer.clone());
        req
    }
    let authed = |msg| with(msg, &bearer);
    let code = |r: Result<tonic::Response<pb::ReencryptResponse>, tonic::Status>| r.unwrap_err().code();
    // No target, an empty subject, a record id that is not one.
    assert_eq!(
        code(keys.reencrypt(authed(pb::ReencryptRequest { target: None })).await),
        tonic::Code::InvalidArgument
    );
    let subject =
        pb::ReencryptRequest { target: Some(pb::reencrypt_request::Target::SubjectId(String::new())) };
    assert_eq!(code(keys.reencrypt(authed(subject)).await), tonic::Code::InvalidArgument);
    let all_false = pb::ReencryptRequest { target: Some(pb::reencrypt_request::Target::All(false)) };
    assert_eq!(code(keys.reencrypt(authed(all_false)).await), tonic::Code::InvalidArgument);
    // Without a token, key operations are unauthenticated.
    let e = keys.rotate_key(pb::RotateKeyRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // Custodian numbers out of range (for Unseal, a number that fits says "already unsealed" first;
    // the range check of a sealed vault is in the custodians test).
    for custodian in [0, 2, 300] {
        let e =
            operator.unseal(pb::UnsealRequest { custodian, passphrase: "x".repeat(20) }).await.unwrap_err();
        let expected =
            if custodian > 255 { tonic::Code::InvalidArgument } else { tonic::Code::FailedPrecondition };
        assert_eq!(e.code(), expected, "custodian {custodian}: {e:?}");
        let req = pb::ChangePassphraseRequest {
            custodian,
            old_passphrase: PASSPHRASE.into(),
            new_passphrase: "a long enough new passphrase".into(),
        };
        let e = operator.change_passphrase(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "custodian {custodian}: {e:?}");
    }
    // Rekey with no custodians, or more than 255.
    for (threshold, custodians) in [(1, 0), (2, 300), (300, 2)] {
        let req = pb::RekeyRequest { threshold, custodians, ..Default::default() };
        let e = operator.rekey(with(req, &bearer)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{threshold} of {custodians}: {e:?}");
    }
    // A holder for each new share, no fewer and no more.
    for holders in [vec![], vec!["tester"], vec!["tester", "security-officer", "registration-app"]] {
        let holders = holders.into_iter().map(str::to_owned).collect();
        let req = pb::RekeyRequest { threshold: 2, custodians: 2, holders };
        let e = operator.rekey(with(req, &bearer)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("name the identity that will hold each new share"), "{e:?}");
    }
    server.stop().await;
}

/// Erasure and deletion destroy the data keys with the records: nothing of them stays in the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_and_deletion_destroy_the_data_keys() {
    sled_only!("reads sled's tree for the deleted keys");
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut tester = server.client().await;
    let a = tester.put("erase-me", canary_fields()).await.unwrap();
    let b = tester.put("erase-me", [("age", "41")]).await.unwrap();
    let c = tester.put("delete-one", [("age", "42")]).await.unwrap();
    let kept = tester.put("keep-me", [("age", "43")]).await.unwrap();
    assert_eq!(tester.erase_subject("erase-me").await.unwrap(), 2);
    tester.delete(&c).await.unwrap();
    server.stop().await;
    let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
    let tree = store.vault_tree_for_tests();
    for id in [&a, &b, &c] {
        for prefix in [b"r", b"d"] {
            let key = [prefix.as_slice(), id.as_bytes()].concat();
            assert!(tree.get(&key).unwrap().is_none(), "{} of {id} survived", prefix[0] as char);
        }
    }
    assert!(tree.get([b"d".as_slice(), kept.as_bytes()].concat()).unwrap().is_some());
    assert_eq!(store.count(khlang_server::storage::KeySpace::DataKeys).await.unwrap(), 1);
}
