//! Who may do what comes from the root key, not from whoever can write the store (issue 25).
//! Each test writes the store as an attacker with the database or the data folder would — the
//! vault's own encodings, through the storage port or as raw bytes — and checks that the vault
//! refuses what it did not write (`DataLoss`) instead of obeying it. Run on sled here and on
//! PostgreSQL by `on_postgres_authority.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::path::Path;

use khlang_client::Code;
use khlang_server::storage::{Changes, Storage, StoredRegulations};
use khlang_server::{StoreError, Vault, VaultError};
use khlang_tests::*;

/// Opens the stopped vault's store, lets `edit` change it, and makes it durable.
async fn tamper<F>(dir: &Path, edit: F)
where
    F: AsyncFnOnce(&dyn Storage),
{
    let store = open_store(dir).await;
    edit(store.as_ref()).await;
    store.flush_now().await.unwrap();
}

async fn commit(store: &dyn Storage, changes: Changes) {
    assert!(store.commit(changes).await.unwrap(), "the attacker's write applied");
}

/// Opens and unseals the stopped vault in `dir` (with the regulations file, or with none: then
/// the store's are in force), which must be refused; returns why.
async fn refused_at_open(dir: &Path, with_file: bool) -> VaultError {
    let mut options = TestServer::options(dir);
    if !with_file {
        options.regulations_path = None;
    }
    Vault::open_or_init(dir, PASSPHRASE.as_bytes(), khlang_keys::SealParams::MINIMUM, &options)
        .await
        .expect_err("the vault must not open")
}

fn refused_as_data_loss(e: &khlang_client::ClientError) {
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
}

/// The attack: the statistics contractor's role rewritten to the data-protection
/// officer's in the store. Its existing token then exports nothing: the identity is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_rewritten_in_the_store_is_refused_not_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.client().await.put("citizen-1", canary_fields()).await.unwrap();
    let contractor = server.tokens["statistics-contractor"].clone();
    let e = server.client_with_token(&contractor).await.export_subject("citizen-1").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(health_becomes(&server.url(), "khlang.v1.Authority", true).await, "genuine: serving");
    server.stop().await;

    tamper(dir.path(), async |store| {
        let mut who = store.get_identity("statistics-contractor").await.unwrap().unwrap();
        who.role = "data-protection-officer".into();
        let mut c = Changes::new();
        c.put_identity(&who);
        commit(store, c).await;
    })
    .await;

    let server = TestServer::start(dir.path()).await;
    let e = server.client_with_token(&contractor).await.export_subject("citizen-1").await.unwrap_err();
    refused_as_data_loss(&e);
    assert!(e.to_string().contains("statistics-contractor"), "names what is damaged: {e}");
    assert!(!e.to_string().contains(CANARY_NAME_TH));
    // The genuine officer is unaffected.
    let records =
        server.client_as("data-protection-officer").await.export_subject("citizen-1").await.unwrap();
    assert_eq!(records.len(), 1);
    // Health and metrics say so.
    assert!(health_becomes(&server.url(), "khlang.v1.Authority", false).await, "health says so");
    assert!(server.vault().authority_refused() > 0);
    // The refusal is in the access log.
    assert!(
        server
            .audit_entries()
            .iter()
            .any(|e| e.outcome == "DataLoss" && e.reason.contains("statistics-contractor")),
        "the refusal is audited"
    );
    // And it raised one alarm of its own, however often the value is read.
    server.client_with_token(&contractor).await.export_subject("citizen-1").await.unwrap_err();
    let alarms = server
        .audit_entries()
        .iter()
        .filter(|e| e.rpc == "AuthorityAlarm" && e.reason.contains("identity:statistics-contractor"))
        .count();
    assert_eq!(alarms, 1, "one alarm entry for the forged value");
    server.stop().await;
}

/// A genuine row copied over another identity's, a token pointed at another identity, and an
/// identity inserted with no tag at all: none of them authenticates anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_and_tokens_moved_or_inserted_in_the_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.client().await.put("citizen-2", canary_fields()).await.unwrap();
    let contractor = server.tokens["statistics-contractor"].clone();
    let postal = server.tokens["postal-contractor"].clone();
    let marketing = server.tokens["marketing-officer"].clone();
    server.stop().await;

    tamper(dir.path(), async |store| {
        // The postal contractor's tokens repointed at the data-protection officer.
        for (id, mut token) in store.tokens_of("postal-contractor").await.unwrap() {
            token.identity = "data-protection-officer".into();
            let mut c = Changes::new();
            c.put_token(&id, &token);
            commit(store, c).await;
        }
        // The marketing officer re-created without a tag, as the administrator's role.
        let mut who = store.get_identity("marketing-officer").await.unwrap().unwrap();
        who.role = "key-admin".into();
        who.auth = None;
        let mut c = Changes::new();
        c.put_identity(&who);
        commit(store, c).await;
    })
    .await;
    // The officer's genuine row copied, bytes and tag, over the contractor's.
    copy_identity_row(dir.path(), "data-protection-officer", "statistics-contractor").await;

    let server = TestServer::start(dir.path()).await;
    for token in [&contractor, &postal] {
        let e = server.client_with_token(token).await.export_subject("citizen-2").await.unwrap_err();
        refused_as_data_loss(&e);
    }
    let e = server.client_with_token(&marketing).await.key_status(false).await.unwrap_err();
    refused_as_data_loss(&e);
    // Listing identities (an administrator's view) refuses to show a forged one as genuine.
    let e = server.client_as("key-admin").await.list_identities().await.unwrap_err();
    refused_as_data_loss(&e);
    server.client_as("data-protection-officer").await.export_subject("citizen-2").await.unwrap();
    server.stop().await;
    // `khlangd verify` on the stopped vault counts them and exits 2 (damage).
    let (code, report) = khlangd_verify(dir.path());
    assert_eq!(code, Some(2), "{report}");
    assert!(report.contains("authority: ") && report.contains("not written by this vault"), "{report}");
    assert!(!report.contains(" 0 not written"), "{report}");
}

/// `khlangd verify` on the stopped vault in `dir`: its exit status and everything it printed.
fn khlangd_verify(dir: &Path) -> (Option<i32>, String) {
    let out = khlangd_offline(dir, "verify", &[]);
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// Item 2: the log knows which records exist. A record deleted from the store without its
/// DeleteRecord entry, and a deleted record's genuine bytes put back, are both reported by a
/// security officer's verification on the running vault and by `khlangd verify` (exit 2), with
/// an alarm entry in the log; the records the log accounts for are counted, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_removed_or_put_back_outside_the_vault_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client().await;
    let mut ids = Vec::new();
    for subject in ["citizen-1", "citizen-2", "citizen-3", "citizen-4"] {
        ids.push(app.put(subject, canary_fields()).await.unwrap());
    }
    // citizen-4 is erased through the vault: the log accounts for it.
    assert_eq!(
        server.client_as("data-protection-officer").await.erase_subject("citizen-4").await.unwrap(),
        1
    );
    let verified = server.client_as("security-officer").await.verify_audit(&[]).await.unwrap();
    assert!(verified.records.holds(), "{:?}", verified.records);
    assert_eq!(verified.records.matched, 3, "{:?}", verified.records);
    // Puts and deletes while the officer verifies are judged fairly (never reported).
    let busy = {
        let mut app = server.client().await;
        tokio::spawn(async move {
            for i in 0..150 {
                let id = app.put(&format!("busy-{i}"), canary_fields()).await.unwrap();
                if i % 2 == 0 {
                    app.delete(&id).await.unwrap();
                }
            }
        })
    };
    let mut officer = server.client_as("security-officer").await;
    while !busy.is_finished() {
        let verified = officer.verify_audit(&[]).await.unwrap();
        assert!(verified.records.holds(), "under load: {:?}", verified.records);
    }
    busy.await.unwrap();
    let verified = officer.verify_audit(&[]).await.unwrap();
    assert_eq!((verified.records.matched, verified.records.in_flux), (3 + 75, 0), "{:?}", verified.records);
    server.stop().await;

    let (kept, doomed) = (ids[0].clone(), ids[2].clone());
    let mut saved = None;
    tamper(dir.path(), async |store| {
        saved = Some(store.get_record(&doomed).await.unwrap().unwrap().0);
    })
    .await;
    let server = TestServer::start(dir.path()).await;
    server.client().await.delete(&doomed).await.unwrap();
    server.stop().await;

    tamper(dir.path(), async |store| {
        let mut c = Changes::new();
        let (record, read) = store.get_record(&kept).await.unwrap().unwrap();
        c.delete_record(&kept, &record, read);
        c.insert_record(&doomed, saved.as_ref().unwrap());
        commit(store, c).await;
    })
    .await;

    let server = TestServer::start(dir.path()).await;
    let mut officer = server.client_as("security-officer").await;
    let verified = officer.verify_audit(&[]).await.unwrap();
    let found = &verified.records;
    assert_eq!((found.vanished, found.appeared, found.matched), (1, 1, 1 + 75), "{found:?}");
    let named = found.findings.join("\n");
    assert!(named.contains(&kept) && named.contains("never deleted"), "{named}");
    assert!(named.contains(&doomed) && named.contains("removed it"), "{named}");
    assert!(!named.contains(CANARY_CARD) && !named.contains(CANARY_NAME_TH), "{named}");
    let alarms = officer
        .query_audit(&khlang_client::AuditQuery { identity: "vault".into(), ..Default::default() })
        .await
        .unwrap();
    assert!(
        alarms
            .iter()
            .any(|a| a.rpc == "AuthorityAlarm" && a.outcome == "DataLoss" && a.reason.contains("1 vanished")),
        "{alarms:?}"
    );
    server.stop().await;

    let (code, report) = khlangd_verify(dir.path());
    assert_eq!(code, Some(2), "{report}");
    assert!(
        report.contains("1 vanished without their delete entry, 1 appeared without their put"),
        "{report}"
    );
    assert!(report.contains(&kept) && report.contains(&doomed), "{report}");
}

/// Copies one identity's stored bytes (with its tag) over another's, as raw bytes: sled's tree,
/// or the `identities` table.
async fn copy_identity_row(dir: &Path, from: &str, to: &str) {
    if on_postgres() {
        database_sql(
            dir,
            &format!(
                "UPDATE identities SET body = (SELECT body FROM identities WHERE name = '{from}') WHERE name = '{to}'"
            ),
        )
        .await;
    } else {
        use khlang_server::storage::{Durability, SledStore};
        let store = SledStore::open(dir, Durability::PerRequest).unwrap();
        let tree = store.vault_tree_for_tests();
        let body = tree.get([b"i".as_slice(), from.as_bytes()].concat()).unwrap().unwrap();
        tree.insert([b"i".as_slice(), to.as_bytes()].concat(), body).unwrap();
        store.flush_now().await.unwrap();
    }
}

/// The first attack: regulations with a higher serial, giving the statistics contractor
/// every field, written into the store. A running node never puts them in force; a node that
/// starts on them refuses to unseal, naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regulations_written_into_the_store_are_never_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let id = server.client().await.put("citizen-3", canary_fields()).await.unwrap();
    let before = server.client_as("key-admin").await.regulations().await.unwrap();
    let granting = test_regulations().replace(
        "fields = [\"age\", \"sex\", \"preferences\", \"interests\", \"browser\", \"pages_visited\"]",
        "fields = [\"*\"]",
    );
    assert_ne!(granting, test_regulations());
    let forge = async |store: &dyn Storage| {
        let serial = store.regulations_serial().await.unwrap().unwrap();
        let mut c = Changes::new();
        c.put_regulations(&StoredRegulations {
            format: 1,
            serial: serial + 1,
            text: granting.clone(),
            loaded_ms: 1,
            loaded_by: "key-admin".into(),
            auth: None,
        });
        commit(store, c).await;
    };
    let mut contractor = server.client_as("statistics-contractor").await;
    if on_postgres() {
        // Written into the database while the node serves: it follows the store every 200 ms.
        let store = open_store(dir.path()).await;
        forge(store.as_ref()).await;
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let e = contractor.get(&id, &["card_number".into()], Some("statistics")).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
        let now = server.client_as("key-admin").await.regulations().await.unwrap();
        assert_eq!(now.version, before.version, "the forged version is not in force");
        // The node raised an alarm entry, once.
        let alarms: Vec<_> =
            server.audit_entries().into_iter().filter(|e| e.rpc == "AuthorityAlarm").collect();
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        assert!(alarms[0].reason.contains("regulations") && alarms[0].outcome == "DataLoss", "{alarms:?}");
        server.stop().await;
    } else {
        server.stop().await;
        tamper(dir.path(), async |store| forge(store).await).await;
    }
    let refused = refused_at_open(dir.path(), false).await;
    assert!(
        matches!(&refused, VaultError::Storage(StoreError::Unauthentic { what, .. }) if what.starts_with("regulations")),
        "{refused:?}"
    );
}

/// A withdrawn consent rewritten as granted in the store, and a consent inserted for a person who
/// never gave one: the marketing read is refused, not allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_rewritten_or_inserted_in_the_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let withdrawn = app.put("citizen-4", canary_fields()).await.unwrap();
    let never = app.put("citizen-5", canary_fields()).await.unwrap();
    app.set_consent("citizen-4", "marketing", true).await.unwrap();
    let mut marketing = server.client_as("marketing-officer").await;
    marketing.get(&withdrawn, &["email".into()], Some("marketing")).await.unwrap();
    app.set_consent("citizen-4", "marketing", false).await.unwrap();
    let e = marketing.get(&withdrawn, &["email".into()], Some("marketing")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let e = marketing.get(&never, &["email".into()], Some("marketing")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    let (index_4, index_5) = {
        let v = server.vault();
        (v.subject_index_for_tests("citizen-4").unwrap(), v.subject_index_for_tests("citizen-5").unwrap())
    };
    server.stop().await;

    tamper(dir.path(), async |store| {
        let mut choice = store.get_consent(&index_4, "marketing").await.unwrap().unwrap();
        choice.granted = true;
        let mut c = Changes::new();
        c.set_consent(&index_4, store.generate_id().await.unwrap(), &choice);
        // The same genuine-looking choice (tag and all) given to a person who never consented.
        c.set_consent(&index_5, store.generate_id().await.unwrap(), &choice);
        commit(store, c).await;
    })
    .await;

    let server = TestServer::start(dir.path()).await;
    let mut marketing = server.client_as("marketing-officer").await;
    for id in [&withdrawn, &never] {
        let e = marketing.get(id, &["email".into()], Some("marketing")).await.unwrap_err();
        refused_as_data_loss(&e);
        assert!(!e.to_string().contains(CANARY_EMAIL));
    }
    server.stop().await;
}

/// A vault made by this build never blesses untagged values: stripping every tag (identities,
/// tokens, regulations) and rewriting a role, with the vault stopped, does not make the next
/// unseal take them for an earlier build's and migrate them (its log shows tagged writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripping_every_tag_does_not_get_a_forged_identity_blessed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let contractor = server.tokens["statistics-contractor"].clone();
    server.stop().await;
    tamper(dir.path(), async |store| {
        let mut c = Changes::new();
        for mut who in store.list_identities().await.unwrap() {
            for (id, mut token) in store.tokens_of(&who.name).await.unwrap() {
                token.auth = None;
                c.put_token(&id, &token);
            }
            who.auth = None;
            if who.name == "statistics-contractor" {
                who.role = "data-protection-officer".into();
            }
            c.put_identity(&who);
        }
        let mut regulations = store.regulations().await.unwrap().unwrap();
        regulations.auth = None;
        c.retag_regulations(&regulations);
        commit(store, c).await;
    })
    .await;
    // The regulations in force carry no tag: the vault refuses to unseal on them, naming them.
    let refused = refused_at_open(dir.path(), true).await;
    assert!(
        matches!(&refused, VaultError::Storage(StoreError::Unauthentic { what, .. }) if what == "regulations:1"),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("regulations:1"), "{refused}");
    // And nothing was blessed: the forged role is still untagged in the store.
    let store = open_store(dir.path()).await;
    let who = store.get_identity("statistics-contractor").await.unwrap().unwrap();
    assert_eq!(who.role, "data-protection-officer");
    assert!(who.auth.is_none(), "the forged identity was not tagged");
    drop(store);
    let _ = contractor;
}

/// Removes a stored value as raw bytes: a key of sled's tree, or rows of the database.
async fn raw_delete(dir: &Path, sled_key: &[u8], sql: &str) {
    if on_postgres() {
        database_sql(dir, sql).await;
    } else {
        use khlang_server::storage::{Durability, SledStore};
        let store = SledStore::open(dir, Durability::PerRequest).unwrap();
        assert!(store.vault_tree_for_tests().remove(sled_key).unwrap().is_some(), "the key was there");
        store.flush_now().await.unwrap();
    }
}

/// Values the vault once wrote, put back after a later audited change replaced or removed them:
/// a revoked identity with its token, a withdrawn consent (from the subject's own history), and
/// a withdrawal deleted outright. Each tag is genuine; the audit log's newest write is not theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_older_values_put_back_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut app = server.client_as("registration-app").await;
    let record = app.put("citizen-6", canary_fields()).await.unwrap();
    let deleted = app.put("citizen-7", canary_fields()).await.unwrap();
    app.set_consent("citizen-6", "marketing", true).await.unwrap();
    app.set_consent("citizen-7", "marketing", true).await.unwrap();
    let postal = server.tokens["postal-contractor"].clone();
    let (index_6, index_7) = {
        let v = server.vault();
        (v.subject_index_for_tests("citizen-6").unwrap(), v.subject_index_for_tests("citizen-7").unwrap())
    };
    server.stop().await;
    // What an attacker copies while it is genuine (a database snapshot, an old backup).
    let (identity, tokens) = {
        let store = open_store(dir.path()).await;
        let identity = store.get_identity("postal-contractor").await.unwrap().unwrap();
        (identity, store.tokens_of("postal-contractor").await.unwrap())
    };

    let server = TestServer::start(dir.path()).await;
    server.client_as("key-admin").await.revoke_identity("postal-contractor").await.unwrap();
    let mut app = server.client_as("registration-app").await;
    app.set_consent("citizen-6", "marketing", false).await.unwrap();
    app.set_consent("citizen-7", "marketing", false).await.unwrap();
    let e = server
        .client_with_token(&postal)
        .await
        .get(&record, &["home_address".into()], Some("postal_delivery"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
    server.stop().await;

    tamper(dir.path(), async |store| {
        let mut c = Changes::new();
        c.put_identity(&identity);
        for (id, token) in &tokens {
            c.put_token(id, token);
        }
        // The consent granted before, from the subject's own history, back in the current slot.
        let (_, history) = store.consent_of(&index_6).await.unwrap();
        let granted = history.iter().find(|h| h.granted).unwrap().clone();
        c.retag_consent(&index_6, None, &granted);
        commit(store, c).await;
    })
    .await;
    // The withdrawal deleted: no current choice at all.
    let purpose_key = [b"c".as_slice(), &index_7, b"marketing"].concat();
    raw_delete(
        dir.path(),
        &purpose_key,
        &format!(
            "DELETE FROM consent WHERE subject_index = '\\x{}' AND purpose = 'marketing'",
            hex_of(&index_7)
        ),
    )
    .await;

    let server = TestServer::start(dir.path()).await;
    let e = server
        .client_with_token(&postal)
        .await
        .get(&record, &["home_address".into()], Some("postal_delivery"))
        .await
        .unwrap_err();
    refused_as_data_loss(&e);
    assert!(e.to_string().contains("older value") || e.to_string().contains("removed"), "{e}");
    let mut marketing = server.client_as("marketing-officer").await;
    for id in [&record, &deleted] {
        let e = marketing.get(id, &["email".into()], Some("marketing")).await.unwrap_err();
        refused_as_data_loss(&e);
    }
    server.stop().await;
}

/// The regulations rolled back to an older genuine version (the newer one deleted): the vault
/// does not start under the older rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regulations_rolled_back_to_an_older_version_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let tighter = test_regulations()
        .replace("fields = [\"card_number\", \"billing_address\"]", "fields = [\"card_number\"]");
    assert_ne!(tighter, test_regulations());
    std::fs::write(&server.regulations_path, &tighter).unwrap();
    server.client_as("key-admin").await.reload_regulations().await.unwrap();
    server.stop().await;
    // Serial 2 deleted (sled: the pointer moved back to 1 as well).
    if on_postgres() {
        database_sql(dir.path(), "DELETE FROM regulations WHERE serial = 2").await;
    } else {
        use khlang_server::storage::{Durability, SledStore};
        let store = SledStore::open(dir.path(), Durability::PerRequest).unwrap();
        store.vault_tree_for_tests().insert(b"G", &1u64.to_be_bytes()).unwrap();
        store.flush_now().await.unwrap();
    }
    let refused = refused_at_open(dir.path(), false).await;
    assert!(
        matches!(&refused, VaultError::Storage(StoreError::Unauthentic { what, why }) if what == "regulations:1" && why.contains("later version")),
        "{refused:?}"
    );
}

/// A rotation undone in the store (the newest KEK's rows deleted, or it marked retired) would put
/// new records back under the older key: the vault does not unseal, naming the version. An older
/// version retired without its entry, as a crash can leave it, still unseals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_undone_in_the_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.client_as("key-admin").await.rotate_key().await.unwrap();
    server.client().await.put("citizen-k", canary_fields()).await.unwrap();
    server.stop().await;
    // An older version retired without its entry (a retirement destroys the key before its entry
    // commits: a crash between them) is not a rotation undone: the vault unseals.
    tamper(dir.path(), async |store| store.retire_kek(1, 1).await.unwrap()).await;
    TestServer::start(dir.path()).await.stop().await;
    if on_postgres() {
        database_sql(
            dir.path(),
            "DELETE FROM keks WHERE version = 2; DELETE FROM kek_info WHERE version = 2",
        )
        .await;
    } else {
        tamper(dir.path(), async |store| store.retire_kek(2, 1).await.unwrap()).await;
    }
    let refused = refused_at_open(dir.path(), true).await;
    assert!(
        matches!(&refused, VaultError::Storage(StoreError::Unauthentic { what, why }) if what == "kek:2" && why.contains("rotation")),
        "{refused:?}"
    );
}

/// Lockouts decide who is refused: one written into the store (to lock a token out) is ignored,
/// while the vault's own lockout of a guessed-at token still survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lockout_written_into_the_store_is_ignored_and_a_genuine_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), strict(dir.path(), 3)).await;
    let victim = server.tokens["registration-app"].clone();
    let guessed = server.tokens["billing-clerk"].clone();
    let (id, secret) = guessed.trim_start_matches("khl_").split_once('_').unwrap();
    let forged = format!("khl_{id}_{}", "0".repeat(secret.len()));
    for _ in 0..3 {
        server.client_with_token(&forged).await.list("x").await.unwrap_err();
    }
    let e = server.client_with_token(&guessed).await.list("x").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "locked by the vault: {e}");
    server.stop().await;

    let victim_id = victim.trim_start_matches("khl_").split_once('_').unwrap().0.to_owned();
    tamper(dir.path(), async |store| {
        let locked = khlang_server::storage::FailureRecord {
            format: 1,
            locked_until_ms: Some(u64::MAX / 2),
            ..Default::default()
        };
        let key = khlang_server::vault::auth::Credential::Token(victim_id.clone()).key();
        store.put_failures(&key, &locked).await.unwrap();
    })
    .await;

    let server = TestServer::start_with(dir.path(), strict(dir.path(), 3)).await;
    server.client_with_token(&victim).await.list("x").await.unwrap();
    let e = server.client_with_token(&guessed).await.list("x").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "the genuine lockout survives the restart: {e}");
    server.stop().await;
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
