//! The storage port: what the domain needs from a database, in the domain's own types.
//!
//! The vault holds its store as `Arc<dyn Storage>`. Nothing outside this folder sees a backend's
//! types (no `sled::` outside `sled_store.rs`, no `tokio_postgres::` outside `postgres.rs`), builds
//! a stored key or compares stored bytes:
//! reads hand out an opaque [`Version`], walks a [`Cursor`], and every change is a [`Changes`] —
//! a list of typed operations with the expectations they depend on — applied by one
//! [`Storage::commit`] that checks the expectations and applies the operations atomically, or
//! writes nothing. The backend owns its own durability (sled's group flush; PostgreSQL's
//! asynchronous commits made durable by a shared synchronous tick).
//!
//! Backends: [`SledStore`] (the embedded default, the on-disk layout of every earlier build),
//! [`PgStore`] (PostgreSQL, several nodes on one database, holding their one audit chain) and [`MemoryStore`] (a test double,
//! for the domain's unit tests through the port).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::StoreError;

pub mod authority;
#[cfg(test)]
mod conformance;
mod folder;
#[cfg(any(test, feature = "test-util"))]
mod memory;
pub mod models;
pub mod overlap;
mod postgres;
mod sled_store;
#[cfg(any(test, feature = "test-util"))]
pub mod test_postgres;
pub mod write_index;

pub use folder::{secure_folder, tighten};
#[cfg(any(test, feature = "test-util"))]
pub use memory::MemoryStore;
pub use models::{
    AuthTag, Custody, FailureRecord, JobKind, KekInfo, RECORD_FORMAT, Stored, StoredConsent, StoredField,
    StoredIdentity, StoredIdentityRequest, StoredJob, StoredRecord, StoredRegulations, StoredToken, body_of,
    decode_stored, encode_stored,
};
pub use postgres::{ChainPages, ChainReader, ChainRow, PG_SCHEMA_VERSION, PgStore, redacted};
pub use sled_store::{Durability, SCHEMA_VERSION, SledRestore, SledStore};

/// A stored value as it was read: a change that expects it applies only if nothing changed it
/// meanwhile (optimistic concurrency). Opaque: only the backend that made it interprets it (sled:
/// the bytes read; the memory store: a revision number).
#[derive(Clone, PartialEq, Eq)]
pub struct Version(Vec<u8>);

impl Version {
    fn new(token: Vec<u8>) -> Self {
        Self(token)
    }

    fn token(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Version(..)")
    }
}

/// What [`Storage::all_consent`] returns.
pub type AllConsent = (Vec<([u8; 32], StoredConsent)>, Vec<([u8; 32], u64, StoredConsent)>);

/// Where a walk over a key space resumes: after the entry it names (empty: from the start).
/// A job keeps it in its stored progress as bytes ([`Cursor::as_bytes`]); only the backend that
/// made it interprets them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The key spaces a background job walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpace {
    /// Every record (re-encryption).
    Records,
    /// Every wrapped data key (rewrap after a rotation).
    DataKeys,
}

/// One entry of a walk: the record it belongs to, its value's bytes (an encoded record, or a
/// wrapped data key), the version a change of it expects, and the cursor that resumes after it.
#[derive(Debug, Clone)]
pub struct Walked {
    pub record_id: String,
    pub value: Vec<u8>,
    pub version: Version,
    pub cursor: Cursor,
}

/// The audit log's own records in the store, beside the entries changes carry. They are what the
/// log's files cannot silently drop: the head the vault last signed, the newest tagged head of a
/// change (in that change's commit) and of a group of reads, and a break the operator has not yet
/// accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuditRecord {
    SignedHead,
    ChangeTag,
    ReadTag,
    Break,
}

/// One stored key and value in a backend's own layout (`space`: sled's tree): what a backup
/// carries and a restore replays into the same backend. Values are what the store holds —
/// ciphertext, wrapped keys, sealed shares, HMACs — never plaintext.
pub struct RawEntry {
    pub space: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for RawEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawEntry({}, {} + {} bytes)", self.space, self.key.len(), self.value.len())
    }
}

/// What a [`Storage::snapshot`] handed over.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// The lowest id [`Storage::generate_id`] may give after a restore of it.
    pub ids_from: u64,
    pub records: u64,
}

/// Counts for the benchmark report: how many writes each flush carried.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub writes: AtomicU64,
}

/// A write on its way to [`Storage::commit`] and [`Storage::durable`]: while it lives, the
/// backend's group commit counts one more writer coming and may hold a flush for it (so a flush
/// serves every writer in flight, not the few that happened to arrive in a fixed window).
#[derive(Debug)]
pub struct WriteTicket(Option<Arc<AtomicUsize>>);

impl WriteTicket {
    /// A backend that does not group its flushes counts nothing.
    pub fn uncounted() -> Self {
        Self(None)
    }

    fn counted(writers: &Arc<AtomicUsize>) -> Self {
        writers.fetch_add(1, Ordering::AcqRel);
        Self(Some(writers.clone()))
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Records the audit log's newest synced heads from its flusher thread, outside any request
/// (durable with the backend's next flush).
#[derive(Clone)]
pub struct HeadRecorder(Arc<RecordFn>);

type RecordFn = dyn Fn(AuditRecord, &[u8]) -> Result<(), StoreError> + Send + Sync;

impl HeadRecorder {
    pub fn new(
        record: impl Fn(AuditRecord, &[u8]) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(record))
    }

    pub fn record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        (self.0)(which, value)
    }
}

/// The chain head the audit log last committed to the store: the newest entry a commit carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// One typed write of a change set.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new record, its wrapped data key (unless empty: the plaintext baseline) and its subject
    /// index entry.
    InsertRecord {
        id: String,
        record: StoredRecord,
    },
    /// A record's fields and times; its data key unchanged.
    ReplaceRecord {
        id: String,
        record: StoredRecord,
    },
    /// A record's wrapped data key (rotation, re-encryption).
    ReplaceDataKey {
        id: String,
        wrapped: Vec<u8>,
    },
    /// A record, its data key and its subject index entry (crypto-shredding).
    DeleteRecord {
        id: String,
        subject_index: [u8; 32],
    },
    PutIdentity(StoredIdentity),
    PutIdentityRequest(StoredIdentityRequest),
    RemoveIdentityRequest(String),
    PutToken {
        id: String,
        token: StoredToken,
    },
    RemoveToken(String),
    /// A subject's current choice for a purpose, and its place `seq` in the subject's history.
    SetConsent {
        subject_index: [u8; 32],
        seq: u64,
        consent: StoredConsent,
    },
    PutJob(StoredJob),
    /// A new version of the regulations in force, kept beside every earlier one.
    PutRegulations(StoredRegulations),
    /// A stored regulations version rewritten as is with its tag (the unseal-time migration).
    RetagRegulations(StoredRegulations),
    /// A stored consent choice rewritten as is with its tag: the current one (`seq: None`) or
    /// one of the subject's history (the unseal-time migration).
    RetagConsent {
        subject_index: [u8; 32],
        seq: Option<u64>,
        consent: StoredConsent,
    },
    /// An audit entry (`hash ‖ canonical JSON`) carried with the change it records.
    AuditEntry {
        seq: u64,
        value: Vec<u8>,
    },
    /// One of the audit log's records (the tagged head of a change), in the same commit.
    AuditRecord {
        which: AuditRecord,
        value: Vec<u8>,
    },
    /// The chain head the store holds after this commit.
    AuditHead(AuditHead),
}

/// What must still hold when a change set is applied.
#[derive(Debug, Clone)]
pub enum Expect {
    /// The record is still the version read.
    Record { id: String, version: Version },
    /// The record's wrapped data key is still the version read (a walk's version).
    DataKey { id: String, version: Version },
    /// The record's wrapped data key still holds exactly these bytes.
    DataKeyIs { id: String, wrapped: Vec<u8> },
    /// The identity is stored exactly so (`None`: the name is free).
    Identity { name: String, is: Option<StoredIdentity> },
    /// The request is stored exactly so (`None`: the id is free).
    IdentityRequest { id: String, is: Option<StoredIdentityRequest> },
    /// The KEK version is still live (not retired).
    KekLive(u32),
    /// The newest stored regulations are still this serial (`None`: none stored), so two
    /// reloads on two nodes cannot both become version `serial + 1`.
    Regulations(Option<u64>),
    /// The key job is stored exactly so (`None`: there is none), so a job step read by two
    /// runners is committed by one at most.
    Job(Option<StoredJob>),
    /// The store's audit chain head is still this one (`None`: no entry was ever carried), so two
    /// writers can never both extend the same head.
    AuditHead(Option<AuditHead>),
}

/// Changes a request wants to make, applied with its audit entry in one commit by the audit log.
#[derive(Debug, Default)]
pub struct Changes {
    ops: Vec<Op>,
    expect: Vec<Expect>,
    /// KEK versions already expected live (a change usually names one).
    live_keks: Vec<u32>,
    empty: bool,
}

impl Changes {
    pub fn none() -> Self {
        Self { empty: true, ..Self::default() }
    }

    pub fn new() -> Self {
        Self { empty: false, ..Self::default() }
    }

    /// Operations with no expectations (the unseal-time migration rewrites values as they are).
    pub fn from_ops(ops: Vec<Op>) -> Self {
        Self { ops, ..Self::new() }
    }

    /// No change: the request only carries its audit entry (to the log's files).
    pub fn is_empty(&self) -> bool {
        self.empty
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn expectations(&self) -> &[Expect] {
        &self.expect
    }

    /// Adds `other`'s operations and expectations after these (a group commit's one batch).
    pub fn merge(&mut self, other: Changes) {
        self.ops.extend(other.ops);
        for e in other.expect {
            if let Expect::KekLive(v) = e {
                if self.live_keks.contains(&v) {
                    continue;
                }
                self.live_keks.push(v);
            }
            self.expect.push(e);
        }
        self.empty &= other.empty;
    }

    /// Takes the operations and expectations apart (a backend applying them).
    pub fn into_parts(self) -> (Vec<Op>, Vec<Expect>) {
        (self.ops, self.expect)
    }

    /// Carries an audit entry (`hash ‖ JSON`) in the change's own commit, so the change and its
    /// entry reach disk together; the audit log's file gets it too (see `audit.rs`).
    pub fn audit_entry(&mut self, seq: u64, value: &[u8]) {
        self.ops.push(Op::AuditEntry { seq, value: value.to_vec() });
    }

    /// The tagged head of this change's entry, in the same commit.
    pub fn audit_head_tag(&mut self, value: &[u8]) {
        self.ops.push(Op::AuditRecord { which: AuditRecord::ChangeTag, value: value.to_vec() });
    }

    /// The commit applies only if the store's chain head is still `previous`, and leaves `next`.
    pub fn extend_audit_head(&mut self, previous: Option<AuditHead>, next: AuditHead) {
        self.expect.push(Expect::AuditHead(previous));
        self.ops.push(Op::AuditHead(next));
    }

    /// Commits only if `identity` is still stored exactly as read (a decision that counted on it,
    /// e.g. "another administrator remains", holds at the commit).
    pub fn expect_identity(&mut self, identity: &StoredIdentity) {
        self.expect.push(Expect::Identity { name: identity.name.clone(), is: Some(identity.clone()) });
    }

    /// Creates an identity, provided the name is not taken when the change is applied.
    pub fn create_identity(&mut self, identity: &StoredIdentity) {
        self.expect.push(Expect::Identity { name: identity.name.clone(), is: None });
        self.put_identity(identity);
    }

    pub fn insert_record(&mut self, record_id: &str, record: &StoredRecord) {
        self.ops.push(Op::InsertRecord { id: record_id.to_owned(), record: record.clone() });
    }

    /// Replaces a record's fields (its data key unchanged), provided it still holds `expected`
    /// when the change is applied.
    pub fn replace_record(&mut self, record_id: &str, expected: Version, next: &StoredRecord) {
        self.ops.push(Op::ReplaceRecord { id: record_id.to_owned(), record: next.clone() });
        self.expect.push(Expect::Record { id: record_id.to_owned(), version: expected });
    }

    /// Replaces a record and its data key together (re-encryption), provided neither changed
    /// since they were read (`read` is the record as [`Storage::get_record`] returned it).
    pub fn replace_record_and_key(
        &mut self,
        record_id: &str,
        expected: Version,
        read: &StoredRecord,
        next: &StoredRecord,
    ) {
        self.replace_record(record_id, expected, next);
        self.ops.push(Op::ReplaceDataKey { id: record_id.to_owned(), wrapped: next.wrapped_key.clone() });
        self.expect.push(Expect::DataKeyIs { id: record_id.to_owned(), wrapped: read.wrapped_key.clone() });
    }

    /// Rewraps a record's data key (KEK rotation), provided it still holds `expected`.
    pub fn replace_data_key(&mut self, record_id: &str, expected: Version, wrapped: &[u8]) {
        self.ops.push(Op::ReplaceDataKey { id: record_id.to_owned(), wrapped: wrapped.to_vec() });
        self.expect.push(Expect::DataKey { id: record_id.to_owned(), version: expected });
    }

    /// Removes a record, its data key and its index entry, provided it is still as read.
    pub fn delete_record(&mut self, record_id: &str, record: &StoredRecord, read: Version) {
        self.ops.push(Op::DeleteRecord { id: record_id.to_owned(), subject_index: record.subject_index });
        self.expect.push(Expect::Record { id: record_id.to_owned(), version: read });
    }

    /// Applies only if KEK `version` is still live: a data key wrapped under a version retired
    /// meanwhile is never stored (the request runs again under the active version).
    pub fn expect_kek_live(&mut self, version: u32) {
        if !self.live_keks.contains(&version) {
            self.live_keks.push(version);
            self.expect.push(Expect::KekLive(version));
        }
    }

    /// Saves a key job's progress in the same commit as the records it changed.
    pub fn put_job(&mut self, job: &StoredJob) {
        self.ops.push(Op::PutJob(job.clone()));
    }

    /// Puts `next` in force, provided the newest stored version is still `serial - 1` (none
    /// stored, for serial 1).
    pub fn put_regulations(&mut self, next: &StoredRegulations) {
        self.expect.push(Expect::Regulations(next.serial.checked_sub(1).filter(|s| *s > 0)));
        self.ops.push(Op::PutRegulations(next.clone()));
    }

    /// Applies only if the key job is still `read` when the change is applied.
    pub fn expect_job(&mut self, read: Option<&StoredJob>) {
        self.expect.push(Expect::Job(read.cloned()));
    }

    pub fn put_identity(&mut self, identity: &StoredIdentity) {
        self.ops.push(Op::PutIdentity(identity.clone()));
    }

    /// Files a request, provided its id is not taken when the change is applied.
    pub fn add_identity_request(&mut self, request: &StoredIdentityRequest) {
        self.expect.push(Expect::IdentityRequest { id: request.id.clone(), is: None });
        self.ops.push(Op::PutIdentityRequest(request.clone()));
    }

    /// Closes a request, provided it is still stored as read: two approvals of one request cannot
    /// both create the identity.
    pub fn close_identity_request(&mut self, request: &StoredIdentityRequest) {
        self.expect.push(Expect::IdentityRequest { id: request.id.clone(), is: Some(request.clone()) });
        self.ops.push(Op::RemoveIdentityRequest(request.id.clone()));
    }

    pub fn put_token(&mut self, token_id: &str, token: &StoredToken) {
        self.ops.push(Op::PutToken { id: token_id.to_owned(), token: token.clone() });
    }

    pub fn remove_token(&mut self, token_id: &str) {
        self.ops.push(Op::RemoveToken(token_id.to_owned()));
    }

    /// Rewrites authority values stored before tags existed, each as it is, with its tag (the
    /// unseal-time migration; identities, requests, tokens and the job are put as they are).
    pub fn retag_regulations(&mut self, r: &StoredRegulations) {
        self.ops.push(Op::RetagRegulations(r.clone()));
    }

    pub fn retag_consent(&mut self, subject_index: &[u8; 32], seq: Option<u64>, consent: &StoredConsent) {
        self.ops.push(Op::RetagConsent { subject_index: *subject_index, seq, consent: consent.clone() });
    }

    pub fn put_identity_request(&mut self, request: &StoredIdentityRequest) {
        self.ops.push(Op::PutIdentityRequest(request.clone()));
    }

    /// A subject's choice, and its place in the subject's history (`seq` from
    /// [`Storage::generate_id`]).
    pub fn set_consent(&mut self, subject_index: &[u8; 32], seq: u64, consent: &StoredConsent) {
        self.ops.push(Op::SetConsent { subject_index: *subject_index, seq, consent: consent.clone() });
    }
}

/// The storage port. Every method is one backend round trip (or a scan); none of them interprets
/// a key format (the key hierarchy reads headers, see [`data_keys_per_kek`]).
#[async_trait::async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    // ---- custody and KEKs (init, unseal, rotation, rekey) ------------------------------------

    /// `"encrypted"`, or the plaintext benchmark baseline's mode; `None` before init.
    async fn mode(&self) -> Result<Option<String>, StoreError>;
    /// Writes the custody of the root key, the derivation key and the first KEK at once, durable;
    /// refuses an initialised vault ([`StoreError::AlreadyInitialised`]).
    async fn initialise(
        &self,
        custody: &Custody,
        mode: &str,
        wrapped_derivation_key: &[u8],
        kek: (u32, &[u8]),
        now_ms: u64,
    ) -> Result<(), StoreError>;
    async fn is_initialised(&self) -> Result<bool, StoreError>;
    async fn custody(&self) -> Result<Custody, StoreError>;
    /// Replaces one custodian's sealed share (or the single sealed root key), durable.
    async fn replace_sealed(&self, custodian: u8, sealed: &[u8]) -> Result<(), StoreError>;
    /// A rekey: new custody, every KEK and the derivation key rewrapped, all or nothing, durable.
    async fn replace_root(
        &self,
        custody: &Custody,
        wrapped_derivation_key: &[u8],
        keks: &[(u32, Vec<u8>)],
    ) -> Result<(), StoreError>;
    /// The wrapped derivation key; `None` for a vault created before there was one.
    async fn derivation_key(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Adds a KEK version (a rotation), live at once ([`Expect::KekLive`]), durable before it wraps
    /// anything; refuses a used version. (`initialise` marks the first version live the same way.)
    async fn add_kek(&self, version: u32, wrapped: &[u8], now_ms: u64) -> Result<(), StoreError>;
    /// Destroys a KEK version's wrapped key and its live marker at once; its history stays,
    /// marked retired. Durable.
    async fn retire_kek(&self, version: u32, now_ms: u64) -> Result<(), StoreError>;
    /// Every KEK version ever created, oldest first.
    async fn kek_infos(&self) -> Result<Vec<KekInfo>, StoreError>;
    /// Every stored KEK, `(version, wrapped bytes)`.
    async fn keks(&self) -> Result<Vec<(u32, Vec<u8>)>, StoreError>;

    // ---- records ------------------------------------------------------------------------------

    /// The record with its wrapped data key, and the version a change of it expects. The two
    /// belong together (same data-key generation) even if a re-encryption runs meanwhile.
    async fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, Version)>, StoreError>;
    /// A subject's records, by blind index.
    async fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError>;
    /// Up to `limit` entries of `space` after `cursor`, in a stable order, each with its version.
    async fn walk(&self, space: KeySpace, cursor: &Cursor, limit: usize) -> Result<Vec<Walked>, StoreError>;
    /// How many entries `space` holds.
    async fn count(&self, space: KeySpace) -> Result<u64, StoreError>;

    // ---- identities, tokens, lockouts, consent, jobs -----------------------------------------

    async fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError>;
    async fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError>;
    async fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError>;
    async fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError>;
    async fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError>;
    /// Every token of an identity, `(token id, token)`.
    async fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError>;
    /// A credential's failure record, written outside any request's commit: a lockout holds
    /// whether or not the request that caused it commits.
    async fn put_failures(&self, credential: &[u8], record: &FailureRecord) -> Result<(), StoreError>;
    /// Every credential's failure record, `(credential key, record)`.
    async fn failure_records(&self) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError>;
    /// On a store several nodes share: replaces `credential`'s stored record by `update` of it,
    /// atomically (every node's failures count toward one limit), and returns the new record.
    /// `Ok(None)`: this store leaves counting to the one node that owns it.
    async fn count_failure(
        &self,
        _credential: &[u8],
        _update: &(dyn Fn(Option<FailureRecord>) -> FailureRecord + Sync),
    ) -> Result<Option<FailureRecord>, StoreError> {
        Ok(None)
    }
    /// The credentials locked out at `now_ms`, for nodes that follow each other's lockouts.
    async fn lockouts(&self, _now_ms: u64) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        Ok(Vec::new())
    }
    async fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError>;
    /// Every subject's consent: `(current: (index, choice), history: (index, seq, choice))`
    /// (the unseal-time migration reads them all once).
    async fn all_consent(&self) -> Result<AllConsent, StoreError>;
    /// `(current choices, full history oldest first)`.
    async fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError>;
    /// The background key job, if one was ever started.
    async fn job(&self) -> Result<Option<StoredJob>, StoreError>;
    /// The regulations in force (the newest stored version), if any were stored.
    async fn regulations(&self) -> Result<Option<StoredRegulations>, StoreError>;
    /// The serial of the newest stored regulations (cheap: nodes poll it).
    async fn regulations_serial(&self) -> Result<Option<u64>, StoreError>;
    /// A number never handed out before by this store (consent history order).
    async fn generate_id(&self) -> Result<u64, StoreError>;

    // ---- the audit log's records ------------------------------------------------------------

    async fn audit_record(&self, which: AuditRecord) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores an audit record (durable with the next flush; [`Storage::flush_now`] for at once).
    async fn set_audit_record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError>;
    async fn remove_audit_record(&self, which: AuditRecord) -> Result<(), StoreError>;
    /// A writer for the log's flusher thread.
    fn head_recorder(&self) -> HeadRecorder;
    /// The chain head the last commit carrying an entry left (see [`Changes::extend_audit_head`]).
    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError>;
    /// Entries changes carried ([`Op::AuditEntry`]) after seq `after`, oldest first.
    async fn audit_entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Removes the carried entries up to `last` (archival), durable.
    async fn remove_audit_entries_upto(&self, last: u64) -> Result<(), StoreError>;
    /// Signed checkpoints a vault of an earlier layout kept in its store, for moving them to the
    /// log's checkpoints file once (only sled ever had them).
    async fn legacy_checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(Vec::new())
    }
    async fn remove_legacy_checkpoints(&self) -> Result<(), StoreError> {
        Ok(())
    }

    // ---- the one way in -----------------------------------------------------------------------

    /// Applies `changes` atomically if every expectation it carries still holds; `Ok(false)`,
    /// nothing written, if one does not. The backend checks and applies under its own
    /// serialisation: compare-and-swap does not depend on any caller's lock.
    async fn commit(&self, changes: Changes) -> Result<bool, StoreError>;
    /// Whether `expect` holds now, for a group commit that checks each member before chaining
    /// the survivors' entries (its caller commits alone meanwhile). A backend that cannot say
    /// answers `true`: the group's commit then checks, and a failure sends every member back.
    async fn holds_now(&self, expect: &Expect) -> Result<bool, StoreError> {
        let _ = expect;
        Ok(true)
    }
    /// Hands every stored key and value to `each` (a backup: the caller holds commits off, so
    /// what it sees is one consistent state), counting the records as it goes (one walk, not a
    /// second under the hold). Synchronous: a backup runs on a blocking thread. A database
    /// backend leaves this to the database's own tools.
    fn snapshot(
        &self,
        each: &mut dyn FnMut(RawEntry) -> Result<(), StoreError>,
    ) -> Result<Snapshot, StoreError> {
        let _ = each;
        Err(StoreError::NotSupported(
            "this storage backend is backed up with its database's own tools (PostgreSQL: pg_basebackup, \
             see the README), then checked with `khlangd verify`",
        ))
    }
    /// Returns once everything committed before the call is durable.
    async fn durable(&self) -> Result<(), StoreError>;
    /// Announces a request that may write (taken before it prepares, dropped when it returns).
    fn begin_write(&self) -> WriteTicket {
        WriteTicket::uncounted()
    }
    /// Makes everything committed so far durable now (init, shutdown, operator commands).
    async fn flush_now(&self) -> Result<(), StoreError>;
    fn flush_stats(&self) -> &FlushStats;
    /// The audit chain, when the store holds it itself for every node that shares it (PostgreSQL);
    /// `None`: the log lives in the node's own files and changes carry their entries (sled).
    fn shared_chain(&self) -> Option<Arc<dyn SharedChain>> {
        None
    }
    /// Drops what this node caches of values another node may change (credentials), so the
    /// next read is the store's own. A store with no such cache does nothing.
    fn forget_cached(&self) {}
    /// Whether this node may run the background key jobs now. `want`: it is ready to (unsealed);
    /// the store then takes the lease every node sharing it competes for, if free, and keeps it;
    /// `false` gives it up. A store one process owns always grants it.
    async fn hold_job_lease(&self, want: bool) -> Result<bool, StoreError> {
        Ok(want)
    }
}

/// The head of a chain the store holds, as a batch found it under the head's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainTip {
    pub seq: u64,
    pub hash: [u8; 32],
    /// The newest signed checkpoint's seq (0: none yet) and when it was signed: the next one names
    /// it, and is due by entries or by time.
    pub signed_seq: u64,
    pub signed_ms: u64,
}

/// What a batch adds to a shared chain, as the audit log computed it from the tip.
#[derive(Debug, Default)]
pub struct ChainAppend {
    /// `(seq, hash ‖ canonical JSON)`, seqs following the tip's without a gap.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// The HMAC tag of the new head (`None` while sealed), stored with its entry.
    pub tag: Option<Vec<u8>>,
    /// A signed checkpoint of the new head (JSON).
    pub checkpoint: Option<Vec<u8>>,
    /// The signed head the chain goes on from, when it moves: `(seq, time_ms)`.
    pub signed: Option<(u64, u64)>,
    /// The new head when it does not simply follow the tip (a carried-forward break chains from
    /// its anchor), else taken from the last entry.
    pub head: Option<AuditHead>,
}

/// Computes a batch's entries from the tip found under the lock and which change sets' expectations
/// held (only those are applied; the others are answered "conflict", nothing of them written).
pub type Seal<'a> = dyn FnMut(&ChainTip, &[bool]) -> Result<ChainAppend, StoreError> + Send + 'a;

/// An audit chain kept by the store itself, one for every node that shares the store: gap-free and
/// strictly ordered because each batch appends under a lock on the head, in the same transaction
/// as the changes its entries record.
#[async_trait::async_trait]
pub trait SharedChain: Send + Sync {
    /// One transaction: takes the head's lock, checks every change set's expectations, calls
    /// `seal`, writes its entries with the change sets that held, commits durably. Returns which
    /// change sets were applied (empty sets count as applied).
    async fn append(&self, batch: Vec<Changes>, seal: &mut Seal<'_>) -> Result<Vec<bool>, StoreError>;
    /// The chain's current tip (no lock).
    async fn tip(&self) -> Result<ChainTip, StoreError>;
    /// The chain's reader (entries, checkpoints, the archive base), synchronous as the files'
    /// are; the audit layer reads and verifies through it (`audit::chain_rows`).
    fn rows(&self) -> ChainReader;
    /// How long this node's batches held the head's lock, so far.
    fn lock_stats(&self) -> LockStats;
}

/// How long a node's batches held a shared chain's head lock: from the lock's answer to the
/// commit's (what the other nodes' batches wait behind). Percentiles from a log₂ histogram
/// (within a factor of two, upper bounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockStats {
    pub batches: u64,
    /// Change sets and entries' requests the batches carried.
    pub requests: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Lock-hold times as they are measured (see [`LockStats`]).
#[derive(Debug, Default)]
pub struct LockMeter {
    batches: AtomicU64,
    requests: AtomicU64,
    total_us: AtomicU64,
    max_us: AtomicU64,
    /// `buckets[i]`: holds under `2^i` µs.
    buckets: [AtomicU64; 32],
}

impl LockMeter {
    pub fn record(&self, requests: usize, held: std::time::Duration) {
        let us = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(requests as u64, Ordering::Relaxed);
        self.total_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(31);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> LockStats {
        let batches = self.batches.load(Ordering::Relaxed);
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let quantile = |q: f64| {
            let want = (batches as f64 * q).ceil() as u64;
            let mut seen = 0;
            for (i, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= want.max(1) {
                    return 1u64 << i;
                }
            }
            0
        };
        LockStats {
            batches,
            requests: self.requests.load(Ordering::Relaxed),
            mean_us: self.total_us.load(Ordering::Relaxed).checked_div(batches).unwrap_or(0),
            p50_us: if batches == 0 { 0 } else { quantile(0.5) },
            p99_us: if batches == 0 { 0 } else { quantile(0.99) },
            max_us: self.max_us.load(Ordering::Relaxed),
        }
    }
}

/// The KEK version of every stored data key, counted from the wrapped keys' headers (read by the
/// key hierarchy, not the store).
pub async fn data_keys_per_kek(
    store: &dyn Storage,
) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    let mut cursor = Cursor::default();
    loop {
        let batch = store.walk(KeySpace::DataKeys, &cursor, 4096).await?;
        let Some(last) = batch.last() else { return Ok(out) };
        cursor = last.cursor.clone();
        for w in &batch {
            let (version, _) = khlang_keys::WrappedDataKey::header_of(&w.value)
                .map_err(|_| StoreError::Corrupt("wrapped data key"))?;
            *out.entry(version).or_insert(0) += 1;
        }
    }
}
