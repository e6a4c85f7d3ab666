//! The municipality's regulations, enforced end to end over gRPC: who may read which field for
//! which purpose, masking, consent, identities, reload, data-subject rights.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::collections::BTreeMap;

use khlang_client::{Client, Code};
use khlang_server::VaultOptions;
use khlang_server::policy::regulations::{Regulations, SAMPLE};
use khlang_tests::*;

/// Every field of the catalogue, with a valid value.
const RECORD: &[(&str, &str)] = &[
    ("name", "สมชาย ใจดี"),
    ("email", "somchai@example.go.th"),
    ("home_address", "99 ถนนราชดำเนิน นครศรีธรรมราช"),
    ("work_address", "1 ศาลากลาง นครศรีธรรมราช"),
    ("postal_code", "80000"),
    ("phone", "0812345678"),
    ("sex", "male"),
    ("age", "42"),
    ("preferences", "ภาษาไทย"),
    ("interests", "ดนตรี"),
    ("card_number", "4111111111111111"),
    ("billing_address", "99 Ratchadamnoen Rd"),
    ("ip_address", "203.0.113.7"),
    ("browser", "Firefox"),
    ("domain", "example.go.th"),
    ("pages_visited", "/news,/tax"),
    ("access_time", "2026-11-29T10:15:00+07:00"),
    ("referrer", "https://www.example.go.th/"),
    ("national_id", "1101700203450"),
];

const PURPOSES: &[&str] = &[
    "service_delivery",
    "contact",
    "public_relations",
    "news",
    "opinion_survey",
    "billing",
    "postal_delivery",
    "statistics",
    "marketing",
    "third_party_disclosure",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Full,
    Masked,
    Deny,
}

/// The table, written out independently of the TOML.
fn expected(identity: &str, purpose: &str, field: &str, marketing_consent: bool) -> Expect {
    use Expect::*;
    let grant = |purposes: &[&str], fields: &[&str], how: Expect| {
        if purposes.contains(&purpose) && (fields.is_empty() || fields.contains(&field)) { how } else { Deny }
    };
    match identity {
        "registration-app" => grant(&["service_delivery", "contact"], &[], Masked),
        "billing-clerk" => grant(&["billing"], &["card_number", "billing_address"], Full),
        "postal-contractor" => {
            grant(&["postal_delivery"], &["name", "home_address", "work_address", "postal_code"], Full)
        }
        "statistics-contractor" => grant(
            &["statistics"],
            &["age", "sex", "preferences", "interests", "browser", "pages_visited"],
            Full,
        ),
        "marketing-officer" if marketing_consent => grant(&["marketing"], &["name", "email"], Full),
        _ => Deny,
    }
}

async fn sample_server(dir: &std::path::Path) -> TestServer {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("regulations.toml"), SAMPLE).unwrap();
    TestServer::start(dir).await
}

const IDENTITIES: &[&str] = &[
    "registration-app",
    "billing-clerk",
    "postal-contractor",
    "statistics-contractor",
    "marketing-officer",
    "security-officer",
    "key-admin",
    "data-protection-officer",
];

async fn check_table(server: &TestServer, id: &str, consent: bool) -> usize {
    let plain: BTreeMap<&str, &str> = RECORD.iter().copied().collect();
    let mut checked = 0;
    for identity in IDENTITIES {
        let mut c = server.client_as(identity).await;
        for purpose in PURPOSES {
            for (field, value) in RECORD {
                let result = c.get(id, &[(*field).to_owned()], Some(purpose)).await;
                let want = expected(identity, purpose, field, consent);
                let ctx = format!("{identity} reading {field} for {purpose}");
                match (want, result) {
                    (Expect::Deny, Err(e)) => {
                        assert_eq!(e.code(), Some(Code::PermissionDenied), "{ctx}: {e}");
                        let m = e.to_string();
                        assert!(
                            m.contains(&format!("field '{field}'"))
                                || m.contains("may not read")
                                || m.contains("consent"),
                            "{ctx}: the refusal should say why: {m}"
                        );
                    }
                    (Expect::Full, Ok(r)) => {
                        assert_eq!(r.fields[*field].expose_secret(), plain[field], "{ctx}")
                    }
                    (Expect::Masked, Ok(r)) => {
                        let shown = r.fields[*field].expose_secret();
                        assert_ne!(shown, *value, "{ctx}: should be masked");
                        assert!(!shown.contains(value), "{ctx}: mask shows the value: {shown}");
                    }
                    (want, got) => panic!("{ctx}: expected {want:?}, got {got:?}"),
                }
                checked += 1;
            }
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_regulations_table() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let id = app.put("citizen-1", RECORD.iter().copied()).await.unwrap();

    // Without consent to marketing, then with it.
    assert_eq!(check_table(&server, &id, false).await, IDENTITIES.len() * PURPOSES.len() * RECORD.len());
    app.set_consent("citizen-1", "marketing", true).await.unwrap();
    check_table(&server, &id, true).await;

    // The exact masks the policy promises.
    let masked = app.get(&id, &["card_number".into(), "email".into()], Some("contact")).await.unwrap();
    assert_eq!(masked.fields["card_number"].expose_secret(), "411111******1111");
    assert_eq!(masked.fields["email"].expose_secret(), "s***@example.go.th");
    let mut clerk = server.client_as("billing-clerk").await;
    let full = clerk.get(&id, &["card_number".into()], Some("billing")).await.unwrap();
    assert_eq!(full.fields["card_number"].expose_secret(), "4111111111111111");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_whole_and_precise() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let id = app.put("citizen-2", RECORD.iter().copied()).await.unwrap();

    let mut postal = server.client_as("postal-contractor").await;
    // One forbidden field refuses the whole read, naming the field.
    let e =
        postal.get(&id, &["name".into(), "card_number".into()], Some("postal_delivery")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert!(e.to_string().contains("field 'card_number'"), "{e}");
    // "Every field" means every field the record holds, so it is refused too.
    let e = postal.get(&id, &[], Some("postal_delivery")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    // Not for marketing, and not the email.
    for (fields, purpose) in [(vec!["name"], "marketing"), (vec!["email"], "postal_delivery")] {
        let fields: Vec<String> = fields.into_iter().map(str::to_owned).collect();
        let e = postal.get(&id, &fields, Some(purpose)).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    }
    // Allowed: exactly the granted fields.
    let ok = postal.get(&id, &["name".into(), "postal_code".into()], Some("postal_delivery")).await.unwrap();
    assert_eq!(ok.fields.len(), 2);

    // A read states a purpose, one the regulations know.
    let e = postal.get(&id, &["name".into()], None).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("purpose"), "{e}");
    let e = postal.get(&id, &["name".into()], Some("curiosity")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("unknown purpose 'curiosity'"), "{e}");

    // Operations by role: writers, readers, administrators stay in their lanes.
    let scratch = app.put("scratch", [("age", "30")]).await.unwrap();
    for identity in ["billing-clerk", "postal-contractor", "statistics-contractor", "marketing-officer"] {
        let mut c = server.client_as(identity).await;
        assert_eq!(c.put("x", [("age", "1")]).await.unwrap_err().code(), Some(Code::PermissionDenied));
        assert_eq!(c.delete(&scratch).await.unwrap_err().code(), Some(Code::PermissionDenied));
        assert_eq!(c.export_subject("citizen-2").await.unwrap_err().code(), Some(Code::PermissionDenied));
        assert_eq!(c.list("citizen-2").await.unwrap_err().code(), Some(Code::PermissionDenied));
    }
    for identity in ["security-officer", "key-admin"] {
        let mut c = server.client_as(identity).await;
        assert_eq!(c.put("x", [("age", "1")]).await.unwrap_err().code(), Some(Code::PermissionDenied));
        assert_eq!(c.export_subject("citizen-2").await.unwrap_err().code(), Some(Code::PermissionDenied));
        assert_eq!(c.erase_subject("citizen-2").await.unwrap_err().code(), Some(Code::PermissionDenied));
        assert_eq!(
            c.set_consent("citizen-2", "marketing", true).await.unwrap_err().code(),
            Some(Code::PermissionDenied)
        );
    }
    let mut sec = server.client_as("security-officer").await;
    assert_eq!(
        sec.create_identity("evil", "billing-clerk").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    assert_eq!(app.erase_subject("citizen-2").await.unwrap_err().code(), Some(Code::PermissionDenied));
    assert_eq!(
        app.create_identity("evil", "billing-clerk").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    // The record is intact after all that.
    assert_eq!(app.get(&id, &[], Some("contact")).await.unwrap().fields.len(), RECORD.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_withdrawal_is_enforced_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let mut marketing = server.client_as("marketing-officer").await;
    let id = app.put("citizen-3", [("name", "สมศรี"), ("email", "somsri@example.go.th")]).await.unwrap();
    let read = |c: &mut Client| {
        let mut c = c.clone();
        let id = id.clone();
        async move { c.get(&id, &["name".into(), "email".into()], Some("marketing")).await }
    };

    let e = read(&mut marketing).await.unwrap_err();
    assert!(e.to_string().contains("needs the data subject's consent"), "{e}");
    app.set_consent("citizen-3", "marketing", true).await.unwrap();
    assert_eq!(read(&mut marketing).await.unwrap().fields["email"].expose_secret(), "somsri@example.go.th");
    app.set_consent("citizen-3", "marketing", false).await.unwrap();
    assert_eq!(read(&mut marketing).await.unwrap_err().code(), Some(Code::PermissionDenied));

    let (current, history) = app.consent("citizen-3").await.unwrap();
    assert_eq!(current.len(), 1);
    assert!(!current[0].granted);
    assert_eq!(current[0].recorded_by, "registration-app");
    assert_eq!(history.iter().map(|c| c.granted).collect::<Vec<_>>(), [true, false]);
    // Consent for a purpose the regulations do not know is refused.
    let e = app.set_consent("citizen-3", "astrology", true).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_erase_a_subject() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let a = app.put("citizen-4", RECORD.iter().copied()).await.unwrap();
    let b = app.put("citizen-4", [("phone", "0899999999")]).await.unwrap();
    let other = app.put("citizen-5", [("phone", "0811111111")]).await.unwrap();

    let mut dpo = server.client_as("data-protection-officer").await;
    let mut exported = dpo.export_subject("citizen-4").await.unwrap();
    exported.sort_by_key(|r| if r.record_id == a { 0 } else { 1 });
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[0].record_id, a);
    assert_eq!(exported[0].fields.len(), RECORD.len());
    for (field, value) in RECORD {
        assert_eq!(exported[0].fields[*field].expose_secret(), *value, "{field} in full");
    }
    assert_eq!(exported[1].fields["phone"].expose_secret(), "0899999999");

    assert_eq!(dpo.erase_subject("citizen-4").await.unwrap(), 2);
    for id in [&a, &b] {
        assert_eq!(app.get(id, &[], Some("contact")).await.unwrap_err().code(), Some(Code::NotFound));
    }
    assert!(dpo.list("citizen-4").await.unwrap().is_empty());
    assert!(dpo.export_subject("citizen-4").await.unwrap().is_empty());
    assert_eq!(app.get(&other, &[], Some("contact")).await.unwrap().fields.len(), 1, "others untouched");
    server.stop().await;

    // On disk: the records, and with them their wrapped data keys, are gone.
    let store = open_store(dir.path()).await;
    assert!(store.get_record(&a).await.unwrap().is_none());
    assert!(store.get_record(&b).await.unwrap().is_none());
    assert!(store.get_record(&other).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_revocation_and_impersonation() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let id = app.put("citizen-6", RECORD.iter().copied()).await.unwrap();
    let mut admin = server.client_as("key-admin").await;

    let token = server.approved_identity("billing-clerk-2", "billing-clerk").await;
    let mut clerk2 = server.client_with_token(&token).await;
    let r = clerk2.get(&id, &["card_number".into()], Some("billing")).await.unwrap();
    assert_eq!(r.fields["card_number"].expose_secret(), "4111111111111111");
    let listed = admin.list_identities().await.unwrap();
    let entry = listed.iter().find(|i| i.name == "billing-clerk-2").unwrap();
    assert_eq!(
        (entry.role.as_str(), entry.created_by.as_str(), entry.revoked_ms),
        ("billing-clerk", "key-admin (approved by key-admin-2)", None)
    );
    assert_eq!(
        admin.create_identity("billing-clerk-2", "billing-clerk").await.unwrap_err().code(),
        Some(Code::AlreadyExists)
    );
    assert_eq!(admin.create_identity("x", "overlord").await.unwrap_err().code(), Some(Code::InvalidArgument));

    admin.revoke_identity("billing-clerk-2").await.unwrap();
    let e = clerk2.get(&id, &["card_number".into()], Some("billing")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated), "a revoked token is refused at once");
    assert!(
        admin
            .list_identities()
            .await
            .unwrap()
            .iter()
            .any(|i| i.name == "billing-clerk-2" && i.revoked_ms.is_some())
    );

    // A role or identity claimed in metadata is ignored: the token alone decides.
    let mut raw = khlang_proto::pb::records_client::RecordsClient::connect(server.url()).await.unwrap();
    let mut req = tonic::Request::new(khlang_proto::pb::GetRecordRequest {
        record_id: id.clone(),
        fields: vec!["card_number".into()],
        purpose: "billing".into(),
    });
    let postal_token = &server.tokens["postal-contractor"];
    req.metadata_mut().insert("authorization", format!("Bearer {postal_token}").parse().unwrap());
    for key in ["x-khlang-role", "role", "x-role", "x-khlang-identity", "identity"] {
        req.metadata_mut().insert(key, "billing-clerk".parse().unwrap());
    }
    assert_eq!(raw.get_record(req).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_rules_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let server = sample_server(dir.path()).await;
    let mut admin = server.client_as("key-admin").await;
    let mut app = server.client_as("registration-app").await;
    let mut clerk = server.client_as("billing-clerk").await;
    let id = app.put("citizen-7", RECORD.iter().copied()).await.unwrap();
    let before = admin.regulations().await.unwrap();
    assert_eq!(before.version, Regulations::parse(SAMPLE).unwrap().version);

    // A typo in a purpose: refused, with the role and key named; the old rules still apply.
    let broken = SAMPLE.replace("purposes = [\"billing\"]", "purposes = [\"biling\"]");
    std::fs::write(&server.regulations_path, &broken).unwrap();
    let e = admin.reload_regulations().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(e.to_string().contains("roles.billing-clerk.read[0].purposes: unknown purpose 'biling'"), "{e}");
    assert_eq!(admin.regulations().await.unwrap().version, before.version);
    assert!(clerk.get(&id, &["card_number".into()], Some("billing")).await.is_ok());
    std::fs::write(&server.regulations_path, "this is [not toml").unwrap();
    assert_eq!(admin.reload_regulations().await.unwrap_err().code(), Some(Code::InvalidArgument));

    // Only a regulations administrator may reload.
    assert_eq!(app.reload_regulations().await.unwrap_err().code(), Some(Code::PermissionDenied));

    // A valid change takes effect at once: the clerk loses the billing address.
    let changed =
        SAMPLE.replace("fields = [\"card_number\", \"billing_address\"]", "fields = [\"card_number\"]");
    std::fs::write(&server.regulations_path, &changed).unwrap();
    let after = admin.reload_regulations().await.unwrap();
    assert_ne!(after.version, before.version);
    assert_eq!(after.version, Regulations::parse(&changed).unwrap().version);
    let e = clerk.get(&id, &["billing_address".into()], Some("billing")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert!(clerk.get(&id, &["card_number".into()], Some("billing")).await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_slow_uniform_and_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut options: VaultOptions = TestServer::options(dir.path());
    options.auth.max_failures = 4;
    let server = TestServer::start_with(dir.path(), options).await;
    let good = server.tokens["tester"].clone();
    let mut forged = good.clone();
    forged.replace_range(good.len() - 4.., "0000");
    let unknown_id = format!("khl_{}_{}", "0".repeat(16), "ab".repeat(32));
    for bad in ["not-a-token", unknown_id.as_str(), forged.as_str()] {
        let mut c = server.client_with_token(bad).await;
        let t = std::time::Instant::now();
        let e = c.list("anyone").await.unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.code(), Some(Code::Unauthenticated));
        assert!(took >= khlang_server::api::FAILED_AUTH_FLOOR, "{bad}: answered after {took:?}");
    }
    // The fourth failure of this address does not lock it out: a valid token from it still works.
    let mut c = server.client_with_token("khl_nope").await;
    assert_eq!(c.list("anyone").await.unwrap_err().code(), Some(Code::Unauthenticated));
    let mut ok = server.client().await;
    ok.list("anyone").await.unwrap();
    // The forged secret counted against the real token: three more and that token is locked.
    for _ in 0..3 {
        let mut c = server.client_with_token(&forged).await;
        assert_eq!(c.list("anyone").await.unwrap_err().code(), Some(Code::Unauthenticated));
    }
    let e = ok.list("anyone").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("this credential is locked"), "{e}");
    server.stop().await;
}

/// The vault remembers the regulations it is under: started with a file that differs it is
/// refused, both versions named; started without a file it takes its own (not the built-in
/// sample); with `regulations_changed` (`--regulations-changed`) it starts under its own and,
/// once unsealed, puts the file in force by an audited reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_remembers_its_regulations_and_a_change_must_be_said() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let before = server.vault().regulations().version.clone();
    server.stop().await;
    let changed = test_regulations()
        .replace("fields = [\"card_number\", \"billing_address\"]", "fields = [\"card_number\"]");
    std::fs::write(dir.path().join("regulations.toml"), &changed).unwrap();
    let after = Regulations::parse(&changed).unwrap().version;

    let refused =
        khlang_server::Vault::open_sealed(dir.path(), &TestServer::options(dir.path())).await.unwrap_err();
    let message = refused.to_string();
    assert!(message.contains(&before) && message.contains(&after), "{message}");
    assert!(message.contains("--regulations-changed"), "says how to say so: {message}");

    let mut no_file = TestServer::options(dir.path());
    no_file.regulations_path = None;
    no_file.regulations = std::sync::Arc::new(Regulations::sample());
    let vault = khlang_server::Vault::open_sealed(dir.path(), &no_file).await.unwrap();
    assert_eq!(vault.regulations().version, before, "its own, not the sample");
    drop(vault);
    // sled lets go of its folder once the vault is dropped; the next open waits for that.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let mut said = TestServer::options(dir.path());
    said.regulations_changed = true;
    let server = TestServer::start_with(dir.path(), said).await;
    assert_eq!(server.vault().regulations().version, after, "in force once unsealed");
    let reload =
        server.audit_entries().into_iter().find(|e| e.rpc == "SIGHUP").expect("the reload is audited");
    assert_eq!((reload.identity.as_str(), reload.outcome.name()), ("operator", "Ok"));
    assert!(reload.reason.contains(&after), "{}", reload.reason);
    server.stop().await;
    // And it is remembered: the changed file now starts without the flag.
    let server = TestServer::start(dir.path()).await;
    assert_eq!(server.vault().regulations().version, after);
    server.stop().await;
}
