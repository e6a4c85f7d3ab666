//! An in-memory implementation of the storage port: the test double the domain's unit tests run
//! through. Typed maps under one mutex, versions are revision numbers (not bytes, as sled's are),
//! so a test passing here does not lean on how sled happens to version things. Nothing is durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    AuditHead, AuditRecord, Changes, Cursor, Custody, Expect, FailureRecord, FlushStats, HeadRecorder,
    KekInfo, KeySpace, Op, Storage, StoredConsent, StoredIdentity, StoredIdentityRequest, StoredJob,
    StoredRecord, StoredRegulations, StoredToken, Version, Walked,
};
use crate::StoreError;

#[derive(Debug, Default)]
struct State {
    mode: Option<String>,
    custody: Option<Custody>,
    derivation_key: Option<Vec<u8>>,
    keks: BTreeMap<u32, Vec<u8>>,
    kek_info: BTreeMap<u32, KekInfo>,
    live: BTreeSet<u32>,
    /// Record (its `wrapped_key` empty: that lives in `data_keys`) and its revision.
    records: BTreeMap<String, (StoredRecord, u64)>,
    data_keys: BTreeMap<String, (Vec<u8>, u64)>,
    subjects: BTreeSet<([u8; 32], String)>,
    identities: BTreeMap<String, StoredIdentity>,
    requests: BTreeMap<String, StoredIdentityRequest>,
    tokens: BTreeMap<String, StoredToken>,
    failures: BTreeMap<Vec<u8>, FailureRecord>,
    consent: BTreeMap<([u8; 32], String), StoredConsent>,
    history: BTreeMap<([u8; 32], u64), StoredConsent>,
    job: Option<StoredJob>,
    regulations: Vec<StoredRegulations>,
    audit_records: BTreeMap<AuditRecord, Vec<u8>>,
    audit_head: Option<AuditHead>,
    audit_entries: BTreeMap<u64, Vec<u8>>,
    next_id: u64,
    revision: u64,
}

fn version(revision: u64) -> Version {
    Version::new(revision.to_be_bytes().to_vec())
}

impl State {
    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn holds(&self, expect: &Expect) -> bool {
        match expect {
            Expect::Record { id, version: v } => self.records.get(id).is_some_and(|(_, r)| version(*r) == *v),
            Expect::DataKey { id, version: v } => {
                self.data_keys.get(id).is_some_and(|(_, r)| version(*r) == *v)
            }
            Expect::DataKeyIs { id, wrapped } => self.data_keys.get(id).is_some_and(|(k, _)| k == wrapped),
            Expect::Identity { name, is } => self.identities.get(name) == is.as_ref(),
            Expect::IdentityRequest { id, is } => self.requests.get(id) == is.as_ref(),
            Expect::KekLive(v) => self.live.contains(v),
            Expect::Job(job) => self.job == *job,
            Expect::Regulations(serial) => self.regulations.last().map(|r| r.serial) == *serial,
            Expect::AuditHead(head) => self.audit_head == *head,
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::InsertRecord { id, mut record } => {
                let rev = self.next_revision();
                if !record.wrapped_key.is_empty() {
                    self.data_keys.insert(id.clone(), (std::mem::take(&mut record.wrapped_key), rev));
                }
                self.subjects.insert((record.subject_index, id.clone()));
                self.records.insert(id, (record, rev));
            }
            Op::ReplaceRecord { id, mut record } => {
                record.wrapped_key.clear();
                let rev = self.next_revision();
                self.records.insert(id, (record, rev));
            }
            Op::ReplaceDataKey { id, wrapped } => {
                let rev = self.next_revision();
                self.data_keys.insert(id, (wrapped, rev));
            }
            Op::DeleteRecord { id, subject_index } => {
                self.records.remove(&id);
                self.data_keys.remove(&id);
                self.subjects.remove(&(subject_index, id));
            }
            Op::PutIdentity(i) => {
                self.identities.insert(i.name.clone(), i);
            }
            Op::PutIdentityRequest(r) => {
                self.requests.insert(r.id.clone(), r);
            }
            Op::RemoveIdentityRequest(id) => {
                self.requests.remove(&id);
            }
            Op::PutToken { id, token } => {
                self.tokens.insert(id, token);
            }
            Op::RemoveToken(id) => {
                self.tokens.remove(&id);
            }
            Op::SetConsent { subject_index, seq, consent } => {
                self.history.insert((subject_index, seq), consent.clone());
                self.consent.insert((subject_index, consent.purpose.clone()), consent);
            }
            Op::PutJob(job) => self.job = Some(job),
            Op::PutRegulations(r) => self.regulations.push(r),
            Op::RetagRegulations(r) => {
                if let Some(slot) = self.regulations.iter_mut().find(|x| x.serial == r.serial) {
                    *slot = r;
                }
            }
            Op::RetagConsent { subject_index, seq: None, consent } => {
                self.consent.insert((subject_index, consent.purpose.clone()), consent);
            }
            Op::RetagConsent { subject_index, seq: Some(seq), consent } => {
                self.history.insert((subject_index, seq), consent);
            }
            Op::AuditEntry { seq, value } => {
                self.audit_entries.insert(seq, value);
            }
            Op::AuditRecord { which, value } => {
                self.audit_records.insert(which, value);
            }
            Op::AuditHead(head) => self.audit_head = Some(head),
        }
    }

    fn record(&self, id: &str) -> Option<(StoredRecord, Version)> {
        let (record, rev) = self.records.get(id)?;
        let mut record = record.clone();
        record.wrapped_key = self.data_keys.get(id).map(|(k, _)| k.clone()).unwrap_or_default();
        Some((record, version(*rev)))
    }
}

/// The in-memory store (tests only).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: std::sync::Arc<Mutex<State>>,
    stats: FlushStats,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread cannot leave a half-applied commit: commits apply in memory
        // after every check, so the state is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Storage for MemoryStore {
    async fn mode(&self) -> Result<Option<String>, StoreError> {
        Ok(self.state().mode.clone())
    }

    async fn initialise(
        &self,
        custody: &Custody,
        mode: &str,
        wrapped_derivation_key: &[u8],
        kek: (u32, &[u8]),
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        if s.custody.is_some() {
            return Err(StoreError::AlreadyInitialised);
        }
        s.custody = Some(custody.clone());
        s.mode = Some(mode.to_owned());
        s.derivation_key = Some(wrapped_derivation_key.to_vec());
        s.keks.insert(kek.0, kek.1.to_vec());
        s.kek_info.insert(kek.0, KekInfo { version: kek.0, created_ms: now_ms, retired_ms: None });
        s.live.insert(kek.0);
        Ok(())
    }

    async fn is_initialised(&self) -> Result<bool, StoreError> {
        Ok(self.state().custody.is_some())
    }

    async fn custody(&self) -> Result<Custody, StoreError> {
        self.state().custody.clone().ok_or(StoreError::NotInitialised)
    }

    async fn replace_sealed(&self, custodian: u8, sealed: &[u8]) -> Result<(), StoreError> {
        let mut s = self.state();
        match s.custody.as_mut().ok_or(StoreError::NotInitialised)? {
            Custody::Single { sealed_root } => *sealed_root = sealed.to_vec(),
            Custody::Shares { sealed: shares, .. } => {
                let slot = shares
                    .get_mut(usize::from(custodian).wrapping_sub(1))
                    .ok_or(StoreError::Corrupt("custodian share"))?;
                *slot = sealed.to_vec();
            }
        }
        Ok(())
    }

    async fn replace_root(
        &self,
        custody: &Custody,
        wrapped_derivation_key: &[u8],
        keks: &[(u32, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        s.custody = Some(custody.clone());
        s.derivation_key = Some(wrapped_derivation_key.to_vec());
        for (v, k) in keks {
            s.keks.insert(*v, k.clone());
        }
        Ok(())
    }

    async fn derivation_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().derivation_key.clone())
    }

    async fn add_kek(&self, version: u32, wrapped: &[u8], now_ms: u64) -> Result<(), StoreError> {
        let mut s = self.state();
        if s.keks.contains_key(&version) || s.kek_info.contains_key(&version) {
            return Err(StoreError::Corrupt("kek version reused"));
        }
        s.keks.insert(version, wrapped.to_vec());
        s.kek_info.insert(version, KekInfo { version, created_ms: now_ms, retired_ms: None });
        s.live.insert(version);
        Ok(())
    }

    async fn retire_kek(&self, version: u32, now_ms: u64) -> Result<(), StoreError> {
        let mut s = self.state();
        s.keks.remove(&version);
        let info = s.kek_info.entry(version).or_insert(KekInfo { version, created_ms: 0, retired_ms: None });
        info.retired_ms = Some(now_ms);
        s.live.remove(&version);
        Ok(())
    }

    async fn kek_infos(&self) -> Result<Vec<KekInfo>, StoreError> {
        Ok(self.state().kek_info.values().cloned().collect())
    }

    async fn keks(&self) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        Ok(self.state().keks.iter().map(|(v, k)| (*v, k.clone())).collect())
    }

    async fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, Version)>, StoreError> {
        Ok(self.state().record(record_id))
    }

    async fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        let s = self.state();
        Ok(s.subjects
            .range((*subject_index, String::new())..)
            .take_while(|(index, _)| index == subject_index)
            .filter_map(|(_, id)| s.record(id).map(|(r, _)| (id.clone(), r)))
            .collect())
    }

    async fn walk(&self, space: KeySpace, cursor: &Cursor, limit: usize) -> Result<Vec<Walked>, StoreError> {
        use std::ops::Bound;
        let s = self.state();
        let after =
            String::from_utf8(cursor.as_bytes().to_vec()).map_err(|_| StoreError::Corrupt("cursor"))?;
        let start = if after.is_empty() { Bound::Unbounded } else { Bound::Excluded(after) };
        let walked = |id: &String, value: Vec<u8>, rev: u64| Walked {
            record_id: id.clone(),
            value,
            version: version(rev),
            cursor: Cursor::from_bytes(id.as_bytes().to_vec()),
        };
        match space {
            KeySpace::Records => s
                .records
                .range((start, Bound::Unbounded))
                .take(limit)
                .map(|(id, (r, rev))| Ok(walked(id, r.encode()?, *rev)))
                .collect(),
            KeySpace::DataKeys => Ok(s
                .data_keys
                .range((start, Bound::Unbounded))
                .take(limit)
                .map(|(id, (k, rev))| walked(id, k.clone(), *rev))
                .collect()),
        }
    }

    async fn count(&self, space: KeySpace) -> Result<u64, StoreError> {
        let s = self.state();
        Ok(match space {
            KeySpace::Records => s.records.len(),
            KeySpace::DataKeys => s.data_keys.len(),
        } as u64)
    }

    async fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        Ok(self.state().identities.get(name).cloned())
    }

    async fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        Ok(self.state().identities.values().cloned().collect())
    }

    async fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        Ok(self.state().requests.get(id).cloned())
    }

    async fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        Ok(self.state().requests.values().cloned().collect())
    }

    async fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        Ok(self.state().tokens.get(token_id).cloned())
    }

    async fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
        Ok(self
            .state()
            .tokens
            .iter()
            .filter(|(_, t)| t.identity == name)
            .map(|(i, t)| (i.clone(), t.clone()))
            .collect())
    }

    async fn put_failures(&self, credential: &[u8], record: &FailureRecord) -> Result<(), StoreError> {
        self.state().failures.insert(credential.to_vec(), record.clone());
        Ok(())
    }

    async fn failure_records(&self) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        Ok(self.state().failures.iter().map(|(k, r)| (k.clone(), r.clone())).collect())
    }

    async fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        Ok(self.state().consent.get(&(*subject_index, purpose.to_owned())).cloned())
    }

    async fn all_consent(&self) -> Result<super::AllConsent, StoreError> {
        let s = self.state();
        Ok((
            s.consent.iter().map(|((i, _), c)| (*i, c.clone())).collect(),
            s.history.iter().map(|((i, seq), c)| (*i, *seq, c.clone())).collect(),
        ))
    }

    async fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let s = self.state();
        let current =
            s.consent.iter().filter(|((i, _), _)| i == subject_index).map(|(_, c)| c.clone()).collect();
        let history =
            s.history.iter().filter(|((i, _), _)| i == subject_index).map(|(_, c)| c.clone()).collect();
        Ok((current, history))
    }

    async fn job(&self) -> Result<Option<StoredJob>, StoreError> {
        Ok(self.state().job.clone())
    }

    async fn regulations(&self) -> Result<Option<StoredRegulations>, StoreError> {
        Ok(self.state().regulations.last().cloned())
    }

    async fn regulations_serial(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.state().regulations.last().map(|r| r.serial))
    }

    async fn generate_id(&self) -> Result<u64, StoreError> {
        let mut s = self.state();
        s.next_id += 1;
        Ok(s.next_id)
    }

    async fn audit_record(&self, which: AuditRecord) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().audit_records.get(&which).cloned())
    }

    async fn set_audit_record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        self.state().audit_records.insert(which, value.to_vec());
        Ok(())
    }

    async fn remove_audit_record(&self, which: AuditRecord) -> Result<(), StoreError> {
        self.state().audit_records.remove(&which);
        Ok(())
    }

    fn head_recorder(&self) -> HeadRecorder {
        let state = self.state.clone();
        HeadRecorder::new(move |which, value| {
            state.lock().unwrap_or_else(|p| p.into_inner()).audit_records.insert(which, value.to_vec());
            Ok(())
        })
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        Ok(self.state().audit_head)
    }

    async fn audit_entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .state()
            .audit_entries
            .range(after.saturating_add(1)..)
            .map(|(s, v)| (*s, v.clone()))
            .collect())
    }

    async fn remove_audit_entries_upto(&self, last: u64) -> Result<(), StoreError> {
        self.state().audit_entries.retain(|seq, _| *seq > last);
        Ok(())
    }

    async fn holds_now(&self, expect: &Expect) -> Result<bool, StoreError> {
        Ok(self.state().holds(expect))
    }

    async fn commit(&self, changes: Changes) -> Result<bool, StoreError> {
        if changes.is_empty() {
            return Ok(true);
        }
        let mut s = self.state();
        let (ops, expect) = changes.into_parts();
        if !expect.iter().all(|e| s.holds(e)) {
            return Ok(false);
        }
        for op in ops {
            s.apply(op);
        }
        Ok(true)
    }

    async fn durable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn flush_now(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn flush_stats(&self) -> &FlushStats {
        &self.stats
    }
}
