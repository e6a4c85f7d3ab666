//! Authority values — what decides who may do what: identities, tokens, identity requests,
//! consent, regulations, the key job — carry a tag under a key only the unsealed vault holds
//! (see `khlang_keys::AuthorityTagger`), so whoever can write the database or hand over a
//! backup cannot grant access. [`tag_changes`] tags every authority value a change writes (the
//! audit log calls it on its one commit path); [`Authentic`] wraps the store and checks every
//! authority value it reads: one that fails is never handed to the domain, the read fails with
//! [`StoreError::Unauthentic`] (answered `DataLoss`), logged and counted.

use std::sync::{Arc, RwLock};

use khlang_keys::AuthorityTagger;

use super::models::{AuthTag, Stored, body_of};
use super::{
    AuditHead, AuditRecord, Changes, Cursor, Custody, FailureRecord, FlushStats, HeadRecorder, KekInfo,
    KeySpace, Op, RawEntry, SharedChain, Snapshot, Storage, StoredConsent, StoredIdentity,
    StoredIdentityRequest, StoredJob, StoredRecord, StoredRegulations, StoredToken, Version, Walked,
    WriteTicket,
};
use crate::StoreError;

/// Key spaces of authority values: each tag names its own, so a value cannot move between them.
pub const SPACE_IDENTITY: &str = "identity";
pub const SPACE_IDENTITY_REQUEST: &str = "identity-request";
pub const SPACE_TOKEN: &str = "token";
pub const SPACE_CONSENT: &str = "consent";
pub const SPACE_JOB: &str = "key-job";
pub const SPACE_REGULATIONS: &str = "regulations";

/// A consent choice's key: the subject's blind index and the purpose (its current slot and its
/// history entries carry the same tag).
pub fn consent_key(subject_index: &[u8; 32], purpose: &str) -> Vec<u8> {
    [subject_index.as_slice(), purpose.as_bytes()].concat()
}

fn tag<T: Stored>(
    tagger: &AuthorityTagger,
    space: &str,
    key: &[u8],
    write: u64,
    value: &T,
) -> Result<AuthTag, StoreError> {
    Ok(AuthTag { write, mac: tagger.tag(space, key, write, &body_of(value, "authority value")?) })
}

/// Names an authority write for its audit entry (`space:key`); keys that are bytes are hex.
fn name(space: &str, key: &[u8], readable: bool) -> String {
    if readable {
        format!("{space}:{}", String::from_utf8_lossy(key))
    } else {
        format!("{space}:{}", hex::encode(key))
    }
}

/// Tags every authority value `changes` writes as write `write`, and returns what it writes and
/// removes (`identity:alice`, `-token:…`), for the change's audit entry.
pub fn tag_changes(
    changes: &mut Changes,
    tagger: &AuthorityTagger,
    write: u64,
) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for op in &mut changes.ops {
        match op {
            Op::PutIdentity(i) => {
                i.auth = None;
                i.auth = Some(tag(tagger, SPACE_IDENTITY, i.name.as_bytes(), write, i)?);
                names.push(name(SPACE_IDENTITY, i.name.as_bytes(), true));
            }
            Op::PutIdentityRequest(r) => {
                r.auth = None;
                r.auth = Some(tag(tagger, SPACE_IDENTITY_REQUEST, r.id.as_bytes(), write, r)?);
                names.push(name(SPACE_IDENTITY_REQUEST, r.id.as_bytes(), true));
            }
            Op::RemoveIdentityRequest(id) => {
                names.push(format!("-{}", name(SPACE_IDENTITY_REQUEST, id.as_bytes(), true)))
            }
            Op::PutToken { id, token } => {
                token.auth = None;
                token.auth = Some(tag(tagger, SPACE_TOKEN, id.as_bytes(), write, token)?);
                names.push(name(SPACE_TOKEN, id.as_bytes(), true));
            }
            Op::RemoveToken(id) => names.push(format!("-{}", name(SPACE_TOKEN, id.as_bytes(), true))),
            Op::SetConsent { subject_index, consent, .. }
            | Op::RetagConsent { subject_index, consent, .. } => {
                let key = consent_key(subject_index, &consent.purpose);
                consent.auth = None;
                consent.auth = Some(tag(tagger, SPACE_CONSENT, &key, write, consent)?);
                names.push(format!("{SPACE_CONSENT}:{}:{}", hex::encode(subject_index), consent.purpose));
            }
            Op::PutJob(job) => {
                job.auth = None;
                job.auth = Some(tag(tagger, SPACE_JOB, b"", write, job)?);
                names.push(SPACE_JOB.to_owned());
            }
            Op::PutRegulations(r) | Op::RetagRegulations(r) => {
                r.auth = None;
                r.auth = Some(tag(tagger, SPACE_REGULATIONS, &r.serial.to_be_bytes(), write, r)?);
                names.push(format!("{SPACE_REGULATIONS}:{}", r.serial));
            }
            _ => {}
        }
    }
    Ok(names)
}

/// Whether `changes` writes an authority value (so needs the authority key to be committed).
pub fn writes_authority(changes: &Changes) -> bool {
    changes.ops.iter().any(|op| {
        matches!(
            op,
            Op::PutIdentity(_)
                | Op::PutIdentityRequest(_)
                | Op::PutToken { .. }
                | Op::SetConsent { .. }
                | Op::PutJob(_)
                | Op::PutRegulations(_)
                | Op::RetagRegulations(_)
                | Op::RetagConsent { .. }
        )
    })
}

/// Checks one authority value's tag: `Ok` only if the vault wrote exactly this value at this key.
pub fn check<T: Stored>(
    tagger: &AuthorityTagger,
    space: &str,
    key: &[u8],
    value: &T,
) -> Result<(), StoreError> {
    let Some(auth) = value.auth() else {
        return Err(unauthentic(space, key, "it carries no tag"));
    };
    let body = body_of(value, "authority value")?;
    if tagger.verify(space, key, auth.write, &body, &auth.mac) {
        Ok(())
    } else {
        Err(unauthentic(space, key, "its tag does not match"))
    }
}

fn unauthentic(space: &str, key: &[u8], why: &'static str) -> StoreError {
    let readable = !matches!(space, SPACE_CONSENT) && key.iter().all(|b| b.is_ascii_graphic());
    let named = match (space, <[u8; 8]>::try_from(key)) {
        (SPACE_JOB, _) => space.to_owned(),
        (SPACE_REGULATIONS, Ok(serial)) => format!("{space}:{}", u64::from_be_bytes(serial)),
        _ => name(space, key, readable),
    };
    // Key bytes of a consent entry are a blind index and a purpose name, never a subject id.
    tracing::error!(value = %named, why, "a stored authority value fails its check: it was not written by this vault (edited, moved or inserted in the store); it is not used");
    metrics::counter!("khlang_authority_failures_total", "space" => space.to_owned()).increment(1);
    StoreError::Unauthentic { what: named, why }
}

/// The authority key, once the vault is unsealed; shared by the store wrapper and the audit log.
#[derive(Default)]
pub struct AuthorityKey(RwLock<Option<Arc<AuthorityTagger>>>);

impl std::fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthorityKey(..)")
    }
}

impl AuthorityKey {
    pub fn install(&self, tagger: Option<Arc<AuthorityTagger>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = tagger;
    }

    pub fn get(&self) -> Option<Arc<AuthorityTagger>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn require(&self) -> Result<Arc<AuthorityTagger>, StoreError> {
        self.get().ok_or(StoreError::Sealed)
    }
}

/// The store as the domain sees it: every authority value read is checked (see the module doc);
/// everything else passes through. A change that writes an authority value untagged is refused.
#[derive(Debug)]
pub struct Authentic {
    inner: Arc<dyn Storage>,
    key: Arc<AuthorityKey>,
}

impl Authentic {
    pub fn new(inner: Arc<dyn Storage>, key: Arc<AuthorityKey>) -> Self {
        Self { inner, key }
    }

    /// The store without the checks: for the unseal-time migration and the regulations a
    /// sealed vault starts under (checked once unsealed).
    pub fn unchecked(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    fn check<T: Stored>(&self, space: &str, key: &[u8], value: &T) -> Result<(), StoreError> {
        check(&*self.key.require()?, space, key, value)
    }

    fn check_untagged_none(changes: &Changes) -> Result<(), StoreError> {
        let untagged = changes.ops.iter().any(|op| match op {
            Op::PutIdentity(v) => v.auth.is_none(),
            Op::PutIdentityRequest(v) => v.auth.is_none(),
            Op::PutToken { token, .. } => token.auth.is_none(),
            Op::SetConsent { consent, .. } | Op::RetagConsent { consent, .. } => consent.auth.is_none(),
            Op::PutJob(v) => v.auth.is_none(),
            Op::PutRegulations(v) | Op::RetagRegulations(v) => v.auth.is_none(),
            _ => false,
        });
        if untagged {
            // A path that writes authority without the audit log's commit: a bug, refused.
            tracing::error!("a change writes an authority value without its tag; refused");
            return Err(StoreError::Sealed);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Storage for Authentic {
    async fn mode(&self) -> Result<Option<String>, StoreError> {
        self.inner.mode().await
    }
    async fn initialise(
        &self,
        custody: &Custody,
        mode: &str,
        wrapped_derivation_key: &[u8],
        kek: (u32, &[u8]),
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.inner.initialise(custody, mode, wrapped_derivation_key, kek, now_ms).await
    }
    async fn is_initialised(&self) -> Result<bool, StoreError> {
        self.inner.is_initialised().await
    }
    async fn custody(&self) -> Result<Custody, StoreError> {
        self.inner.custody().await
    }
    async fn replace_sealed(&self, custodian: u8, sealed: &[u8]) -> Result<(), StoreError> {
        self.inner.replace_sealed(custodian, sealed).await
    }
    async fn replace_root(
        &self,
        custody: &Custody,
        wrapped_derivation_key: &[u8],
        keks: &[(u32, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.inner.replace_root(custody, wrapped_derivation_key, keks).await
    }
    async fn derivation_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.derivation_key().await
    }
    async fn add_kek(&self, version: u32, wrapped: &[u8], now_ms: u64) -> Result<(), StoreError> {
        self.inner.add_kek(version, wrapped, now_ms).await
    }
    async fn retire_kek(&self, version: u32, now_ms: u64) -> Result<(), StoreError> {
        self.inner.retire_kek(version, now_ms).await
    }
    async fn kek_infos(&self) -> Result<Vec<KekInfo>, StoreError> {
        self.inner.kek_infos().await
    }
    async fn keks(&self) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        self.inner.keks().await
    }
    async fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, Version)>, StoreError> {
        self.inner.get_record(record_id).await
    }
    async fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        self.inner.records_of_subject(subject_index).await
    }
    async fn walk(&self, space: KeySpace, cursor: &Cursor, limit: usize) -> Result<Vec<Walked>, StoreError> {
        self.inner.walk(space, cursor, limit).await
    }
    async fn count(&self, space: KeySpace) -> Result<u64, StoreError> {
        self.inner.count(space).await
    }

    async fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        let found = self.inner.get_identity(name).await?;
        if let Some(i) = &found {
            self.check(SPACE_IDENTITY, name.as_bytes(), i)?;
            if i.name != name {
                return Err(unauthentic(SPACE_IDENTITY, name.as_bytes(), "it names another identity"));
            }
        }
        Ok(found)
    }
    async fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        let all = self.inner.list_identities().await?;
        for i in &all {
            self.check(SPACE_IDENTITY, i.name.as_bytes(), i)?;
        }
        Ok(all)
    }
    async fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        let found = self.inner.get_identity_request(id).await?;
        if let Some(r) = &found {
            self.check(SPACE_IDENTITY_REQUEST, id.as_bytes(), r)?;
            if r.id != id {
                return Err(unauthentic(SPACE_IDENTITY_REQUEST, id.as_bytes(), "it names another request"));
            }
        }
        Ok(found)
    }
    async fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        let all = self.inner.list_identity_requests().await?;
        for r in &all {
            self.check(SPACE_IDENTITY_REQUEST, r.id.as_bytes(), r)?;
        }
        Ok(all)
    }
    async fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let found = self.inner.get_token(token_id).await?;
        if let Some(t) = &found {
            self.check(SPACE_TOKEN, token_id.as_bytes(), t)?;
        }
        Ok(found)
    }
    async fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
        let all = self.inner.tokens_of(name).await?;
        for (id, t) in &all {
            self.check(SPACE_TOKEN, id.as_bytes(), t)?;
        }
        Ok(all)
    }
    async fn put_failures(&self, credential: &[u8], record: &FailureRecord) -> Result<(), StoreError> {
        self.inner.put_failures(credential, record).await
    }
    async fn failure_records(&self) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        self.inner.failure_records().await
    }
    async fn count_failure(
        &self,
        credential: &[u8],
        update: &(dyn Fn(Option<FailureRecord>) -> FailureRecord + Sync),
    ) -> Result<Option<FailureRecord>, StoreError> {
        self.inner.count_failure(credential, update).await
    }
    async fn lockouts(&self, now_ms: u64) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        self.inner.lockouts(now_ms).await
    }
    async fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        let found = self.inner.get_consent(subject_index, purpose).await?;
        if let Some(c) = &found {
            self.check(SPACE_CONSENT, &consent_key(subject_index, purpose), c)?;
            if c.purpose != purpose {
                return Err(unauthentic(
                    SPACE_CONSENT,
                    &consent_key(subject_index, purpose),
                    "it names another purpose",
                ));
            }
        }
        Ok(found)
    }
    async fn all_consent(&self) -> Result<super::AllConsent, StoreError> {
        let (current, history) = self.inner.all_consent().await?;
        for (index, c) in &current {
            self.check(SPACE_CONSENT, &consent_key(index, &c.purpose), c)?;
        }
        for (index, _, c) in &history {
            self.check(SPACE_CONSENT, &consent_key(index, &c.purpose), c)?;
        }
        Ok((current, history))
    }
    async fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let (current, history) = self.inner.consent_of(subject_index).await?;
        for c in current.iter().chain(&history) {
            self.check(SPACE_CONSENT, &consent_key(subject_index, &c.purpose), c)?;
        }
        Ok((current, history))
    }
    async fn job(&self) -> Result<Option<StoredJob>, StoreError> {
        let found = self.inner.job().await?;
        if let Some(j) = &found {
            self.check(SPACE_JOB, b"", j)?;
        }
        Ok(found)
    }
    async fn regulations(&self) -> Result<Option<StoredRegulations>, StoreError> {
        let found = self.inner.regulations().await?;
        if let Some(r) = &found {
            self.check(SPACE_REGULATIONS, &r.serial.to_be_bytes(), r)?;
        }
        Ok(found)
    }
    async fn regulations_serial(&self) -> Result<Option<u64>, StoreError> {
        self.inner.regulations_serial().await
    }
    async fn generate_id(&self) -> Result<u64, StoreError> {
        self.inner.generate_id().await
    }

    async fn audit_record(&self, which: AuditRecord) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.audit_record(which).await
    }
    async fn set_audit_record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set_audit_record(which, value).await
    }
    async fn remove_audit_record(&self, which: AuditRecord) -> Result<(), StoreError> {
        self.inner.remove_audit_record(which).await
    }
    fn head_recorder(&self) -> HeadRecorder {
        self.inner.head_recorder()
    }
    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.inner.audit_head().await
    }
    async fn audit_entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.audit_entries_after(after).await
    }
    async fn remove_audit_entries_upto(&self, last: u64) -> Result<(), StoreError> {
        self.inner.remove_audit_entries_upto(last).await
    }
    async fn legacy_checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.legacy_checkpoints().await
    }
    async fn remove_legacy_checkpoints(&self) -> Result<(), StoreError> {
        self.inner.remove_legacy_checkpoints().await
    }

    async fn commit(&self, changes: Changes) -> Result<bool, StoreError> {
        Self::check_untagged_none(&changes)?;
        self.inner.commit(changes).await
    }
    fn snapshot(
        &self,
        each: &mut dyn FnMut(RawEntry) -> Result<(), StoreError>,
    ) -> Result<Snapshot, StoreError> {
        self.inner.snapshot(each)
    }
    async fn durable(&self) -> Result<(), StoreError> {
        self.inner.durable().await
    }
    fn begin_write(&self) -> WriteTicket {
        self.inner.begin_write()
    }
    async fn flush_now(&self) -> Result<(), StoreError> {
        self.inner.flush_now().await
    }
    fn flush_stats(&self) -> &FlushStats {
        self.inner.flush_stats()
    }
    fn shared_chain(&self) -> Option<Arc<dyn SharedChain>> {
        self.inner.shared_chain()
    }
    async fn hold_job_lease(&self, want: bool) -> Result<bool, StoreError> {
        self.inner.hold_job_lease(want).await
    }
}
