//! The audit log's part in authority: every change that writes an authority value is tagged on
//! the log's one commit path, and its entry names the write (see `storage::authority`).

use std::sync::Arc;

use khlang_keys::RandomSource;

use super::{AuditEntry, AuditLog, lock};
use crate::VaultError;
use crate::storage::Changes;
use crate::storage::authority::{AuthorityKey, tag_changes};

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
        let mut id = [0u8; 8];
        khlang_keys::OsRandom::new().fill(&mut id)?;
        // Never zero: zero means "no write" in an entry.
        let write = u64::from_be_bytes(id).max(1);
        entry.writes = tag_changes(changes, &tagger, write)?;
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
}
