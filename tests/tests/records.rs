//! Records over real gRPC: round trips through the client library, and every guarded bad input
//! answered with the right status while stored data stays unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use khlang_client::{Client, Code};
use khlang_proto::pb;
use khlang_server::{Limits, VaultOptions};
use khlang_tests::*;

fn values(record: &khlang_client::Record) -> BTreeMap<String, String> {
    record.fields.iter().map(|(k, v)| (k.clone(), v.expose_secret().to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;

    let id = c.put("citizen-001", canary_fields()).await.unwrap();
    let got = c.get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(got.record_id, id);
    assert_eq!(got.subject_id.expose_secret(), "citizen-001");
    let expected: BTreeMap<String, String> =
        canary_fields().into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    assert_eq!(values(&got), expected);

    // A subset, with a field the record does not hold simply absent.
    let some = c.get(&id, &["email".into(), "phone".into()], PURPOSE).await.unwrap();
    assert_eq!(values(&some), BTreeMap::from([("email".to_owned(), CANARY_EMAIL.to_owned())]));

    // Values are canonicalised by their validators.
    let names = c.update(&id, [("phone", "+66 81-234-5678")], &["email".to_owned()]).await.unwrap();
    assert_eq!(names, ["card_number", "home_address", "name", "phone"]);
    let after = c.get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(after.fields["phone"].expose_secret(), "+66812345678");
    assert!(!after.fields.contains_key("email"));

    let second = c.put("citizen-001", [("postal_code", "80000")]).await.unwrap();
    c.put("citizen-002", [("postal_code", "80000")]).await.unwrap();
    let mut listed = c.list("citizen-001").await.unwrap();
    listed.sort_by(|a, b| a.record_id.cmp(&b.record_id));
    let mut want = vec![
        khlang_client::RecordSummary {
            record_id: id.clone(),
            field_names: vec!["card_number".into(), "home_address".into(), "name".into(), "phone".into()],
        },
        khlang_client::RecordSummary { record_id: second.clone(), field_names: vec!["postal_code".into()] },
    ];
    want.sort_by(|a, b| a.record_id.cmp(&b.record_id));
    assert_eq!(listed, want);

    c.delete(&id).await.unwrap();
    assert_eq!(c.get(&id, &[], PURPOSE).await.unwrap_err().code(), Some(Code::NotFound));
    assert_eq!(c.delete(&id).await.unwrap_err().code(), Some(Code::NotFound));
    assert_eq!(c.list("citizen-001").await.unwrap().len(), 1);
    server.stop().await;
}

async fn expect(code: Code, needle: &str, result: Result<impl std::fmt::Debug, khlang_client::ClientError>) {
    let err = result.expect_err("request should have been refused");
    assert_eq!(err.code(), Some(code), "{err}");
    assert!(err.to_string().contains(needle), "'{err}' should mention '{needle}'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_message_bytes: 64 * 1024,
        max_fields_per_record: 4,
        max_field_bytes: 1024,
        ..Limits::default()
    };
    let server =
        TestServer::start_with(dir.path(), VaultOptions { limits, ..TestServer::options(dir.path()) }).await;
    let mut c = server.client().await;
    let id = c.put("subject-a", [("name", "สมชาย ใจดี"), ("card_number", CANARY_CARD)]).await.unwrap();
    let before = values(&c.get(&id, &[], PURPOSE).await.unwrap());

    let s = "subject-a";
    expect(Code::InvalidArgument, "unknown field 'shoe_size'", c.put(s, [("shoe_size", "42")]).await).await;
    expect(Code::InvalidArgument, "Luhn", c.put(s, [("card_number", "4111111111111112")]).await).await;
    expect(Code::InvalidArgument, "13 to 19 digits", c.put(s, [("card_number", "41111111")]).await).await;
    expect(Code::InvalidArgument, "check digit", c.put(s, [("national_id", "1101700203451")]).await).await;
    expect(Code::InvalidArgument, "PCI DSS 3.3.1", c.put(s, [("name", "x"), ("cvv", "123")]).await).await;
    expect(Code::InvalidArgument, "PCI DSS 3.3.1", c.put(s, [("track_data", "B4111")]).await).await;
    expect(Code::InvalidArgument, "email", c.put(s, [("email", "not-an-email")]).await).await;
    expect(Code::ResourceExhausted, "larger than 1024 bytes", c.put(s, [("name", "ก".repeat(400))]).await)
        .await;
    let five = [("name", "a"), ("email", "a@b.co"), ("sex", "male"), ("age", "30"), ("postal_code", "80000")];
    expect(Code::ResourceExhausted, "at most 4", c.put(s, five).await).await;
    expect(Code::OutOfRange, "message length too large", c.put(s, [("name", "x".repeat(70 * 1024))]).await)
        .await;
    expect(Code::InvalidArgument, "subject_id is empty", c.put("", [("name", "a")]).await).await;
    expect(Code::InvalidArgument, "subject_id is empty", c.put("   ", [("name", "a")]).await).await;
    expect(Code::InvalidArgument, "at least one field", c.put(s, Vec::<(String, String)>::new()).await).await;
    expect(Code::InvalidArgument, "given twice", c.put(s, [("name", "a"), ("name", "b")]).await).await;
    // Errors never echo a value back.
    let err = c.put(s, [("card_number", "4111111111111112")]).await.unwrap_err();
    assert!(!err.to_string().contains("4111111111111112"));

    // Updates: refused whole, record unchanged.
    expect(Code::InvalidArgument, "Luhn", c.update(&id, [("card_number", "4111111111111112")], &[]).await)
        .await;
    expect(Code::InvalidArgument, "PCI DSS", c.update(&id, [("cvc2", "999")], &[]).await).await;
    let three = [("email", "a@b.co"), ("sex", "male"), ("age", "30")];
    expect(Code::ResourceExhausted, "at most 4", c.update(&id, three, &[]).await).await;
    expect(
        Code::InvalidArgument,
        "remove every field",
        c.update(&id, Vec::<(String, String)>::new(), &["name".into(), "card_number".into()]).await,
    )
    .await;
    expect(
        Code::InvalidArgument,
        "both set and removed",
        c.update(&id, [("name", "n")], &["name".into()]).await,
    )
    .await;
    expect(Code::InvalidArgument, "not a record id", c.get("../../etc/passwd", &[], PURPOSE).await).await;
    expect(
        Code::NotFound,
        "record not found",
        c.get("00000000-0000-4000-8000-000000000000", &[], PURPOSE).await,
    )
    .await;
    expect(
        Code::NotFound,
        "record not found",
        c.update("00000000-0000-4000-8000-000000000000", [("name", "n")], &[]).await,
    )
    .await;
    expect(Code::InvalidArgument, "unknown field", c.get(&id, &["password".into()], PURPOSE).await).await;

    // Authentication: no token, an empty one, a forged one, a malformed one.
    let mut raw = pb::records_client::RecordsClient::connect(server.url()).await.unwrap();
    let no_token = raw.get_record(pb::GetRecordRequest { record_id: id.clone(), ..Default::default() }).await;
    assert_eq!(no_token.unwrap_err().code(), tonic::Code::Unauthenticated);
    let no_token_put = raw
        .put_record(pb::PutRecordRequest {
            subject_id: s.into(),
            fields: vec![pb::Field { name: "name".into(), value: "intruder".into() }],
        })
        .await;
    assert_eq!(no_token_put.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut forged = server.token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    for bad in [forged.as_str(), "", "khl_nope", "Bearer", &server.token.replace("khl_", "khl_0")] {
        let mut bad_client = Client::connect(&server.url(), bad).await.unwrap();
        expect(Code::Unauthenticated, "bearer token", bad_client.get(&id, &[], PURPOSE).await).await;
        expect(Code::Unauthenticated, "bearer token", bad_client.put(s, [("name", "intruder")]).await).await;
        expect(Code::Unauthenticated, "bearer token", bad_client.delete(&id).await).await;
    }

    // Nothing changed: still exactly one record with the same values.
    let listed = c.list(s).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(values(&c.get(&id, &[], PURPOSE).await.unwrap()), before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.client().await;
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                ids.push(c.put(&format!("s-{w}-{i}"), [("age", "40")]).await.unwrap());
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 320);
    let stats = server.vault().flush_stats();
    let (flushes, writes) = (stats.flushes.load(Relaxed), stats.writes.load(Relaxed));
    assert!(writes >= 321, "every put (and the token) waited for a flush: {writes}");
    assert!(
        flushes < writes,
        "concurrent writers should share flushes: {flushes} flushes for {writes} writes"
    );
    let mut c = client.clone();
    for id in all.iter().step_by(17) {
        assert_eq!(c.get(id, &[], PURPOSE).await.unwrap().fields["age"].expose_secret(), "40");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_one_record_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.client().await;
    let id = client.clone().put("busy-subject", [("age", "1")]).await.unwrap();
    let fields = ["name", "email", "phone", "postal_code", "sex", "interests", "preferences", "browser"];
    let values = ["ชื่อ", "x@example.go.th", "0812345678", "80000", "other", "ดนตรี", "กีฬา", "Firefox"];
    let mut tasks = Vec::new();
    for (f, v) in fields.into_iter().zip(values) {
        let mut c = client.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                c.update(&id, [(f, v)], &[]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let record = client.clone().get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(record.fields.len(), 9, "every concurrent update kept: {:?}", record.fields.keys());
    for (f, v) in fields.into_iter().zip(values) {
        assert_eq!(record.fields[f].expose_secret(), v);
    }
    server.stop().await;
}

/// Group commit (issue 26): 64 requests updating one record at once, committed in groups. Each
/// member that read a version another member of its group (or an earlier group) replaced is sent
/// back to read again, so none is lost: every field set is there, every update has its own `Ok`
/// entry, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_updates_of_one_record_lose_none() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.client().await;
    let id = client.clone().put("hot-subject", [("age", "1")]).await.unwrap();
    let fields = ["name", "email", "phone", "postal_code", "sex", "interests", "preferences", "browser"];
    let mut tasks = Vec::new();
    for k in 0..64 {
        let mut c = client.clone();
        let id = id.clone();
        let field = fields[k % fields.len()];
        tasks.push(tokio::spawn(async move {
            // Each task's own value: the field ends with one of its writers' values.
            let value = if field == "email" { format!("w{k}@example.go.th") } else { format!("{k}") };
            let value = match field {
                "phone" => format!("08123456{k:02}"),
                "postal_code" => format!("800{k:02}"),
                "sex" => "other".to_owned(),
                _ => value,
            };
            for _ in 0..3 {
                c.update(&id, [(field, value.as_str())], &[]).await.unwrap();
            }
            (field, value)
        }));
    }
    let mut written: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for t in tasks {
        let (field, value) = t.await.unwrap();
        written.entry(field).or_default().push(value);
    }
    let record = client.clone().get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(record.fields.len(), 9, "every field set is kept: {:?}", record.fields.keys());
    for (field, values) in &written {
        let now = record.fields[*field].expose_secret();
        assert!(values.iter().any(|v| v == now), "{field} holds a value one of its writers set");
    }
    let updates = server
        .vault()
        .audit_entries(khlang_server::AuditGrant::unaudited_for_tests(Default::default()))
        .map(Result::unwrap)
        .filter(|e| e.rpc == "UpdateRecord" && e.outcome.as_str() == "Ok")
        .count();
    assert_eq!(updates, 64 * 3, "one Ok entry per update");
    let verified = server.vault().verify_audit_now().await.unwrap();
    assert!(verified.first_break.is_none(), "{verified:?}");
    server.stop().await;
}
