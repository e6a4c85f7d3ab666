//! The access log end to end: one entry per RPC, denials and failed authentication logged, tamper
//! evidence (live and offline), fail closed, and no personal data in it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::collections::BTreeSet;

use khlang_client::{AuditQuery, Code};
use khlang_server::audit::{AuditEntry, AuditFilter, VerifyWith, verify_dir};
use khlang_server::policy::regulations::SAMPLE;
use khlang_tests::*;
use prost::Message;

fn entries(server: &TestServer) -> Vec<AuditEntry> {
    server
        .vault()
        .audit_entries(khlang_server::AuditGrant::unaudited_for_tests(AuditFilter::default()))
        .map(Result::unwrap)
        .collect()
}

async fn sample_server(dir: &std::path::Path) -> TestServer {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("regulations.toml"), SAMPLE).unwrap();
    TestServer::start(dir).await
}

/// Every RPC of the khlang.v1 API, as the descriptor set declares them.
fn api_rpcs() -> BTreeSet<String> {
    let fds = prost_types::FileDescriptorSet::decode(khlang_proto::FILE_DESCRIPTOR_SET).unwrap();
    fds.file
        .iter()
        .filter(|f| f.package() == "khlang.v1")
        .flat_map(|f| f.service.iter().flat_map(|s| s.method.iter().map(|m| m.name().to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_writes_exactly_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let mut dpo = server.client_as("data-protection-officer").await;
    let mut admin = server.client_as("key-admin").await;
    let mut sec = server.client_as("security-officer").await;
    let mut clerk = server.client_as("billing-clerk").await;
    let id =
        app.put("audit-subject", [("card_number", CANARY_CARD), ("name", CANARY_NAME_TH)]).await.unwrap();
    let scratch = app.put("scratch-subject", [("age", "40")]).await.unwrap();

    let mut seen = BTreeSet::new();
    // (rpc, identity, outcome) after each call; one call per RPC, some refused on purpose.
    macro_rules! check {
        ($rpc:literal, $who:literal, $outcome:literal, $call:expr) => {{
            let before = entries(&server).len();
            let _ = $call;
            let after = entries(&server);
            // The background key job writes its own entries (identity khlang-key-job).
            let new: Vec<AuditEntry> =
                after[before..].iter().filter(|e| e.identity != "khlang-key-job").cloned().collect();
            assert_eq!(new.len(), 1, "{}: {} entries: {new:?}", $rpc, new.len());
            let e = &new[0];
            assert_eq!(
                (e.rpc.as_str(), e.identity.as_str(), e.outcome.as_str()),
                ($rpc, $who, $outcome),
                "{e:?}"
            );
            assert!(after.iter().all(|x| x.seq <= e.seq || x.identity == "khlang-key-job"), "{e:?}");
            assert!(!e.request_id.is_empty() && !e.regulations_version.is_empty() && e.time_ms > 0, "{e:?}");
            assert!(e.peer.starts_with("127.0.0.1:"), "{e:?}");
            seen.insert($rpc.to_owned());
            e.clone()
        }};
    }
    let e = check!(
        "PutRecord",
        "registration-app",
        "Ok",
        app.put("audit-subject", [("postal_code", "80000")]).await
    );
    assert_eq!((e.operation.as_str(), e.decision.as_str()), ("write", "allow"));
    assert_eq!(e.fields, ["postal_code"]);
    assert_eq!(e.subject.len(), 64, "the subject's blind index, never its id");
    assert!(e.key_versions.to_string().starts_with("kek=1 gen=1"), "{e:?}");
    let e = check!(
        "GetRecord",
        "billing-clerk",
        "Ok",
        clerk.get(&id, &["card_number".into()], Some("billing")).await
    );
    assert_eq!(
        (e.purpose.as_str(), e.rule.as_str(), e.record_id.as_str()),
        ("billing", "roles.billing-clerk.read[0]", id.as_str())
    );
    let e = check!(
        "GetRecord",
        "billing-clerk",
        "PermissionDenied",
        clerk.get(&id, &["name".into()], Some("billing")).await
    );
    assert_eq!((e.decision.as_str(), e.rule.as_str()), ("deny", "deny-by-default"));
    assert!(e.reason.contains("may not read field 'name'"), "{e:?}");
    let e = check!("GetRecord", "registration-app", "InvalidArgument", app.get(&id, &[], None).await);
    assert_eq!(e.decision, "none");
    let _ = check!(
        "UpdateRecord",
        "registration-app",
        "Ok",
        app.update(&id, [("phone", "0812345678")], &[]).await
    );
    let _ = check!("ListRecords", "registration-app", "Ok", app.list("audit-subject").await);
    let _ = check!("DeleteRecord", "data-protection-officer", "Ok", dpo.delete(&scratch).await);
    let _ = check!(
        "SetConsent",
        "registration-app",
        "Ok",
        app.set_consent("audit-subject", "marketing", false).await
    );
    let _ = check!("GetConsent", "registration-app", "Ok", app.consent("audit-subject").await);
    let _ =
        check!("ExportSubject", "data-protection-officer", "Ok", dpo.export_subject("audit-subject").await);
    let _ = check!("EraseSubject", "data-protection-officer", "Ok", dpo.erase_subject("nobody-here").await);
    let mut second = server.second_admin().await;
    let _ = check!("CreateIdentity", "key-admin", "Ok", admin.create_identity("temp", "billing-clerk").await);
    let _ = check!("ListIdentityRequests", "key-admin", "Ok", admin.identity_requests().await);
    let request_id =
        admin.identity_requests().await.unwrap().into_iter().find(|r| r.name == "temp").unwrap().id;
    let _ = check!("ApproveIdentity", "key-admin-2", "Ok", second.approve_identity(&request_id).await);
    let _ =
        check!("RefuseIdentity", "key-admin", "NotFound", admin.refuse_identity(&request_id, "done").await);
    let _ = check!("ListIdentities", "key-admin", "Ok", admin.list_identities().await);
    let _ = check!("RevokeIdentity", "key-admin", "Ok", admin.revoke_identity("temp").await);
    let _ = check!("ReloadRegulations", "key-admin", "Ok", admin.reload_regulations().await);
    let _ = check!("GetRegulations", "key-admin", "Ok", admin.regulations().await);
    // The key lifecycle: custodians' calls carry no token and are audited under the custodian.
    let mut anon = khlang_client::Client::connect_with(&server.url(), None, None).await.unwrap();
    let e = check!("SealStatus", "", "Ok", anon.seal_status().await);
    assert_eq!(e.reason, "unsealed");
    let _ = check!("KeyStatus", "key-admin", "Ok", admin.key_status(true).await);
    let e = check!("RotateKey", "key-admin", "Ok", admin.rotate_key().await);
    assert_eq!(e.key_versions, "kek=2");
    while admin.key_status(false).await.unwrap().job.unwrap().finished_ms.is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = check!("RetireKey", "key-admin", "Ok", admin.retire_key(1).await);
    let e = check!(
        "Reencrypt",
        "key-admin",
        "Ok",
        admin.reencrypt(khlang_client::ReencryptTarget::Record(id.clone())).await
    );
    assert!(e.key_versions.to_string().starts_with("kek=2 gen=2"), "{e:?}");
    let new_pass = "a new passphrase for the only custodian";
    let _ = check!(
        "ChangePassphrase",
        "custodian-1",
        "Ok",
        anon.change_passphrase(1, PASSPHRASE, new_pass).await
    );
    // Rekey: the key admin starts, the one new custodian sets their passphrase, the current one approves.
    let fresh = "the new custodian's own passphrase";
    let _ = check!("Rekey", "key-admin", "Ok", admin.rekey(1, &["security-officer"]).await);
    let _ = check!("RekeyCancel", "key-admin", "Ok", admin.rekey_cancel().await);
    let nonce = admin.rekey(1, &["security-officer"]).await.unwrap().nonce.unwrap();
    let mut holder = server.client_as("security-officer").await;
    let _ = check!(
        "RekeyPassphrase",
        "new-custodian-1",
        "Ok",
        holder.rekey_passphrase(nonce.expose_secret(), 1, fresh).await
    );
    let e = check!(
        "RekeyApprove",
        "custodian-1",
        "Ok",
        anon.rekey_approve(nonce.expose_secret(), 1, new_pass).await
    );
    assert!(e.reason.contains("root key replaced") && !e.reason.contains(nonce.expose_secret()), "{e:?}");
    let new_pass = fresh;
    // A backup is the key admin's, audited either way; on PostgreSQL the database's tools do it.
    if on_postgres() {
        let _ = check!("Backup", "key-admin", "FailedPrecondition", admin.backup(|_| true).await);
    } else {
        let _ = check!("Backup", "key-admin", "Ok", admin.backup(|_| true).await);
    }
    let _ = check!("Backup", "registration-app", "PermissionDenied", app.backup(|_| true).await);
    let _ = check!("Seal", "key-admin", "Ok", admin.seal().await);
    let e = check!("Unseal", "custodian-1", "PermissionDenied", anon.unseal(1, PASSPHRASE).await);
    assert!(!e.reason.contains(PASSPHRASE));
    let e = check!("Unseal", "custodian-1", "Ok", anon.unseal(1, new_pass).await);
    assert_eq!(e.reason, "unsealed");
    let e = check!(
        "QueryAudit",
        "security-officer",
        "Ok",
        sec.query_audit(&AuditQuery { identity: "x".into(), ..AuditQuery::default() }).await
    );
    assert_eq!((e.operation.as_str(), e.reason.as_str()), ("audit_read", "identity=x"));
    let _ = check!("ExportAudit", "security-officer", "Ok", sec.export_audit(|_| {}).await);
    let _ = check!("VerifyAudit", "security-officer", "Ok", sec.verify_audit(&[]).await);
    let _ = check!("AuditPublicKey", "security-officer", "Ok", sec.audit_public_key().await);
    // The audit log is not for data readers.
    let _ = check!(
        "QueryAudit",
        "registration-app",
        "PermissionDenied",
        app.query_audit(&AuditQuery::default()).await
    );
    // A failed authentication is logged too, with no identity and the reason.
    let mut bad = server.client_with_token("khl_not_a_token").await;
    let e = check!("GetRecord", "", "Unauthenticated", bad.get(&id, &[], Some("billing")).await);
    assert!(e.reason.contains("bearer token"), "{e:?}");
    // A batch's records are a PutRecord entry each (tests/bulk.rs); the batch itself is named
    // when it is refused before any record is (here: no valid token).
    let batch = [khlang_client::NewRecord { subject: "x".into(), fields: vec![("name".into(), "x".into())] }];
    let _ = check!("PutRecords", "", "Unauthenticated", bad.put_many(&batch, false).await);

    let missing: Vec<_> = api_rpcs().difference(&seen).cloned().collect();
    assert!(missing.is_empty(), "RPCs without an audit check: {missing:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let id = c.put("fail-closed", [("card_number", CANARY_CARD)]).await.unwrap();

    server.vault().inject_audit_failure(true);
    let e = c.get(&id, &[], PURPOSE).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    assert!(e.to_string().contains("could not be audited") && !e.to_string().contains(CANARY_CARD), "{e}");
    let e = c.put("fail-closed", [("age", "50")]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable));
    assert_eq!(c.delete(&id).await.unwrap_err().code(), Some(Code::Unavailable));
    // Health tells the truth: nothing but the operator service serves while entries cannot be
    // written, and all of it again once they can.
    assert!(health_becomes(&server.url(), "", false).await, "NOT_SERVING while the log is unwritable");
    assert!(health_becomes(&server.url(), "khlang.v1.Records", false).await);
    assert!(health_becomes(&server.url(), "khlang.v1.Operator", true).await);

    server.vault().inject_audit_failure(false);
    assert!(health_becomes(&server.url(), "", true).await, "SERVING once it can be written again");
    let listed = c.list("fail-closed").await.unwrap();
    assert_eq!(listed.len(), 1, "the refused put left nothing, the refused delete removed nothing");
    assert_eq!(c.get(&id, &[], PURPOSE).await.unwrap().fields["card_number"].expose_secret(), CANARY_CARD);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_report_and_no_personal_data_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let id = app.put("somying-001", canary_fields()).await.unwrap();
    app.put("someone-else", [("age", "20")]).await.unwrap();
    server.client_as("billing-clerk").await.get(&id, &["card_number".into()], Some("billing")).await.unwrap();
    let denied =
        server.client_as("marketing-officer").await.get(&id, &["email".into()], Some("marketing")).await;
    assert!(denied.is_err());
    app.update(&id, [("billing_address", CANARY_ADDRESS_TH)], &[]).await.unwrap();
    server.client_as("data-protection-officer").await.export_subject("somying-001").await.unwrap();
    // A caller's string built to break a log line or forge an entry.
    let forged = "billing\n{\"seq\":1,\"identity\":\"root\"}\u{7}";
    let _ = app.get(&id, &[], Some(forged)).await;
    // Reads of this person's record refused before the record was looked up (no purpose, an
    // unknown field) still belong in the person's report.
    let clerk = &mut server.client_as("billing-clerk").await;
    assert_eq!(
        clerk.get(&id, &["card_number".into()], None).await.unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    let unknown = clerk.get(&id, &["no_such_field".into()], Some("billing")).await.unwrap_err();
    assert_eq!(unknown.code(), Some(Code::InvalidArgument));

    let mut sec = server.client_as("security-officer").await;
    let report = sec
        .query_audit(&AuditQuery { subject_id: "somying-001".into(), ..AuditQuery::default() })
        .await
        .unwrap();
    let who: Vec<(&str, &str, &str)> = report
        .iter()
        .filter(|e| e.operation != "audit_read")
        .map(|e| (e.identity.as_str(), e.purpose.as_str(), e.decision.as_str()))
        .collect();
    assert!(who.contains(&("billing-clerk", "billing", "allow")), "{who:?}");
    assert!(who.contains(&("marketing-officer", "marketing", "deny")), "{who:?}");
    assert!(who.contains(&("data-protection-officer", "", "allow")), "{who:?}");
    let refused: Vec<_> =
        report.iter().filter(|e| e.identity == "billing-clerk" && e.outcome == "InvalidArgument").collect();
    assert_eq!(refused.len(), 2, "refused reads of the record are in the subject's report: {report:?}");
    assert!(
        !report.iter().any(|e| e.identity == "registration-app" && e.fields == ["age"]),
        "other subjects' entries stay out"
    );

    // Export: valid JSON on every line, the forged purpose defused, and no canary anywhere.
    let mut lines = Vec::new();
    sec.export_audit(|l| lines.push(l.to_owned())).await.unwrap();
    let all = lines.join("\n");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["type"].is_string());
    }
    assert!(!all.contains(r#""identity":"root""#), "the forged entry stays inside an escaped string");
    assert!(all.contains(r#"\"identity\":\"root\""#), "the forged text is kept, escaped");
    for canary in [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL, "somying-001"] {
        assert!(!all.contains(canary), "the audit export holds '{canary}'");
    }
    server.stop().await;
    // And the raw audit log on disk (on PostgreSQL, `tests/postgres.rs` scans a dump instead).
    sled_only!("the audit log's files are sled's");
    let on_disk = files_under(&dir.path().join("audit"));
    assert!(!on_disk.is_empty());
    for f in on_disk {
        let v = std::fs::read(&f).unwrap();
        for canary in [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL, "somying-001"] {
            assert!(!contains(&v, canary.as_bytes()), "the audit log file {f:?} holds '{canary}'");
        }
    }
}

/// Runs some traffic, stops the server (which signs a final checkpoint) and returns the public key.
async fn make_log(dir: &std::path::Path) -> (String, usize) {
    let server = TestServer::start(dir).await;
    let mut c = server.client().await;
    for i in 0..20 {
        let id = c.put(&format!("s{i}"), [("age", "30")]).await.unwrap();
        c.get(&id, &[], PURPOSE).await.unwrap();
    }
    let key = server.client_as("security-officer").await.audit_public_key().await.unwrap();
    let n = entries(&server).len();
    server.stop().await;
    (key, n)
}

fn verify_stored(dir: &std::path::Path, key: &str) -> Option<(u64, String)> {
    let report = verify_dir(&dir.join("audit"), &hex::decode(key).unwrap(), &VerifyWith::default()).unwrap();
    report.first_break.map(|b| (b.seq, b.reason))
}

/// A forger's edit: the entry says the request was refused.
fn edit(json: &str) -> String {
    assert!(json.contains("\"outcome\":\"Ok\""), "{json}");
    json.replace("\"outcome\":\"Ok\"", "\"outcome\":\"PermissionDenied\"")
}

/// The lines of the log's one segment file, to tamper with as an intruder with disk access would.
struct Lines {
    path: std::path::PathBuf,
    lines: Vec<String>,
}

impl Lines {
    fn open(dir: &std::path::Path) -> Self {
        let segments = khlang_server::audit::files::segments(&dir.join("audit")).unwrap();
        assert_eq!(segments.len(), 1, "{segments:?}");
        Self::of(segments[0].1.clone())
    }

    /// The signed checkpoints' file.
    fn checkpoints(dir: &std::path::Path) -> Self {
        Self::of(dir.join("audit").join("checkpoints.log"))
    }

    fn of(path: std::path::PathBuf) -> Self {
        let lines = std::fs::read_to_string(&path).unwrap().lines().map(str::to_owned).collect();
        Self { path, lines }
    }

    fn at(&self, seq: u64) -> usize {
        self.lines.iter().position(|l| l.starts_with(&format!("e {seq} "))).unwrap()
    }

    /// `(hash hex, json)` of entry `seq`.
    fn entry(&self, seq: u64) -> (String, String) {
        let mut parts = self.lines[self.at(seq)].splitn(4, ' ').skip(2);
        (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned())
    }

    fn set(&mut self, seq: u64, hash: &str, json: &str) {
        let i = self.at(seq);
        self.lines[i] = format!("e {seq} {hash} {json}");
    }

    fn save(&self) {
        std::fs::write(&self.path, self.lines.join("\n") + "\n").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_first_bad_entry_for_every_kind_of_tampering() {
    sled_only!("tampers with the audit log's files");
    let original = tempfile::tempdir().unwrap();
    let (public_key, n) = make_log(original.path()).await;
    assert!(n > 40, "{n} entries");
    assert_eq!(verify_stored(original.path(), &public_key), None, "an untouched log verifies");

    type Tamper = fn(&mut Lines);
    let cases: &[(&str, Tamper, u64)] = &[
        (
            "edit",
            |l| {
                let (hash, json) = l.entry(10);
                l.set(10, &hash, &edit(&json));
            },
            10,
        ),
        (
            "delete",
            |l| {
                let i = l.at(10);
                l.lines.remove(i);
            },
            10,
        ),
        (
            "reorder",
            |l| {
                let (a, b) = (l.at(10), l.at(11));
                l.lines.swap(a, b);
            },
            10,
        ),
        (
            "insert",
            |l| {
                // A copy of entry 9, renumbered 10, and every later entry moved up one.
                let (i, last) = (l.at(10), l.lines.iter().filter(|x| x.starts_with("e ")).count() as u64);
                for seq in (10..=last).rev() {
                    let (hash, json) = l.entry(seq);
                    let at = l.at(seq);
                    l.lines[at] = format!("e {} {hash} {json}", seq + 1);
                }
                let (hash, json) = l.entry(9);
                l.lines.insert(i, format!("e 10 {hash} {json}"));
            },
            10,
        ),
        (
            "truncate",
            |l| {
                l.lines.retain(|x| {
                    !x.starts_with("e ") || x.split(' ').nth(1).unwrap().parse::<u64>().unwrap() < 30
                });
            },
            30,
        ),
        (
            "garble",
            |l| {
                let i = l.at(12);
                l.lines[i] = "not an entry".into();
            },
            12,
        ),
    ];
    for (name, tamper, first_bad) in cases {
        let copy = tempfile::tempdir().unwrap();
        copy_tree(original.path(), copy.path());
        let mut lines = Lines::open(copy.path());
        tamper(&mut lines);
        lines.save();
        let broken = verify_stored(copy.path(), &public_key);
        let (seq, reason) = broken.unwrap_or_else(|| panic!("{name}: not detected"));
        assert_eq!(seq, *first_bad, "{name}: {reason}");
    }

    // An attacker who edits entry 10 and recomputes every hash after it is caught by the signed
    // checkpoint (the final one, written at shutdown).
    let copy = tempfile::tempdir().unwrap();
    copy_tree(original.path(), copy.path());
    let mut lines = Lines::open(copy.path());
    let mut prev: [u8; 32] = hex::decode(lines.entry(9).0).unwrap().try_into().unwrap();
    for seq in 10..=(n as u64) {
        let (_, json) = lines.entry(seq);
        let json = if seq == 10 { edit(&json) } else { json };
        let hash = khlang_keys::audit_chain::chain_hash(&prev, json.as_bytes());
        lines.set(seq, &hex::encode(hash), &json);
        prev = hash;
    }
    lines.save();
    let cps = Lines::checkpoints(copy.path()).lines.len();
    assert!(cps >= 1);
    let (seq, reason) = verify_stored(copy.path(), &public_key)
        .unwrap_or_else(|| panic!("rechained edit not detected ({n} entries, {cps} checkpoints)"));
    assert!(reason.contains("checkpoint"), "{seq}: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_verifies_offline_with_the_right_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    for i in 0..10 {
        c.put(&format!("o{i}"), [("age", "33")]).await.unwrap();
    }
    let mut sec = server.client_as("security-officer").await;
    let key = sec.audit_public_key().await.unwrap();
    let live = sec.verify_audit(&[]).await.unwrap();
    assert!(live.report.first_break.is_none(), "{live:?}");
    server.stop().await;
    // After the stop (and its final checkpoint), export from a restarted vault.
    let server = TestServer::start(dir.path()).await;
    let mut sec = server.client_as("security-officer").await;
    let mut lines = Vec::new();
    sec.export_audit(|l| lines.push(l.to_owned())).await.unwrap();
    let text = lines.join("\n");
    assert!(text.lines().any(|l| l.contains("\"type\":\"checkpoint\"")));

    let ok = khlang_client::verify_export(text.as_bytes(), &key, &[]).unwrap();
    assert!(ok.first_break.is_none(), "{ok:?}");
    assert!(ok.entries > 10 && ok.last_checkpoint > 0, "{ok:?}");

    let other_key = hex::encode([7u8; 32]);
    let wrong = khlang_client::verify_export(text.as_bytes(), &other_key, &[]).unwrap();
    assert!(wrong.first_break.unwrap().reason.contains("invalid signature"));

    let altered = text.replacen("\"outcome\":\"Ok\"", "\"outcome\":\"PermissionDenied\"", 1);
    let broken = khlang_client::verify_export(altered.as_bytes(), &key, &[]).unwrap();
    assert_eq!(broken.first_break.unwrap().seq, 1);

    let dropped: Vec<&str> = text.lines().filter(|l| !l.contains("\"seq\":3,\"hash\"")).collect();
    let gap = khlang_client::verify_export(dropped.join("\n").as_bytes(), &key, &[]).unwrap();
    assert_eq!(gap.first_break.unwrap().seq, 3);
    server.stop().await;
}

#[test]
fn an_audit_entry_keeps_control_characters_out() {
    let e = AuditEntry { purpose: khlang_server::audit::clean("x\n\"y\"\u{0}"), ..AuditEntry::default() };
    let json = String::from_utf8(e.canonical().unwrap()).unwrap();
    assert!(!json.contains('\n') && !json.contains('\u{0}'), "{json}");
    assert!(json.contains(r#""purpose":"x?\"y\"?""#), "{json}");
}

/// Retention: nothing younger than the regulations' retention can be archived; older entries move
/// to an archive that verifies offline, and the log left behind still verifies from its anchor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archival_respects_retention_and_leaves_a_verifiable_log() {
    sled_only!("reads and checks the audit log's files");
    use khlang_server::Vault;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let id = c.put("archived-subject", canary_fields()).await.unwrap();
    for _ in 0..10 {
        c.get(&id, &[], PURPOSE).await.unwrap();
    }
    server.stop().await; // signs a checkpoint at the head

    let vault =
        Vault::open(dir.path(), PASSPHRASE.as_bytes(), &TestServer::options(dir.path())).await.unwrap();
    let public_key = vault.audit_public_key_now().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let day = 86_400_000;
    let archive_path = dir.path().join("archive.jsonl");
    let mut file = std::fs::File::create(&archive_path).unwrap();
    // Today's entries are within the 365-day retention: refused, nothing removed.
    let err = vault.archive_audit(now, now, &mut file).await.unwrap_err();
    assert!(err.to_string().contains("younger than 365 days are kept"), "{err}");
    // The refused attempt to remove history is itself on the record.
    let refused = vault
        .audit_entries(khlang_server::AuditGrant::unaudited_for_tests(AuditFilter::default()))
        .map(Result::unwrap)
        .last()
        .unwrap();
    assert_eq!((refused.rpc.as_str(), refused.outcome.as_str()), ("ArchiveAudit", "FailedPrecondition"));
    assert!(refused.reason.contains("refused"), "{refused:?}");
    let before =
        vault.audit_entries(khlang_server::AuditGrant::unaudited_for_tests(AuditFilter::default())).count();
    // 400 days on, the same entries may go.
    let report = vault.archive_audit(now + 1, now + 400 * day, &mut file).await.unwrap();
    assert_eq!(report.first, 1);
    assert!(report.entries >= 12 && report.last == report.entries, "{report:?}");
    let left: Vec<AuditEntry> = vault
        .audit_entries(khlang_server::AuditGrant::unaudited_for_tests(AuditFilter::default()))
        .map(Result::unwrap)
        .collect();
    assert_eq!(left.first().unwrap().seq, report.last + 1);
    assert_eq!(left.last().unwrap().rpc, "ArchiveAudit");
    assert_eq!(left.len() as u64, before as u64 + 1 - report.entries);

    // The archive verifies offline with only the public key; so does an export of what is left
    // (anchored by the checkpoint the archival kept); so does the live log.
    let archived = khlang_client::verify_export(
        std::io::BufReader::new(std::fs::File::open(&archive_path).unwrap()),
        &public_key,
        &[],
    )
    .unwrap();
    assert_eq!(
        (archived.entries, archived.last_checkpoint, archived.first_break),
        (report.entries, report.last, None)
    );
    let begun = vault
        .audit_export(khlang_server::AuditGrant::unaudited_for_tests(AuditFilter::default()))
        .await
        .unwrap();
    let export: Vec<String> = vault.export_lines(begun).map(Result::unwrap).collect();
    let rest = khlang_client::verify_export(export.join("\n").as_bytes(), &public_key, &[]).unwrap();
    assert!(rest.first_break.is_none() && rest.entries == left.len() as u64, "{rest:?}");
    assert!(vault.verify_audit_now().await.unwrap().first_break.is_none());

    // Without its anchor the rest no longer verifies.
    drop(vault);
    let mut lines = Lines::checkpoints(dir.path());
    let anchor = format!("c {} ", report.last);
    assert!(lines.lines.iter().any(|l| l.starts_with(&anchor)));
    lines.lines.retain(|l| !l.starts_with(&anchor));
    lines.save();
    let vault =
        Vault::open(dir.path(), PASSPHRASE.as_bytes(), &TestServer::options(dir.path())).await.unwrap();
    let broken = vault.verify_audit_now().await.unwrap().first_break.unwrap();
    assert_eq!(broken.seq, report.last, "{broken:?}");
}

/// `--audit-sink file://…`: every entry the log holds is also streamed, as the same canonical
/// JSON (no value, no subject id), allowed, denied and refused alike — on either backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_is_also_streamed_to_the_audit_sink() {
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("siem.jsonl");
    let mut options = TestServer::options(dir.path());
    options.audit_files.sink = Some(khlang_server::audit::sink::SinkTarget::File(sink.clone()));
    let server = TestServer::start_with(dir.path(), options).await;
    let mut c = server.client().await;
    let id = c.put("sink-subject", canary_fields()).await.unwrap();
    c.get(&id, &[], PURPOSE).await.unwrap();
    let mut clerk = server.client_as("billing-clerk").await;
    assert_eq!(
        clerk.get(&id, &["name".into()], Some("billing")).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    let mut bad = server.client_with_token("khl_not_a_token").await;
    assert!(bad.list("sink-subject").await.is_err());
    server.vault().flush().await.unwrap();

    let logged = entries(&server);
    let mut streamed = Vec::new();
    for _ in 0..100 {
        streamed = std::fs::read_to_string(&sink).unwrap_or_default().lines().map(str::to_owned).collect();
        if streamed.len() >= logged.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let parsed: Vec<serde_json::Value> = streamed.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    for e in &logged {
        let line = parsed
            .iter()
            .find(|j| j["seq"] == e.seq)
            .unwrap_or_else(|| panic!("entry {} not streamed", e.seq));
        assert_eq!(
            (line["rpc"].as_str(), line["outcome"].as_str()),
            (Some(e.rpc.as_str()), Some(e.outcome.as_str()))
        );
    }
    assert!(parsed.iter().any(|j| j["decision"] == "deny" && j["identity"] == "billing-clerk"));
    assert!(parsed.iter().any(|j| j["outcome"] == "Unauthenticated"));
    let text = streamed.join("\n");
    for (_, value) in canary_fields() {
        assert!(!text.contains(value), "a value in the sink");
    }
    assert!(!text.contains("sink-subject"), "a subject id in the sink");
    server.stop().await;
}
