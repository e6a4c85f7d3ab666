//! An archived audit log still decides what is genuine (issue 25): the archival keeps a signed
//! base of what the removed entries said, so values the vault once wrote and later replaced are
//! refused when put back even though the change that replaced them was archived, records older
//! than the archive are still checked against the log, and a base that is missing or edited stops
//! the vault from opening. Run on sled here and on PostgreSQL by `on_postgres_archived_authority.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::Path;

use khlang_client::Code;
use khlang_server::storage::Changes;
use khlang_server::{StoreError, Vault, VaultError};
use khlang_tests::*;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Archives every entry of the stopped vault in `dir` as an operator would (400 days on, so the
/// retention allows it); returns how many entries left.
async fn archive_all(dir: &Path) -> u64 {
    let vault = Vault::open(dir, PASSPHRASE.as_bytes(), &TestServer::options(dir)).await.unwrap();
    let now = now_ms();
    let mut out = std::fs::File::create(dir.join(format!("archive-{now}.jsonl"))).unwrap();
    let report = vault.archive_audit(now + 1, now + 400 * 86_400_000, &mut out).await.unwrap();
    assert!(report.entries > 0, "{report:?}");
    report.entries
}

/// The base's stored bytes, as the attacker with the folder or the database reads them.
async fn read_base(dir: &Path) -> Vec<u8> {
    if on_postgres() {
        let (client, conn) =
            tokio_postgres::connect(&database_url(dir), tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        let row =
            client.query_one("SELECT value FROM meta WHERE key = 'audit_archive_base'", &[]).await.unwrap();
        drop(client);
        let _ = conn.await;
        row.get(0)
    } else {
        std::fs::read(dir.join("audit/archive-base.json")).unwrap()
    }
}

/// Replaces (`Some`) or deletes (`None`) the base as that attacker would.
async fn write_base(dir: &Path, bytes: Option<&[u8]>) {
    match (on_postgres(), bytes) {
        (true, Some(b)) => {
            let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
            database_sql(
                dir,
                &format!(
                    "INSERT INTO meta (key, value) VALUES ('audit_archive_base', '\\x{hex}')
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                ),
            )
            .await
        }
        (true, None) => database_sql(dir, "DELETE FROM meta WHERE key = 'audit_archive_base'").await,
        (false, Some(b)) => std::fs::write(dir.join("audit/archive-base.json"), b).unwrap(),
        (false, None) => std::fs::remove_file(dir.join("audit/archive-base.json")).unwrap(),
    }
}

async fn refused_at_open(dir: &Path) -> VaultError {
    Vault::open(dir, PASSPHRASE.as_bytes(), &TestServer::options(dir))
        .await
        .expect_err("the vault must not open")
}

fn names_the_base(e: &VaultError, why: &str) {
    match e {
        VaultError::Storage(StoreError::Unauthentic { what, why: said }) => {
            assert!(what.starts_with("archive-base:") && said.contains(why), "{e}")
        }
        other => panic!("expected the base refused, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_log_still_refuses_what_its_archived_entries_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let kept = app.put("citizen-8", canary_fields()).await.unwrap();
    let doomed = app.put("citizen-9", canary_fields()).await.unwrap();
    app.set_consent("citizen-8", "marketing", true).await.unwrap();
    let postal = server.tokens["postal-contractor"].clone();
    let index_8 = server.vault().subject_index_for_tests("citizen-8").unwrap();
    server.stop().await;
    // What an attacker copies while it is genuine (a database snapshot, an old backup).
    let (identity, tokens) = {
        let store = open_store(dir.path()).await;
        let identity = store.get_identity("postal-contractor").await.unwrap().unwrap();
        (identity, store.tokens_of("postal-contractor").await.unwrap())
    };

    // The contractor is revoked and the consent withdrawn; then every entry that says so is
    // archived.
    let server = TestServer::start(dir.path()).await;
    server.client_as("key-admin").await.revoke_identity("postal-contractor").await.unwrap();
    server.client_as("registration-app").await.set_consent("citizen-8", "marketing", false).await.unwrap();
    server.stop().await;
    archive_all(dir.path()).await;

    // The records the archived entries put are still accounted for, not "before the log".
    let server = TestServer::start(dir.path()).await;
    let verified = server.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(verified.records.holds(), "{:?}", verified.records);
    assert_eq!((verified.records.matched, verified.records.before_log), (2, 0), "{:?}", verified.records);
    server.client_as("registration-app").await.put("citizen-10", canary_fields()).await.unwrap();
    server.stop().await;
    let first_base = read_base(dir.path()).await;
    // A second archival carries the first one's base forward.
    archive_all(dir.path()).await;

    let store = open_store(dir.path()).await;
    let mut c = Changes::new();
    c.put_identity(&identity);
    for (id, token) in &tokens {
        c.put_token(id, token);
    }
    let (_, history) = store.consent_of(&index_8).await.unwrap();
    let granted = history.iter().find(|h| h.granted).unwrap().clone();
    c.retag_consent(&index_8, None, &granted);
    let (record, read) = store.get_record(&doomed).await.unwrap().unwrap();
    c.delete_record(&doomed, &record, read);
    assert!(store.commit(c).await.unwrap());
    store.flush_now().await.unwrap();
    drop(store);

    let server = TestServer::start(dir.path()).await;
    let e = server
        .client_with_token(&postal)
        .await
        .get(&kept, &["home_address".into()], Some("postal_delivery"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::DataLoss), "the revoked contractor put back: {e}");
    assert!(e.to_string().contains("older value") || e.to_string().contains("removed was put back"), "{e}");
    let e =
        server.client_as("marketing-officer").await.get(&kept, &["email".into()], Some("marketing")).await;
    assert_eq!(e.unwrap_err().code(), Some(Code::DataLoss), "the withdrawn consent put back");
    let verified = server.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    let found = &verified.records;
    assert_eq!((found.vanished, found.matched, found.before_log), (1, 2, 0), "{found:?}");
    assert!(found.findings.join("\n").contains(&doomed), "{found:?}");
    server.stop().await;

    // The base itself: edited, or deleted, the vault does not open on it.
    let genuine = read_base(dir.path()).await;
    let mut edited = genuine.clone();
    let at = edited.len() - 3;
    edited[at] ^= 0x01;
    write_base(dir.path(), Some(&edited)).await;
    names_the_base(&refused_at_open(dir.path()).await, "tag does not match");
    // The first archival's genuine base, put back in the second one's place.
    write_base(dir.path(), Some(&first_base)).await;
    names_the_base(&refused_at_open(dir.path()).await, "tag does not match");
    write_base(dir.path(), None).await;
    names_the_base(&refused_at_open(dir.path()).await, "not there");
    write_base(dir.path(), Some(&genuine)).await;
    Vault::open(dir.path(), PASSPHRASE.as_bytes(), &TestServer::options(dir.path())).await.unwrap();
}

/// The newest signed checkpoint's seq, as the attacker reads it.
async fn newest_checkpoint(dir: &Path) -> u64 {
    if on_postgres() {
        let (client, conn) =
            tokio_postgres::connect(&database_url(dir), tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        let row = client.query_one("SELECT max(seq) FROM audit_checkpoints", &[]).await.unwrap();
        drop(client);
        let _ = conn.await;
        u64::try_from(row.get::<_, i64>(0)).unwrap()
    } else {
        let text = std::fs::read_to_string(dir.join("audit/checkpoints.log")).unwrap();
        text.lines().filter_map(|l| l.split(' ').nth(1)?.parse().ok()).max().unwrap()
    }
}

/// Removes the log's entries up to `last` and its checkpoints before `last` (the one at `last`
/// stays and anchors the rest), as an archival would, but outside the vault and with no base.
async fn cut_front(dir: &Path, last: u64) {
    if on_postgres() {
        database_sql(
            dir,
            &format!(
                "DELETE FROM audit_entries WHERE seq <= {last}; DELETE FROM audit_checkpoints WHERE seq < {last}"
            ),
        )
        .await;
        return;
    }
    let audit = dir.join("audit");
    let seq_of = |l: &str| l.split(' ').nth(1).and_then(|s| s.parse::<u64>().ok());
    let mut kept = Vec::new();
    for (_, path) in khlang_server::audit::files::segments(&audit).unwrap() {
        let text = std::fs::read_to_string(&path).unwrap();
        kept.extend(
            text.lines()
                .filter(|l| !l.starts_with('\0') && !l.is_empty())
                .filter(|l| seq_of(l).is_some_and(|s| s > last))
                .map(str::to_owned),
        );
        std::fs::remove_file(path).unwrap();
    }
    std::fs::write(audit.join(format!("{:020}.log", last + 1)), kept.join("\n") + "\n").unwrap();
    let checkpoints = std::fs::read_to_string(audit.join("checkpoints.log")).unwrap();
    let left: Vec<&str> = checkpoints.lines().filter(|l| seq_of(l).is_some_and(|s| s >= last)).collect();
    std::fs::write(audit.join("checkpoints.log"), left.join("\n") + "\n").unwrap();
}

/// Cutting the log's front outside the vault (to a signed checkpoint, so what is left still
/// verifies) would hide the changes it recorded — a revocation, say — so that a value they
/// replaced could be put back and judged by its tag alone. No kept entry names a base for such
/// a log: the vault does not open on it unless the operator says it was archived by a version
/// that kept none (`--accept-unbased-log` and the first kept entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_at_its_front_outside_an_archival_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.client_as("key-admin").await.revoke_identity("postal-contractor").await.unwrap();
    server.stop().await;
    let last = newest_checkpoint(dir.path()).await;
    let server = TestServer::start(dir.path()).await;
    server.client_as("registration-app").await.put("citizen-11", canary_fields()).await.unwrap();
    server.stop().await;

    cut_front(dir.path(), last).await;
    let e = refused_at_open(dir.path()).await;
    match &e {
        VaultError::Storage(StoreError::Unauthentic { what, why }) => {
            assert_eq!(what, &format!("audit log from entry {}", last + 1));
            assert!(why.contains("--accept-unbased-log"), "{why}");
        }
        other => panic!("expected the cut log refused, got {other}"),
    }
    // A wrong entry named is no acceptance.
    let mut options = TestServer::options(dir.path());
    options.accept_unbased_log = Some(last);
    assert!(Vault::open(dir.path(), PASSPHRASE.as_bytes(), &options).await.is_err());
    options.accept_unbased_log = Some(last + 1);
    Vault::open(dir.path(), PASSPHRASE.as_bytes(), &options).await.unwrap();
}
