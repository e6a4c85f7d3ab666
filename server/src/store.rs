//! Storage on sled 0.34, with durable acknowledgements through a group-commit flusher.
//!
//! Trees: `meta` (sealed root key, mode) and `keks` (version → wrapped KEK), written only at init
//! and by key operations; and `vault`, which holds every key space that requests change, so a change
//! and its audit entry are applied together in one atomic batch:
//! - `r` ‖ record id → record (wrapped data key, field envelopes); `s` ‖ subject index ‖ id → ();
//! - `i` ‖ name → identity; `t` ‖ token id → token (HMAC of its secret);
//! - `c` ‖ subject index ‖ purpose → current consent; `h` ‖ subject index ‖ seq → consent history;
//! - `a` ‖ seq → audit entry (its chain hash ‖ canonical JSON); `k` ‖ seq → signed checkpoint.
//!
//! Requests stage their changes in [`Changes`]; only the audit log applies them (see `audit.rs`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use tokio::sync::oneshot;

use crate::StoreError;

const META_SEALED_ROOT: &[u8] = b"sealed_root";
const META_MODE: &[u8] = b"mode";
/// Current encoding of [`StoredRecord`] and [`StoredIdentity`].
const RECORD_FORMAT: u8 = 1;

/// How a write becomes durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one `fsync` (the default).
    #[default]
    Group,
    /// One flush per write, never shared with another write; kept as the benchmark's baseline.
    PerRequest,
}

/// A record as stored: its wrapped data key, envelopes (ciphertext) and field names. Keeping the
/// data key inside the record makes every read see a matching key and ciphertext.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRecord {
    pub format: u8,
    /// The record's data key, wrapped by a KEK (empty in the plaintext benchmark baseline).
    pub wrapped_key: Vec<u8>,
    /// HMAC of the subject id (blind index), so a subject's records can be found without its id.
    pub subject_index: [u8; 32],
    /// The subject id, sealed under the record's data key like a field.
    pub subject: Vec<u8>,
    /// Sorted by name.
    pub fields: Vec<StoredField>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredField {
    pub name: String,
    pub envelope: Vec<u8>,
}

impl StoredRecord {
    pub fn new(
        wrapped_key: Vec<u8>,
        subject_index: [u8; 32],
        subject: Vec<u8>,
        fields: Vec<StoredField>,
        now_ms: u64,
    ) -> Self {
        Self {
            format: RECORD_FORMAT,
            wrapped_key,
            subject_index,
            subject,
            fields,
            created_ms: now_ms,
            updated_ms: now_ms,
        }
    }

    pub fn field_names(&self) -> Vec<String> {
        self.fields.iter().map(|f| f.name.clone()).collect()
    }

    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(self).map_err(|_| StoreError::Corrupt("record (encode)"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let r: Self = postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("record"))?;
        if r.format != RECORD_FORMAT {
            return Err(StoreError::Corrupt("record (unknown format)"));
        }
        Ok(r)
    }
}

/// An identity the regulations' roles apply to. Credentials (tokens, client certificates) point here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredIdentity {
    pub format: u8,
    pub name: String,
    pub role: String,
    pub created_ms: u64,
    pub created_by: String,
    /// Set when revoked; a revoked identity's tokens are deleted and it can never authenticate again.
    pub revoked_ms: Option<u64>,
}

impl StoredIdentity {
    pub fn new(name: String, role: String, created_by: String, created_ms: u64) -> Self {
        Self { format: RECORD_FORMAT, name, role, created_ms, created_by, revoked_ms: None }
    }
}

/// A bearer token: never the token itself, only an HMAC of its secret part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredToken {
    pub format: u8,
    pub identity: String,
    /// HMAC-SHA256 of the token's secret part under the token pepper.
    pub mac: [u8; 32],
    pub created_ms: u64,
}

/// A data subject's current choice for one purpose.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredConsent {
    pub format: u8,
    pub purpose: String,
    pub granted: bool,
    pub at_ms: u64,
    /// The identity that recorded it.
    pub by: String,
}

/// Counts for the benchmark report: how many writes each flush carried.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub writes: AtomicU64,
}

type FlushWaiter = oneshot::Sender<Result<(), String>>;

/// How long a group flush waits for more writers after the first, and how many it takes at most.
const GROUP_WINDOW: std::time::Duration = std::time::Duration::from_micros(500);
const GROUP_MAX: usize = 256;

/// Writers insert, then wait here; one thread flushes once for everyone who arrived meanwhile.
/// (sled's own `flush_async` deadlocks under concurrency in 0.34.7.)
struct GroupCommit {
    tx: Option<mpsc::Sender<FlushWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    /// Stops the flusher and waits for it, so the database lock is free once the store is dropped.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GroupCommit {
    fn start(db: sled::Db, stats: Arc<FlushStats>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<FlushWaiter>();
        let thread = std::thread::Builder::new().name("khlang-flusher".into()).spawn(move || {
            // Ends when the store (the only sender) is dropped.
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                // Hold the door briefly for writers already on their way: every flush costs sled a
                // log write and a sync on this machine's only two cores.
                let deadline = std::time::Instant::now() + GROUP_WINDOW;
                while batch.len() < GROUP_MAX {
                    match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                stats.flushes.fetch_add(1, Ordering::Relaxed);
                stats.writes.fetch_add(batch.len() as u64, Ordering::Relaxed);
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        })?;
        Ok(Self { tx: Some(tx), thread: Some(thread) })
    }
}

pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    keks: sled::Tree,
    vault: sled::Tree,
    /// Fault drill: when set, every commit fails as a disk error would (tests use it to show
    /// that an unauditable request fails closed).
    fail_commits: std::sync::atomic::AtomicBool,
    durability: Durability,
    group: GroupCommit,
    per_request_lock: Arc<std::sync::Mutex<()>>,
    stats: Arc<FlushStats>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("durability", &self.durability).finish_non_exhaustive()
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

impl Store {
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir.join("db")).mode(sled::Mode::HighThroughput).open()?;
        let stats = Arc::new(FlushStats::default());
        let group =
            GroupCommit::start(db.clone(), stats.clone()).map_err(|e| StoreError::Flush(e.to_string()))?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            keks: db.open_tree("keks")?,
            vault: db.open_tree("vault")?,
            fail_commits: false.into(),
            db,
            durability,
            group,
            per_request_lock: Arc::default(),
            stats,
        })
    }

    pub fn flush_stats(&self) -> &FlushStats {
        &self.stats
    }

    /// Returns once everything written before the call is on disk.
    pub async fn durable(&self) -> Result<(), StoreError> {
        match self.durability {
            Durability::Group => {
                let (tx, rx) = oneshot::channel();
                let sender =
                    self.group.tx.as_ref().ok_or_else(|| StoreError::Flush("flusher stopped".into()))?;
                sender.send(tx).map_err(|_| StoreError::Flush("flusher stopped".into()))?;
                rx.await.map_err(|_| StoreError::Flush("flusher stopped".into()))?.map_err(StoreError::Flush)
            }
            Durability::PerRequest => {
                // One flush of its own for every write: flushes are serialised, so none is shared.
                let db = self.db.clone();
                let lock = self.per_request_lock.clone();
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                tokio::task::spawn_blocking(move || {
                    let _one_at_a_time =
                        lock.lock().map_err(|_| StoreError::Flush("flush lock poisoned".into()))?;
                    db.flush().map(|_| ()).map_err(StoreError::from)
                })
                .await
                .map_err(|e| StoreError::Flush(e.to_string()))??;
                Ok(())
            }
        }
    }

    /// Flushes synchronously (init, shutdown).
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn sealed_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(META_SEALED_ROOT)?.map(|v| v.to_vec()))
    }

    pub fn mode(&self) -> Result<Option<String>, StoreError> {
        self.meta
            .get(META_MODE)?
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt("mode")))
            .transpose()
    }

    /// Writes the sealed root key and the first KEK in one transaction; refuses an initialised vault.
    pub fn initialise(
        &self,
        sealed_root: &[u8],
        mode: &str,
        kek_version: u32,
        wrapped_kek: &[u8],
    ) -> Result<(), StoreError> {
        (&self.meta, &self.keks).transaction(|(meta, keks)| {
            if meta.get(META_SEALED_ROOT)?.is_some() {
                return Err(abort(StoreError::AlreadyInitialised));
            }
            meta.insert(META_SEALED_ROOT, sealed_root)?;
            meta.insert(META_MODE, mode.as_bytes())?;
            keks.insert(&kek_version.to_be_bytes(), wrapped_kek)?;
            Ok(())
        })?;
        self.flush_now()
    }

    /// Every stored KEK, `(version, wrapped bytes)`.
    pub fn keks(&self) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        self.keks
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let version: [u8; 4] =
                    k.as_ref().try_into().map_err(|_| StoreError::Corrupt("kek version"))?;
                Ok((u32::from_be_bytes(version), v.to_vec()))
            })
            .collect()
    }

    fn record_key(record_id: &str) -> Vec<u8> {
        [b"r".as_slice(), record_id.as_bytes()].concat()
    }

    fn subject_key(subject_index: &[u8; 32], record_id: &str) -> Vec<u8> {
        [b"s".as_slice(), subject_index.as_slice(), record_id.as_bytes()].concat()
    }

    fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(value).map_err(|_| StoreError::Corrupt(what))
    }

    fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
        postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
    }

    // ---- reads ------------------------------------------------------------------------------

    /// The record and the exact bytes it was read from (for [`Changes::replace_record`]).
    pub fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, sled::IVec)>, StoreError> {
        self.vault
            .get(Self::record_key(record_id))?
            .map(|bytes| Ok((StoredRecord::decode(&bytes)?, bytes)))
            .transpose()
    }

    /// A subject's records, by blind index.
    pub fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        let prefix = [b"s".as_slice(), subject_index.as_slice()].concat();
        let mut out = Vec::new();
        for kv in self.vault.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let id =
                std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StoreError::Corrupt("subject index"))?;
            if let Some((record, _)) = self.get_record(id)? {
                out.push((id.to_owned(), record));
            }
        }
        Ok(out)
    }

    pub fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        let key = [b"i".as_slice(), name.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "identity")).transpose()
    }

    pub fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        self.vault.scan_prefix(b"i").map(|kv| Self::decode(&kv?.1, "identity")).collect()
    }

    pub fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let key = [b"t".as_slice(), token_id.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "token")).transpose()
    }

    pub fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        let key = [b"c".as_slice(), subject_index, purpose.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "consent")).transpose()
    }

    /// `(current choices, full history oldest first)`.
    pub fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let read = |prefix: &[u8]| -> Result<Vec<StoredConsent>, StoreError> {
            let key = [prefix, subject_index.as_slice()].concat();
            self.vault.scan_prefix(key).map(|kv| Self::decode(&kv?.1, "consent")).collect()
        };
        Ok((read(b"c")?, read(b"h")?))
    }

    /// Audit entries from `from_seq` on, in order: `(seq, stored value)`.
    pub fn audit_entries(
        &self,
        from_seq: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> + '_ {
        let start = [b"a".as_slice(), &from_seq.to_be_bytes()].concat();
        self.vault.range(start..[b"b".as_slice()].concat()).map(|kv| {
            let (k, v) = kv?;
            let seq: [u8; 8] =
                k.get(1..9).and_then(|s| s.try_into().ok()).ok_or(StoreError::Corrupt("audit key"))?;
            Ok((u64::from_be_bytes(seq), v))
        })
    }

    /// The last audit entry, if any.
    pub fn last_audit_entry(&self) -> Result<Option<(u64, sled::IVec)>, StoreError> {
        let Some((k, v)) = self.vault.scan_prefix(b"a").next_back().transpose()? else { return Ok(None) };
        let seq: [u8; 8] =
            k.get(1..9).and_then(|s| s.try_into().ok()).ok_or(StoreError::Corrupt("audit key"))?;
        Ok(Some((u64::from_be_bytes(seq), v)))
    }

    /// Every stored checkpoint (its JSON).
    pub fn checkpoints(&self) -> Result<Vec<sled::IVec>, StoreError> {
        self.vault.scan_prefix(b"k").map(|kv| Ok(kv?.1)).collect()
    }

    // ---- the one way in -----------------------------------------------------------------------

    /// Applies staged changes and audit records atomically. `Ok(false)`: an expectation
    /// ([`Changes::replace_record`]) no longer holds and nothing was written. The caller (the audit
    /// log) serialises commits, so the check and the write cannot interleave with another commit.
    pub fn commit(&self, changes: Changes, audit: &[Record]) -> Result<bool, StoreError> {
        if self.fail_commits.load(Ordering::Relaxed) {
            return Err(StoreError::Flush("injected write failure".into()));
        }
        for (key, expected) in &changes.expect {
            if self.vault.get(key)?.as_ref() != expected.as_ref() {
                return Ok(false);
            }
        }
        if changes.empty {
            // Nothing but audit records: skip sled's batch machinery (it logs a batch marker
            // even for an empty batch); a single record is atomic on its own.
            match audit {
                [] => return Ok(true),
                [(k, v)] => {
                    self.vault.insert(k.as_slice(), v.as_slice())?;
                    return Ok(true);
                }
                _ => {}
            }
        }
        let mut batch = changes.batch;
        for (k, v) in audit {
            batch.insert(k.as_slice(), v.as_slice());
        }
        self.vault.apply_batch(batch)?;
        Ok(true)
    }

    /// Fault drill: make every following commit fail (or succeed again).
    pub fn inject_commit_failure(&self, fail: bool) {
        self.fail_commits.store(fail, Ordering::Relaxed);
    }

    /// Overwrites a stored record as is. Only for tests that tamper with ciphertext, server stopped.
    pub fn overwrite_record_for_tests(
        &self,
        record_id: &str,
        record: &StoredRecord,
    ) -> Result<(), StoreError> {
        self.vault.insert(Self::record_key(record_id), record.encode()?)?;
        Ok(())
    }

    /// Raw access to the `vault` tree, for tests that tamper with the audit log (server stopped).
    pub fn vault_tree_for_tests(&self) -> &sled::Tree {
        &self.vault
    }

    pub fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }
}

/// A raw key and value written beside a request's changes (audit entries, checkpoints).
pub type Record = (Vec<u8>, Vec<u8>);

/// Changes a request wants to make, applied with its audit entry in one batch by the audit log.
#[derive(Default)]
pub struct Changes {
    batch: sled::Batch,
    /// Keys that must still hold these values (`None`: be absent) when the batch is applied.
    expect: Vec<(Vec<u8>, Option<sled::IVec>)>,
    empty: bool,
}

impl Changes {
    pub fn none() -> Self {
        Self { empty: true, ..Self::default() }
    }

    pub fn new() -> Self {
        Self { empty: false, ..Self::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.empty
    }

    /// Creates an identity, provided the name is not taken when the change is applied.
    pub fn create_identity(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        self.expect.push(([b"i".as_slice(), identity.name.as_bytes()].concat(), None));
        self.put_identity(identity)
    }

    pub fn insert_record(&mut self, record_id: &str, record: &StoredRecord) -> Result<(), StoreError> {
        self.batch.insert(Store::record_key(record_id), record.encode()?);
        self.batch.insert(Store::subject_key(&record.subject_index, record_id), &[] as &[u8]);
        Ok(())
    }

    /// Replaces a record, provided it still holds `expected` when the change is applied.
    pub fn replace_record(
        &mut self,
        record_id: &str,
        expected: sled::IVec,
        next: &StoredRecord,
    ) -> Result<(), StoreError> {
        let key = Store::record_key(record_id);
        self.batch.insert(key.clone(), next.encode()?);
        self.expect.push((key, Some(expected)));
        Ok(())
    }

    /// Removes a record (with its data key) and its index entry, provided it is still as read.
    pub fn delete_record(&mut self, record_id: &str, record: &StoredRecord, read: sled::IVec) {
        let key = Store::record_key(record_id);
        self.batch.remove(key.clone());
        self.batch.remove(Store::subject_key(&record.subject_index, record_id));
        self.expect.push((key, Some(read)));
    }

    pub fn put_identity(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        self.batch.insert(
            [b"i".as_slice(), identity.name.as_bytes()].concat(),
            Store::encode(identity, "identity")?,
        );
        Ok(())
    }

    pub fn put_token(&mut self, token_id: &str, token: &StoredToken) -> Result<(), StoreError> {
        self.batch.insert([b"t".as_slice(), token_id.as_bytes()].concat(), Store::encode(token, "token")?);
        Ok(())
    }

    pub fn remove_token(&mut self, token_id: &str) {
        self.batch.remove([b"t".as_slice(), token_id.as_bytes()].concat());
    }

    /// A subject's choice, and its place in the subject's history (`seq` from [`Store::generate_id`]).
    pub fn set_consent(
        &mut self,
        subject_index: &[u8; 32],
        seq: u64,
        consent: &StoredConsent,
    ) -> Result<(), StoreError> {
        let encoded = Store::encode(consent, "consent")?;
        self.batch
            .insert([b"c".as_slice(), subject_index, consent.purpose.as_bytes()].concat(), encoded.clone());
        self.batch.insert([b"h".as_slice(), subject_index, &seq.to_be_bytes()].concat(), encoded);
        Ok(())
    }
}

impl Store {
    /// Every token of an identity, `(token id, token)`.
    pub fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.vault.scan_prefix(b"t") {
            let (k, v) = kv?;
            let token: StoredToken = Self::decode(&v, "token")?;
            if token.identity == name {
                out.push((String::from_utf8_lossy(&k[1..]).into_owned(), token));
            }
        }
        Ok(out)
    }
}
