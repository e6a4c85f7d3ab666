//! The vault on PostgreSQL, over real gRPC: a throwaway cluster per test (see
//! `khlang_server::storage::test_postgres`), skipped loudly without server binaries, a failure
//! with `KHLANG_REQUIRE_POSTGRES=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::Code;
use khlang_server::storage::test_postgres::TestPostgres;
use khlang_server::storage::{PG_SCHEMA_VERSION, PgStore};
use khlang_server::{StorageLocation, StoreError, Vault, VaultError, VaultOptions};
use khlang_tests::*;

/// Whether a `pg_dump` shows `value`: as text, or inside a bytea column (which the dump prints as
/// hex).
fn dump_shows(dump: &[u8], value: &str) -> bool {
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    contains(dump, value.as_bytes()) || contains(dump, hex.as_bytes())
}

fn on(dir: &std::path::Path, url: &str) -> VaultOptions {
    VaultOptions {
        storage: StorageLocation::Postgres { url: url.to_owned(), ca_cert: None },
        ..TestServer::options(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_consent_and_the_audit_log_on_postgres_with_no_plaintext_in_the_database() {
    let Some(pg) = TestPostgres::start("records_consent_and_the_audit_log_on_postgres") else { return };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(c.put(&format!("canary-subject-{i}"), canary_fields()).await.unwrap());
    }
    c.update(&ids[0], [("billing_address", CANARY_ADDRESS_TH)], &[]).await.unwrap();
    c.delete(&ids[19]).await.unwrap();
    let r = c.get(&ids[0], &[], PURPOSE).await.unwrap();
    assert_eq!(r.fields["card_number"].expose_secret(), CANARY_CARD);
    assert_eq!(r.fields["billing_address"].expose_secret(), CANARY_ADDRESS_TH);
    let gone = c.get(&ids[19], &[], PURPOSE).await.unwrap_err();
    assert_eq!(gone.code(), Some(Code::NotFound), "{gone}");
    let listed = c.list("canary-subject-3").await.unwrap();
    assert_eq!(listed.len(), 1, "the subject index finds the subject's record");
    let verified = server.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(matches!(verified.verdict, khlang_client::Verdict::Intact), "{:?}", verified.verdict);
    assert!(verified.report.entries >= 24, "every request has its entry: {}", verified.report.entries);
    server.stop().await;

    // What the database holds: ciphertext, wrapped keys, HMACs, blind indexes; never a value or
    // a subject id (the dump is what a database administrator or a stolen backup sees).
    let db = url.rsplit('/').next().unwrap();
    let dump = pg.dump(db);
    assert!(dump.len() > 20 * 500, "the dump holds the records ({} bytes)", dump.len());
    for canary in [CANARY_CARD, CANARY_NAME_TH, CANARY_ADDRESS_TH, CANARY_EMAIL, "canary-subject-1"] {
        assert!(!dump_shows(&dump, canary), "pg_dump shows plaintext '{canary}'");
    }

    // A restart (same database, same folder) reads everything back.
    let server = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let mut c = server.client().await;
    for id in &ids[1..19] {
        let r = c.get(id, &[], PURPOSE).await.unwrap();
        assert_eq!(r.fields["card_number"].expose_secret(), CANARY_CARD);
    }
    let verified = server.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(matches!(verified.verdict, khlang_client::Verdict::Intact), "{:?}", verified.verdict);
    server.stop().await;
}

/// The scan above does see plaintext when the database holds it: a benchmark-baseline vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dump_scan_sees_plaintext_when_it_is_there() {
    let Some(pg) = TestPostgres::start("the_dump_scan_sees_plaintext_when_it_is_there") else { return };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let options = VaultOptions { mode: khlang_server::CipherMode::PlaintextBaseline, ..on(dir.path(), &url) };
    let server = TestServer::start_with(dir.path(), options).await;
    server.client().await.put("canary-subject-1", canary_fields()).await.unwrap();
    server.stop().await;
    let dump = pg.dump(url.rsplit('/').next().unwrap());
    for canary in [CANARY_CARD, CANARY_NAME_TH, CANARY_EMAIL] {
        assert!(dump_shows(&dump, canary), "the scan should see '{canary}' in a baseline vault");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_a_newer_schema_is_refused_and_left_as_it_is() {
    let Some(pg) = TestPostgres::start("a_database_with_a_newer_schema_is_refused") else { return };
    let url = pg.database().await;
    {
        let store = PgStore::connect(&url).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), PG_SCHEMA_VERSION);
        store.set_schema_version_for_tests(PG_SCHEMA_VERSION + 1).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let Err(err) = Vault::open_or_init(
        dir.path(),
        PASSPHRASE.as_bytes(),
        khlang_keys::SealParams::MINIMUM,
        &on(dir.path(), &url),
    )
    .await
    else {
        panic!("a newer schema must be refused")
    };
    assert!(
        matches!(err, VaultError::Storage(StoreError::SchemaTooNew { found, .. }) if found == (PG_SCHEMA_VERSION + 1) as u32),
        "{err}"
    );
    assert!(err.to_string().contains("run the newer khlangd"), "{err}");
    // Untouched: still the newer version, and nothing was initialised.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let version: i32 = client.query_one("SELECT version FROM khlang_schema", &[]).await.unwrap().get(0);
    assert_eq!(version, PG_SCHEMA_VERSION + 1);
    let custody: i64 = client.query_one("SELECT count(*) FROM custody", &[]).await.unwrap().get(0);
    assert_eq!(custody, 0);
}

/// Two nodes on one database keep one audit chain: writes on A read on B, both under concurrent
/// writers for two seconds, every acknowledged write on both, the chain gap-free with the nodes'
/// entries interleaved, verified intact from either node; a revocation on A is refused on B within
/// a second (B's credentials cache hears the epoch move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_keep_one_chain() {
    let Some(pg) = TestPostgres::start("two_nodes_on_one_database_keep_one_chain") else { return };
    let url = pg.database().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = TestServer::start_with(a.path(), on(a.path(), &url)).await;
    // The second node's connection string carries a password (the test cluster trusts loopback,
    // so any password connects): the options' Debug print does not show it.
    let secret = "s3cret-db-pass";
    let with_password = url.replacen("postgres://khlang@", &format!("postgres://khlang:{secret}@"), 1);
    assert_ne!(with_password, url);
    let second = on(b.path(), &with_password);
    assert!(!format!("{second:?}").contains(secret), "Debug prints the password");
    let node_b = TestServer::start_with(b.path(), second).await;
    let id = node_a.client().await.put("canary-subject-1", canary_fields()).await.unwrap();
    let r = node_b.client().await.get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(r.fields["email"].expose_secret(), CANARY_EMAIL);

    let written: std::sync::Arc<std::sync::Mutex<Vec<(char, String)>>> = Default::default();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut writers = Vec::new();
    for (node, url) in [('a', node_a.url()), ('b', node_b.url()), ('a', node_a.url()), ('b', node_b.url())] {
        let token = node_a.token.clone();
        let token = if node == 'a' { token } else { node_b.token.clone() };
        let written = written.clone();
        writers.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&url, &token).await.unwrap();
            let mut n = 0;
            while std::time::Instant::now() < until {
                let id = c.put(&format!("subject-{node}-{n}"), canary_fields()).await.unwrap();
                c.get(&id, &[], PURPOSE).await.unwrap();
                written.lock().unwrap().push((node, id));
                n += 1;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let written = written.lock().unwrap().clone();
    assert!(written.iter().filter(|(n, _)| *n == 'a').count() > 10, "node A wrote");
    assert!(written.iter().filter(|(n, _)| *n == 'b').count() > 10, "node B wrote");
    let (mut ca, mut cb) = (node_a.client().await, node_b.client().await);
    for (_, id) in &written {
        ca.get(id, &[], PURPOSE).await.unwrap_or_else(|e| panic!("{id} not on A: {e}"));
        cb.get(id, &[], PURPOSE).await.unwrap_or_else(|e| panic!("{id} not on B: {e}"));
    }
    // One chain: every seq from the first to the last, once, whichever node reads it; the puts of
    // the two nodes interleave in it.
    let entries = node_b.audit_entries();
    assert_eq!(entries, node_a.audit_entries());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, entries[0].seq + i as u64, "a gap or a repeat at {}", e.seq);
    }
    let node_of: std::collections::HashMap<&str, char> =
        written.iter().map(|(n, id)| (id.as_str(), *n)).collect();
    let order: Vec<char> = entries
        .iter()
        .filter(|e| e.rpc == "PutRecord")
        .filter_map(|e| node_of.get(e.record_id.as_str()).copied())
        .collect();
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 10, "the nodes' entries interleave ({switches} switches in {})", order.len());
    for node in [&node_a, &node_b] {
        let verified = node.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
        assert!(matches!(verified.verdict, khlang_client::Verdict::Intact), "{:?}", verified.verdict);
    }

    // A revocation on A holds on B within a second, though B had the identity cached.
    let token = node_a.approved_identity("temp-clerk", "billing-clerk").await;
    let mut clerk = node_b.client_with_token(&token).await;
    for _ in 0..3 {
        clerk.get(&id, &["card_number".to_owned()], Some("billing")).await.unwrap();
    }
    node_a.client_as("key-admin").await.revoke_identity("temp-clerk").await.unwrap();
    let revoked = std::time::Instant::now();
    let refused = loop {
        match clerk.get(&id, &["card_number".to_owned()], Some("billing")).await {
            Ok(_) => assert!(revoked.elapsed() < std::time::Duration::from_secs(1), "still served after 1 s"),
            Err(e) => break e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(refused.code(), Some(Code::Unauthenticated), "{refused}");
    eprintln!(
        "two nodes: {} acknowledged writes, {} entries, {switches} switches; revocation held on B after {:?}",
        written.len(),
        entries.len(),
        revoked.elapsed()
    );
    node_b.stop().await;
    node_a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn khlangd_dev_runs_on_postgres_and_a_bad_connection_string_is_one_clear_error() {
    let Some(pg) = TestPostgres::start("khlangd_dev_runs_on_postgres") else { return };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("vault");
    let (mut daemon, addr) = spawn_khlangd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--storage",
        &url,
    ]);
    let addr = addr.expect("khlangd dev on PostgreSQL starts");
    let mut c = khlang_client::Client::connect(&addr, &dev_token(&data, "registration-app")).await.unwrap();
    let id = c.put("canary-subject-1", [("email", CANARY_EMAIL)]).await.unwrap();
    let r = c.get(&id, &[], Some("contact")).await.unwrap();
    let shown = r.fields["email"].expose_secret();
    assert!(shown != CANARY_EMAIL && shown.ends_with("@example.go.th"), "masked for this reader: {shown}");
    daemon.kill().unwrap();

    let out = std::process::Command::new(bin("khlangd"))
        .args([
            "dev",
            "--data-dir",
            data.to_str().unwrap(),
            "--storage",
            "postgress://khlang:s3cret-db-pass@db/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres://"), "the refusal says what is expected: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("s3cret-db-pass"), "a mistyped connection string's password is echoed: {err}");
}

/// Credentials are cached by the PostgreSQL store (every request authenticates): a revocation
/// must still take effect on the next request, also when the token was used (and cached) just
/// before, and a token of a new identity works at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_is_refused_at_its_next_request_on_postgres() {
    let Some(pg) = TestPostgres::start("a_revoked_identity_is_refused_at_its_next_request") else { return };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let id = server.client().await.put("canary-subject-1", canary_fields()).await.unwrap();
    let token = server.approved_identity("temp-clerk", "billing-clerk").await;
    let mut clerk = server.client_with_token(&token).await;
    for _ in 0..3 {
        clerk.get(&id, &["card_number".to_owned()], Some("billing")).await.unwrap();
    }
    server.client_as("key-admin").await.revoke_identity("temp-clerk").await.unwrap();
    let refused = clerk.get(&id, &["card_number".to_owned()], Some("billing")).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::Unauthenticated), "{refused}");
    server.stop().await;
}

/// The group commit acknowledges a write only after a synchronous tick covered it: a database
/// crash in the middle of a burst (`pg_ctl stop -m immediate`, WAL replayed at restart) loses no
/// acknowledged write, and the vault serves them after the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_mid_burst_loses_no_acknowledged_write() {
    let Some(pg) = TestPostgres::start("a_database_crash_mid_burst_loses_no_acknowledged_write") else {
        return;
    };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = server.client().await;
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut failed = 0;
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match c.put(&format!("crash-subject-{w}-{i}"), [("email", CANARY_EMAIL)]).await {
                    Ok(id) => acknowledged.lock().unwrap().push(id),
                    Err(_) => failed += 1,
                }
            }
            failed
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let before_crash = acknowledged.lock().unwrap().len();
    pg.crash();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = 0;
    for w in writers {
        failed += w.await.unwrap();
    }
    assert!(before_crash > 20, "the burst was under way before the crash ({before_crash} writes)");
    assert!(failed > 0, "writes failed while the database was down");
    server.stop().await;
    pg.restart();

    let ids = acknowledged.lock().unwrap().clone();
    let server = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let mut c = server.client().await;
    for id in &ids {
        let r = c.get(id, &[], PURPOSE).await.unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
        assert_eq!(r.fields["email"].expose_secret(), CANARY_EMAIL);
    }
    eprintln!(
        "{} acknowledged writes ({before_crash} before the crash), {failed} refused, all read back",
        ids.len()
    );
    server.stop().await;
}

/// `(CA certificate PEM, server certificate PEM, server key PEM)` for 127.0.0.1.
fn database_certificates(ca_name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "database");
    let cert = leaf.signed_by(&key, &Issuer::from_params(&ca, &ca_key)).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

/// TLS to the database: with the CA that signed the server's certificate and `sslmode=require`,
/// every connection the vault makes is encrypted (the server's own `pg_stat_ssl` says so);
/// without the CA, or with another CA, the vault refuses to start rather than talk in the clear
/// or to an unproven server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_talks_to_its_database_over_tls_it_verifies() {
    let (ca, cert, key) = database_certificates("database CA");
    let Some(pg) = TestPostgres::start_tls("the_vault_talks_to_its_database_over_tls", &cert, &key) else {
        return;
    };
    let url = format!("{}?sslmode=require", pg.database().await);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let (other_ca, _, _) = database_certificates("another CA");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, &other_ca).unwrap();
    let with = |ca_cert: Option<&std::path::Path>, folder: &str| VaultOptions {
        storage: StorageLocation::Postgres { url: url.clone(), ca_cert: ca_cert.map(Into::into) },
        ..TestServer::options(&dir.path().join(folder))
    };

    let Err(plain) = Vault::open_or_init(
        &dir.path().join("a"),
        PASSPHRASE.as_bytes(),
        khlang_keys::SealParams::MINIMUM,
        &with(None, "a"),
    )
    .await
    else {
        panic!("sslmode=require without a CA must not connect")
    };
    assert!(plain.to_string().to_lowercase().contains("tls"), "{plain}");
    let Err(unproven) = Vault::open_or_init(
        &dir.path().join("b"),
        PASSPHRASE.as_bytes(),
        khlang_keys::SealParams::MINIMUM,
        &with(Some(&other_file), "b"),
    )
    .await
    else {
        panic!("a server certificate from another CA must be refused")
    };
    let unproven = unproven.to_string().to_lowercase();
    assert!(unproven.contains("certificate") || unproven.contains("tls"), "{unproven}");

    let server = TestServer::start_with(&dir.path().join("c"), with(Some(&ca_file), "c")).await;
    let id = server.client().await.put("canary-subject-1", canary_fields()).await.unwrap();
    let r = server.client().await.get(&id, &[], PURPOSE).await.unwrap();
    assert_eq!(r.fields["card_number"].expose_secret(), CANARY_CARD);
    // Every backend the vault's pools and lease opened is on TLS.
    let (client, conn) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let rows = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.datname = $1 AND a.backend_type = 'client backend'",
            &[&db],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "the vault has connections open");
    assert!(rows.iter().all(|r| r.get::<_, bool>(0)), "every connection of the vault uses TLS");
    server.stop().await;
}

/// `kill -9` of the node in the middle of a burst: every acknowledged write is in the database,
/// the restarted node serves them, and the audit log (the node's files beside the database's
/// entries of changes) still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_node_mid_burst_loses_no_acknowledged_write_and_the_log_verifies() {
    let Some(pg) = TestPostgres::start("kill_9_of_the_node_mid_burst") else { return };
    let url = pg.database().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("vault");
    let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap(), "--storage", &url];
    let (mut daemon, addr) = spawn_khlangd(&args);
    let addr = addr.expect("khlangd dev on PostgreSQL starts");
    let token = dev_token(&data, "registration-app");
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = khlang_client::Client::connect(&addr, &token).await.unwrap();
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                match c.put(&format!("kill-subject-{w}-{i}"), [("email", CANARY_EMAIL)]).await {
                    Ok(id) => acknowledged.lock().unwrap().push(id),
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let ids = acknowledged.lock().unwrap().clone();
    assert!(ids.len() > 20, "the burst was under way ({} writes)", ids.len());

    let (_daemon, addr) = spawn_khlangd(&args);
    let addr = addr.expect("khlangd restarts on the same folder and database");
    let mut c = khlang_client::Client::connect(&addr, &token).await.unwrap();
    for id in &ids {
        c.get(id, &[], Some("contact")).await.unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
    }
    let mut sec = khlang_client::Client::connect(&addr, &dev_token(&data, "security-officer")).await.unwrap();
    let verified = sec.verify_audit(&[]).await.unwrap();
    assert!(matches!(verified.verdict, khlang_client::Verdict::Intact), "{:?}", verified.verdict);
    assert!(verified.report.entries >= ids.len() as u64, "{} entries", verified.report.entries);
}

/// The regulations in force live in the database, every version kept: a reload on A holds on B
/// within a second; a node started with a different file is refused, naming both versions; a
/// node given no file takes the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regulations_reload_on_a_holds_on_b_within_a_second() {
    let Some(pg) = TestPostgres::start("a_regulations_reload_on_a_holds_on_b") else { return };
    let url = pg.database().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = TestServer::start_with(a.path(), on(a.path(), &url)).await;
    let node_b = TestServer::start_with(b.path(), on(b.path(), &url)).await;
    let id = node_a.client_as("registration-app").await.put("citizen-7", canary_fields()).await.unwrap();
    let mut clerk_b = node_b.client_as("billing-clerk").await;
    clerk_b.get(&id, &["billing_address".into()], Some("billing")).await.unwrap();

    let before = node_a.client_as("key-admin").await.regulations().await.unwrap();
    let changed = test_regulations()
        .replace("fields = [\"card_number\", \"billing_address\"]", "fields = [\"card_number\"]");
    assert_ne!(changed, test_regulations());
    std::fs::write(&node_a.regulations_path, &changed).unwrap();
    let after = node_a.client_as("key-admin").await.reload_regulations().await.unwrap();
    assert_ne!(after.version, before.version);
    let reloaded = std::time::Instant::now();
    loop {
        match clerk_b.get(&id, &["billing_address".into()], Some("billing")).await {
            Err(e) if e.code() == Some(Code::PermissionDenied) => break,
            other => {
                assert!(other.is_ok(), "{other:?}");
                assert!(
                    reloaded.elapsed() < std::time::Duration::from_secs(1),
                    "B still allows it after a second"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    let heard = reloaded.elapsed();
    clerk_b.get(&id, &["card_number".into()], Some("billing")).await.unwrap();
    assert_eq!(node_b.client_as("key-admin").await.regulations().await.unwrap().version, after.version);
    node_b.stop().await;

    // B's file is the old one: B is refused, both versions named, and the database unchanged.
    let refused = Vault::open_sealed(b.path(), &on(b.path(), &url)).await.unwrap_err();
    let message = refused.to_string();
    assert!(matches!(refused, VaultError::FailedPrecondition(_)), "{refused:?}");
    assert!(message.contains(&after.version) && message.contains(&before.version), "{message}");
    // Without a file, B takes the database's.
    let c = tempfile::tempdir().unwrap();
    let mut no_file = on(c.path(), &url);
    no_file.regulations_path = None;
    no_file.regulations = std::sync::Arc::new(khlang_server::policy::regulations::Regulations::sample());
    let node_c = Vault::open_sealed(c.path(), &no_file).await.unwrap();
    assert_eq!(node_c.regulations().version, after.version);
    assert_eq!(node_a.client_as("key-admin").await.regulations().await.unwrap().version, after.version);
    println!("a reload on A was enforced on B after {heard:?}");
    node_a.stop().await;
}

/// Failures count toward one limit across the nodes, and a lockout on one holds on the other: an
/// attacker spreading guesses over two nodes gets no more tries than on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_counts_are_shared_by_the_nodes() {
    let Some(pg) = TestPostgres::start("lockout_counts_are_shared_by_the_nodes") else { return };
    let url = pg.database().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let limited = |dir: &std::path::Path| {
        let mut o = on(dir, &url);
        o.auth.max_failures = 4;
        o
    };
    let node_a = TestServer::start_with(a.path(), limited(a.path())).await;
    let node_b = TestServer::start_with(b.path(), limited(b.path())).await;
    let good = node_a.tokens["tester"].clone();
    let mut forged = good.clone();
    forged.replace_range(good.len() - 4.., "0000");
    assert_ne!(forged, good);
    // A is busy throughout (the report found a lockout still served 2.5 s later under load).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..24 {
        let (mut app, stop) = (node_a.client_as("registration-app").await, stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                app.put(&format!("load-{w}-{n}"), canary_fields()).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Two wrong guesses on each node: four in all, the limit (a node counting alone would allow
    // four on each).
    for node in [&node_a, &node_b, &node_a, &node_b] {
        let e = node.client_with_token(&forged).await.list("anyone").await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Unauthenticated));
    }
    // The fourth failure, on B, locked the token: the right token is refused on B at once and on
    // A within a second.
    let e = node_b.client_with_token(&good).await.list("anyone").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    let locked = std::time::Instant::now();
    loop {
        match node_a.client_with_token(&good).await.list("anyone").await {
            Err(e) if e.code() == Some(Code::ResourceExhausted) => break,
            other => {
                assert!(locked.elapsed() < std::time::Duration::from_secs(1), "A still serves it: {other:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    let held_after = locked.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut puts = 0;
    for l in load {
        puts += l.await.unwrap();
    }
    eprintln!("lockout on B held on A after {held_after:?}, while A served {puts} puts");
    // Another identity's token is untouched.
    node_a.client_with_token(&node_a.tokens["registration-app"]).await.list("anyone").await.unwrap();
    node_b.stop().await;
    node_a.stop().await;
}

/// Each node is sealed and unsealed on its own: a sealed node answers health NOT_SERVING and
/// serves no data while the other serves, and gives up the key-job lease, so a rotation started
/// on the other runs there; unsealed again, it serves records rewrapped meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_sealed_while_the_other_serves() {
    let Some(pg) = TestPostgres::start("one_node_sealed_while_the_other_serves") else { return };
    let url = pg.database().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // B first: it takes the key-job lease.
    let node_b = TestServer::start_with(b.path(), on(b.path(), &url)).await;
    let node_a = TestServer::start_with(a.path(), on(a.path(), &url)).await;
    let mut app_a = node_a.client_as("registration-app").await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(app_a.put(&format!("sealed-subject-{i}"), canary_fields()).await.unwrap());
    }
    assert!(node_b.client_as("key-admin").await.seal().await.unwrap().sealed);
    assert!(health_becomes(&node_b.url(), "", false).await, "sealed B answers NOT_SERVING");
    assert!(health_becomes(&node_a.url(), "", true).await, "A serves on");
    let e = node_b.client().await.get(&ids[0], &[], PURPOSE).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    node_a.client().await.get(&ids[0], &[], PURPOSE).await.unwrap();

    let mut admin_a = node_a.client_as("key-admin").await;
    admin_a.rotate_key().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let job = loop {
        let job = admin_a.key_status(false).await.unwrap().job.unwrap();
        if job.finished_ms.is_some() {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "the rotation never ran with B sealed: {job:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!((job.changed, job.skipped, job.total), (30, 0, 30));

    let status = node_b.client().await.unseal(1, PASSPHRASE).await.unwrap();
    assert!(!status.sealed);
    let r = node_b.client().await.get(&ids[29], &[], PURPOSE).await.unwrap();
    assert_eq!(r.fields["email"].expose_secret(), CANARY_EMAIL);
    node_a.stop().await;
    node_b.stop().await;
}

/// A node's audit traffic on a fresh database (checkpoints every 10 entries), the node stopped:
/// the database's URL and the chain's last seq.
async fn audited_database(pg: &TestPostgres, dir: &std::path::Path) -> (String, u64) {
    let url = pg.database().await;
    let mut options = on(dir, &url);
    options.checkpoints = khlang_server::audit::CheckpointPolicy {
        every_entries: 10,
        every: std::time::Duration::from_secs(3600),
    };
    let node = TestServer::start_with(dir, options).await;
    let mut c = node.client().await;
    for i in 0..20 {
        let id = c.put(&format!("attacked-subject-{i}"), canary_fields()).await.unwrap();
        c.get(&id, &[], PURPOSE).await.unwrap();
    }
    let mut sec = node.client_as("security-officer").await;
    let verified = sec.verify_audit(&[]).await.unwrap();
    assert!(matches!(verified.verdict, khlang_client::Verdict::Intact), "{:?}", verified.verdict);
    let last = verified.report.entries;
    node.stop().await;
    (url, last)
}

async fn sql(url: &str, statements: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client.batch_execute(statements).await.unwrap_or_else(|e| panic!("{statements}: {e}"));
    drop(client);
    let _ = conn.await;
}

/// Someone with write access to the database edits the audit rows (an entry rewritten, a row
/// deleted, the tail cut with the head row moved back, a checkpoint forged): a node on that
/// database says the log is not intact, names where, and serves no personal data until an
/// operator accepts the break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_to_the_audit_rows_in_the_database_are_caught() {
    let Some(pg) = TestPostgres::start("edits_to_the_audit_rows_in_the_database") else { return };
    let attacks: &[(&str, &dyn Fn(u64) -> String)] = &[
        ("an entry rewritten", &|_| {
            // Byte 40 is inside the JSON after the 32-byte hash.
            "UPDATE audit_entries SET value = set_byte(value, 40, get_byte(value, 40) # 1) WHERE seq = 12"
                .into()
        }),
        ("a row deleted", &|_| "DELETE FROM audit_entries WHERE seq = 12".into()),
        ("the tail cut, its checkpoints too, the head row moved back", &|last| {
            format!(
                "DELETE FROM audit_entries WHERE seq > {cut};
                 DELETE FROM audit_checkpoints WHERE seq > {cut};
                 UPDATE audit_head SET seq = {cut}, hash = (SELECT substring(value FROM 1 FOR 32)
                     FROM audit_entries WHERE seq = {cut}), signed_seq = LEAST(signed_seq, {cut})",
                cut = last - 5
            )
        }),
        ("a checkpoint forged", &|_| {
            "UPDATE audit_checkpoints SET value = set_byte(value, length(value) - 3, get_byte(value, length(value) - 3) # 1)
                 WHERE seq = (SELECT min(seq) FROM audit_checkpoints)"
                .into()
        }),
    ];
    for (what, attack) in attacks {
        let dir = tempfile::tempdir().unwrap();
        let (url, last) = audited_database(&pg, dir.path()).await;
        sql(&url, &attack(last)).await;
        let node = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
        let mut sec = node.client_as("security-officer").await;
        let verified = sec.verify_audit(&[]).await.unwrap();
        assert!(
            matches!(verified.verdict, khlang_client::Verdict::Broken(_)),
            "{what}: not reported broken: {:?}",
            verified.verdict
        );
        let mut refused = false;
        for _ in 0..100 {
            match node.client().await.put("after-the-attack", canary_fields()).await {
                Err(e) if e.code() == Some(Code::FailedPrecondition) => {
                    refused = true;
                    break;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        assert!(refused, "{what}: data is still served ({:?})", verified.verdict);
        println!("{what}: {:?}", verified.verdict);
        node.stop().await;
    }

    // While a node runs: an officer's verification that finds the edit carries it forward at
    // once, and the node stops serving personal data.
    let dir = tempfile::tempdir().unwrap();
    let url = pg.database().await;
    let node = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let mut c = node.client().await;
    for i in 0..5 {
        c.put(&format!("live-subject-{i}"), canary_fields()).await.unwrap();
    }
    sql(&url, "UPDATE audit_entries SET value = set_byte(value, 40, get_byte(value, 40) # 1) WHERE seq = 3")
        .await;
    let verified = node.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(
        matches!(&verified.verdict, khlang_client::Verdict::Broken(b) if b.seq == 3),
        "{:?}",
        verified.verdict
    );
    assert!(verified.break_open, "carried forward by the verification itself");
    let e = c.put("after-the-live-edit", canary_fields()).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    node.stop().await;
}

/// Failover: a primary and a synchronous standby made with `pg_basebackup -R`; the node knows
/// both (`target_session_attrs=read-write`). The primary is stopped mid-burst and the standby
/// promoted: meanwhile requests answer `Unavailable` (never stale data from the standby), the
/// node is back by itself within seconds, no acknowledged write is lost, and the chain verifies
/// across the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_promoted_synchronous_replica_loses_no_acknowledged_write() {
    let Some(primary) = TestPostgres::start("failover_to_a_promoted_synchronous_replica") else { return };
    let single = primary.database().await;
    let replica = primary.synchronous_replica().await;
    let db = single.rsplit('/').next().unwrap().to_owned();
    let url = format!(
        "postgres://khlang@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
        primary.port(),
        replica.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let node = TestServer::start_with(dir.path(), on(dir.path(), &url)).await;
    let acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let refusals: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let first = node.client().await.put("failover-subject-first", canary_fields()).await.unwrap();
    let mut writers = Vec::new();
    // A reader beside the writers: while the database is away it must be refused, never served.
    {
        let (refusals, url, token, first) = (refusals.clone(), node.url(), node.token.clone(), first.clone());
        writers.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&url, &token).await.unwrap();
            while std::time::Instant::now() < until {
                if let Err(e) = c.get(&first, &[], PURPOSE).await {
                    refusals.lock().unwrap().push(format!("{:?}: {e}", e.code()));
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for w in 0..3 {
        let (acknowledged, refusals) = (acknowledged.clone(), refusals.clone());
        let (url, token) = (node.url(), node.token.clone());
        writers.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&url, &token).await.unwrap();
            let mut i = 0;
            while std::time::Instant::now() < until {
                match c.put(&format!("failover-subject-{w}-{i}"), canary_fields()).await {
                    Ok(id) => acknowledged.lock().unwrap().push(id),
                    Err(e) => {
                        refusals.lock().unwrap().push(format!("{:?}: {e}", e.code()));
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let before = acknowledged.lock().unwrap().len();
    assert!(before > 20, "the burst was under way ({before} writes)");
    primary.crash();
    let stopped = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    replica.promote();
    let promoted = std::time::Instant::now();
    // Back by itself: writes succeed again within seconds of the promotion.
    let at_promotion = acknowledged.lock().unwrap().len();
    loop {
        if acknowledged.lock().unwrap().len() > at_promotion {
            break;
        }
        assert!(promoted.elapsed() < std::time::Duration::from_secs(5), "the node did not come back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let back = promoted.elapsed();
    for w in writers {
        w.await.unwrap();
    }
    let ids = acknowledged.lock().unwrap().clone();
    let refusals = refusals.lock().unwrap().clone();
    assert!(ids.len() > at_promotion, "writes resumed");
    assert!(!refusals.is_empty(), "the switch was noticed");
    assert!(
        refusals.iter().all(|r| r.starts_with("Some(Unavailable)")),
        "refusals other than Unavailable: {:?}",
        refusals.iter().filter(|r| !r.starts_with("Some(Unavailable)")).take(3).collect::<Vec<_>>()
    );
    let mut readers = Vec::new();
    for chunk in ids.chunks(ids.len().div_ceil(4)) {
        let (chunk, url, token) = (chunk.to_vec(), node.url(), node.token.clone());
        readers.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&url, &token).await.unwrap();
            for id in &chunk {
                c.get(id, &[], PURPOSE)
                    .await
                    .unwrap_or_else(|e| panic!("acknowledged {id} lost in the failover: {e}"));
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    let verified = node.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(matches!(verified.verdict, khlang_client::Verdict::Intact), "{:?}", verified.verdict);
    println!(
        "failover: {} writes acknowledged ({before} before the stop), {} refused meanwhile, \
         back {back:?} after the promotion ({:?} after the stop)",
        ids.len(),
        refusals.len(),
        (promoted - stopped) + back
    );
    node.stop().await;
}

/// On PostgreSQL the backup is the database's own (README: Backup and restore): `pg_basebackup`
/// while the node serves writes, the copy started as a cluster of its own, and `khlangd verify`
/// on it opens every record and verifies the audit chain. `khlang operator backup` answers
/// FailedPrecondition naming that way, and is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_basebackup_under_load_then_khlangd_verify_opens_every_record() {
    let Some(pg) = TestPostgres::start("pg_basebackup_under_load") else { return };
    let url = pg.database().await;
    let db = url.rsplit('/').next().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let node = TestServer::start_with(&node_dir, on(&node_dir, &url)).await;
    let mut admin = node.client_as("key-admin").await;
    let e = admin.backup(|_| true).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("pg_basebackup"), "{e}");

    let acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..3 {
        let (acknowledged, stop, url, token) =
            (acknowledged.clone(), stop.clone(), node.url(), node.token.clone());
        load.push(tokio::spawn(async move {
            let mut c = khlang_client::Client::connect(&url, &token).await.unwrap();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = c.put(&format!("basebackup-{w}-{i}"), canary_fields()).await.unwrap();
                acknowledged.lock().unwrap().push(id);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let before = acknowledged.lock().unwrap().len();
    let copy = tokio::task::block_in_place(|| pg.base_backup("restored", false));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let all = acknowledged.lock().unwrap().len();
    node.stop().await;
    assert!(before > 10 && all > before, "writes before ({before}) and during ({all}) the copy");

    let pass = write_passphrase(dir.path(), PASSPHRASE);
    let out = std::process::Command::new(bin("khlangd"))
        .args(["verify", "--data-dir", dir.path().join("verifier").to_str().unwrap()])
        .args(["--passphrase-file", &pass])
        .env("KHLANG_STORAGE", copy.url(&db))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
    let opened: usize =
        report.split("records: ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        opened > before && opened <= all + 1,
        "{opened} records: {before}..={all} written, and the first"
    );
    assert!(report.contains(", 0 damaged") && report.contains("audit log: intact"), "{report}");
    for (_, value) in canary_fields() {
        assert!(!report.contains(value), "verify shows no value");
    }
}
