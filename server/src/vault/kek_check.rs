//! Key metadata against the access log. A KEK's material cannot be forged (it is AEAD-wrapped under
//! the root key, bound to its version), but which versions exist decides which one wraps new data
//! keys: deleting the newest KEK's row, or marking it retired, in the store would silently undo a
//! rotation and put new records back under an older key. Every rotation is an audited entry
//! (`RotateKey`, `kek=N`), and the vault never retires its active version, so at unseal the store
//! must hold, live and wrapped, the newest version the log made (unless the log retired it);
//! otherwise unsealing is refused (`DataLoss`) naming the version. Older versions are not judged:
//! a retirement destroys the key before its entry commits, so a crash between the two leaves one
//! retired without its `RetireKey` entry, and retiring an older key outside the vault only makes
//! the records still under it unreadable (each read `DataLoss`). A version the store holds that
//! the log never named is a rotation whose entry a crash took (the key is added before its entry
//! commits): harmless, as only the vault can have wrapped it.

use std::collections::HashSet;

use super::Vault;
use crate::VaultError;
use crate::storage::authority::{SPACE_KEK, unauthentic};

impl Vault {
    pub(crate) async fn check_keks_against_log(&self) -> Result<(), VaultError> {
        let (made, retired) = {
            let index = self.audit.authority_key();
            let index = index.index();
            (index.keks_made.clone(), index.keks_retired.clone())
        };
        let live: HashSet<u32> = self
            .unchecked
            .kek_infos()
            .await?
            .into_iter()
            .filter(|i| i.retired_ms.is_none())
            .map(|i| i.version)
            .collect();
        let wrapped: HashSet<u32> = self.unchecked.keks().await?.into_iter().map(|(v, _)| v).collect();
        let newest = made.into_iter().rfind(|(v, _)| !retired.contains(v));
        if let Some((version, seq)) = newest
            && (!live.contains(&version) || !wrapped.contains(&version))
        {
            tracing::error!(
                version,
                made_by = seq,
                "the newest KEK version the access log made is missing from the store, or marked retired: \
                 a rotation was undone outside the vault; not unsealing"
            );
            self.audit.authority_key().count_refused(1);
            return Err(unauthentic(
                SPACE_KEK,
                version.to_string().as_bytes(),
                "a rotation the access log names was undone outside the vault (the version is missing or marked retired)",
            )
            .into());
        }
        Ok(())
    }
}
