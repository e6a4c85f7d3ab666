//! At unseal: the authority key is installed, every stored authority value is checked, and a
//! vault made before authority values carried tags gains them in one audited step.
//!
//! Which values are blessed is the one judgement here. A vault whose values carry no tag at all
//! was made by an earlier build: its values are tagged as they are, and the audit log says so
//! (`AuthenticateAuthority`, with how many of each kind). Untagged values beside tagged ones were
//! not written by this vault (an earlier build never wrote tags, this one never writes without):
//! they are left untagged, so they are refused wherever they are read, and reported. And the
//! step is taken only on a log that verifies whole and shows no sign of this build (no entry
//! naming a write, no migration, no line it cannot read): stripping every tag and inserting
//! one's own values, with the vault stopped, does not get them blessed.
//!
//! Tags prove who wrote a value, not that it is still current: the audit log's index of writes
//! (`storage::authority::WriteIndex`, read whole here before anything is judged) says which
//! write is the newest for each key, so a genuine older value put back is refused too.

use std::sync::Arc;

use khlang_keys::AuthorityTagger;

use crate::audit::{AuditEntry, Rpc};
use crate::policy::Operation;
use crate::storage::authority::{
    AuthorityKey, SPACE_CONSENT, SPACE_IDENTITY, SPACE_IDENTITY_REQUEST, SPACE_JOB, SPACE_REGULATIONS,
    SPACE_TOKEN, check, consent_key, consent_name, regulations_name,
};
use crate::storage::{Changes, Storage, Stored};
use crate::{StoreError, Vault, VaultError};

/// Values per migration commit (each its own audited step), so one batch stays bounded.
const MIGRATE_PER_COMMIT: usize = 10_000;

/// What the unseal-time check found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuthorityCheck {
    /// Tagged, and the newest write the log names.
    pub tagged: u64,
    pub untagged: u64,
    /// Tagged, but the tag does not match, or an older write than the log's newest.
    pub forged: u64,
    /// Untagged values this unseal tagged (an earlier build's vault).
    pub migrated: u64,
}

/// Tallies values as it reads them.
struct Classifier<'a> {
    tagger: &'a AuthorityTagger,
    index: &'a AuthorityKey,
    found: AuthorityCheck,
}

impl Classifier<'_> {
    /// `true`: the value is untagged (a migration candidate).
    fn untagged<T: Stored>(&mut self, space: &str, key: &[u8], name: &str, v: &T) -> bool {
        let Some(auth) = v.auth() else {
            self.found.untagged += 1;
            return true;
        };
        let genuine = check(self.tagger, space, key, v).is_ok();
        match self.index.judge(name, auth.write) {
            Ok(()) if genuine => self.found.tagged += 1,
            _ => self.found.forged += 1,
        }
        false
    }
}

impl Vault {
    /// Installs the authority key and checks (or, for an earlier build's vault, migrates) every
    /// stored authority value. Fails, leaving the key out, only if the store or the log cannot
    /// be read or the regulations in force are not genuine.
    pub(crate) async fn install_authority(
        &self,
        tagger: Arc<AuthorityTagger>,
    ) -> Result<AuthorityCheck, VaultError> {
        let key = self.audit.authority_key();
        let installed = self.check_and_install(&key, tagger).await;
        if installed.is_err() {
            key.install(None);
        }
        installed
    }

    async fn check_and_install(
        &self,
        key: &Arc<AuthorityKey>,
        tagger: Arc<AuthorityTagger>,
    ) -> Result<AuthorityCheck, VaultError> {
        let raw = self.unchecked.clone();
        // The log first: every value is judged against the newest write it names. On a store of
        // this node's own, a change's entry reaches the log's file before the store's flush; past
        // the store's chain head, a crash took the change (unacknowledged), so not its writes.
        let changes_upto = match raw.shared_chain() {
            Some(_) => None,
            None => Some(raw.audit_head().await?.map_or(0, |h| h.seq)),
        };
        let started = std::time::Instant::now();
        self.audit.build_write_index(changes_upto, &tagger)?;
        let indexed = started.elapsed();
        self.check_keks_against_log().await?;
        let mut c = Classifier { tagger: &tagger, index: key, found: AuthorityCheck::default() };
        let mut untagged = Changes::new();
        let mut per_kind: std::collections::BTreeMap<&str, u64> = Default::default();
        let mut note = |kind: &'static str| *per_kind.entry(kind).or_default() += 1;
        for i in &raw.list_identities().await? {
            if c.untagged(SPACE_IDENTITY, i.name.as_bytes(), &format!("{SPACE_IDENTITY}:{}", i.name), i) {
                untagged.put_identity(i);
                note("identities");
            }
            for (id, t) in raw.tokens_of(&i.name).await? {
                if c.untagged(SPACE_TOKEN, id.as_bytes(), &format!("{SPACE_TOKEN}:{id}"), &t) {
                    untagged.put_token(&id, &t);
                    note("tokens");
                }
            }
        }
        for r in raw.list_identity_requests().await? {
            let name = format!("{SPACE_IDENTITY_REQUEST}:{}", r.id);
            if c.untagged(SPACE_IDENTITY_REQUEST, r.id.as_bytes(), &name, &r) {
                untagged.put_identity_request(&r);
                note("identity requests");
            }
        }
        if let Some(job) = raw.job().await?
            && c.untagged(SPACE_JOB, b"", SPACE_JOB, &job)
        {
            untagged.put_job(&job);
            note("key job");
        }
        if let Some(r) = raw.regulations().await?
            && c.untagged(SPACE_REGULATIONS, &r.serial.to_be_bytes(), &regulations_name(r.serial), &r)
        {
            untagged.retag_regulations(&r);
            note("regulations");
        }
        let (current, history) = raw.all_consent().await?;
        for (index, v) in &current {
            if c.untagged(SPACE_CONSENT, &consent_key(index, &v.purpose), &consent_name(index, &v.purpose), v)
            {
                untagged.retag_consent(index, None, v);
                note("consent choices");
            }
        }
        // The history holds every choice ever made: each is checked by its tag alone.
        for (index, seq, v) in &history {
            if v.auth().is_none() {
                c.found.untagged += 1;
                untagged.retag_consent(index, Some(*seq), v);
                note("consent history entries");
            } else if check(&tagger, SPACE_CONSENT, &consent_key(index, &v.purpose), v).is_ok() {
                c.found.tagged += 1;
            } else {
                c.found.forged += 1;
            }
        }
        let mut found = c.found;
        tracing::info!(
            entries = key.index().upto(),
            index_ms = indexed.as_millis() as u64,
            values = found.tagged + found.forged + found.untagged,
            total_ms = started.elapsed().as_millis() as u64,
            "authority: the log's writes indexed and every stored authority value checked"
        );
        key.install(Some(tagger));
        // Token lockouts survive a restart: read once the tags can be checked (a lockout the vault
        // did not write is ignored). A custodian's, stored by an earlier build, is not taken
        // back: custodians are paced, never locked.
        let lockouts = self.store.failure_records().await?;
        self.auth_guard.restore(
            lockouts
                .into_iter()
                .filter_map(|(k, r)| Some((crate::vault::auth::Credential::from_key(&k)?, r)))
                .filter(|(c, _)| matches!(c, crate::vault::auth::Credential::Token(_)))
                .collect(),
        );
        if found.forged > 0 {
            tracing::error!(
                forged = found.forged,
                "stored authority values fail their tags or are older than the newest write the audit log names: \
                 they were changed outside the vault and are refused wherever they are read"
            );
        }
        if found.untagged > 0 {
            if found.tagged == 0 && found.forged == 0 && self.may_migrate_authority().await? {
                found.migrated = self.migrate_authority(untagged, &per_kind).await?;
            } else {
                tracing::error!(
                    untagged = found.untagged,
                    "stored authority values without a tag in a vault whose values carry tags (or whose log shows \
                     this build): they were not written by this vault and are refused wherever they are read"
                );
            }
        }
        self.store_first_regulations().await?;
        self.regulations_from_store().await?;
        key.count_refused(found.forged + found.untagged - found.migrated);
        *self.authority_found.lock().unwrap_or_else(|p| p.into_inner()) = found;
        Ok(found)
    }

    /// Authority values found not genuine since unseal (at unseal or by a read): health's
    /// `khlang.v1.Authority` answers NOT_SERVING while there are any.
    pub fn authority_refused(&self) -> u64 {
        self.audit.authority_key().refused()
    }

    /// What the last unseal-time check found (`khlangd verify` reports it).
    pub fn authority_check(&self) -> AuthorityCheck {
        *self.authority_found.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The regulations in force are the newest genuine version in the store: the copy a sealed
    /// vault started under was read before it could be checked (it may have been swapped since,
    /// or swapped back), so the checked one replaces it when they differ.
    async fn regulations_from_store(&self) -> Result<(), VaultError> {
        let Some(stored) = self.store.regulations().await? else { return Ok(()) };
        if stored.serial == self.regulations_serial() && stored.text == *self.regulations().text {
            return Ok(());
        }
        let checked = crate::policy::regulations::Regulations::parse(&stored.text)
            .map_err(|_| StoreError::Corrupt("regulations"))?;
        tracing::warn!(
            serial = stored.serial,
            version = %checked.version,
            "the regulations read before unsealing are not the newest genuine version: that one is in force"
        );
        self.force_regulations(checked, stored.serial);
        Ok(())
    }

    /// Whether this vault's values may be taken for an earlier build's: its log verifies whole
    /// (no edited entry), every line of it reads, and none shows this build (a write, a
    /// migration, the first regulations stored at unseal).
    async fn may_migrate_authority(&self) -> Result<bool, VaultError> {
        if matches!(self.verify_audit_now().await?.verdict(), khlang_keys::audit_chain::Verdict::Broken(_)) {
            tracing::error!(
                "authority values carry no tags, but the audit log does not verify: not migrating them"
            );
            return Ok(false);
        }
        let this_build = [Rpc::AuthenticateAuthority.as_str(), Rpc::FirstRegulations.as_str()];
        for line in self.audit.raw_entries() {
            let (seq, value) = line?;
            let Some(entry) = value.get(32..).and_then(|j| serde_json::from_slice::<AuditEntry>(j).ok())
            else {
                tracing::error!(seq, "an audit entry does not read: not migrating authority values");
                return Ok(false);
            };
            if entry.write != 0 || !entry.writes.is_empty() || this_build.contains(&entry.rpc.as_str()) {
                tracing::error!(
                    seq,
                    "authority values carry no tags, but the log shows this build wrote tagged ones: not migrating"
                );
                return Ok(false);
            }
        }
        Ok(true)
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

/// Values alarmed at most (then refusals are still answered and entered, but raise no alarm).
const MAX_ALARMED: usize = 10_000;

impl Vault {
    /// A value refused as not this vault's (a row that appeared in a shared database without its
    /// audited change, an edit of the data folder) raises one `AuthorityAlarm` entry per value,
    /// so the finding stands in the log on its own, beside the refused request's entry.
    pub(crate) async fn alarm_unauthentic(&self, e: &VaultError) {
        let VaultError::Storage(crate::StoreError::Unauthentic { what, why }) = e else { return };
        {
            let mut alarmed = self.alarmed.lock().unwrap_or_else(|p| p.into_inner());
            if alarmed.len() >= MAX_ALARMED || !alarmed.insert(what.clone()) {
                return;
            }
        }
        let mut entry = crate::vault::operator_entry(
            crate::audit::Rpc::AuthorityAlarm,
            crate::policy::Operation::RegulationsAdmin,
            &self.regulations(),
        );
        entry.identity = "vault".into();
        entry.outcome = crate::Outcome::DataLoss;
        entry.reason = crate::audit::clean(&format!("{what} refused: {why}"));
        if let Err(alarm) = self.commit_now(entry, Changes::none()).await {
            tracing::error!(error = %alarm, value = %what, "could not record an authority alarm");
        }
    }
}
