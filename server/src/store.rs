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
const META_CUSTODIANS: &[u8] = b"custodians";
const META_DERIVATION_KEY: &[u8] = b"derivation_key";
/// `share` ‖ custodian index (u8) → that custodian's sealed share.
const META_SHARE: &[u8] = b"share";
/// Key of the background key job (rewrap or re-encryption) in the `vault` tree.
const JOB_KEY: &[u8] = b"j";
/// Current encoding of [`StoredRecord`] and [`StoredIdentity`]. (Format 1, from before data keys
/// were stored apart, is not read.)
const RECORD_FORMAT: u8 = 2;

/// How a write becomes durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one `fsync` (the default).
    #[default]
    Group,
    /// One flush per write, never shared with another write; kept as the benchmark's baseline.
    PerRequest,
}

/// A record as stored: envelopes (ciphertext), field names and, beside it at `d‖id`, its wrapped
/// data key. The key is stored apart so a KEK rotation rewrites 61 bytes per record, not the
/// record; a read checks the two belong together (same data-key generation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRecord {
    pub format: u8,
    /// The record's data key, wrapped by a KEK (empty in the plaintext benchmark baseline).
    /// Stored at `d‖id`, not in the record's own bytes.
    #[serde(skip)]
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

    /// Whether the wrapped data key and the sealed subject id name the same data-key generation
    /// (always true without encryption). A mismatch means a re-encryption ran between two reads.
    /// The formats are the key hierarchy's: it reads both headers.
    fn key_matches(&self) -> bool {
        if self.wrapped_key.is_empty() {
            return true;
        }
        match (
            khlang_keys::WrappedDataKey::header_of(&self.wrapped_key),
            khlang_keys::envelope_generation(&self.subject),
        ) {
            (Ok((_, a)), Ok(b)) => a == b,
            _ => false,
        }
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

/// A request to create an identity of a role that needs a second identity's approval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredIdentityRequest {
    pub format: u8,
    pub id: String,
    pub name: String,
    pub role: String,
    pub requested_by: String,
    pub requested_ms: u64,
    pub expires_ms: u64,
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

/// How the root key is held: sealed whole under one passphrase, or split among custodians.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Custody {
    /// One custodian (the development default): the root key sealed under their passphrase.
    Single { sealed_root: Vec<u8> },
    /// K of N custodians, each holding a sealed share (index 1..=N, in order).
    Shares { threshold: u8, sealed: Vec<Vec<u8>> },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredCustodians {
    threshold: u8,
    count: u8,
}

/// A KEK version's life: created, and retired (destroyed) once no data key referenced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KekInfo {
    pub version: u32,
    pub created_ms: u64,
    pub retired_ms: Option<u64>,
}

/// What a background key job does to every record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JobKind {
    /// Rewrap each data key under KEK `target`; fields are not touched.
    Rewrap { target: u32 },
    /// Fresh data key and fresh ciphertexts for every record.
    Reencrypt,
}

/// A background key job, persisted with every batch it applies so it resumes exactly where it
/// stopped: `cursor` is the last record key whose batch committed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredJob {
    pub format: u8,
    pub kind: JobKind,
    pub cursor: Vec<u8>,
    /// Records this job changed.
    pub changed: u64,
    /// Records it found already done (written under the target after the job began).
    pub skipped: u64,
    /// Records present when it began.
    pub total: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// The identity that started it.
    pub requested_by: String,
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

/// Creates the data folder 0700 whatever the umask, and refuses one that others (group or world)
/// can write: they could replace the database or the log. One others can read holds only
/// ciphertext, but is warned about.
#[cfg(unix)]
fn secure_folder(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(StoreError::Insecure(format!(
            "the data folder {} can be written by others (mode {mode:o}): refusing to serve from it; `chmod 700` it",
            dir.display()
        )));
    }
    if mode & 0o044 != 0 {
        tracing::warn!(folder = %dir.display(), mode = format!("{mode:o}"), "the data folder can be read by others; `chmod 700` it");
    }
    Ok(())
}

/// Every file under the data folder 0600 and every folder 0700, whatever the umask made them
/// (sled's files, the audit log's).
#[cfg(unix)]
pub fn tighten(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io)? {
            let entry = entry.map_err(io)?;
            let kind = entry.file_type().map_err(io)?;
            let mode = if kind.is_dir() {
                stack.push(entry.path());
                0o700
            } else if kind.is_file() {
                0o600
            } else {
                continue;
            };
            if entry.metadata().map_err(io)?.permissions().mode() & 0o777 != mode {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode)).map_err(io)?;
            }
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn secure_folder(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

#[cfg(not(unix))]
pub fn tighten(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// The audit log's own records in the store, beside the entries changes carry (`a‖seq`). They are
/// what the log's files cannot silently drop: the head the vault last signed, the newest tagged
/// head of a change (in that change's batch) and of a group of reads, and a break the operator
/// has not yet accepted.
#[derive(Debug, Clone, Copy)]
pub enum AuditRecord {
    SignedHead,
    ChangeTag,
    ReadTag,
    Break,
}

impl AuditRecord {
    fn key(self) -> &'static [u8] {
        match self {
            Self::SignedHead => b"A",
            Self::ChangeTag => b"m",
            Self::ReadTag => b"M",
            Self::Break => b"B",
        }
    }
}

/// Records the audit log's newest synced heads from its flusher thread (an insert, made durable
/// by sled's next flush: its own timer or a write's).
#[derive(Clone)]
pub struct HeadRecorder(sled::Tree);

impl HeadRecorder {
    pub fn record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        self.0.insert(which.key(), value)?;
        Ok(())
    }
}

pub struct Store {
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
    /// Fault drill (tests): every batch fails to apply, as a disk error would make it.
    fail_applies: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("durability", &self.durability).finish_non_exhaustive()
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
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

/// A stored value as it was read: a change that expects it applies only if nothing changed it
/// meanwhile (optimistic concurrency). Opaque: only the store makes and compares versions.
#[derive(Clone, PartialEq, Eq)]
pub struct Version(sled::IVec);

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Version(..)")
    }
}

/// Where a walk over a key space resumes: after the entry it names (empty: from the start).
/// A job keeps it in its stored progress as bytes ([`Cursor::as_bytes`]).
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

impl KeySpace {
    fn prefix(self) -> u8 {
        match self {
            Self::Records => b'r',
            Self::DataKeys => b'd',
        }
    }
}

/// One entry of a walk: the record it belongs to, its value's bytes (a record, or a wrapped data
/// key), the version a change of it expects, and the cursor that resumes after it.
#[derive(Debug, Clone)]
pub struct Walked {
    pub record_id: String,
    pub value: Vec<u8>,
    pub version: Version,
    pub cursor: Cursor,
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

impl Store {
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        secure_folder(dir)?;
        let db = sled::Config::new().path(dir.join("db")).mode(sled::Mode::HighThroughput).open()?;
        tighten(dir)?;
        let stats = Arc::new(FlushStats::default());
        let group =
            GroupCommit::start(db.clone(), stats.clone()).map_err(|e| StoreError::Flush(e.to_string()))?;
        Ok(Self {
            meta: db.open_tree("meta")?,
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
            fail_applies: false.into(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn audit_record(&self, which: AuditRecord) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.vault.get(which.key())?.map(|v| v.to_vec()))
    }

    /// Stores an audit record (durable with sled's next flush; [`Store::flush_now`] for at once).
    pub fn set_audit_record(&self, which: AuditRecord, value: &[u8]) -> Result<(), StoreError> {
        self.vault.insert(which.key(), value)?;
        Ok(())
    }

    pub fn remove_audit_record(&self, which: AuditRecord) -> Result<(), StoreError> {
        self.vault.remove(which.key())?;
        Ok(())
    }

    pub fn head_recorder(&self) -> HeadRecorder {
        HeadRecorder(self.vault.clone())
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

    pub fn mode(&self) -> Result<Option<String>, StoreError> {
        self.meta
            .get(META_MODE)?
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt("mode")))
            .transpose()
    }

    /// Writes the custody of the root key, the derivation key and the first KEK in one
    /// transaction; refuses an initialised vault.
    pub fn initialise(
        &self,
        custody: &Custody,
        mode: &str,
        wrapped_derivation_key: &[u8],
        kek: (u32, &[u8]),
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let info =
            Self::encode(&KekInfo { version: kek.0, created_ms: now_ms, retired_ms: None }, "kek info")?;
        (&self.meta, &self.keks, &self.kek_info).transaction(|(meta, keks, kek_info)| {
            if meta.get(META_SEALED_ROOT)?.is_some() || meta.get(META_CUSTODIANS)?.is_some() {
                return Err(abort(StoreError::AlreadyInitialised));
            }
            Self::write_custody(meta, custody)?;
            meta.insert(META_DERIVATION_KEY, wrapped_derivation_key)?;
            meta.insert(META_MODE, mode.as_bytes())?;
            keks.insert(&kek.0.to_be_bytes(), kek.1)?;
            kek_info.insert(&kek.0.to_be_bytes(), info.as_slice())?;
            Ok(())
        })?;
        self.flush_now()
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

    pub fn is_initialised(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get(META_SEALED_ROOT)?.is_some() || self.meta.get(META_CUSTODIANS)?.is_some())
    }

    pub fn custody(&self) -> Result<Custody, StoreError> {
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
    pub fn replace_sealed(&self, custodian: u8, sealed: &[u8]) -> Result<(), StoreError> {
        match self.custody()? {
            Custody::Single { .. } => self.meta.insert(META_SEALED_ROOT, sealed)?,
            Custody::Shares { .. } => self.meta.insert([META_SHARE, &[custodian]].concat(), sealed)?,
        };
        self.flush_now()
    }

    /// A rekey: new custody, every KEK rewrapped under the new root key, and the derivation key
    /// rewrapped, in one transaction (a crash leaves the old or the new root key, never a mix).
    pub fn replace_root(
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
        self.flush_now()
    }

    /// The wrapped derivation key; `None` for a vault created before there was one.
    pub fn derivation_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(META_DERIVATION_KEY)?.map(|v| v.to_vec()))
    }

    /// Adds a KEK version (a rotation), durable before it wraps anything.
    pub fn add_kek(&self, version: u32, wrapped: &[u8], now_ms: u64) -> Result<(), StoreError> {
        let info = Self::encode(&KekInfo { version, created_ms: now_ms, retired_ms: None }, "kek info")?;
        (&self.keks, &self.kek_info).transaction(|(keks, kek_info)| {
            if keks.get(version.to_be_bytes())?.is_some() || kek_info.get(version.to_be_bytes())?.is_some() {
                return Err(abort(StoreError::Corrupt("kek version reused")));
            }
            keks.insert(&version.to_be_bytes(), wrapped)?;
            kek_info.insert(&version.to_be_bytes(), info.as_slice())?;
            Ok(())
        })?;
        self.flush_now()
    }

    /// Destroys a KEK version: its wrapped key is removed; its history stays, marked retired.
    pub fn retire_kek(&self, version: u32, now_ms: u64) -> Result<(), StoreError> {
        let mut info = self.kek_infos()?.into_iter().find(|i| i.version == version).unwrap_or(KekInfo {
            version,
            created_ms: 0,
            retired_ms: None,
        });
        info.retired_ms = Some(now_ms);
        let info = Self::encode(&info, "kek info")?;
        (&self.keks, &self.kek_info).transaction(|(keks, kek_info)| {
            keks.remove(&version.to_be_bytes())?;
            kek_info.insert(&version.to_be_bytes(), info.as_slice())?;
            Ok(())
        })?;
        self.flush_now()
    }

    /// Every KEK version ever created, oldest first (versions from before this table existed
    /// appear with `created_ms` 0).
    pub fn kek_infos(&self) -> Result<Vec<KekInfo>, StoreError> {
        let mut out: Vec<KekInfo> =
            self.kek_info.iter().map(|kv| Self::decode(&kv?.1, "kek info")).collect::<Result<_, _>>()?;
        for (version, _) in self.keks()? {
            if !out.iter().any(|i| i.version == version) {
                out.push(KekInfo { version, created_ms: 0, retired_ms: None });
            }
        }
        out.sort_by_key(|i| i.version);
        Ok(out)
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

    fn data_key_key(record_id: &str) -> Vec<u8> {
        [b"d".as_slice(), record_id.as_bytes()].concat()
    }

    /// The record (with its wrapped data key) and the exact bytes of the record it was read from
    /// (for [`Changes::replace_record`]). The record and its key are two reads; if a concurrent
    /// re-encryption slipped between them (their generations differ), both are read again.
    pub fn get_record(&self, record_id: &str) -> Result<Option<(StoredRecord, Version)>, StoreError> {
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
                return Ok(Some((record, Version(bytes))));
            }
        }
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
            let id = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StoreError::Damaged {
                record_id: String::from_utf8_lossy(&k[prefix.len()..]).chars().take(64).collect(),
                what: "subject index entry",
            })?;
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

    pub fn get_identity_request(&self, id: &str) -> Result<Option<StoredIdentityRequest>, StoreError> {
        let key = [b"p".as_slice(), id.as_bytes()].concat();
        self.vault.get(key)?.map(|b| Self::decode(&b, "identity request")).transpose()
    }

    pub fn list_identity_requests(&self) -> Result<Vec<StoredIdentityRequest>, StoreError> {
        self.vault.scan_prefix(b"p").map(|kv| Self::decode(&kv?.1, "identity request")).collect()
    }

    /// A credential's failure record (`L` ‖ credential key), written outside any request's batch:
    /// a lockout holds whether or not the request that caused it commits.
    pub fn put_failures<T: Serialize>(&self, credential: &[u8], record: &T) -> Result<(), StoreError> {
        self.vault.insert([b"L".as_slice(), credential].concat(), Self::encode(record, "lockout record")?)?;
        Ok(())
    }

    /// Every credential's failure record, `(credential key, record)`.
    pub fn failure_records<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        self.vault
            .scan_prefix(b"L")
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k[1..].to_vec(), Self::decode(&v, "lockout record")?))
            })
            .collect()
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

    /// Audit entries a change carried into sled (see [`Changes::audit_entry`]) after seq `after`,
    /// oldest first: `(seq, hash ‖ JSON)`.
    pub fn audit_entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
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
    pub fn remove_audit_entries_upto(&self, last: u64) -> Result<(), StoreError> {
        let end = [b"a".as_slice(), &last.saturating_add(1).to_be_bytes()].concat();
        let mut batch = sled::Batch::default();
        for kv in self.vault.range(b"a".to_vec()..end) {
            batch.remove(kv?.0);
        }
        self.vault.apply_batch(batch)?;
        self.flush_now()
    }

    /// Signed checkpoints a vault of the previous layout kept in sled (`k‖seq` → JSON), oldest
    /// first, for moving them to the audit log's checkpoints file once.
    pub fn legacy_checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.vault.scan_prefix(b"k").map(|kv| Ok(kv?.1.to_vec())).collect()
    }

    /// Removes the previous layout's checkpoints (after they were moved), flushed.
    pub fn remove_legacy_checkpoints(&self) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in self.vault.scan_prefix(b"k") {
            batch.remove(kv?.0);
        }
        self.vault.apply_batch(batch)?;
        self.flush_now()
    }

    /// Marks a KEK version live in the `vault` tree, where writes can expect it (see
    /// [`Changes::expect_kek_live`]).
    pub fn mark_kek_live(&self, version: u32) -> Result<(), StoreError> {
        self.vault.insert(kek_live_key(version), KEK_LIVE)?;
        Ok(())
    }

    pub fn unmark_kek_live(&self, version: u32) -> Result<(), StoreError> {
        self.vault.remove(kek_live_key(version))?;
        Ok(())
    }

    /// The background key job, if one was ever started.
    pub fn job(&self) -> Result<Option<StoredJob>, StoreError> {
        self.vault.get(JOB_KEY)?.map(|b| Self::decode(&b, "key job")).transpose()
    }

    /// Up to `limit` entries of `space` after `cursor`, each with the exact bytes read.
    pub fn walk(&self, space: KeySpace, cursor: &Cursor, limit: usize) -> Result<Vec<Walked>, StoreError> {
        use std::ops::Bound;
        let prefix = space.prefix();
        let start = if cursor.0.is_empty() {
            Bound::Included(vec![prefix])
        } else {
            Bound::Excluded(cursor.0.clone())
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
                    version: Version(v),
                    cursor: Cursor(k.to_vec()),
                })
            })
            .collect()
    }

    /// The KEK version of every stored data key, counted from the wrapped keys' headers.
    pub fn data_keys_per_kek(&self) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        for kv in self.vault.scan_prefix(b"d") {
            let (_, v) = kv?;
            let (version, _) = khlang_keys::WrappedDataKey::header_of(&v)
                .map_err(|_| StoreError::Corrupt("wrapped data key"))?;
            *out.entry(version).or_insert(0) += 1;
        }
        Ok(out)
    }

    pub fn record_count(&self) -> u64 {
        self.vault.scan_prefix(b"r").count() as u64
    }

    pub fn data_key_count(&self) -> u64 {
        self.vault.scan_prefix(b"d").count() as u64
    }

    // ---- the one way in -----------------------------------------------------------------------

    /// Applies `changes` atomically if every expectation it carries still holds (record, data key,
    /// identity or request unchanged since read, KEK version live); `Ok(false)`, nothing written,
    /// if one does not. Checked and applied under the store's own lock: compare-and-swap does not
    /// depend on any caller's lock.
    pub fn commit(&self, changes: Changes) -> Result<bool, StoreError> {
        let _commit = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !self.expectations_hold(&changes)? {
            return Ok(false);
        }
        self.apply(changes)?;
        Ok(true)
    }

    /// Whether every expectation of `changes` ([`Changes::replace_record`]) still holds.
    fn expectations_hold(&self, changes: &Changes) -> Result<bool, StoreError> {
        for (key, expected) in &changes.expect {
            if self.vault.get(key)?.as_ref() != expected.as_ref() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Applies staged changes atomically, unchecked: only under the commit lock.
    fn apply(&self, changes: Changes) -> Result<(), StoreError> {
        if changes.empty {
            return Ok(());
        }
        if self.fail_applies.load(Ordering::Relaxed) {
            return Err(StoreError::Flush("injected write failure".into()));
        }
        self.vault.apply_batch(changes.batch)?;
        Ok(())
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

    pub fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }
}

const KEK_LIVE: &[u8] = b"live";

fn kek_live_key(version: u32) -> Vec<u8> {
    [b"v".as_slice(), &version.to_be_bytes()].concat()
}

/// Changes a request wants to make, applied with its audit entry in one batch by the audit log.
#[derive(Default)]
pub struct Changes {
    batch: sled::Batch,
    /// Keys that must still hold these values (`None`: be absent) when the batch is applied.
    expect: Vec<(Vec<u8>, Option<sled::IVec>)>,
    /// KEK versions already expected live (a batch usually names one).
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

    pub fn is_empty(&self) -> bool {
        self.empty
    }

    /// Carries an audit entry (`hash ‖ JSON`) in the change's own batch, so the change and its
    /// entry reach disk together; the audit log's file gets it too (see `audit.rs`).
    /// The tagged head of this change's entry, in the same atomic batch.
    pub fn audit_head_tag(&mut self, value: &[u8]) {
        self.batch.insert(AuditRecord::ChangeTag.key(), value);
    }

    pub fn audit_entry(&mut self, seq: u64, value: &[u8]) {
        self.batch.insert([b"a".as_slice(), &seq.to_be_bytes()].concat(), value);
    }

    /// Creates an identity, provided the name is not taken when the change is applied.
    /// Commits only if `identity` is still stored exactly as read (a decision that counted on it,
    /// e.g. "another administrator remains", holds at the commit).
    pub fn expect_identity(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        let key = [b"i".as_slice(), identity.name.as_bytes()].concat();
        self.expect.push((key, Some(sled::IVec::from(Store::encode(identity, "identity")?))));
        Ok(())
    }

    pub fn create_identity(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        self.expect.push(([b"i".as_slice(), identity.name.as_bytes()].concat(), None));
        self.put_identity(identity)
    }

    pub fn insert_record(&mut self, record_id: &str, record: &StoredRecord) -> Result<(), StoreError> {
        self.batch.insert(Store::record_key(record_id), record.encode()?);
        if !record.wrapped_key.is_empty() {
            self.batch.insert(Store::data_key_key(record_id), record.wrapped_key.as_slice());
        }
        self.batch.insert(Store::subject_key(&record.subject_index, record_id), &[] as &[u8]);
        Ok(())
    }

    /// Replaces a record's fields (its data key unchanged), provided it still holds `expected`
    /// when the change is applied.
    pub fn replace_record(
        &mut self,
        record_id: &str,
        expected: Version,
        next: &StoredRecord,
    ) -> Result<(), StoreError> {
        let key = Store::record_key(record_id);
        self.batch.insert(key.clone(), next.encode()?);
        self.expect.push((key, Some(expected.0)));
        Ok(())
    }

    /// Replaces a record and its data key together (re-encryption), provided neither changed
    /// since they were read (`read` is the record as [`Store::get_record`] returned it).
    pub fn replace_record_and_key(
        &mut self,
        record_id: &str,
        expected: Version,
        read: &StoredRecord,
        next: &StoredRecord,
    ) -> Result<(), StoreError> {
        self.replace_record(record_id, expected, next)?;
        let key = Store::data_key_key(record_id);
        self.batch.insert(key.clone(), next.wrapped_key.as_slice());
        self.expect.push((key, Some(sled::IVec::from(read.wrapped_key.as_slice()))));
        Ok(())
    }

    /// Rewraps a record's data key (KEK rotation), provided it still holds `expected`.
    pub fn replace_data_key(&mut self, record_id: &str, expected: Version, wrapped: &[u8]) {
        let key = Store::data_key_key(record_id);
        self.batch.insert(key.clone(), wrapped);
        self.expect.push((key, Some(expected.0)));
    }

    /// Removes a record, its data key and its index entry, provided it is still as read.
    pub fn delete_record(&mut self, record_id: &str, record: &StoredRecord, read: Version) {
        let key = Store::record_key(record_id);
        self.batch.remove(key.clone());
        self.batch.remove(Store::data_key_key(record_id));
        self.batch.remove(Store::subject_key(&record.subject_index, record_id));
        self.expect.push((key, Some(read.0)));
    }

    /// Applies only if KEK `version` is still live: a data key wrapped under a version retired
    /// meanwhile is never stored (the request runs again under the active version).
    pub fn expect_kek_live(&mut self, version: u32) {
        if !self.live_keks.contains(&version) {
            self.live_keks.push(version);
            self.expect.push((kek_live_key(version), Some(sled::IVec::from(KEK_LIVE))));
        }
    }

    /// Saves a key job's progress in the same batch as the records it changed.
    pub fn put_job(&mut self, job: &StoredJob) -> Result<(), StoreError> {
        self.batch.insert(JOB_KEY, Store::encode(job, "key job")?);
        Ok(())
    }

    pub fn put_identity(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        self.batch.insert(
            [b"i".as_slice(), identity.name.as_bytes()].concat(),
            Store::encode(identity, "identity")?,
        );
        Ok(())
    }

    /// Files a request, provided its id is not taken when the change is applied.
    pub fn add_identity_request(&mut self, request: &StoredIdentityRequest) -> Result<(), StoreError> {
        let key = [b"p".as_slice(), request.id.as_bytes()].concat();
        self.expect.push((key.clone(), None));
        self.batch.insert(key, Store::encode(request, "identity request")?);
        Ok(())
    }

    /// Closes a request, provided it is still stored as read: two approvals of one request cannot
    /// both create the identity.
    pub fn close_identity_request(&mut self, request: &StoredIdentityRequest) -> Result<(), StoreError> {
        let key = [b"p".as_slice(), request.id.as_bytes()].concat();
        self.expect.push((key.clone(), Some(sled::IVec::from(Store::encode(request, "identity request")?))));
        self.batch.remove(key);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(age: &[u8]) -> StoredRecord {
        let field = StoredField { name: "age".into(), envelope: age.to_vec() };
        StoredRecord::new(Vec::new(), [7; 32], b"subject".to_vec(), vec![field], 1)
    }

    /// Two changes prepared from one read: the first commits, the second finds the record changed
    /// and writes nothing — the store checks its own expectations, whoever calls it.
    #[test]
    fn a_commit_expecting_a_changed_version_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let mut first = Changes::new();
        first.insert_record("r1", &record(b"30")).unwrap();
        assert!(store.commit(first).unwrap());
        let (_, read) = store.get_record("r1").unwrap().unwrap();
        let (mut a, mut b) = (Changes::new(), Changes::new());
        a.replace_record("r1", read.clone(), &record(b"31")).unwrap();
        b.replace_record("r1", read, &record(b"32")).unwrap();
        assert!(store.commit(a).unwrap());
        assert!(!store.commit(b).unwrap(), "the second expected what the first replaced");
        let (now, _) = store.get_record("r1").unwrap().unwrap();
        assert_eq!(now.fields[0].envelope, b"31");
        let walked = store.walk(KeySpace::Records, &Cursor::default(), 10).unwrap();
        assert_eq!(walked.iter().map(|w| w.record_id.as_str()).collect::<Vec<_>>(), ["r1"]);
        assert!(store.walk(KeySpace::Records, &walked[0].cursor, 10).unwrap().is_empty(), "resumes after it");
    }
}
