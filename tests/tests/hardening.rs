//! Hardening (issue 11), each attack sent as an attacker would over real gRPC (or by editing the
//! data folder of a stopped vault): the exact status, that nothing changed, and that the log has it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::Code;
use khlang_server::storage::{Durability, SledStore, Storage};
use khlang_tests::*;

/// `citizen-777` and a look-alike of it cannot be two people: every look-alike is refused
/// (InvalidArgument, never echoed), on writes and on erasure, and each refusal is on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_subject_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    c.put("citizen-777", [("age", "30")]).await.unwrap();
    let look_alikes = [
        "citizen-777 ",
        " citizen-777",
        "citizen-777\t",
        "citizen\u{200b}-777",
        "citizen-777\u{feff}",
        "citizen-\u{202e}777",
        "citizen\u{a0}777",
        "citizen  777",
        "\u{ff43}itizen-777",
        "citizen-7\u{ad}77",
    ];
    for bad in look_alikes {
        let e = c.put(bad, [("age", "31")]).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{bad:?}: {e}");
        assert!(e.to_string().contains("subject_id") && !e.to_string().contains(bad), "{e}");
        let e = c.erase_subject(bad).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{bad:?}: {e}");
    }
    assert_eq!(c.list("citizen-777").await.unwrap().len(), 1, "nothing else stored");
    let refused = server
        .audit_entries()
        .into_iter()
        .filter(|e| e.outcome == "InvalidArgument" && e.reason.contains("subject_id"))
        .count();
    assert_eq!(refused, 2 * look_alikes.len());
    server.stop().await;
}

/// The subject index is not authenticated: an intruder who adds another person's record under
/// someone's index gets neither an export of it nor its erasure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_subject_index_cannot_export_or_erase_someone_else() {
    sled_only!("alters sled's subject index");
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let alice = c.put("alice-1", [("age", "30")]).await.unwrap();
    let bob = c.put("bob-1", [("email", CANARY_EMAIL)]).await.unwrap();
    server.stop().await;
    {
        let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
        let (record, _) = store.get_record(&alice).await.unwrap().unwrap();
        let key = [b"s".as_slice(), &record.subject_index, bob.as_bytes()].concat();
        store.vault_tree_for_tests().insert(key, &[][..]).unwrap();
        store.flush_now().await.unwrap();
    }
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let e = c.export_subject("alice-1").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
    assert!(e.to_string().contains(&bob) && !e.to_string().contains(CANARY_EMAIL), "{e}");
    let e = c.erase_subject("alice-1").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
    // Nothing was erased: Bob's record and Alice's are both still there.
    assert_eq!(c.get(&bob, &[], PURPOSE).await.unwrap().fields["email"].expose_secret(), CANARY_EMAIL);
    c.get(&alice, &[], PURPOSE).await.unwrap();
    let logged: Vec<_> =
        server.audit_entries().into_iter().filter(|e| e.outcome == "DataLoss").map(|e| e.rpc).collect();
    assert_eq!(logged, ["ExportSubject", "EraseSubject"]);
    server.stop().await;
}

/// One refused read naming 300,000 one-letter fields: its entry records the first 64 names and a
/// count, stays small, and unfiltered query and export keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_naming_300000_fields_writes_a_bounded_entry() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let id = c.put("many-names", [("age", "30")]).await.unwrap();
    let names: Vec<String> = (0..300_000u32).map(|i| char::from(b'a' + (i % 26) as u8).to_string()).collect();
    let e = c.get(&id, &names, PURPOSE).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    let entry = server.audit_entries().into_iter().rfind(|e| e.rpc == "GetRecord").unwrap();
    assert_eq!(entry.fields.len(), 65, "64 names and a count");
    assert_eq!(entry.fields.last().unwrap(), "(+299936 more)");
    assert!(entry.canonical().unwrap().len() < 20_000);
    let mut sec = server.client_as("security-officer").await;
    assert!(sec.query_audit(&khlang_client::AuditQuery::default()).await.unwrap().len() > 3);
    let mut lines = 0;
    sec.export_audit(|_| lines += 1).await.unwrap();
    assert!(lines > 3);
    server.stop().await;
}

/// A full card number (or track data) typed into a field that is not a card field is refused,
/// naming the field and never echoing the value; nothing is stored, the refusal is on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_data_in_a_non_card_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    for value in [
        "card 4111 1111 1111 1111 exp 12/27 cvv 123",
        "%B4111111111111112^SOMCHAI/J^2712101000000",
        ";4111111111111112=2712101000000000?",
    ] {
        let e = c.put("pan-in-text", [("preferences", value)]).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("preferences") && msg.contains("PCI DSS") && !msg.contains("4111"), "{msg}");
    }
    assert!(c.list("pan-in-text").await.unwrap().is_empty());
    c.put("pan-in-text", [("preferences", "call me on 081 234 5678")]).await.unwrap();
    let refused = server
        .audit_entries()
        .into_iter()
        .filter(|e| e.rpc == "PutRecord" && e.outcome == "InvalidArgument")
        .count();
    assert_eq!(refused, 3);
    server.stop().await;
}

/// Sensitive authentication data by any name: a field `card_cvv` or `pin_code` is refused when a
/// regulations file defines it (the rules in force stay) and when a request names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_authentication_data_is_refused_by_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    let before = admin.regulations().await.unwrap().version;
    for name in ["card_cvv", "pin_code", "cardVerification", "track_2"] {
        let rules = format!(
            "{}\n[fields.{name}]\nkind = \"free_text\"\nclass = \"restricted\"\nmask = \"redact\"\n",
            test_regulations()
        );
        std::fs::write(&server.regulations_path, rules).unwrap();
        let e = admin.reload_regulations().await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{name}: {e}");
        assert!(e.to_string().contains("PCI DSS 3.3.1"), "{name}: {e}");
        assert_eq!(admin.regulations().await.unwrap().version, before);
        let e = server.client().await.put("sad", [(name, "123")]).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{name}: {e}");
        assert!(e.to_string().contains("PCI DSS 3.3.1"), "{name}: {e}");
    }
    server.stop().await;
}

/// The data folder is created 0700 with every file 0600 whatever the umask; a folder others can
/// write is refused.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_folder_is_private_and_an_open_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    // The rules live elsewhere, so the vault creates its folder itself.
    let options = TestServer::options(&tmp.path().join("rules"));
    let server = TestServer::start_with(&data, options.clone()).await;
    server.client().await.put("perm", [("age", "30")]).await.unwrap();
    server.stop().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in files_under(&data) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
        assert_eq!(mode(f.parent().unwrap()), 0o700, "{}", f.display());
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = khlang_server::Vault::open(&data, PASSPHRASE.as_bytes(), &options).await.unwrap_err();
    assert!(e.to_string().contains("can be written by others"), "{e}");
}

const CUSTODIANS: [&str; 2] = TWO_CUSTODIANS;

/// Guesses are paced and a success clears nothing: past the limit of wrong old passphrases from
/// one address, its ChangePassphrase tries of that custodian start one a second (the wait comes
/// before any derivation), yet the right passphrase still works: nothing locks the custodian.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_guesses_are_paced_and_a_success_does_not_reset_them() {
    let dir = tempfile::tempdir().unwrap();
    let limits = khlang_server::AuthLimits { max_failures: 5, ..Default::default() };
    let server = sealed_server(dir.path(), limits).await;
    let mut anon = khlang_client::Client::connect_with(&server.url(), None, None).await.unwrap();
    // `old = new = guess` is refused before any derivation: it tells nothing and counts nothing.
    for i in 0..20 {
        let guess = format!("same guess {i}: twice");
        let e = anon.change_passphrase(1, &guess, &guess).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("must differ from the old one"), "{e}");
    }
    let fresh = "a fresh passphrase to set";
    for i in 0..3 {
        let guess = format!("guess {i}: not the passphrase");
        let e = anon.change_passphrase(1, &guess, fresh).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    }
    // One right answer in between does not start the count again...
    anon.unseal(1, CUSTODIANS[0]).await.unwrap();
    for i in 3..5 {
        let e =
            anon.change_passphrase(1, &format!("guess {i}: not the passphrase"), fresh).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    }
    // ...so the next tries from this address are paced: three take at least two seconds.
    let paced = std::time::Instant::now();
    for i in 5..8 {
        let e =
            anon.change_passphrase(1, &format!("guess {i}: not the passphrase"), fresh).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    }
    assert!(paced.elapsed() >= std::time::Duration::from_secs(2), "paced: {:?}", paced.elapsed());
    // The right passphrase is never locked out, only made to wait its turn.
    anon.change_passphrase(1, CUSTODIANS[0], "custodian one: a new passphrase").await.unwrap();
    server.stop().await;
}

/// An identity cannot revoke itself, and the last identity able to administer identities cannot
/// be revoked: two administrators revoking each other at once leave one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_identity_administrator_cannot_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    let e = admin.revoke_identity("key-admin").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("cannot revoke itself"), "{e}");
    let a = server.approved_identity("admin-a", "key-admin").await;
    let b = server.approved_identity("admin-b", "key-admin").await;
    let mut a = server.client_with_token(&a).await;
    let mut b = server.client_with_token(&b).await;
    a.revoke_identity("key-admin").await.unwrap();
    a.revoke_identity("key-admin-2").await.unwrap();
    let (ra, rb) = tokio::join!(a.revoke_identity("admin-b"), b.revoke_identity("admin-a"));
    let oks = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert!(oks <= 1, "both administrators revoked: {ra:?} {rb:?}");
    for r in [&ra, &rb].into_iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(r.code(), Some(Code::FailedPrecondition | Code::Unauthenticated)), "{r}");
    }
    let listed = match a.list_identities().await {
        Ok(l) => l,
        Err(_) => b.list_identities().await.unwrap(),
    };
    let live: Vec<_> =
        listed.into_iter().filter(|i| i.role == "key-admin" && i.revoked_ms.is_none()).collect();
    assert_eq!(live.len(), 1, "{live:?}");
    // The survivor cannot revoke itself either.
    let survivor = if live[0].name == "admin-a" { &mut a } else { &mut b };
    let e = survivor.revoke_identity(&live[0].name).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    server.stop().await;
}

/// A role that may not read a field learns neither whether a record exists nor which fields it
/// holds: the decision comes before the lookup and is made on the fields as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_read_learns_nothing_of_records_or_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let with_email = app.put("oracle-1", [("name", "สมหญิง"), ("email", CANARY_EMAIL)]).await.unwrap();
    let without_email = app.put("oracle-2", [("name", "สมศรี")]).await.unwrap();
    let missing = "00000000-0000-4000-8000-000000000000";
    let mut clerk = server.client_as("billing-clerk").await;
    let email = ["email".to_owned()];
    for id in [with_email.as_str(), without_email.as_str(), missing] {
        let e = clerk.get(id, &email, Some("billing")).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{id}: {e}");
    }
    // Who may read gets NotFound for a record that does not exist, and no error for an asked
    // field the record lacks.
    let mut tester = server.client().await;
    assert_eq!(tester.get(missing, &email, PURPOSE).await.unwrap_err().code(), Some(Code::NotFound));
    assert!(tester.get(&without_email, &email, PURPOSE).await.unwrap().fields.is_empty());
    // Updates too: refused before the record is looked up.
    let e = clerk.update(missing, [("name", "x")], &[]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    server.stop().await;
}

/// A stored record that no longer decodes (damage on disk) answers DataLoss naming the record,
/// not Internal, and the refusal is on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_record_is_data_loss_naming_it() {
    sled_only!("damages a record in sled's tree");
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let id = server.client().await.put("damaged", [("age", "30")]).await.unwrap();
    server.stop().await;
    {
        let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
        let key = [b"r".as_slice(), id.as_bytes()].concat();
        store.vault_tree_for_tests().insert(key, &b"\xff\xfe not a record"[..]).unwrap();
        store.flush_now().await.unwrap();
    }
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let e = c.get(&id, &[], PURPOSE).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
    assert!(e.to_string().contains(&id), "{e}");
    assert_eq!(c.list("damaged").await.unwrap_err().code(), Some(Code::DataLoss));
    let logged = server.audit_entries().into_iter().filter(|e| e.outcome == "DataLoss").count();
    assert_eq!(logged, 2);
    server.stop().await;
}

/// Every response and audit entry carries a request id of the server's own; a caller's
/// `x-request-id` is recorded beside it, so two requests sent with the same id stay two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_the_servers_and_the_callers_is_kept_beside() {
    use khlang_proto::pb;
    let dir = tempfile::tempdir().unwrap();
    // Repeated unauthenticated calls are counted, not written, within an interval
    // (`unauthenticated_floods_are_counted_not_written`); here each is written.
    let options = khlang_server::VaultOptions {
        audit_repeat_interval: std::time::Duration::ZERO,
        ..TestServer::options(dir.path())
    };
    let server = TestServer::start_with(dir.path(), options).await;
    let id = server.client().await.put("rid", [("age", "30")]).await.unwrap();
    let mut raw = pb::records_client::RecordsClient::connect(server.url()).await.unwrap();
    let mut operator = pb::operator_client::OperatorClient::connect(server.url()).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut req = tonic::Request::new(pb::GetRecordRequest {
            record_id: id.clone(),
            purpose: "service_delivery".into(),
            ..Default::default()
        });
        req.metadata_mut().insert("authorization", format!("Bearer {}", server.token).parse().unwrap());
        req.metadata_mut().insert("x-request-id", "same-id-twice".parse().unwrap());
        let resp = raw.get_record(req).await.unwrap();
        seen.push(resp.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned());
        let mut req = tonic::Request::new(pb::SealStatusRequest {});
        req.metadata_mut().insert("x-request-id", "same-id-twice".parse().unwrap());
        let resp = operator.seal_status(req).await.unwrap();
        seen.push(resp.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned());
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|s| s != "same-id-twice" && s.len() == 36), "{seen:?}");
    let entries: Vec<_> =
        server.audit_entries().into_iter().filter(|e| e.client_request_id == "same-id-twice").collect();
    assert_eq!(entries.len(), 4);
    for e in &entries {
        assert!(seen.contains(&e.request_id), "{e:?}");
    }
    server.stop().await;
}

/// The subject id is personal data too: a read returns it only to a role whose grant names it
/// (masked if the grant masks), and the statistics and postal contractors get none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_roles_granted_the_subject_id_are_shown_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let id = app
        .put("citizen-000991", [("name", "สมใจ ดีมาก"), ("home_address", "1 ถนนราชดำเนิน"), ("age", "41")])
        .await
        .unwrap();
    let stats = server
        .client_as("statistics-contractor")
        .await
        .get(&id, &["age".into()], Some("statistics"))
        .await
        .unwrap();
    assert!(stats.subject_id.expose_secret().is_empty(), "the statistics contractor got a subject id");
    assert_eq!(stats.fields["age"].expose_secret(), "41");
    let postal = server
        .client_as("postal-contractor")
        .await
        .get(&id, &["name".into()], Some("postal_delivery"))
        .await
        .unwrap();
    assert!(postal.subject_id.expose_secret().is_empty());
    // The registration app's grant covers every field, masked: the last four characters show.
    let masked = app.get(&id, &[], Some("contact")).await.unwrap();
    assert_eq!(masked.subject_id.expose_secret(), "**********0991");
    // In full for a role granted it in full.
    assert_eq!(
        server.client().await.get(&id, &[], PURPOSE).await.unwrap().subject_id.expose_secret(),
        "citizen-000991"
    );
    // Asking for it explicitly without a grant refuses the read; writing it as a field is refused.
    let e = server
        .client_as("statistics-contractor")
        .await
        .get(&id, &["subject_id".into()], Some("statistics"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let e = app.put("citizen-000992", [("subject_id", "someone-else")]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    // Who was shown it is on the record: the field list names it.
    let entries: Vec<_> =
        server.audit_entries().into_iter().filter(|e| e.rpc == "GetRecord" && e.outcome == "Ok").collect();
    let named: Vec<(String, bool)> =
        entries.iter().map(|e| (e.identity.clone(), e.fields.iter().any(|f| f == "subject_id"))).collect();
    assert!(
        named.contains(&("statistics-contractor".into(), false))
            && named.contains(&("registration-app".into(), true)),
        "{named:?}"
    );
    server.stop().await;
}

/// Field 1 as bytes (GetRecordRequest has a string there).
#[derive(Clone, PartialEq, prost::Message)]
struct RawBytes {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
}

/// Field 1 as a varint (PutRecordRequest has a string there).
#[derive(Clone, PartialEq, prost::Message)]
struct RawVarint {
    #[prost(uint64, tag = "1")]
    value: u64,
}

/// Messages that do not decode — invalid UTF-8 in a string, a wrong wire type — answer
/// InvalidArgument (not Internal) and are audited like any refused request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_and_audited() {
    use tonic::codegen::http::uri::PathAndQuery;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    // Field 1 of GetRecordRequest is the record id, a string: here bytes that are not UTF-8...
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawBytes, khlang_proto::pb::GetRecordResponse>::default();
    let bad_utf8 = RawBytes { value: vec![0xff, 0xfe, 0xfd] };
    let e = grpc
        .unary(
            tonic::Request::new(bad_utf8),
            PathAndQuery::from_static("/khlang.v1.Records/GetRecord"),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // ...and a varint where a string belongs.
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawVarint, khlang_proto::pb::PutRecordResponse>::default();
    let e = grpc
        .unary(
            tonic::Request::new(RawVarint { value: 7 }),
            PathAndQuery::from_static("/khlang.v1.Records/PutRecord"),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Recorded as the answer goes out (the refusal is written beside it).
    let mut refused = Vec::new();
    for _ in 0..50 {
        refused = server
            .audit_entries()
            .into_iter()
            .filter(|e| e.outcome == "InvalidArgument" && e.reason.contains("does not decode"))
            .map(|e| e.rpc)
            .collect();
        if refused.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    refused.sort();
    assert_eq!(refused, ["GetRecord", "PutRecord"]);
    server.stop().await;
}

/// Roles for the separation-of-duties attacks: a helpdesk that may assign only a postal
/// contractor (needs approval) and an intake clerk (needs none).
fn helpdesk_regulations() -> String {
    format!(
        "{}
[roles.helpdesk]
operations = [\"identity_admin\"]
assigns = [\"postal-contractor\", \"intake\"]
[roles.intake]
operations = [\"write\"]
write_fields = [\"name\"]
",
        test_regulations()
    )
}

/// The key administrator cannot mint a data-protection officer alone: creating a privileged
/// identity only files a request, nobody approves their own, a role may assign only what its
/// `assigns` lists (approving included), two approvals of one request create one identity, a
/// refused request and a revoked requester's request cannot be approved, and every step is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_admin_cannot_create_a_privileged_identity_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("regulations.toml"), helpdesk_regulations()).unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client().await;
    app.put("citizen-sod", [("name", CANARY_NAME_TH)]).await.unwrap();
    let mut admin = server.client_as("key-admin").await;
    let mut helpdesk = server.client_as("helpdesk").await;
    let exists = |list: &[khlang_client::IdentityInfo], name: &str| list.iter().any(|i| i.name == name);

    // A privileged role: a request, no token, no identity.
    let request =
        admin.create_identity("rogue-dpo", "data-protection-officer").await.unwrap().pending().unwrap();
    assert_eq!((request.name.as_str(), request.requested_by.as_str()), ("rogue-dpo", "key-admin"));
    assert!(!exists(&admin.list_identities().await.unwrap(), "rogue-dpo"));
    // Approving one's own request is refused, and recorded as the two-person rule.
    let e = admin.approve_identity(&request.id).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("nobody approves their own request"), "{e}");
    let refused = server.audit_entries().into_iter().rev().find(|e| e.rpc == "ApproveIdentity").unwrap();
    assert_eq!(
        (refused.decision.as_str(), refused.rule.as_str()),
        ("deny", "two-person-rule"),
        "{refused:?}"
    );
    // A role may assign only what `assigns` lists, and approve only that too.
    let e = helpdesk.create_identity("rogue-clerk", "billing-clerk").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("roles.helpdesk.assigns"), "{e}");
    let e = helpdesk.approve_identity(&request.id).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    // Nor can it kill a request it could not approve.
    let e = helpdesk.refuse_identity(&request.id, "not mine to refuse").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let listed = admin.list_identities().await.unwrap();
    assert!(!exists(&listed, "rogue-dpo") && !exists(&listed, "rogue-clerk"), "nothing created");
    assert_eq!(admin.identity_requests().await.unwrap().len(), 1, "the request still waits");
    // A role that reads nothing and administers nothing needs no approval.
    let intake = helpdesk.create_identity("intake-1", "intake").await.unwrap().token().unwrap();
    server.client_with_token(intake.expose_secret()).await.put("citizen-sod", [("name", "x")]).await.unwrap();
    // The loader says the helpdesk changes personal data through the intake role it assigns alone.
    let info = admin.regulations().await.unwrap();
    assert!(
        info.warnings.iter().any(|w| w.contains("role 'helpdesk'") && w.contains("assign alone: intake")),
        "{:?}",
        info.warnings
    );

    // Two approvals at once by a second administrator: one identity, one token.
    let second = server.second_admin().await;
    let (mut s1, mut s2) = (second.clone(), second.clone());
    let (r1, r2) = tokio::join!(s1.approve_identity(&request.id), s2.approve_identity(&request.id));
    let tokens: Vec<_> = [r1, r2].into_iter().filter_map(Result::ok).collect();
    assert_eq!(tokens.len(), 1, "exactly one approval creates the identity");
    let mut dpo = server.client_with_token(tokens[0].expose_secret()).await;
    assert_eq!(dpo.export_subject("citizen-sod").await.unwrap().len(), 2);
    let listed = admin.list_identities().await.unwrap();
    let created = listed.iter().find(|i| i.name == "rogue-dpo").unwrap();
    assert_eq!(created.created_by, "key-admin (approved by key-admin-2)");
    assert!(admin.identity_requests().await.unwrap().is_empty());

    // Refused: it cannot be approved afterwards.
    let mut second = server.second_admin().await;
    let r = admin.create_identity("temp-sec", "security-officer").await.unwrap().pending().unwrap();
    second.refuse_identity(&r.id, "not on the staff list").await.unwrap();
    assert_eq!(second.approve_identity(&r.id).await.unwrap_err().code(), Some(Code::NotFound));
    let entry = server.audit_entries().into_iter().rev().find(|e| e.rpc == "RefuseIdentity").unwrap();
    assert!(entry.reason.contains("not on the staff list") && entry.identity == "key-admin-2", "{entry:?}");
    // The requester may withdraw their own request; it cannot be approved afterwards.
    let r = admin.create_identity("withdrawn-sec", "security-officer").await.unwrap().pending().unwrap();
    admin.refuse_identity(&r.id, "filed by mistake").await.unwrap();
    assert_eq!(second.approve_identity(&r.id).await.unwrap_err().code(), Some(Code::NotFound));
    // The requester is revoked before the approval: the request dies with them.
    let r = second.create_identity("late-sec", "security-officer").await.unwrap().pending().unwrap();
    admin.revoke_identity("key-admin-2").await.unwrap();
    let e = admin.approve_identity(&r.id).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(!exists(&admin.list_identities().await.unwrap(), "late-sec"));

    let rpcs: Vec<(String, String)> = server
        .audit_entries()
        .into_iter()
        .filter(|e| e.rpc.contains("Identit") && e.identity != "operator")
        .map(|e| (e.rpc, e.outcome.as_str().to_owned()))
        .collect();
    for (rpc, outcome) in [
        ("CreateIdentity", "Ok"),
        ("CreateIdentity", "PermissionDenied"),
        ("ApproveIdentity", "PermissionDenied"),
        ("ApproveIdentity", "Ok"),
        ("ApproveIdentity", "NotFound"),
        ("RefuseIdentity", "Ok"),
        ("ApproveIdentity", "FailedPrecondition"),
    ] {
        assert!(rpcs.iter().any(|(r, o)| r == rpc && o == outcome), "{rpc} {outcome} not audited: {rpcs:?}");
    }
    server.stop().await;
}

/// A request waits a bounded time: once expired it cannot be approved and no longer blocks the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_identity_request_cannot_be_approved() {
    let dir = tempfile::tempdir().unwrap();
    let options = khlang_server::VaultOptions {
        identity_request_ttl: std::time::Duration::from_millis(500),
        ..TestServer::options(dir.path())
    };
    let server = TestServer::start_with(dir.path(), options).await;
    let mut admin = server.client_as("key-admin").await;
    let mut second = server.second_admin().await;
    let r = admin.create_identity("slow-clerk", "billing-clerk").await.unwrap().pending().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let e = second.approve_identity(&r.id).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(second.identity_requests().await.unwrap().is_empty());
    assert!(!second.list_identities().await.unwrap().iter().any(|i| i.name == "slow-clerk"));
    let again = admin.create_identity("slow-clerk", "billing-clerk").await.unwrap().pending().unwrap();
    assert_ne!(again.id, r.id);
    second.approve_identity(&again.id).await.unwrap();
    server.stop().await;
}

/// Unauthenticated failures throttle their address but lock nobody out: after twenty bad tokens
/// from one address its failed answers are spaced out, while a valid token from that same address
/// is answered at once, and custodians there still unseal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_failures_throttle_the_address_but_lock_out_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), strict(dir.path(), 5)).await;
    let attacker = ip("127.0.0.5");
    let mut bad = client_from(&server.url(), attacker, Some("khl_not_a_token")).await;
    for _ in 0..6 {
        assert_eq!(bad.list("x").await.unwrap_err().code(), Some(Code::Unauthenticated));
    }
    let started = std::time::Instant::now();
    for _ in 0..4 {
        let code = bad.list("x").await.unwrap_err().code();
        assert!(matches!(code, Some(Code::Unauthenticated)), "{code:?}");
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1400),
        "throttled: {:?}",
        started.elapsed()
    );
    let mut good = client_from(&server.url(), attacker, Some(&server.token)).await;
    let started = std::time::Instant::now();
    good.put("throttle", [("age", "30")]).await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_millis(400), "a valid token is not held back");
    server.stop().await;
}

/// A real token's id with wrong secrets locks that token (from any address), not another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_for_a_real_token_lock_that_token_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), strict(dir.path(), 3)).await;
    let real = server.token.clone();
    let (id, secret) = real.trim_start_matches("khl_").split_once('_').unwrap();
    let forged = format!("khl_{id}_{}", "0".repeat(secret.len()));
    for (n, from) in ["127.0.0.10", "127.0.0.11", "127.0.0.12"].into_iter().enumerate() {
        let e = client_from(&server.url(), ip(from), Some(&forged)).await.list("x").await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated), "try {n}: {e}");
    }
    let e = server.client().await.list("x").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "the real token is locked: {e}");
    let mut other = server.client_as("registration-app").await;
    other.list("x").await.unwrap();
    server.stop().await;
}

/// A flood of unauthenticated calls writes at most a first entry and a summary per address, RPC,
/// outcome and interval, and the summaries' counts add up to every call made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_floods_are_counted_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let options = khlang_server::VaultOptions {
        audit_repeat_interval: std::time::Duration::from_millis(300),
        ..TestServer::options(dir.path())
    };
    let server = TestServer::start_with(dir.path(), options).await;
    let before = server.audit_entries().len();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let url = server.url();
        tasks.push(tokio::spawn(async move {
            let mut status = client_from(&url, ip("127.0.0.20"), None).await;
            let mut bad = client_from(&url, ip("127.0.0.21"), Some("khl_garbage")).await;
            for _ in 0..250 {
                status.seal_status().await.unwrap();
            }
            for _ in 0..if t == 0 { 100 } else { 0 } {
                bad.list("x").await.unwrap_err();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    client_from(&server.url(), ip("127.0.0.22"), None).await.seal_status().await.unwrap();
    let elapsed_intervals = started.elapsed().as_millis() as usize / 300 + 2;
    let counted = |rpc: &str, peer: &str| {
        let entries = server.audit_entries();
        let mine: Vec<_> =
            entries[before..].iter().filter(|e| e.rpc == rpc && e.peer.starts_with(peer)).cloned().collect();
        (mine.len(), mine.iter().map(|e| if e.repeated > 0 { e.repeated } else { 1 }).sum::<u64>())
    };
    let mut waited = 0;
    while (counted("SealStatus", "127.0.0.20").1, counted("ListRecords", "127.0.0.21").1) != (1000, 100) {
        assert!(
            waited < 50,
            "counts never added up: {:?} {:?}",
            counted("SealStatus", "127.0.0.20"),
            counted("ListRecords", "127.0.0.21")
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += 1;
    }
    let (written, total) = counted("SealStatus", "127.0.0.20");
    assert_eq!(total, 1000);
    assert!(
        written <= 2 * elapsed_intervals,
        "{written} entries for 1000 calls over {elapsed_intervals} intervals"
    );
    assert!(counted("ListRecords", "127.0.0.21").0 <= 2 * elapsed_intervals);
    assert_eq!(counted("SealStatus", "127.0.0.22"), (1, 1), "another address is another event, written");
    let summary = server.audit_entries().into_iter().find(|e| e.repeated > 0).unwrap();
    assert!(summary.reason.contains("more like this from 127.0.0."), "{summary:?}");
    server.stop().await;
}

/// An administrator cannot fill the store with requests: at most 256 wait at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_requests_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    for i in 0..khlang_server::vault::identities::MAX_PENDING_REQUESTS {
        admin.create_identity(&format!("clerk-{i}"), "billing-clerk").await.unwrap().pending().unwrap();
    }
    let e = admin.create_identity("one-too-many", "billing-clerk").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    // A second request for a name already waiting is refused too.
    let e = admin.create_identity("clerk-0", "billing-clerk").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::AlreadyExists), "{e}");
    assert_eq!(
        admin.identity_requests().await.unwrap().len(),
        khlang_server::vault::identities::MAX_PENDING_REQUESTS
    );
    server.stop().await;
}
