//! Authority values — what decides who may do what: identities, tokens, identity requests,
//! consent, regulations, the key job — carry a tag under a key only the unsealed vault holds
//! (see `khlang_keys::AuthorityTagger`), so whoever can write the database or hand over a
//! backup cannot grant access. [`tag_changes`] tags every authority value a change writes (the
//! audit log calls it on its one commit path); [`Authentic`] wraps the store and checks every
//! authority value it reads: one that fails is never handed to the domain, the read fails with
//! [`StoreError::Unauthentic`] (answered `DataLoss`), logged and counted.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use khlang_keys::AuthorityTagger;

use super::models::{AuthTag, Stored, body_of};
pub use super::write_index::{MIGRATED_ALL, WriteIndex};
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
/// KEK versions, judged against the log's rotations and retirements (not tagged: see `vault::kek_check`).
pub const SPACE_KEK: &str = "kek";
/// Lockout records: tagged, not indexed (failures are counted, not each audited), so a lockout
/// written by anyone else is ignored; one deleted is not noticed.
pub const SPACE_LOCKOUT: &str = "lockout";
/// An archived log's signed base (`audit::archive_base`): kept beside the log, not in the store.
pub const SPACE_ARCHIVE_BASE: &str = "archive-base";

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

/// The name an entry's `writes` gives a consent choice: how the write index knows it.
pub fn consent_name(subject_index: &[u8; 32], purpose: &str) -> String {
    format!("{SPACE_CONSENT}:{}:{purpose}", hex::encode(subject_index))
}

/// The name an entry's `writes` gives a regulations version.
pub fn regulations_name(serial: u64) -> String {
    format!("{SPACE_REGULATIONS}:{serial}")
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
                names.push(consent_name(subject_index, &consent.purpose));
            }
            Op::PutJob(job) => {
                job.auth = None;
                job.auth = Some(tag(tagger, SPACE_JOB, b"", write, job)?);
                names.push(SPACE_JOB.to_owned());
            }
            Op::PutRegulations(r) | Op::RetagRegulations(r) => {
                r.auth = None;
                r.auth = Some(tag(tagger, SPACE_REGULATIONS, &r.serial.to_be_bytes(), write, r)?);
                names.push(regulations_name(r.serial));
            }
            _ => {}
        }
    }
    Ok(names)
}

/// Whether `changes` writes or removes an authority value (so needs the authority key, and its
/// entry names what it did).
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
                | Op::RemoveToken(_)
                | Op::RemoveIdentityRequest(_)
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
    tag_verdict(tagger, space, key, value).map_err(|why| unauthentic(space, key, why))
}

/// [`check`] without reporting: `Err` says why the tag is not this vault's.
fn tag_verdict<T: Stored>(
    tagger: &AuthorityTagger,
    space: &str,
    key: &[u8],
    value: &T,
) -> Result<(), &'static str> {
    let Some(auth) = value.auth() else { return Err("it carries no tag") };
    let body = body_of(value, "authority value").map_err(|_| "it does not encode")?;
    if tagger.verify(space, key, auth.write, &body, &auth.mac) {
        Ok(())
    } else {
        Err("its tag does not match")
    }
}

pub(crate) fn unauthentic(space: &str, key: &[u8], why: &'static str) -> StoreError {
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

/// The authority key, once the vault is unsealed, and the log's index of writes; shared by the
/// store wrapper and the audit log.
#[derive(Default)]
pub struct AuthorityKey {
    tagger: RwLock<Option<Arc<AuthorityTagger>>>,
    index: RwLock<WriteIndex>,
    /// Authority values refused since the key was installed (health says so while non-zero).
    refused: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthorityKey(..)")
    }
}

impl AuthorityKey {
    pub fn install(&self, tagger: Option<Arc<AuthorityTagger>>) {
        let sealing = tagger.is_none();
        self.refused.store(0, std::sync::atomic::Ordering::Relaxed);
        *self.tagger.write().unwrap_or_else(|p| p.into_inner()) = tagger;
        if sealing {
            *self.index() = WriteIndex::default();
        }
    }

    pub fn get(&self) -> Option<Arc<AuthorityTagger>> {
        self.tagger.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn require(&self) -> Result<Arc<AuthorityTagger>, StoreError> {
        self.get().ok_or(StoreError::Sealed)
    }

    /// Counts authority values found not genuine (by a read, or by the unseal-time check).
    pub fn count_refused(&self, n: u64) {
        self.refused.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many authority values were found not genuine since unseal.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The index of writes (built by the audit log at unseal, kept current by every commit).
    pub fn index(&self) -> std::sync::RwLockWriteGuard<'_, WriteIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a value of `name` tagged as `write` is the newest the log names (`Err`: why not).
    pub fn judge(&self, name: &str, write: u64) -> Result<(), &'static str> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).judge(name, write)
    }

    fn expects(&self, name: &str) -> bool {
        self.index.read().unwrap_or_else(|p| p.into_inner()).expects(name)
    }

    fn newest_regulations(&self) -> Option<u64> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.built.then_some(index.newest_regulations).flatten()
    }
}

/// Reads what other nodes appended to a chain the store shares since the index last looked, so a
/// value another node wrote a moment ago is judged against its entry. Nothing to do on a store
/// one node owns (every write is this node's, noted as it commits).
pub async fn catch_up(store: &dyn Storage, key: &Arc<AuthorityKey>) -> Result<(), StoreError> {
    let Some(chain) = store.shared_chain() else { return Ok(()) };
    let key = key.clone();
    tokio::task::spawn_blocking(move || {
        let rows = chain.rows();
        let from = key.index.read().unwrap_or_else(|p| p.into_inner()).upto() + 1;
        for item in rows.pages(from) {
            let (seq, value, _) = item?;
            key.index().note_stored(seq, &value);
        }
        Ok(())
    })
    .await
    .map_err(|_| StoreError::Backend("the audit index task failed".into()))?
}

/// The store as the domain sees it: every authority value read is checked (see the module doc);
/// everything else passes through. A change that writes an authority value untagged is refused.
#[derive(Debug)]
pub struct Authentic {
    inner: Arc<dyn Storage>,
    key: Arc<AuthorityKey>,
    /// Lockout records already reported as not the vault's: a shared store's lockouts are read
    /// every tick, and one forged row is one report, not one every 200 ms.
    flagged_lockouts: std::sync::Mutex<HashSet<Vec<u8>>>,
}

/// Forged lockout records reported by credential at most (then they are ignored silently).
const MAX_FLAGGED_LOCKOUTS: usize = 10_000;

impl Authentic {
    pub fn new(inner: Arc<dyn Storage>, key: Arc<AuthorityKey>) -> Self {
        Self { inner, key, flagged_lockouts: Default::default() }
    }

    /// Whether `credential`'s ignored lockout is reported now (the first time only).
    fn first_flag(&self, credential: &[u8]) -> bool {
        let mut flagged = self.flagged_lockouts.lock().unwrap_or_else(|p| p.into_inner());
        flagged.len() < MAX_FLAGGED_LOCKOUTS && flagged.insert(credential.to_vec())
    }

    /// The store without the checks: for the unseal-time migration and the regulations a
    /// sealed vault starts under (checked once unsealed).
    pub fn unchecked(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    /// `record` tagged for `credential` (untagged while sealed: then it is ignored when read).
    fn tag_lockout(&self, credential: &[u8], mut record: FailureRecord) -> FailureRecord {
        record.auth = None;
        if let Some(tagger) = self.key.get() {
            record.auth = tag(&tagger, SPACE_LOCKOUT, credential, 0, &record).ok();
        }
        record
    }

    /// Whether this vault wrote `record` (a forged lockout could lock anyone out).
    fn lockout_genuine(&self, credential: &[u8], record: &FailureRecord) -> bool {
        let Some(tagger) = self.key.get() else { return false };
        match tag_verdict(&tagger, SPACE_LOCKOUT, credential, record) {
            Ok(()) => true,
            // Untagged: an earlier build's, PostgreSQL's empty placeholder row, or inserted by
            // someone else; never used, and harmless ignored (it could only restrict).
            Err(_) if record.auth.is_none() => {
                if (!record.failures.is_empty() || record.locked_until_ms.is_some())
                    && self.first_flag(credential)
                {
                    tracing::warn!("a stored lockout record carries no tag; ignored");
                }
                false
            }
            Err(why) => {
                if self.first_flag(credential) {
                    self.key.count_refused(1);
                    tracing::error!(why, "a stored lockout record was not written by this vault; ignored");
                }
                false
            }
        }
    }

    fn genuine_lockouts(&self, all: Vec<(Vec<u8>, FailureRecord)>) -> Vec<(Vec<u8>, FailureRecord)> {
        all.into_iter().filter(|(credential, r)| self.lockout_genuine(credential, r)).collect()
    }

    fn refuse(&self, space: &str, key: &[u8], why: &'static str) -> StoreError {
        self.key.count_refused(1);
        unauthentic(space, key, why)
    }

    /// A value's tag, then its write against the newest the log names for it (read again from
    /// a shared chain first when they differ: another node may have just written it).
    async fn authentic<T: Stored>(
        &self,
        space: &str,
        key: &[u8],
        name: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.verdict(space, key, name, value).await?.map_err(|why| self.refuse(space, key, why))
    }

    /// [`Authentic::authentic`] without reporting (`Ok(Err(why))`: not genuine or not current).
    async fn verdict<T: Stored>(
        &self,
        space: &str,
        key: &[u8],
        name: &str,
        value: &T,
    ) -> Result<Result<(), &'static str>, StoreError> {
        if let Err(why) = tag_verdict(&*self.key.require()?, space, key, value) {
            return Ok(Err(why));
        }
        let write = value.auth().map_or(0, |a| a.write);
        if self.key.judge(name, write).is_err() {
            catch_up(self.inner.as_ref(), &self.key).await?;
        }
        Ok(self.key.judge(name, write))
    }

    /// Whether a credential read (`found`) is what the log says is current. On a store several
    /// nodes share, a node's cache may hold what another node changed a moment ago: the caller
    /// reads past the cache before it judges for good.
    async fn current<T: Stored>(
        &self,
        space: &str,
        key: &[u8],
        name: &str,
        found: &Option<T>,
    ) -> Result<bool, StoreError> {
        Ok(match found {
            Some(v) => self.verdict(space, key, name, v).await?.is_ok(),
            None => {
                if self.key.expects(name) {
                    catch_up(self.inner.as_ref(), &self.key).await?;
                }
                !self.key.expects(name)
            }
        })
    }

    /// A value the store does not hold, where the log says one was written and never removed:
    /// deleted outside the vault (a withdrawal deleted falls back to no choice, which can grant).
    async fn absent(&self, space: &str, key: &[u8], name: &str) -> Result<(), StoreError> {
        if self.key.expects(name) {
            catch_up(self.inner.as_ref(), &self.key).await?;
            if self.key.expects(name) {
                return Err(self.refuse(space, key, "it was removed outside the vault"));
            }
        }
        Ok(())
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
        let named = format!("{SPACE_IDENTITY}:{name}");
        let mut found = self.inner.get_identity(name).await?;
        if self.inner.shared_chain().is_some()
            && !self.current(SPACE_IDENTITY, name.as_bytes(), &named, &found).await?
        {
            self.inner.forget_cached();
            found = self.inner.get_identity(name).await?;
        }
        match &found {
            Some(i) => {
                self.authentic(SPACE_IDENTITY, name.as_bytes(), &named, i).await?;
                if i.name != name {
                    return Err(self.refuse(SPACE_IDENTITY, name.as_bytes(), "it names another identity"));
                }
            }
            None => self.absent(SPACE_IDENTITY, name.as_bytes(), &named).await?,
        }
        Ok(found)
    }
    async fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        let all = self.inner.list_identities().await?;
        let mut seen = HashSet::new();
        for i in &all {
            self.authentic(SPACE_IDENTITY, i.name.as_bytes(), &format!("{SPACE_IDENTITY}:{}", i.name), i)
                .await?;
            // A genuine row copied under another name lists the same identity twice.
            if !seen.insert(i.name.as_str()) {
                return Err(self.refuse(SPACE_IDENTITY, i.name.as_bytes(), "it is stored under two names"));
            }
        }
        Ok(all)
    }
    async fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        let found = self.inner.get_identity_request(id).await?;
        let named = format!("{SPACE_IDENTITY_REQUEST}:{id}");
        match &found {
            Some(r) => {
                self.authentic(SPACE_IDENTITY_REQUEST, id.as_bytes(), &named, r).await?;
                if r.id != id {
                    return Err(self.refuse(
                        SPACE_IDENTITY_REQUEST,
                        id.as_bytes(),
                        "it names another request",
                    ));
                }
            }
            None => self.absent(SPACE_IDENTITY_REQUEST, id.as_bytes(), &named).await?,
        }
        Ok(found)
    }
    async fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        let all = self.inner.list_identity_requests().await?;
        let mut seen = HashSet::new();
        for r in &all {
            let named = format!("{SPACE_IDENTITY_REQUEST}:{}", r.id);
            self.authentic(SPACE_IDENTITY_REQUEST, r.id.as_bytes(), &named, r).await?;
            if !seen.insert(r.id.as_str()) {
                return Err(self.refuse(
                    SPACE_IDENTITY_REQUEST,
                    r.id.as_bytes(),
                    "it is stored under two ids",
                ));
            }
        }
        Ok(all)
    }
    async fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let named = format!("{SPACE_TOKEN}:{token_id}");
        let mut found = self.inner.get_token(token_id).await?;
        if self.inner.shared_chain().is_some()
            && !self.current(SPACE_TOKEN, token_id.as_bytes(), &named, &found).await?
        {
            self.inner.forget_cached();
            found = self.inner.get_token(token_id).await?;
        }
        match &found {
            Some(t) => self.authentic(SPACE_TOKEN, token_id.as_bytes(), &named, t).await?,
            None => self.absent(SPACE_TOKEN, token_id.as_bytes(), &named).await?,
        }
        Ok(found)
    }
    async fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
        let all = self.inner.tokens_of(name).await?;
        for (id, t) in &all {
            self.authentic(SPACE_TOKEN, id.as_bytes(), &format!("{SPACE_TOKEN}:{id}"), t).await?;
            // A database's own column may say whose a token is; only the tagged value counts.
            if t.identity != name {
                return Err(self.refuse(SPACE_TOKEN, id.as_bytes(), "it belongs to another identity"));
            }
        }
        Ok(all)
    }
    async fn put_failures(&self, credential: &[u8], record: &FailureRecord) -> Result<(), StoreError> {
        self.inner.put_failures(credential, &self.tag_lockout(credential, record.clone())).await
    }
    async fn failure_records(&self) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        Ok(self.genuine_lockouts(self.inner.failure_records().await?))
    }
    async fn count_failure(
        &self,
        credential: &[u8],
        update: &(dyn Fn(Option<FailureRecord>) -> FailureRecord + Sync),
    ) -> Result<Option<FailureRecord>, StoreError> {
        // What the store holds counts only if this vault wrote it; what is stored is tagged.
        let checked = |stored: Option<FailureRecord>| {
            let stored = stored.filter(|r| self.lockout_genuine(credential, r));
            self.tag_lockout(credential, update(stored))
        };
        self.inner.count_failure(credential, &checked).await
    }
    async fn lockouts(&self, now_ms: u64) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        Ok(self.genuine_lockouts(self.inner.lockouts(now_ms).await?))
    }
    async fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        let found = self.inner.get_consent(subject_index, purpose).await?;
        let key = consent_key(subject_index, purpose);
        let named = consent_name(subject_index, purpose);
        match &found {
            Some(c) => {
                self.authentic(SPACE_CONSENT, &key, &named, c).await?;
                if c.purpose != purpose {
                    return Err(self.refuse(SPACE_CONSENT, &key, "it names another purpose"));
                }
            }
            None => self.absent(SPACE_CONSENT, &key, &named).await?,
        }
        Ok(found)
    }
    async fn all_consent(&self) -> Result<super::AllConsent, StoreError> {
        let (current, history) = self.inner.all_consent().await?;
        let tagger = self.key.require()?;
        for (index, c) in &current {
            self.authentic(
                SPACE_CONSENT,
                &consent_key(index, &c.purpose),
                &consent_name(index, &c.purpose),
                c,
            )
            .await?;
        }
        for (index, _, c) in &history {
            check(&tagger, SPACE_CONSENT, &consent_key(index, &c.purpose), c)
                .inspect_err(|_| self.key.count_refused(1))?;
        }
        Ok((current, history))
    }
    /// The current choices are judged as the newest writes; the history is every choice ever
    /// made, each checked by its tag.
    async fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let (current, history) = self.inner.consent_of(subject_index).await?;
        let tagger = self.key.require()?;
        for c in &current {
            let key = consent_key(subject_index, &c.purpose);
            self.authentic(SPACE_CONSENT, &key, &consent_name(subject_index, &c.purpose), c).await?;
        }
        for c in &history {
            check(&tagger, SPACE_CONSENT, &consent_key(subject_index, &c.purpose), c)
                .inspect_err(|_| self.key.count_refused(1))?;
            let named = consent_name(subject_index, &c.purpose);
            if !current.iter().any(|now| now.purpose == c.purpose) {
                self.absent(SPACE_CONSENT, &consent_key(subject_index, &c.purpose), &named).await?;
            }
        }
        Ok((current, history))
    }
    async fn job(&self) -> Result<Option<StoredJob>, StoreError> {
        let found = self.inner.job().await?;
        match &found {
            Some(j) => self.authentic(SPACE_JOB, b"", SPACE_JOB, j).await?,
            None => self.absent(SPACE_JOB, b"", SPACE_JOB).await?,
        }
        Ok(found)
    }
    /// The regulations in force are the newest version the log names: a pointer moved back to an
    /// older genuine version (or forward to a forged one) is refused.
    async fn regulations(&self) -> Result<Option<StoredRegulations>, StoreError> {
        let found = self.inner.regulations().await?;
        let newest = self.key.newest_regulations();
        match &found {
            Some(r) => {
                let key = r.serial.to_be_bytes();
                self.authentic(SPACE_REGULATIONS, &key, &regulations_name(r.serial), r).await?;
                if newest.is_some_and(|n| n > r.serial) {
                    catch_up(self.inner.as_ref(), &self.key).await?;
                    if self.key.newest_regulations().is_some_and(|n| n > r.serial) {
                        return Err(self.refuse(SPACE_REGULATIONS, &key, "a later version was put in force"));
                    }
                }
            }
            None => {
                if let Some(n) = newest {
                    return Err(self.refuse(
                        SPACE_REGULATIONS,
                        &n.to_be_bytes(),
                        "it was removed outside the vault",
                    ));
                }
            }
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

    async fn holds_now(&self, expect: &super::Expect) -> Result<bool, StoreError> {
        self.inner.holds_now(expect).await
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
    fn forget_cached(&self) {
        self.inner.forget_cached();
    }
    async fn hold_job_lease(&self, want: bool) -> Result<bool, StoreError> {
        self.inner.hold_job_lease(want).await
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;
