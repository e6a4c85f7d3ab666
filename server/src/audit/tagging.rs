//! The audit log's part in authority: every change that writes an authority value is tagged on
//! the log's one commit path, and its entry names the write (see `storage::authority`).

use std::sync::Arc;

use khlang_keys::RandomSource;

use super::{AuditEntry, AuditLog, lock};
use crate::VaultError;
use crate::storage::Changes;
use crate::storage::authority::{AuthorityKey, MIGRATED_ALL, WriteIndex, tag_changes};

/// A new write id: random, so a value cannot be replayed into a later write's place, and never
/// zero (zero means "no write" in an entry).
pub(crate) fn fresh_write() -> Result<u64, VaultError> {
    let mut id = [0u8; 8];
    khlang_keys::OsRandom::new().fill(&mut id)?;
    Ok(u64::from_be_bytes(id).max(1))
}

impl AuditLog {
    /// The authority key this log tags with; the vault installs it at unseal and the store's
    /// checking wrapper reads with it.
    pub fn authority_key(&self) -> Arc<AuthorityKey> {
        self.authority.clone()
    }

    /// Tags what `changes` writes under a fresh write id and records it in `entry`. Sealed: the
    /// change is refused (nothing that decides access is ever stored untagged).
    pub(super) fn tag_authority(
        &self,
        entry: &mut AuditEntry,
        changes: &mut Changes,
    ) -> Result<(), VaultError> {
        let tagger = self.authority.get().ok_or_else(|| {
            VaultError::FailedPrecondition(
                "the vault is sealed: who may do what cannot be changed now".into(),
            )
        })?;
        let write = fresh_write()?;
        let names = tag_changes(changes, &tagger, write)?;
        // The one-time migration rewrites every value as it is: its entry says so in one word
        // instead of naming each (the index accepts its write for keys no later change names).
        entry.writes = if entry.rpc == super::Rpc::AuthenticateAuthority.as_str() {
            vec![MIGRATED_ALL.to_owned()]
        } else {
            names
        };
        entry.write = write;
        Ok(())
    }

    /// Signs a whole backup file (by its SHA-256) with the audit key: a restore checks it against
    /// the public key the operator holds before it writes anything.
    pub fn sign_backup(&self, sha256: &[u8; 32]) -> Result<Vec<u8>, VaultError> {
        let keys = lock(&self.keys);
        let keys =
            keys.as_ref().ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        Ok(keys.signer.sign_backup(sha256)?)
    }

    /// Reads the whole log into the index of authority writes (at unseal, before any authority
    /// value is judged), replacing what it held. `changes_upto`: the newest entry whose change the
    /// store holds (its chain head), where the log's file may hold later ones whose change a crash
    /// took before the store's flush (never acknowledged): their writes are not the store's.
    pub fn build_write_index(
        &self,
        changes_upto: Option<u64>,
        tagger: &khlang_keys::AuthorityTagger,
    ) -> Result<(), crate::StoreError> {
        self.file.write_through()?;
        let mut index = WriteIndex::default();
        for item in self.file.entries(0) {
            let (seq, value) = item?;
            if changes_upto.is_some_and(|upto| seq > upto) {
                index.skip(seq);
                continue;
            }
            index.note_stored(seq, &value);
        }
        let first = self.file.first_seq()?;
        let named = self.base_writes(first)?;
        let base = self.archived_base(first, &named, tagger, self.accept_unbased_log)?;
        index.finish_build_on(first, base.map(|b| b.authority));
        *self.authority.index() = index;
        Ok(())
    }

    /// Every stored entry (`seq`, `hash ‖ canonical JSON`), damaged lines included as they read.
    pub fn raw_entries(&self) -> crate::audit::files::StoredEntries<'_> {
        self.file.entries(0)
    }
}
