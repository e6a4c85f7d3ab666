//! Storage on sled 0.34, with durable acknowledgements through a group-commit flusher.
//!
//! Trees: `meta` (sealed root key, mode), `keks` (version → wrapped KEK), `identities` (token id →
//! identity with its token's keyed hash), and `records`, which holds two key spaces so a record and
//! its index entry change together in one atomic batch (sled transactions across trees cost ~45% of
//! Put throughput here):
//! - `r` ‖ record id → the record: its wrapped data key and field envelopes;
//! - `s` ‖ subject blind index ‖ record id → ().

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
                batch.extend(rx.try_iter());
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
    records: sled::Tree,
    identities: sled::Tree,
    consent: sled::Tree,
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
            records: db.open_tree("records")?,
            consent: db.open_tree("consent")?,
            identities: db.open_tree("identities")?,
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

    /// Inserts a new record and its subject index entry in one atomic batch.
    pub fn insert_record(&self, record_id: &str, record: &StoredRecord) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(Self::record_key(record_id), record.encode()?);
        batch.insert(Self::subject_key(&record.subject_index, record_id), &[] as &[u8]);
        self.records.apply_batch(batch)?;
        Ok(())
    }

    /// The record and the exact bytes it was read from (for [`Store::replace_record`]).
    pub fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, sled::IVec)>, StoreError> {
        self.records
            .get(Self::record_key(record_id))?
            .map(|bytes| Ok((StoredRecord::decode(&bytes)?, bytes)))
            .transpose()
    }

    /// Replaces a record if it still holds `expected` (compare-and-swap), so concurrent updates never
    /// lose a write. `Ok(false)`: it changed or vanished meanwhile; read again and retry.
    pub fn replace_record(
        &self,
        record_id: &str,
        expected: &sled::IVec,
        next: &StoredRecord,
    ) -> Result<bool, StoreError> {
        let swapped = self.records.compare_and_swap(
            Self::record_key(record_id),
            Some(expected),
            Some(next.encode()?),
        )?;
        Ok(swapped.is_ok())
    }

    /// Removes the record, with its data key (crypto-shredding), and its index entry.
    /// `false`: not found.
    pub fn delete_record(&self, record_id: &str) -> Result<bool, StoreError> {
        let Some((record, _)) = self.get_record(record_id)? else { return Ok(false) };
        let mut batch = sled::Batch::default();
        batch.remove(Self::record_key(record_id));
        batch.remove(Self::subject_key(&record.subject_index, record_id));
        self.records.apply_batch(batch)?;
        Ok(true)
    }

    /// A subject's records, by blind index.
    pub fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        let prefix = [b"s".as_slice(), subject_index.as_slice()].concat();
        let mut out = Vec::new();
        for kv in self.records.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let id =
                std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StoreError::Corrupt("subject index"))?;
            if let Some((record, _)) = self.get_record(id)? {
                out.push((id.to_owned(), record));
            }
        }
        Ok(out)
    }

    /// Overwrites a stored record as is. Only for tests that tamper with ciphertext, server stopped.
    pub fn overwrite_record_for_tests(
        &self,
        record_id: &str,
        record: &StoredRecord,
    ) -> Result<(), StoreError> {
        self.records.insert(Self::record_key(record_id), record.encode()?)?;
        Ok(())
    }

    fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(value).map_err(|_| StoreError::Corrupt(what))
    }

    fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
        postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
    }

    // Identities tree: `i` ‖ name → identity, `t` ‖ token id → token.

    pub fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        let key = [b"i".as_slice(), name.as_bytes()].concat();
        self.identities.get(key)?.map(|b| Self::decode(&b, "identity")).transpose()
    }

    /// Creates an identity; `false` if one with that name exists (revoked names stay taken).
    pub fn create_identity(&self, identity: &StoredIdentity) -> Result<bool, StoreError> {
        let key = [b"i".as_slice(), identity.name.as_bytes()].concat();
        let created = self.identities.compare_and_swap(
            key,
            None as Option<&[u8]>,
            Some(Self::encode(identity, "identity")?),
        )?;
        Ok(created.is_ok())
    }

    pub fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        self.identities.scan_prefix(b"i").map(|kv| Self::decode(&kv?.1, "identity")).collect()
    }

    pub fn put_token(&self, token_id: &str, token: &StoredToken) -> Result<(), StoreError> {
        let key = [b"t".as_slice(), token_id.as_bytes()].concat();
        self.identities.insert(key, Self::encode(token, "token")?)?;
        Ok(())
    }

    pub fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let key = [b"t".as_slice(), token_id.as_bytes()].concat();
        self.identities.get(key)?.map(|b| Self::decode(&b, "token")).transpose()
    }

    /// Marks the identity revoked and deletes all its tokens, in one batch. `false`: no such identity.
    pub fn revoke_identity(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        let Some(mut identity) = self.get_identity(name)? else { return Ok(false) };
        identity.revoked_ms.get_or_insert(now_ms);
        let mut batch = sled::Batch::default();
        batch.insert([b"i".as_slice(), name.as_bytes()].concat(), Self::encode(&identity, "identity")?);
        for kv in self.identities.scan_prefix(b"t") {
            let (k, v) = kv?;
            let token: StoredToken = Self::decode(&v, "token")?;
            if token.identity == name {
                batch.remove(k);
            }
        }
        self.identities.apply_batch(batch)?;
        Ok(true)
    }

    // Consent tree: `c` ‖ subject index ‖ purpose → current choice; `h` ‖ subject index ‖ seq → history.

    /// Records a choice and appends it to the subject's history, atomically.
    pub fn set_consent(&self, subject_index: &[u8; 32], consent: &StoredConsent) -> Result<(), StoreError> {
        let seq = self.db.generate_id()?;
        let mut batch = sled::Batch::default();
        let encoded = Self::encode(consent, "consent")?;
        batch.insert([b"c".as_slice(), subject_index, consent.purpose.as_bytes()].concat(), encoded.clone());
        batch.insert([b"h".as_slice(), subject_index, &seq.to_be_bytes()].concat(), encoded);
        self.consent.apply_batch(batch)?;
        Ok(())
    }

    pub fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        let key = [b"c".as_slice(), subject_index, purpose.as_bytes()].concat();
        self.consent.get(key)?.map(|b| Self::decode(&b, "consent")).transpose()
    }

    /// `(current choices, full history oldest first)`.
    pub fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let read = |prefix: &[u8]| -> Result<Vec<StoredConsent>, StoreError> {
            let key = [prefix, subject_index.as_slice()].concat();
            self.consent.scan_prefix(key).map(|kv| Self::decode(&kv?.1, "consent")).collect()
        };
        Ok((read(b"c")?, read(b"h")?))
    }

    /// Deletes every record of a subject (with its data key and index entry) in one batch.
    pub fn erase_subject(&self, subject_index: &[u8; 32]) -> Result<usize, StoreError> {
        let prefix = [b"s".as_slice(), subject_index.as_slice()].concat();
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.records.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let id = &k[prefix.len()..];
            batch.remove([b"r".as_slice(), id].concat());
            batch.remove(k);
            n += 1;
        }
        self.records.apply_batch(batch)?;
        Ok(n)
    }
}
