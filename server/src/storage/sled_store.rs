//! Storage on sled 0.34, with durable acknowledgements through a group-commit flusher.
//!
//! Trees: `meta` (sealed root key, mode) and `keks` (version → wrapped KEK), written only at init
//! and by key operations; and `vault`, which holds every key space that requests change, so a change
//! and its audit entry are applied together in one atomic batch:
//! - `r` ‖ record id → record (field envelopes, sealed subject id); `d` ‖ record id → its wrapped
//!   data key; `s` ‖ subject index ‖ id → ();
//! - `i` ‖ name → identity; `t` ‖ token id → token (HMAC of its secret);
//! - `c` ‖ subject index ‖ purpose → current consent; `h` ‖ subject index ‖ seq → consent history;
//! - `a` ‖ seq → audit entry (its chain hash ‖ canonical JSON); `k` ‖ seq → signed checkpoint;
//! - `v` ‖ KEK version → marker while that version is live; `j` → the background key job.
//!
//! - `H` → the audit chain head the last change carried; `A`, `m`, `M`, `B` → the audit log's records.
//!
//! Requests stage their changes in [`Changes`]; only the audit log commits them (see `audit.rs`).

#[path = "sled_commit.rs"]
mod commit;
#[path = "sled_restore.rs"]
mod restore;
use commit::GroupCommit;
pub use restore::SledRestore;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use tokio::sync::oneshot;

use super::folder::{secure_folder, tighten};
use super::{
    AuditHead, AuditRecord, Changes, Cursor, Custody, Expect, FailureRecord, FlushStats, HeadRecorder,
    KekInfo, KeySpace, Op, RawEntry, Snapshot, Storage, Stored, StoredConsent, StoredIdentity,
    StoredIdentityRequest, StoredJob, StoredRecord, StoredRegulations, StoredToken, Version, Walked,
    WriteTicket, decode_stored, encode_stored,
};
use crate::StoreError;

const META_SEALED_ROOT: &[u8] = b"sealed_root";
const META_MODE: &[u8] = b"mode";
const META_CUSTODIANS: &[u8] = b"custodians";
const META_DERIVATION_KEY: &[u8] = b"derivation_key";
/// `share` ‖ custodian index (u8) → that custodian's sealed share.
const META_SHARE: &[u8] = b"share";
/// Key of the background key job (rewrap or re-encryption) in the `vault` tree.
const JOB_KEY: &[u8] = b"j";
/// The serial of the regulations in force (big-endian); each version's text under `g‖serial`.
const REGULATIONS_KEY: &[u8] = b"G";
/// `schema` → the layout version of this data folder (u32, big-endian; absent: 0, every build
/// before the storage port). [`SledStore::open`] upgrades an older folder in place, once, and
/// refuses a newer one.
const META_SCHEMA: &[u8] = b"schema";
/// The layout this build writes. 1: every live KEK version has its marker (`v‖version`), written
/// with the KEK itself (before, the unseal wrote missing markers each time).
pub const SCHEMA_VERSION: u32 = 1;

/// `id_floor` → where this database's ids start (u64, big-endian): a restored database's own
/// counter starts again at 0, so its ids are this floor plus sled's (absent: 0).
const META_ID_FLOOR: &[u8] = b"id_floor";

/// Key of the audit chain head the last change carried (see [`Changes::extend_audit_head`]).
const AUDIT_HEAD_KEY: &[u8] = b"H";

/// How the custodians' shares are counted in `meta`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredCustodians {
    threshold: u8,
    count: u8,
}

/// How a write becomes durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one `fsync` (the default).
    #[default]
    Group,
    /// One flush per write, never shared with another write; kept as the benchmark's baseline.
    PerRequest,
}

type FlushWaiter = oneshot::Sender<Result<(), String>>;

fn audit_record_key(which: AuditRecord) -> &'static [u8] {
    match which {
        AuditRecord::SignedHead => b"A",
        AuditRecord::ChangeTag => b"m",
        AuditRecord::ReadTag => b"M",
        AuditRecord::Break => b"B",
    }
}

/// The embedded store: sled trees in `<data>/db`, with its own group commit.
pub struct SledStore {
    /// The data folder (the audit log's files live beside the database).
    dir: std::path::PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    keks: sled::Tree,
    kek_info: sled::Tree,
    vault: sled::Tree,
    durability: Durability,
    group: GroupCommit,
    per_request_lock: Arc<std::sync::Mutex<()>>,
    /// Held around checking a change's expectations and applying it.
    commit_lock: std::sync::Mutex<()>,
    stats: Arc<FlushStats>,
    /// Requests in flight that may write (see [`WriteTicket`]).
    writers: Arc<AtomicUsize>,
    /// Fault drill (tests): every batch fails to apply, as a disk error would make it.
    fail_applies: std::sync::atomic::AtomicBool,
    /// Added to sled's own ids ([`META_ID_FLOOR`]).
    id_floor: u64,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").field("durability", &self.durability).finish_non_exhaustive()
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            // A page whose checksum fails: the folder is damaged (a flipped bit, a torn copy),
            // which is lost data to report, never an internal error.
            sled::Error::Corruption { at, .. } => StoreError::DamagedFolder(match at {
                Some(at) => format!("sled's files fail their checksum at {at:?}"),
                None => "sled's files fail their checksum".to_owned(),
            }),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl From<sled::transaction::TransactionError<StoreError>> for StoreError {
    fn from(e: sled::transaction::TransactionError<StoreError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(inner) => inner,
            sled::transaction::TransactionError::Storage(s) => s.into(),
        }
    }
}

fn space_prefix(space: KeySpace) -> u8 {
    match space {
        KeySpace::Records => b'r',
        KeySpace::DataKeys => b'd',
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

impl SledStore {
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        secure_folder(dir)?;
        let db = open_db(dir)?;
        tighten(dir)?;
        let stats = Arc::new(FlushStats::default());
        let writers = Arc::new(AtomicUsize::new(0));
        let group = GroupCommit::start(db.clone(), stats.clone(), writers.clone())
            .map_err(|e| StoreError::Flush(e.to_string()))?;
        let meta = db.open_tree("meta")?;
        let store = Self {
            meta: meta.clone(),
            keks: db.open_tree("keks")?,
            kek_info: db.open_tree("kek_info")?,
            vault: db.open_tree("vault")?,
            db,
            dir: dir.to_path_buf(),
            durability,
            group,
            per_request_lock: Arc::default(),
            commit_lock: std::sync::Mutex::new(()),
            stats,
            writers,
            fail_applies: false.into(),
            id_floor: match meta.get(META_ID_FLOOR)? {
                Some(v) => {
                    u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt("id floor"))?)
                }
                None => 0,
            },
        };
        store.migrate()?;
        Ok(store)
    }

    /// Every legacy-layout upgrade, in one place, driven by the folder's schema version.
    fn migrate(&self) -> Result<(), StoreError> {
        let found = match self.meta.get(META_SCHEMA)? {
            Some(v) => {
                u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt("schema version"))?)
            }
            None => 0,
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found, supported: SCHEMA_VERSION });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        // 0 → 1: a live marker for every KEK version still stored.
        let mut batch = sled::Batch::default();
        for kv in self.keks.iter() {
            let (k, _) = kv?;
            let version: [u8; 4] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt("kek version"))?;
            batch.insert(kek_live_key(u32::from_be_bytes(version)), KEK_LIVE);
        }
        self.vault.apply_batch(batch)?;
        self.meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        self.db.flush()?;
        if self.meta.len() > 1 {
            tracing::info!(from = found, to = SCHEMA_VERSION, "data folder layout upgraded");
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new database in `dir` (which must hold none) for a snapshot's entries
    /// ([`Storage::snapshot`]) to be written into: a restore.
    pub fn restore_into(dir: &Path) -> Result<SledRestore, StoreError> {
        if dir.join("db").exists() {
            return Err(StoreError::AlreadyInitialised);
        }
        secure_folder(dir)?;
        let db = open_db(dir)?;
        let trees =
            TREES.iter().map(|name| db.open_tree(name).map(|t| (*name, t))).collect::<Result<_, _>>()?;
        Ok(SledRestore { db, trees, count: 0, dir: dir.to_owned() })
    }

    fn write_custody(
        meta: &sled::transaction::TransactionalTree,
        custody: &Custody,
    ) -> Result<(), ConflictableTransactionError<StoreError>> {
        match custody {
            Custody::Single { sealed_root } => {
                meta.insert(META_SEALED_ROOT, sealed_root.as_slice())?;
                meta.remove(META_CUSTODIANS)?;
            }
            Custody::Shares { threshold, sealed } => {
                meta.remove(META_SEALED_ROOT)?;
                let count =
                    u8::try_from(sealed.len()).map_err(|_| abort(StoreError::Corrupt("custodians")))?;
                let json = serde_json::to_vec(&StoredCustodians { threshold: *threshold, count })
                    .map_err(|_| abort(StoreError::Corrupt("custodians")))?;
                meta.insert(META_CUSTODIANS, json)?;
                for (i, share) in sealed.iter().enumerate() {
                    meta.insert([META_SHARE, &[i as u8 + 1]].concat(), share.as_slice())?;
                }
            }
        }
        Ok(())
    }

    fn record_key(record_id: &str) -> Vec<u8> {
        [b"r".as_slice(), record_id.as_bytes()].concat()
    }

    fn subject_key(subject_index: &[u8; 32], record_id: &str) -> Vec<u8> {
        [b"s".as_slice(), subject_index.as_slice(), record_id.as_bytes()].concat()
    }

    fn encode<T: Stored>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
        encode_stored(value, what)
    }

    fn decode<T: Stored>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
        decode_stored(bytes, what)
    }

    // ---- reads ------------------------------------------------------------------------------

    fn data_key_key(record_id: &str) -> Vec<u8> {
        [b"d".as_slice(), record_id.as_bytes()].concat()
    }

    /// Returns once everything written before the call is on disk.
    async fn durable_now(&self) -> Result<(), StoreError> {
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

    fn identity_key(name: &str) -> Vec<u8> {
        [b"i".as_slice(), name.as_bytes()].concat()
    }

    fn request_key(id: &str) -> Vec<u8> {
        [b"p".as_slice(), id.as_bytes()].concat()
    }

    fn token_key(id: &str) -> Vec<u8> {
        [b"t".as_slice(), id.as_bytes()].concat()
    }

    /// Fault drill for tests: make every following batch fail to apply (or succeed again).
    #[cfg(any(test, feature = "test-util"))]
    pub fn inject_apply_failure(&self, fail: bool) {
        self.fail_applies.store(fail, Ordering::Relaxed);
    }

    /// Overwrites a stored record as is. Only for tests that tamper with ciphertext, server stopped.
    #[cfg(any(test, feature = "test-util"))]
    pub fn overwrite_record_for_tests(
        &self,
        record_id: &str,
        record: &StoredRecord,
    ) -> Result<(), StoreError> {
        self.vault.insert(Self::record_key(record_id), record.encode()?)?;
        self.vault.insert(Self::data_key_key(record_id), record.wrapped_key.as_slice())?;
        Ok(())
    }

    /// Raw access to the `vault` tree, for tests that tamper with the audit log (server stopped).
    #[cfg(any(test, feature = "test-util"))]
    pub fn vault_tree_for_tests(&self) -> &sled::Tree {
        &self.vault
    }
}

#[async_trait::async_trait]
impl Storage for SledStore {
    async fn audit_record(&self, which: AuditRecord) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.vault.get(audit_record_key(which))?.map(|v| v.to_vec()))
    }

    async fn set_audit_record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        self.vault.insert(audit_record_key(which), value)?;
        Ok(())
    }

    async fn remove_audit_record(&self, which: AuditRecord) -> Result<(), StoreError> {
        self.vault.remove(audit_record_key(which))?;
        Ok(())
    }

    fn head_recorder(&self) -> HeadRecorder {
        let vault = self.vault.clone();
        HeadRecorder::new(move |which, value| {
            vault.insert(audit_record_key(which), value)?;
            Ok(())
        })
    }

    fn flush_stats(&self) -> &FlushStats {
        &self.stats
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.durable_now().await
    }

    fn begin_write(&self) -> WriteTicket {
        match self.durability {
            Durability::Group => WriteTicket::counted(&self.writers),
            Durability::PerRequest => WriteTicket::uncounted(),
        }
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.vault.get(AUDIT_HEAD_KEY)?.map(|b| decode_head(&b)).transpose()
    }

    async fn count(&self, space: KeySpace) -> Result<u64, StoreError> {
        Ok(self.vault.scan_prefix([space_prefix(space)]).count() as u64)
    }

    /// Flushes synchronously (init, shutdown).
    async fn flush_now(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    async fn mode(&self) -> Result<Option<String>, StoreError> {
        self.meta
            .get(META_MODE)?
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt("mode")))
            .transpose()
    }

    /// Writes the custody of the root key, the derivation key and the first KEK in one
    /// transaction; refuses an initialised vault.
    async fn initialise(
        &self,
        custody: &Custody,
        mode: &str,
        wrapped_derivation_key: &[u8],
        kek: (u32, &[u8]),
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let info =
            Self::encode(&KekInfo { version: kek.0, created_ms: now_ms, retired_ms: None }, "kek info")?;
        (&self.meta, &self.keks, &self.kek_info, &self.vault).transaction(
            |(meta, keks, kek_info, vault)| {
                if meta.get(META_SEALED_ROOT)?.is_some() || meta.get(META_CUSTODIANS)?.is_some() {
                    return Err(abort(StoreError::AlreadyInitialised));
                }
                Self::write_custody(meta, custody)?;
                meta.insert(META_DERIVATION_KEY, wrapped_derivation_key)?;
                meta.insert(META_MODE, mode.as_bytes())?;
                meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                keks.insert(&kek.0.to_be_bytes(), kek.1)?;
                kek_info.insert(&kek.0.to_be_bytes(), info.as_slice())?;
                vault.insert(kek_live_key(kek.0), KEK_LIVE)?;
                Ok(())
            },
        )?;
        self.flush_now().await
    }

    async fn is_initialised(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get(META_SEALED_ROOT)?.is_some() || self.meta.get(META_CUSTODIANS)?.is_some())
    }

    async fn custody(&self) -> Result<Custody, StoreError> {
        if let Some(sealed_root) = self.meta.get(META_SEALED_ROOT)? {
            return Ok(Custody::Single { sealed_root: sealed_root.to_vec() });
        }
        let raw = self.meta.get(META_CUSTODIANS)?.ok_or(StoreError::NotInitialised)?;
        let c: StoredCustodians =
            serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("custodians"))?;
        let sealed = (1..=c.count)
            .map(|i| {
                self.meta
                    .get([META_SHARE, &[i]].concat())?
                    .map(|v| v.to_vec())
                    .ok_or(StoreError::Corrupt("custodian share"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Custody::Shares { threshold: c.threshold, sealed })
    }

    /// Replaces one custodian's sealed share (or the single sealed root key): a passphrase change.
    async fn replace_sealed(&self, custodian: u8, sealed: &[u8]) -> Result<(), StoreError> {
        match self.custody().await? {
            Custody::Single { .. } => self.meta.insert(META_SEALED_ROOT, sealed)?,
            Custody::Shares { .. } => self.meta.insert([META_SHARE, &[custodian]].concat(), sealed)?,
        };
        self.flush_now().await
    }

    /// A rekey: new custody, every KEK rewrapped under the new root key, and the derivation key
    /// rewrapped, in one transaction (a crash leaves the old or the new root key, never a mix).
    async fn replace_root(
        &self,
        custody: &Custody,
        wrapped_derivation_key: &[u8],
        keks: &[(u32, Vec<u8>)],
    ) -> Result<(), StoreError> {
        (&self.meta, &self.keks).transaction(|(meta, kek_tree)| {
            let old_count = match meta.get(META_CUSTODIANS)? {
                Some(raw) => serde_json::from_slice::<StoredCustodians>(&raw).map_or(0, |c| c.count),
                None => 0,
            };
            for i in 1..=old_count {
                meta.remove([META_SHARE, &[i]].concat())?;
            }
            Self::write_custody(meta, custody)?;
            meta.insert(META_DERIVATION_KEY, wrapped_derivation_key)?;
            for (version, wrapped) in keks {
                kek_tree.insert(&version.to_be_bytes(), wrapped.as_slice())?;
            }
            Ok(())
        })?;
        self.flush_now().await
    }

    /// The wrapped derivation key; `None` for a vault created before there was one.
    async fn derivation_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(META_DERIVATION_KEY)?.map(|v| v.to_vec()))
    }

    /// Adds a KEK version (a rotation), durable before it wraps anything.
    async fn add_kek(&self, version: u32, wrapped: &[u8], now_ms: u64) -> Result<(), StoreError> {
        let info = Self::encode(&KekInfo { version, created_ms: now_ms, retired_ms: None }, "kek info")?;
        (&self.keks, &self.kek_info, &self.vault).transaction(|(keks, kek_info, vault)| {
            if keks.get(version.to_be_bytes())?.is_some() || kek_info.get(version.to_be_bytes())?.is_some() {
                return Err(abort(StoreError::Corrupt("kek version reused")));
            }
            keks.insert(&version.to_be_bytes(), wrapped)?;
            kek_info.insert(&version.to_be_bytes(), info.as_slice())?;
            vault.insert(kek_live_key(version), KEK_LIVE)?;
            Ok(())
        })?;
        self.flush_now().await
    }

    /// Destroys a KEK version: its wrapped key is removed; its history stays, marked retired.
    async fn retire_kek(&self, version: u32, now_ms: u64) -> Result<(), StoreError> {
        let mut info = self
            .kek_infos()
            .await?
            .into_iter()
            .find(|i| i.version == version)
            .unwrap_or(KekInfo { version, created_ms: 0, retired_ms: None });
        info.retired_ms = Some(now_ms);
        let info = Self::encode(&info, "kek info")?;
        (&self.keks, &self.kek_info, &self.vault).transaction(|(keks, kek_info, vault)| {
            keks.remove(&version.to_be_bytes())?;
            kek_info.insert(&version.to_be_bytes(), info.as_slice())?;
            vault.remove(kek_live_key(version))?;
            Ok(())
        })?;
        self.flush_now().await
    }

    /// Every KEK version ever created, oldest first (versions from before this table existed
    /// appear with `created_ms` 0).
    async fn kek_infos(&self) -> Result<Vec<KekInfo>, StoreError> {
        let mut out: Vec<KekInfo> =
            self.kek_info.iter().map(|kv| Self::decode(&kv?.1, "kek info")).collect::<Result<_, _>>()?;
        for (version, _) in self.keks().await? {
            if !out.iter().any(|i| i.version == version) {
                out.push(KekInfo { version, created_ms: 0, retired_ms: None });
            }
        }
        out.sort_by_key(|i| i.version);
        Ok(out)
    }

    /// Every stored KEK, `(version, wrapped bytes)`.
    async fn keks(&self) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
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

    /// The record (with its wrapped data key) and the exact bytes of the record it was read from
    /// (for [`Changes::replace_record`]). The record and its key are two reads; if a concurrent
    /// re-encryption slipped between them (their generations differ), both are read again.
    async fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, Version)>, StoreError> {
        let mut attempts = 0;
        loop {
            let Some(bytes) = self.vault.get(Self::record_key(record_id))? else { return Ok(None) };
            let mut record = StoredRecord::decode(&bytes)
                .map_err(|_| StoreError::Damaged { record_id: record_id.to_owned(), what: "record" })?;
            record.wrapped_key =
                self.vault.get(Self::data_key_key(record_id))?.map(|k| k.to_vec()).unwrap_or_default();
            attempts += 1;
            // Still different after several reads: not a race but damage, which opening the
            // record reports as an integrity failure.
            if record.key_matches() || attempts >= 8 {
                return Ok(Some((record, Version::new(bytes.to_vec()))));
            }
        }
    }

    /// A subject's records, by blind index.
    async fn records_of_subject(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        let prefix = [b"s".as_slice(), subject_index.as_slice()].concat();
        let mut out = Vec::new();
        for kv in self.vault.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let id = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StoreError::Damaged {
                record_id: String::from_utf8_lossy(&k[prefix.len()..]).chars().take(64).collect(),
                what: "subject index entry",
            })?;
            if let Some((record, _)) = self.get_record(id).await? {
                out.push((id.to_owned(), record));
            }
        }
        Ok(out)
    }

    async fn get_identity(&self, name: &str) -> Result<Option<StoredIdentity>, StoreError> {
        let key = [b"i".as_slice(), name.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "identity")).transpose()
    }

    async fn list_identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        self.vault.scan_prefix(b"i").map(|kv| Self::decode(&kv?.1, "identity")).collect()
    }

    async fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        let key = [b"p".as_slice(), id.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "identity request")).transpose()
    }

    async fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        self.vault.scan_prefix(b"p").map(|kv| Self::decode(&kv?.1, "identity request")).collect()
    }

    /// A credential's failure record (`L` ‖ credential key), written outside any request's batch:
    /// a lockout holds whether or not the request that caused it commits.
    async fn put_failures(&self, credential: &[u8], record: &FailureRecord) -> Result<(), StoreError> {
        self.vault.insert([b"L".as_slice(), credential].concat(), Self::encode(record, "lockout record")?)?;
        Ok(())
    }

    /// Every credential's failure record, `(credential key, record)`.
    async fn failure_records(&self) -> Result<Vec<(Vec<u8>, FailureRecord)>, StoreError> {
        self.vault
            .scan_prefix(b"L")
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k[1..].to_vec(), Self::decode(&v, "lockout record")?))
            })
            .collect()
    }

    async fn get_token(&self, token_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let key = [b"t".as_slice(), token_id.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "token")).transpose()
    }

    async fn get_consent(
        &self,
        subject_index: &[u8; 32],
        purpose: &str,
    ) -> Result<Option<StoredConsent>, StoreError> {
        let key = [b"c".as_slice(), subject_index, purpose.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "consent")).transpose()
    }

    async fn all_consent(&self) -> Result<super::AllConsent, StoreError> {
        let index_of = |k: &[u8]| -> Result<[u8; 32], StoreError> {
            k.get(1..33).and_then(|s| s.try_into().ok()).ok_or(StoreError::Corrupt("consent key"))
        };
        let current = self
            .vault
            .scan_prefix(b"c")
            .map(|kv| {
                let (k, v) = kv?;
                Ok((index_of(&k)?, Self::decode(&v, "consent")?))
            })
            .collect::<Result<_, StoreError>>()?;
        let history = self
            .vault
            .scan_prefix(b"h")
            .map(|kv| {
                let (k, v) = kv?;
                let seq: [u8; 8] = k
                    .get(33..41)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(StoreError::Corrupt("consent key"))?;
                Ok((index_of(&k)?, u64::from_be_bytes(seq), Self::decode(&v, "consent")?))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((current, history))
    }

    /// `(current choices, full history oldest first)`.
    async fn consent_of(
        &self,
        subject_index: &[u8; 32],
    ) -> Result<(Vec<StoredConsent>, Vec<StoredConsent>), StoreError> {
        let read = |prefix: &[u8]| -> Result<Vec<StoredConsent>, StoreError> {
            let key = [prefix, subject_index.as_slice()].concat();
            self.vault.scan_prefix(key).map(|kv| Self::decode(&kv?.1, "consent")).collect()
        };
        Ok((read(b"c")?, read(b"h")?))
    }

    /// Audit entries a change carried into sled (see [`Changes::audit_entry`]) after seq `after`,
    /// oldest first: `(seq, hash ‖ JSON)`.
    async fn audit_entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let start = [b"a".as_slice(), &after.saturating_add(1).to_be_bytes()].concat();
        self.vault
            .range(start..b"b".to_vec())
            .map(|kv| {
                let (k, v) = kv?;
                let seq: [u8; 8] =
                    k.get(1..9).and_then(|s| s.try_into().ok()).ok_or(StoreError::Corrupt("audit key"))?;
                Ok((u64::from_be_bytes(seq), v.to_vec()))
            })
            .collect()
    }

    /// Removes the audit entries up to `last` that changes carried into sled (archival), flushed.
    async fn remove_audit_entries_upto(&self, last: u64) -> Result<(), StoreError> {
        let end = [b"a".as_slice(), &last.saturating_add(1).to_be_bytes()].concat();
        let mut batch = sled::Batch::default();
        for kv in self.vault.range(b"a".to_vec()..end) {
            batch.remove(kv?.0);
        }
        self.vault.apply_batch(batch)?;
        self.flush_now().await
    }

    /// Signed checkpoints a vault of the previous layout kept in sled (`k‖seq` → JSON), oldest
    /// first, for moving them to the audit log's checkpoints file once.
    async fn legacy_checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.vault.scan_prefix(b"k").map(|kv| Ok(kv?.1.to_vec())).collect()
    }

    /// Removes the previous layout's checkpoints (after they were moved), flushed.
    async fn remove_legacy_checkpoints(&self) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in self.vault.scan_prefix(b"k") {
            batch.remove(kv?.0);
        }
        self.vault.apply_batch(batch)?;
        self.flush_now().await
    }

    /// The background key job, if one was ever started.
    async fn regulations(&self) -> Result<Option<StoredRegulations>, StoreError> {
        let Some(serial) = self.regulations_serial().await? else { return Ok(None) };
        let key = [b"g".as_slice(), &serial.to_be_bytes()].concat();
        let bytes = self.vault.get(key)?.ok_or(StoreError::Corrupt("regulations"))?;
        Ok(Some(Self::decode(&bytes, "regulations")?))
    }

    async fn regulations_serial(&self) -> Result<Option<u64>, StoreError> {
        self.vault
            .get(REGULATIONS_KEY)?
            .map(|b| {
                b.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| StoreError::Corrupt("regulations"))
            })
            .transpose()
    }

    async fn job(&self) -> Result<Option<StoredJob>, StoreError> {
        self.vault.get(JOB_KEY)?.map(|b| Self::decode(&b, "key job")).transpose()
    }

    /// Up to `limit` entries of `space` after `cursor`, each with the exact bytes read.
    async fn walk(&self, space: KeySpace, cursor: &Cursor, limit: usize) -> Result<Vec<Walked>, StoreError> {
        use std::ops::Bound;
        let prefix = space_prefix(space);
        let start = if cursor.as_bytes().is_empty() {
            Bound::Included(vec![prefix])
        } else {
            Bound::Excluded(cursor.as_bytes().to_vec())
        };
        self.vault
            .range::<Vec<u8>, _>((start, Bound::Excluded(vec![prefix + 1])))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let record_id = std::str::from_utf8(&k[1..]).map_err(|_| StoreError::Damaged {
                    record_id: String::from_utf8_lossy(&k[1..]).chars().take(64).collect(),
                    what: "key",
                })?;
                Ok(Walked {
                    record_id: record_id.to_owned(),
                    value: v.to_vec(),
                    version: Version::new(v.to_vec()),
                    cursor: Cursor::from_bytes(k.to_vec()),
                })
            })
            .collect()
    }

    // ---- the one way in -----------------------------------------------------------------------

    /// Applies `changes` atomically if every expectation it carries still holds (record, data key,
    /// identity or request unchanged since read, KEK version live); `Ok(false)`, nothing written,
    /// if one does not. Checked and applied under the store's own lock: compare-and-swap does not
    /// depend on any caller's lock.
    async fn commit(&self, changes: Changes) -> Result<bool, StoreError> {
        let _commit = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if changes.is_empty() {
            return Ok(true);
        }
        let (ops, expect) = changes.into_parts();
        for e in &expect {
            if !self.holds(e)? {
                return Ok(false);
            }
        }
        let batch = Self::batch(ops)?;
        if self.fail_applies.load(Ordering::Relaxed) {
            return Err(StoreError::Flush("injected write failure".into()));
        }
        self.vault.apply_batch(batch)?;
        Ok(true)
    }

    async fn holds_now(&self, expect: &Expect) -> Result<bool, StoreError> {
        self.holds(expect)
    }

    async fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.id_floor.saturating_add(self.db.generate_id()?))
    }

    fn snapshot(
        &self,
        each: &mut dyn FnMut(RawEntry) -> Result<(), StoreError>,
    ) -> Result<Snapshot, StoreError> {
        let mut records = 0u64;
        let record_prefix = space_prefix(KeySpace::Records);
        for (name, tree) in TREES.iter().zip([&self.meta, &self.keks, &self.kek_info, &self.vault]) {
            let is_vault = *name == "vault";
            for kv in tree.iter() {
                let (key, value) = kv?;
                if is_vault && key.first() == Some(&record_prefix) {
                    records += 1;
                }
                each(RawEntry { space: (*name).to_owned(), key: key.to_vec(), value: value.to_vec() })?;
            }
        }
        // An id given out before this one may be in what was just read (a consent history key):
        // the restored database starts above it.
        let ids_from = self.id_floor.saturating_add(self.db.generate_id()?).saturating_add(1);
        Ok(Snapshot { ids_from, records })
    }

    /// Every token of an identity, `(token id, token)`.
    async fn tokens_of(&self, name: &str) -> Result<Vec<(String, StoredToken)>, StoreError> {
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

const KEK_LIVE: &[u8] = b"live";

/// The database in a data folder, as every build has opened it.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    Ok(sled::Config::new().path(dir.join("db")).mode(sled::Mode::HighThroughput).open()?)
}

/// The trees a snapshot holds, in its order: everything the store keeps.
const TREES: [&str; 4] = ["meta", "keks", "kek_info", "vault"];

fn audit_entry_key(seq: u64) -> Vec<u8> {
    [b"a".as_slice(), &seq.to_be_bytes()].concat()
}

/// `seq u64 ‖ hash32`.
fn encode_head(head: AuditHead) -> Vec<u8> {
    [head.seq.to_be_bytes().as_slice(), &head.hash].concat()
}

fn decode_head(bytes: &[u8]) -> Result<AuditHead, StoreError> {
    let seq = bytes.get(..8).and_then(|s| s.try_into().ok()).ok_or(StoreError::Corrupt("audit head"))?;
    let hash = bytes.get(8..40).and_then(|h| h.try_into().ok()).ok_or(StoreError::Corrupt("audit head"))?;
    Ok(AuditHead { seq: u64::from_be_bytes(seq), hash })
}

fn kek_live_key(version: u32) -> Vec<u8> {
    [b"v".as_slice(), &version.to_be_bytes()].concat()
}

#[cfg(test)]
#[path = "sled_tests.rs"]
mod tests;
