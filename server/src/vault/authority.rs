//! At unseal: the authority key is installed, every stored authority value is checked, and a
//! vault made before authority values carried tags gains them in one audited step.
//!
//! Which values are blessed is the one judgement here. A vault whose values carry no tag at all
//! was made by an earlier build: its values are tagged as they are, and the audit log says so
//! (`AuthenticateAuthority`, with how many of each kind). Untagged values beside tagged ones were
//! not written by this vault (an earlier build never wrote tags, this one never writes without):
//! they are left untagged, so they are refused wherever they are read, and reported. And a vault
//! whose log already records that step never takes it again: stripping every tag and inserting
//! one's own values, with the vault stopped, does not get them blessed.

use std::sync::Arc;

use khlang_keys::AuthorityTagger;

use crate::audit::{AuditEntry, Rpc};
use crate::policy::Operation;
use crate::storage::authority::{
    SPACE_CONSENT, SPACE_IDENTITY, SPACE_IDENTITY_REQUEST, SPACE_JOB, SPACE_REGULATIONS, SPACE_TOKEN, check,
    consent_key,
};
use crate::storage::{Changes, Storage, Stored};
use crate::{StoreError, Vault, VaultError};

/// Values per migration commit (each its own audited step), so one batch stays bounded.
const MIGRATE_PER_COMMIT: usize = 10_000;

/// What the unseal-time check found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuthorityCheck {
    pub tagged: u64,
    pub untagged: u64,
    /// Tagged, but the tag does not match.
    pub forged: u64,
    /// Untagged values this unseal tagged (an earlier build's vault).
    pub migrated: u64,
}

/// Tallies one value: `Some(true)` tagged and genuine, `Some(false)` tagged and forged, `None`
/// untagged.
fn classify<T: Stored>(
    tagger: &AuthorityTagger,
    space: &str,
    key: &[u8],
    v: &T,
    c: &mut AuthorityCheck,
) -> bool {
    if v.auth().is_none() {
        c.untagged += 1;
        return true;
    }
    match check(tagger, space, key, v) {
        Ok(()) => c.tagged += 1,
        Err(_) => c.forged += 1,
    }
    false
}

impl Vault {
    /// Installs the authority key and checks (or, for an earlier build's vault, migrates) every
    /// stored authority value. Fails, leaving the key out, only if the store cannot be read or
    /// the regulations in force are not genuine.
    pub(crate) async fn install_authority(
        &self,
        tagger: Arc<AuthorityTagger>,
    ) -> Result<AuthorityCheck, VaultError> {
        let raw = self.unchecked.clone();
        let mut found = AuthorityCheck::default();
        let mut untagged = Changes::new();
        let mut n_untagged = 0usize;
        let mut per_kind: std::collections::BTreeMap<&str, u64> = Default::default();
        let mut note = |kind: &'static str| *per_kind.entry(kind).or_default() += 1;
        let identities = raw.list_identities().await?;
        for i in &identities {
            if classify(&tagger, SPACE_IDENTITY, i.name.as_bytes(), i, &mut found) {
                untagged.put_identity(i);
                n_untagged += 1;
                note("identities");
            }
            for (id, t) in raw.tokens_of(&i.name).await? {
                if classify(&tagger, SPACE_TOKEN, id.as_bytes(), &t, &mut found) {
                    untagged.put_token(&id, &t);
                    n_untagged += 1;
                    note("tokens");
                }
            }
        }
        for r in raw.list_identity_requests().await? {
            if classify(&tagger, SPACE_IDENTITY_REQUEST, r.id.as_bytes(), &r, &mut found) {
                untagged.put_identity_request(&r);
                n_untagged += 1;
                note("identity requests");
            }
        }
        if let Some(job) = raw.job().await?
            && classify(&tagger, SPACE_JOB, b"", &job, &mut found)
        {
            untagged.put_job(&job);
            n_untagged += 1;
            note("key job");
        }
        if let Some(r) = raw.regulations().await?
            && classify(&tagger, SPACE_REGULATIONS, &r.serial.to_be_bytes(), &r, &mut found)
        {
            untagged.retag_regulations(&r);
            n_untagged += 1;
            note("regulations");
        }
        let (current, history) = raw.all_consent().await?;
        for (index, c) in &current {
            if classify(&tagger, SPACE_CONSENT, &consent_key(index, &c.purpose), c, &mut found) {
                untagged.retag_consent(index, None, c);
                n_untagged += 1;
                note("consent choices");
            }
        }
        for (index, seq, c) in &history {
            if classify(&tagger, SPACE_CONSENT, &consent_key(index, &c.purpose), c, &mut found) {
                untagged.retag_consent(index, Some(*seq), c);
                n_untagged += 1;
                note("consent history entries");
            }
        }
        self.audit.authority_key().install(Some(tagger));
        if found.forged > 0 {
            tracing::error!(
                forged = found.forged,
                "stored authority values fail their tags: they were changed outside the vault and are refused wherever they are read"
            );
        }
        if n_untagged > 0 {
            let migrate = found.tagged == 0 && found.forged == 0 && !self.authority_migrated_before()?;
            if migrate {
                found.migrated = self.migrate_authority(untagged, &per_kind).await?;
            } else {
                tracing::error!(
                    untagged = found.untagged,
                    "stored authority values without a tag in a vault whose values carry tags (or whose log records \
                     their migration): they were not written by this vault and are refused wherever they are read"
                );
            }
        }
        self.store_first_regulations().await.inspect_err(|_| self.audit.authority_key().install(None))?;
        metrics::gauge!("khlang_authority_unauthentic")
            .set((found.forged + found.untagged - found.migrated) as f64);
        // The regulations this vault started under were read before it could check them.
        if let Some(stored) =
            self.store.regulations().await.inspect_err(|_| self.audit.authority_key().install(None))?
            && stored.serial == self.regulations_serial()
            && crate::policy::regulations::Regulations::parse(&stored.text).map(|r| r.version).ok()
                != Some(self.regulations().version.clone())
        {
            self.audit.authority_key().install(None);
            return Err(StoreError::Unauthentic {
                what: format!("regulations:{}", stored.serial),
                why: "they changed since the vault started",
            }
            .into());
        }
        Ok(found)
    }

    /// Whether the audit log shows this vault already had tags: a migration, or any change that
    /// wrote tagged values (read from the log itself, which no one can edit unseen). Read only
    /// when every stored authority value is untagged.
    fn authority_migrated_before(&self) -> Result<bool, VaultError> {
        for entry in self.audit.read_entries() {
            let entry = entry?;
            if entry.write != 0 || entry.rpc == Rpc::AuthenticateAuthority.as_str() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn migrate_authority(
        &self,
        untagged: Changes,
        per_kind: &std::collections::BTreeMap<&str, u64>,
    ) -> Result<u64, VaultError> {
        let (ops, _) = untagged.into_parts();
        let total = ops.len() as u64;
        let summary = per_kind.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ");
        let chunks = ops.len().div_ceil(MIGRATE_PER_COMMIT);
        let mut ops = ops.into_iter().peekable();
        let mut part = 0;
        while ops.peek().is_some() {
            part += 1;
            let changes = Changes::from_ops(ops.by_ref().take(MIGRATE_PER_COMMIT).collect());
            let mut entry: AuditEntry =
                super::operator_entry(Rpc::AuthenticateAuthority, Operation::KeyAdmin, &self.regulations());
            entry.identity = "vault".into();
            entry.reason = format!(
                "values stored by an earlier build, without tags, authenticated as they are ({summary}; part {part} of {chunks})"
            );
            self.commit_now(entry, changes).await?;
        }
        tracing::warn!(
            values = total,
            kinds = %summary,
            "authority values stored by an earlier build were authenticated as they are (audited as AuthenticateAuthority)"
        );
        Ok(total)
    }
}

/// The store a vault uses: `raw` with every authority value checked under `key`.
pub(crate) fn checked_store(
    raw: Arc<dyn Storage>,
    key: Arc<crate::storage::authority::AuthorityKey>,
) -> Arc<dyn Storage> {
    Arc::new(crate::storage::authority::Authentic::new(raw, key))
}
