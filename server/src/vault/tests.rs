//! The domain's unit tests through the storage port, on the in-memory store: the request path
//! (validate, decide, prepare, commit with its entry) and the key lifecycle, with no sled
//! underneath. The end-to-end suite (`tests/`) runs the same paths over gRPC on the real store.

use std::sync::Arc;

use khlang_keys::{Plaintext, SealParams};

use crate::storage::{AuditHead, Changes, KeySpace, MemoryStore, Storage};
use crate::vault::{CipherMode, FieldValue};
use crate::{Caller, Identity, Vault, VaultError, VaultOptions};

const PASSPHRASE: &[u8] = b"correct horse battery staple";

struct Fixture {
    vault: Vault,
    store: Arc<MemoryStore>,
    _dir: tempfile::TempDir,
}

async fn vault() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    Vault::init_store(store.as_ref(), 1, &[PASSPHRASE], SealParams::MINIMUM, CipherMode::Encrypted)
        .await
        .unwrap();
    let vault = Vault::from_store(store.clone(), dir.path(), &VaultOptions::default()).await.unwrap();
    vault.unseal_with(1, PASSPHRASE, None, "", "").await.unwrap();
    Fixture { vault, store, _dir: dir }
}

fn caller(role: &str) -> Caller {
    Caller {
        identity: Identity { name: format!("{role}-1"), role: role.into() },
        peer: None,
        request_id: "test".into(),
        client_request_id: String::new(),
    }
}

fn field(name: &str, value: &str) -> FieldValue {
    FieldValue { name: name.into(), value: Plaintext::from_str_copy(value) }
}

fn text(p: &Plaintext) -> &str {
    std::str::from_utf8(p.expose_secret()).unwrap()
}

/// Every byte the store holds for a record, as a backend would see it.
async fn stored_bytes(store: &dyn Storage) -> Vec<u8> {
    let mut out = Vec::new();
    for space in [KeySpace::Records, KeySpace::DataKeys] {
        for w in store.walk(space, &Default::default(), usize::MAX).await.unwrap() {
            out.extend(w.value);
        }
    }
    out
}

#[tokio::test]
async fn records_round_trip_through_the_port_and_only_ciphertext_reaches_it() {
    let f = vault().await;
    let app = caller("registration-app");
    let id = f
        .vault
        .put(
            &app,
            "subject-1",
            vec![field("name", "Somchai Canary"), field("card_number", "4111111111111111")],
        )
        .await
        .unwrap();
    let bytes = stored_bytes(f.store.as_ref()).await;
    for canary in ["Somchai Canary", "4111111111111111", "subject-1"] {
        assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()), "{canary} reached the store");
    }
    // The billing clerk reads the card in full, for billing only.
    let clerk = caller("billing-clerk");
    let view = f.vault.get(&clerk, &id, &["card_number".into()], Some("billing")).await.unwrap();
    assert_eq!(text(&view.fields[0].value), "4111111111111111");
    let refused = f.vault.get(&clerk, &id, &["name".into()], Some("billing")).await.unwrap_err();
    assert!(matches!(refused, VaultError::PermissionDenied(_)), "{refused:?}");
    // Update, then delete: the record and its data key leave the store.
    let names =
        f.vault.update(&app, &id, vec![field("email", "a@example.org")], &["name".into()]).await.unwrap();
    assert_eq!(names, ["card_number", "email"]);
    f.vault.delete(&caller("data-protection-officer"), &id).await.unwrap();
    assert_eq!(f.store.count(KeySpace::Records).await.unwrap(), 0);
    assert_eq!(f.store.count(KeySpace::DataKeys).await.unwrap(), 0);
    let gone = f.vault.get(&clerk, &id, &["card_number".into()], Some("billing")).await.unwrap_err();
    assert!(matches!(gone, VaultError::NotFound(_)), "{gone:?}");
}

#[tokio::test]
async fn a_withdrawn_consent_is_enforced_from_the_store() {
    let f = vault().await;
    let app = caller("registration-app");
    let id = f
        .vault
        .put(&app, "subject-2", vec![field("name", "Malee"), field("email", "m@example.org")])
        .await
        .unwrap();
    let marketing = caller("marketing-officer");
    let fields = ["name".to_string(), "email".to_string()];
    f.vault.set_consent(&app, "subject-2", "marketing", true).await.unwrap();
    f.vault.get(&marketing, &id, &fields, Some("marketing")).await.unwrap();
    f.vault.set_consent(&app, "subject-2", "marketing", false).await.unwrap();
    let refused = f.vault.get(&marketing, &id, &fields, Some("marketing")).await.unwrap_err();
    assert!(matches!(refused, VaultError::PermissionDenied(_)), "{refused:?}");
    let report = f.vault.consent(&caller("data-protection-officer"), "subject-2").await.unwrap();
    assert_eq!(report.history.len(), 2, "both choices are kept");
}

#[tokio::test]
async fn every_change_carries_its_entry_and_extends_the_stored_chain_head() {
    let f = vault().await;
    let app = caller("registration-app");
    // The first unseal stored the regulations, audited: that change carried the first entry.
    let before = f.store.audit_head().await.unwrap().expect("the first regulations moved the head");
    f.vault.put(&app, "subject-3", vec![field("name", "Anan")]).await.unwrap();
    let first = f.store.audit_head().await.unwrap().expect("the change moved the head");
    assert!(first.seq > before.seq);
    let carried = f.store.audit_entries_after(0).await.unwrap();
    assert_eq!(carried.last().map(|(s, _)| *s), Some(first.seq), "the head names the newest carried entry");
    f.vault.put(&app, "subject-3", vec![field("name", "Anan")]).await.unwrap();
    assert!(f.store.audit_head().await.unwrap().unwrap().seq > first.seq);
}

/// Another writer extends the chain in the store behind this vault's back (two processes on one
/// database): the vault's next change must not fork the chain — it fails closed, writes nothing.
#[tokio::test]
async fn a_change_after_another_writer_moved_the_chain_head_fails_closed() {
    let f = vault().await;
    let app = caller("registration-app");
    f.vault.put(&app, "subject-4", vec![field("name", "Ploy")]).await.unwrap();
    let head = f.store.audit_head().await.unwrap();
    let mut other = Changes::new();
    let forged = AuditHead { seq: head.map_or(1, |h| h.seq + 1), hash: [0xAB; 32] };
    other.extend_audit_head(head, forged);
    assert!(f.store.commit(other).await.unwrap());
    let records = f.store.count(KeySpace::Records).await.unwrap();
    let refused = f.vault.put(&app, "subject-4", vec![field("name", "Ploy")]).await.unwrap_err();
    assert!(matches!(refused, VaultError::AuditUnavailable), "{refused:?}");
    assert_eq!(f.store.count(KeySpace::Records).await.unwrap(), records, "nothing was written");
    assert_eq!(f.store.audit_head().await.unwrap(), Some(forged));
}

#[tokio::test]
async fn rotation_rewraps_every_data_key_through_the_port_and_retires_the_old_kek() {
    let f = vault().await;
    let app = caller("registration-app");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(f.vault.put(&app, &format!("s{i}"), vec![field("name", "Napat")]).await.unwrap());
    }
    let admin = caller("key-admin");
    f.vault.rotate(&admin).await.unwrap();
    while f.vault.job_step().await.unwrap() {}
    let per_kek = crate::storage::data_keys_per_kek(f.store.as_ref()).await.unwrap();
    assert_eq!(per_kek.into_iter().collect::<Vec<_>>(), [(2, 5)]);
    let job = f.store.job().await.unwrap().unwrap();
    assert_eq!((job.changed, job.skipped, job.total), (5, 0, 5));
    f.vault.retire(&admin, 1).await.unwrap();
    assert_eq!(f.store.keks().await.unwrap().iter().map(|(v, _)| *v).collect::<Vec<_>>(), [2]);
    let view = f.vault.get(&app, &ids[0], &["name".into()], Some("service_delivery")).await.unwrap();
    assert!(!view.fields[0].value.is_empty(), "still readable under v2");
}
