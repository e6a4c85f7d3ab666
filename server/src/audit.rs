//! The audit log: one entry for every request that reaches the vault, on disk before any plaintext
//! leaves or any change is acknowledged: a read's in the log's own files (`audit_file.rs`), synced;
//! a change's in the same atomic sled batch as the change (and in the files). Entries form a hash chain over their canonical JSON; every N entries or T seconds,
//! and at shutdown, the head is signed (Ed25519, a key derived from the derivation key).
//!
//! Entries name fields, never their values; the subject appears only as its blind index; strings a
//! caller sent are bounded and stripped of control characters, and JSON escapes the rest.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use khlang_keys::audit_chain::{
    AuditSigner, ChainReport, ChainVerifier, Checkpoint, GENESIS, chain_hash, join_reports,
};
use serde::{Deserialize, Serialize};

use crate::audit_file::{self, AuditFile};
use crate::catalogue::printable;
use crate::store::{Changes, Store};
use crate::vault::now_ms;
use crate::{StoreError, VaultError};

/// One audited request (PCI DSS 10.2.2). `seq` and `time_ms` are set when it is appended.
/// Fields are declared in alphabetical order so that serialising the struct directly yields the
/// canonical form (keys sorted) without building a map; a test holds the two equal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// `allow`, `deny`, or `none` when the request was refused before a decision.
    pub decision: String,
    pub fields: Vec<String>,
    pub identity: String,
    /// `kek=N gen=M` of the record's data key, when one was used.
    pub key_versions: String,
    /// The regulations' name of the operation (`read`), empty before one was known.
    pub operation: String,
    /// The gRPC status code name (`Ok`, `PermissionDenied`, ...).
    pub outcome: String,
    pub peer: String,
    pub purpose: String,
    /// Why it was refused or failed; never a value.
    pub reason: String,
    pub record_id: String,
    pub regulations_version: String,
    pub request_id: String,
    pub role: String,
    /// The RPC (`GetRecord`) or operator action (`Unseal`, `SIGHUP`).
    pub rpc: String,
    pub rule: String,
    pub seq: u64,
    /// The data subject's blind index (hex), never the subject id itself.
    pub subject: String,
    pub time_ms: u64,
}

/// Bounded, printable copy of a caller's string.
pub fn clean(s: &str) -> String {
    printable(s)
}

impl AuditEntry {
    /// The bytes the chain hashes: compact JSON with keys sorted — what an offline verifier gets by
    /// re-serialising a parsed entry (serde_json's default map is sorted).
    pub fn canonical(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(self).map_err(|_| StoreError::Corrupt("audit entry (encode)"))
    }
}

/// A stored checkpoint, as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    pub seq: u64,
    pub hash: String,
    pub time_ms: u64,
    pub signature: String,
}

impl StoredCheckpoint {
    pub fn to_checkpoint(&self) -> Option<Checkpoint> {
        Some(Checkpoint {
            seq: self.seq,
            hash: hex::decode(&self.hash).ok()?.try_into().ok()?,
            time_ms: self.time_ms,
            signature: hex::decode(&self.signature).ok()?,
        })
    }
}

/// When to sign the head.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_entries: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self { every_entries: 1000, every: Duration::from_secs(10) }
    }
}

struct Head {
    seq: u64,
    hash: [u8; 32],
    checkpointed_seq: u64,
    checkpointed_at: Instant,
    /// Entries `(seq, hash ‖ JSON)` in the file's buffer, not yet synced and not in sled: the next
    /// change carries them into sled with its own, so what sled holds never skips one.
    unsynced: VecDeque<(u64, Vec<u8>)>,
}

/// Appends entries (in its own files, see `audit_file.rs`) and signs checkpoints. The mutex
/// orders the chain and makes each commit's expectation check, entry and change one step.
pub struct AuditLog {
    head: Mutex<Head>,
    signer: Mutex<Option<AuditSigner>>,
    policy: CheckpointPolicy,
    /// Benchmark baseline only: apply changes without writing entries.
    disabled: bool,
    file: AuditFile,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("disabled", &self.disabled).finish_non_exhaustive()
    }
}

/// Splits a stored entry into `(hash, canonical JSON)`.
pub fn split_stored(value: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    if value.len() < 32 {
        return Err(StoreError::Corrupt("audit entry"));
    }
    Ok(value.split_at(32))
}

/// The `seq` written inside canonical JSON, found without parsing: in compact JSON a caller's
/// string cannot hold an unescaped `"seq":`, so any one is the key. Keys are sorted and only
/// `subject` and `time_ms` follow it, so the search runs from the end.
pub fn embedded_seq(json: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"seq\":";
    let at = json.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = json[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&json[at..at + digits]).ok()?.parse().ok()
}

pub enum Committed {
    Done(u64),
    /// An expectation no longer held; nothing was written. Read again and retry.
    Conflict,
}

fn unavailable(e: StoreError) -> VaultError {
    tracing::error!(error = %e, "audit entry could not be written");
    VaultError::AuditUnavailable
}

/// `(seq, hash)` of a log's newest entry.
pub type ChainHead = (u64, [u8; 32]);

/// Puts back into the log's file the entries that changes carried into sled after the file's
/// last entry (a crash lost the file's unsynced tail, or the vault is of the layout that kept the
/// whole log in sled), each checked against the chain; and moves that layout's checkpoints.
/// Returns the new head and the newest checkpoint moved.
fn recover_from_sled(
    store: &Store,
    file: &AuditFile,
    head: ChainHead,
) -> Result<(ChainHead, Option<u64>), StoreError> {
    let (mut seq, mut hash) = head;
    let mut recovered = 0u64;
    for (next, value) in store.audit_entries_after(seq)? {
        let (stored, json) = split_stored(&value)?;
        let stored: [u8; 32] = stored.try_into().map_err(|_| StoreError::Corrupt("audit entry"))?;
        if next != seq + 1 || embedded_seq(json) != Some(next) || chain_hash(&hash, json) != stored {
            tracing::error!(seq = next, "an audit entry in the database does not follow the log; not taken");
            break;
        }
        file.append_entry(next, &stored, json, false)?;
        (seq, hash) = (next, stored);
        recovered += 1;
    }
    let checkpoints = store.legacy_checkpoints()?;
    let mut newest_checkpoint = None;
    for cp in &checkpoints {
        let cp_seq = cp_seq_of(cp)?;
        file.append_checkpoint(cp_seq, cp)?;
        newest_checkpoint = Some(cp_seq);
    }
    if recovered > 0 || !checkpoints.is_empty() {
        file.sync_now()?;
        tracing::warn!(
            recovered,
            checkpoints = checkpoints.len(),
            "audit entries restored to the log's file from the database"
        );
    }
    if !checkpoints.is_empty() {
        store.remove_legacy_checkpoints()?;
    }
    Ok(((seq, hash), newest_checkpoint))
}

fn cp_seq_of(json: &[u8]) -> Result<u64, StoreError> {
    serde_json::from_slice::<StoredCheckpoint>(json)
        .map(|c| c.seq)
        .map_err(|_| StoreError::Corrupt("checkpoint"))
}

impl AuditLog {
    /// Opens the log in `data_dir`, first taking back from sled what a crash took from the file
    /// (and, once, the whole log of the layout that kept it in sled).
    pub fn open(
        store: &Store,
        data_dir: &Path,
        policy: CheckpointPolicy,
        disabled: bool,
    ) -> Result<Self, StoreError> {
        let (file, (last, checkpoint)) = AuditFile::open(data_dir)?;
        let head = match last {
            Some((seq, value)) => {
                let (hash, _) = split_stored(&value)?;
                (seq, hash.try_into().map_err(|_| StoreError::Corrupt("audit entry"))?)
            }
            None => (0, GENESIS),
        };
        let ((seq, hash), moved_checkpoint) = recover_from_sled(store, &file, head)?;
        let checkpointed_seq = moved_checkpoint.unwrap_or_else(|| {
            checkpoint.and_then(|c| serde_json::from_slice::<StoredCheckpoint>(&c).ok()).map_or(0, |c| c.seq)
        });
        Ok(Self {
            head: Mutex::new(Head {
                seq,
                hash,
                checkpointed_seq,
                checkpointed_at: Instant::now(),
                unsynced: VecDeque::new(),
            }),
            signer: Mutex::new(None),
            policy,
            disabled,
            file,
        })
    }

    /// Where the log's files are (readers open them on their own).
    pub fn dir(&self) -> &Path {
        self.file.dir()
    }

    pub fn set_signer(&self, signer: AuditSigner) {
        *self.signer.lock().unwrap_or_else(|p| p.into_inner()) = Some(signer);
    }

    /// Sealing: the signing key is wiped; entries are still chained, and signed at the next unseal.
    pub fn clear_signer(&self) {
        *self.signer.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn public_key(&self) -> Option<Vec<u8>> {
        self.signer.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.public_key().to_vec())
    }

    /// `(seq, hash)` of the newest entry.
    pub fn head(&self) -> ChainHead {
        let head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        (head.seq, head.hash)
    }

    /// A signed checkpoint of `(seq, hash)`, as stored JSON; `None` while sealed.
    fn checkpoint_json(&self, seq: u64, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, VaultError> {
        let signer = self.signer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(signer) = signer.as_ref() else { return Ok(None) };
        let time_ms = now_ms();
        let signature = signer.sign_checkpoint(seq, hash, time_ms)?;
        let cp =
            StoredCheckpoint { seq, hash: hex::encode(hash), time_ms, signature: hex::encode(signature) };
        Ok(Some(serde_json::to_vec(&cp).map_err(|_| StoreError::Corrupt("checkpoint (encode)"))?))
    }

    /// Appends `entry` and applies `changes` with it in one sled batch. Fails (and changes
    /// nothing) if the entry cannot be written. Durable once [`AuditLog::durable`] returns (for a
    /// change, once the store's flush does).
    pub fn commit(
        &self,
        store: &Store,
        mut entry: AuditEntry,
        changes: Changes,
    ) -> Result<Committed, VaultError> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if !store.expectations_hold(&changes)? {
            return Ok(Committed::Conflict);
        }
        if self.disabled {
            store.apply(changes)?;
            return Ok(Committed::Done(0));
        }
        entry.seq = head.seq + 1;
        entry.time_ms = now_ms();
        let canonical = entry.canonical()?;
        let hash = chain_hash(&head.hash, &canonical);
        let value = [hash.as_slice(), &canonical].concat();
        if changes.is_empty() {
            // Durable by the file's sync (the request waits for it).
            self.file.append_entry(entry.seq, &hash, &canonical, true).map_err(unavailable)?;
            let synced = self.file.synced_seq();
            while head.unsynced.front().is_some_and(|(s, _)| *s <= synced) {
                head.unsynced.pop_front();
            }
            head.unsynced.push_back((entry.seq, value));
        } else {
            // Durable with the change, in its sled batch (with any entry before it that is not
            // yet on disk); the file gets it too, synced later.
            self.file.check_writable().map_err(unavailable)?;
            let mut changes = changes;
            let synced = self.file.synced_seq();
            for (seq, earlier) in head.unsynced.iter().filter(|(s, _)| *s > synced) {
                changes.audit_entry(*seq, earlier);
            }
            changes.audit_entry(entry.seq, &value);
            if let Err(e) = store.apply(changes) {
                // Neither the change nor its entry was stored: the entry says the change failed.
                tracing::error!(error = %e, "a change and its audit entry could not be stored");
                entry.outcome = "Internal".into();
                entry.reason = "the change could not be stored".into();
                let canonical = entry.canonical()?;
                let hash = chain_hash(&head.hash, &canonical);
                self.file.append_entry(entry.seq, &hash, &canonical, true).map_err(unavailable)?;
                head.seq = entry.seq;
                head.hash = hash;
                return Err(e.into());
            }
            head.unsynced.clear();
            self.file.append_entry(entry.seq, &hash, &canonical, false).map_err(unavailable)?;
        }
        head.seq = entry.seq;
        head.hash = hash;
        let due = entry.seq - head.checkpointed_seq >= self.policy.every_entries
            || head.checkpointed_at.elapsed() >= self.policy.every;
        if due && let Some(cp) = self.checkpoint_json(entry.seq, &hash)? {
            self.file.append_checkpoint(entry.seq, &cp).map_err(unavailable)?;
            head.checkpointed_seq = entry.seq;
            head.checkpointed_at = Instant::now();
        }
        Ok(Committed::Done(entry.seq))
    }

    /// Writes every entry appended so far to the file (no sync), for a reader of the file: a
    /// change's entry otherwise waits in memory for the next sync (its durability is sled's).
    pub fn write_through(&self) -> Result<(), VaultError> {
        self.head_in_file().map(|_| ()).map_err(unavailable)
    }

    /// Returns once entry `seq` is on disk.
    pub async fn durable(&self, seq: u64) -> Result<(), VaultError> {
        if self.disabled {
            return Ok(());
        }
        self.file.durable(seq).await.map_err(unavailable)
    }

    /// Writes and syncs every entry appended so far, now.
    pub fn sync_now(&self) -> Result<(), VaultError> {
        if self.disabled {
            return Ok(());
        }
        self.file.sync_now().map_err(unavailable)
    }

    /// Runs `f` with every commit held off (key retirement proves and destroys under it).
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// Signs the current head now (shutdown, export), if anything was appended since the last
    /// checkpoint, and syncs the log.
    pub fn checkpoint_now(&self) -> Result<(), VaultError> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if self.disabled {
            return Ok(());
        }
        if head.seq != 0
            && head.seq != head.checkpointed_seq
            && let Some(cp) = self.checkpoint_json(head.seq, &head.hash)?
        {
            self.file.append_checkpoint(head.seq, &cp).map_err(unavailable)?;
            head.checkpointed_seq = head.seq;
            head.checkpointed_at = Instant::now();
        }
        self.file.sync_now().map_err(unavailable)
    }

    /// Removes entries `..=last` (archived) and the checkpoints before `last`, with commits held
    /// off; the checkpoint at `last` stays and anchors the rest.
    pub fn remove_archived(&self, last: u64) -> Result<(), StoreError> {
        let _head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        self.file.remove_archived(last)
    }

    /// Fault drill for tests: make every following append fail (or succeed again).
    pub fn inject_failure(&self, fail: bool) {
        self.file.inject_failure(fail);
    }

    /// Verifies the stored log against `public_key`; on the live log, also that the newest entry is
    /// the head this process appended (catches a truncated tail).
    pub fn verify(&self, public_key: &[u8], live: bool) -> Result<ChainReport, StoreError> {
        let expected_head = if live { Some(self.head_in_file()?) } else { None };
        verify_dir(self.dir(), public_key, expected_head)
    }

    /// The head, with everything up to it written to the file: what a live verification of the
    /// file (possibly on another thread, [`verify_dir`]) must reach.
    pub fn head_in_file(&self) -> Result<ChainHead, StoreError> {
        let head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if !self.disabled {
            self.file.write_through()?;
        }
        Ok((head.seq, head.hash))
    }
}

/// Verifies the log in `dir`; with `expected_head`, only up to it, and that it ends there.
pub fn verify_dir(
    dir: &Path,
    public_key: &[u8],
    expected_head: Option<ChainHead>,
) -> Result<ChainReport, StoreError> {
    let live = expected_head.is_some();
    // The live log is verified up to the head as it was when verification began (requests
    // keep appending meanwhile); a stored log, to its end.
    let last = match expected_head {
        Some((seq, _)) => seq,
        None => audit_file::tail(dir)?.0.map_or(0, |(seq, _)| seq),
    };
    let checkpoints: Vec<Checkpoint> = audit_file::checkpoints(dir)?
        .iter()
        .filter_map(|c| serde_json::from_slice::<StoredCheckpoint>(c).ok().and_then(|c| c.to_checkpoint()))
        .filter(|c| !live || c.seq <= last)
        .collect();
    // After an archival the log starts at `first`, anchored by the signed checkpoint at
    // `first - 1`, which must verify.
    let first = audit_file::first_seq(dir)?.unwrap_or(last + 1);
    let mut start_hash = GENESIS;
    if first > 1 {
        let anchor = checkpoints.iter().find(|c| c.seq == first - 1).cloned();
        let ok = anchor.as_ref().is_some_and(|a| {
            khlang_keys::audit_chain::verify_checkpoint(public_key, a.seq, &a.hash, a.time_ms, &a.signature)
        });
        match anchor {
            Some(a) if ok => start_hash = a.hash,
            _ => {
                return Ok(ChainReport {
                    first_break: Some(khlang_keys::audit_chain::ChainBreak {
                        seq: first - 1,
                        reason: format!(
                            "entries before {first} are gone and no valid signed checkpoint at {} anchors the rest",
                            first - 1
                        ),
                    }),
                    ..ChainReport::default()
                });
            }
        }
    }
    let checkpoints: Vec<Checkpoint> = checkpoints.into_iter().filter(|c| c.seq >= first).collect();
    // Two halves on two threads, each reading and hashing its own range: every link is
    // checked against the hash stored before it, so the halves check what one pass would.
    let split = if last >= first + 4096 { first + (last - first) / 2 } else { last + 1 };
    let (early, late): (Vec<Checkpoint>, Vec<Checkpoint>) =
        checkpoints.into_iter().partition(|c| c.seq < split);
    let prev_of_split = match audit_file::entries(dir, split - 1).next().transpose()? {
        Some((seq, value)) if seq == split - 1 => {
            split_stored(&value).ok().and_then(|(hash, _)| <[u8; 32]>::try_from(hash).ok()).unwrap_or(GENESIS)
        }
        // Missing: the first half reports it.
        _ => GENESIS,
    };
    let to = if live { last } else { u64::MAX };
    let (first, second) = std::thread::scope(|scope| {
        let second = scope.spawn(|| {
            verify_range(dir, ChainVerifier::starting_at(public_key, late, split, prev_of_split), split, to)
        });
        let first = verify_range(
            dir,
            ChainVerifier::starting_at(public_key, early, first, start_hash),
            first,
            split - 1,
        );
        (first, second.join())
    });
    let second = second.map_err(|_| StoreError::Corrupt("audit verification thread"))??;
    let reached = if second.head().0 >= split {
        second.head()
    } else {
        first.as_ref().map_or((0, GENESIS), |f| f.head())
    };
    let mut report = join_reports(first?.finish_part(split - 1), second.finish());
    if let Some(expected_head) = expected_head
        && report.first_break.is_none()
        && reached != expected_head
    {
        report.first_break = Some(khlang_keys::audit_chain::ChainBreak {
            seq: reached.0 + 1,
            reason: format!("the log ends at {} but this vault wrote up to {}", reached.0, expected_head.0),
        });
    }
    Ok(report)
}

/// Feeds the stored entries `from..=to` to `v`, stopping at the first break.
fn verify_range<'k>(
    dir: &Path,
    mut v: ChainVerifier<'k>,
    from: u64,
    to: u64,
) -> Result<ChainVerifier<'k>, StoreError> {
    audit_file::scan_entries(dir, from, |seq, hash, json| {
        if seq > to {
            return false;
        }
        match hash {
            Some(hash) => v.entry(seq, embedded_seq(json), json, hash),
            None => v.entry(seq, None, &[], &[]),
        }
        !v.broken()
    })?;
    Ok(v)
}

/// What a security officer asks the log for; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub identity: Option<String>,
    pub role: Option<String>,
    /// The subject's blind index (hex), resolved by the vault from the subject id.
    pub subject: Option<String>,
    pub record_id: Option<String>,
    pub operation: Option<String>,
    pub decision: Option<String>,
    pub purpose: Option<String>,
    pub limit: Option<usize>,
}

impl AuditFilter {
    pub fn matches(&self, e: &AuditEntry) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        self.from_ms.is_none_or(|f| e.time_ms >= f)
            && self.to_ms.is_none_or(|t| e.time_ms <= t)
            && eq(&self.identity, &e.identity)
            && eq(&self.role, &e.role)
            && eq(&self.subject, &e.subject)
            && eq(&self.record_id, &e.record_id)
            && eq(&self.operation, &e.operation)
            && eq(&self.decision, &e.decision)
            && eq(&self.purpose, &e.purpose)
    }

    /// A short description for the audit entry of the query itself.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={}", clean(v)));
            }
        };
        add("identity", &self.identity);
        add("role", &self.role);
        add("subject", &self.subject);
        add("record", &self.record_id);
        add("operation", &self.operation);
        add("decision", &self.decision);
        add("purpose", &self.purpose);
        if let Some(f) = self.from_ms {
            parts.push(format!("from_ms={f}"));
        }
        if let Some(t) = self.to_ms {
            parts.push(format!("to_ms={t}"));
        }
        parts.join(" ")
    }
}

/// Reads entries back, oldest first, parsed.
pub fn read_entries(dir: &Path) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + use<> {
    audit_file::entries(dir, 0).map(|item| {
        let (_, value) = item?;
        let (_, json) = split_stored(&value)?;
        serde_json::from_slice(json).map_err(|_| StoreError::Corrupt("audit entry"))
    })
}

/// The archive of entries up to `last`: the export format (a header, each entry with its chain
/// hash, the checkpoints up to `last`, including the one anchoring its first entry).
pub fn archive_lines(
    dir: &Path,
    public_key: Vec<u8>,
    last: u64,
) -> impl Iterator<Item = Result<String, StoreError>> + use<> {
    lines_up_to(dir, public_key, last)
}

/// The export format, JSON Lines: a header, every entry with its chain hash, every checkpoint.
pub fn export_lines(
    dir: &Path,
    public_key: Vec<u8>,
) -> impl Iterator<Item = Result<String, StoreError>> + use<> {
    lines_up_to(dir, public_key, u64::MAX)
}

/// Export lines of the entries and checkpoints up to seq `last`.
fn lines_up_to(
    dir: &Path,
    public_key: Vec<u8>,
    last: u64,
) -> impl Iterator<Item = Result<String, StoreError>> + use<> {
    let header = serde_json::json!({"type": "header", "format": "khlang-audit-1", "public_key": hex::encode(&public_key)});
    let entries = audit_file::entries(dir, 0)
        .take_while(move |item| item.as_ref().map_or(true, |(seq, _)| *seq <= last))
        .map(|item| {
            let (seq, value) = item?;
            let (hash, json) = split_stored(&value)?;
            let json = std::str::from_utf8(json).map_err(|_| StoreError::Corrupt("audit entry"))?;
            Ok(format!(r#"{{"type":"entry","seq":{seq},"hash":"{}","entry":{json}}}"#, hex::encode(hash)))
        });
    let checkpoints = audit_file::checkpoints(dir).map(|cps| {
        cps.into_iter().filter_map(move |c| {
            let line = || -> Result<Option<String>, StoreError> {
                let cp: StoredCheckpoint =
                    serde_json::from_slice(&c).map_err(|_| StoreError::Corrupt("checkpoint"))?;
                if cp.seq > last {
                    return Ok(None);
                }
                let mut v = serde_json::to_value(&cp).map_err(|_| StoreError::Corrupt("checkpoint"))?;
                v["type"] = "checkpoint".into();
                Ok(Some(v.to_string()))
            };
            line().transpose()
        })
    });
    let checkpoints: Box<dyn Iterator<Item = Result<String, StoreError>>> = match checkpoints {
        Ok(it) => Box::new(it.collect::<Vec<_>>().into_iter()),
        Err(e) => Box::new(std::iter::once(Err(e))),
    };
    std::iter::once(Ok(header.to_string())).chain(entries).chain(checkpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_are_the_sorted_key_form() {
        let e = AuditEntry {
            decision: "deny".into(),
            fields: vec!["card_number".into()],
            identity: "billing-clerk".into(),
            purpose: "x\u{1}\"y".into(),
            seq: 42,
            time_ms: 1_795_000_000_000,
            subject: "ab".repeat(32),
            ..AuditEntry::default()
        };
        let via_map = serde_json::to_vec(&serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(e.canonical().unwrap(), via_map);
        assert_eq!(embedded_seq(&via_map), Some(42));
    }

    /// The two-thread verification must name exactly the break one sequential pass names, for
    /// damage in either half and right at the seam.
    #[test]
    fn split_verification_matches_a_sequential_pass() {
        use crate::store::Durability;
        use khlang_keys::{DerivationKey, OsRandom};
        const N: u64 = 6000;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let log = AuditLog::open(
            &store,
            dir.path(),
            CheckpointPolicy { every_entries: 700, every: Duration::from_secs(3600) },
            false,
        )
        .unwrap();
        let signer = DerivationKey::generate(&OsRandom::new()).unwrap().audit_signer().unwrap();
        let public_key = signer.public_key().to_vec();
        log.set_signer(signer);
        for i in 0..N {
            let entry =
                AuditEntry { rpc: "GetRecord".into(), reason: format!("n{i}"), ..AuditEntry::default() };
            assert!(matches!(log.commit(&store, entry, Changes::none()).unwrap(), Committed::Done(_)));
        }
        log.checkpoint_now().unwrap();
        let sequential = |dir: &Path| {
            let checkpoints: Vec<Checkpoint> = audit_file::checkpoints(dir)
                .unwrap()
                .iter()
                .filter_map(|c| serde_json::from_slice::<StoredCheckpoint>(c).ok()?.to_checkpoint())
                .collect();
            let mut v = ChainVerifier::new(&public_key, checkpoints);
            for item in audit_file::entries(dir, 0) {
                let (seq, value) = item.unwrap();
                match split_stored(&value) {
                    Ok((hash, json)) => v.entry(seq, embedded_seq(json), json, hash),
                    Err(_) => v.entry(seq, None, &[], &[]),
                }
            }
            v.finish()
        };
        let intact = log.verify(&public_key, true).unwrap();
        assert_eq!(intact, sequential(log.dir()));
        assert_eq!((intact.entries, intact.first_break.clone()), (N, None));

        let segments = audit_file::segments(log.dir()).unwrap();
        assert_eq!(segments.len(), 1);
        let path = segments[0].1.clone();
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();
        let at = |seq: u64| lines.iter().position(|l| l.starts_with(&format!("e {seq} "))).unwrap();
        let split = N / 2 + 1;
        for (what, seq) in [
            ("edit", 100),
            ("edit", split - 1),
            ("edit", split),
            ("edit", N - 3),
            ("delete", split - 1),
            ("delete", 4000),
        ] {
            let mut forged: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            let i = at(seq);
            if what == "edit" {
                let mut bytes = forged[i].clone().into_bytes();
                let flip = bytes.len() - 40;
                bytes[flip] ^= 1;
                forged[i] = String::from_utf8(bytes).unwrap();
            } else {
                forged.remove(i);
            }
            std::fs::write(&path, forged.join("\n") + "\n").unwrap();
            let report = log.verify(&public_key, false).unwrap();
            let reference = sequential(log.dir());
            assert_eq!(report.first_break, reference.first_break, "{what} {seq}");
            assert_eq!(report.last_checkpoint, reference.last_checkpoint, "{what} {seq}");
            assert_eq!(report.first_break.as_ref().map(|b| b.seq), Some(seq), "{what} {seq}: {report:?}");
        }
        // Truncation: the newest entries gone, the checkpoint beyond them remains.
        let kept: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| !(N - 5..=N).any(|s| l.starts_with(&format!("e {s} "))))
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        let report = log.verify(&public_key, false).unwrap();
        assert_eq!(report.first_break, sequential(log.dir()).first_break);
        assert!(report.first_break.unwrap().reason.contains("truncated"));
    }

    fn test_log(dir: &Path, store: &Store) -> AuditLog {
        let policy = CheckpointPolicy { every_entries: 1_000_000, every: Duration::from_secs(3600) };
        AuditLog::open(store, dir, policy, false).unwrap()
    }

    fn read(log: &AuditLog, store: &Store, i: u64) -> u64 {
        let entry = AuditEntry { rpc: "GetRecord".into(), reason: format!("r{i}"), ..AuditEntry::default() };
        match log.commit(store, entry, Changes::none()).unwrap() {
            Committed::Done(seq) => seq,
            Committed::Conflict => panic!("conflict"),
        }
    }

    /// A crash in the middle of a write leaves a torn last line: it is cut at open, the chain goes
    /// on from the last whole entry, and the log verifies.
    #[test]
    fn a_torn_last_line_is_cut_at_open() {
        use crate::store::Durability;
        use khlang_keys::{DerivationKey, OsRandom};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let key = DerivationKey::generate(&OsRandom::new()).unwrap();
        let public_key = key.audit_signer().unwrap().public_key().to_vec();
        {
            let log = test_log(dir.path(), &store);
            log.set_signer(key.audit_signer().unwrap());
            for i in 1..=5 {
                read(&log, &store, i);
            }
            log.checkpoint_now().unwrap();
        }
        let (_, segment) = audit_file::segments(&dir.path().join(audit_file::DIR)).unwrap().pop().unwrap();
        let whole = std::fs::read(&segment).unwrap();
        // The crash came in the middle of the next line, in the zero-filled space after the last.
        let end = whole.iter().position(|b| *b == 0).unwrap();
        let mut torn = whole.clone();
        torn[end..end + 8].copy_from_slice(b"e 6 00ff");
        std::fs::write(&segment, &torn).unwrap();

        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 5);
        assert_eq!(std::fs::read(&segment).unwrap(), whole, "the torn line is gone, nothing else");
        log.set_signer(key.audit_signer().unwrap());
        assert_eq!(read(&log, &store, 6), 6);
        let report = log.verify(&public_key, true).unwrap();
        assert_eq!((report.entries, report.first_break), (6, None));
    }

    /// Past 65,536 entries the log goes on in a new segment; readers starting anywhere, the
    /// two-thread verification and archival across the seam all see one log.
    #[test]
    fn segments_roll_and_read_as_one_log() {
        use crate::store::Durability;
        use khlang_keys::{DerivationKey, OsRandom};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let log = test_log(dir.path(), &store);
        let signer = DerivationKey::generate(&OsRandom::new()).unwrap().audit_signer().unwrap();
        let public_key = signer.public_key().to_vec();
        log.set_signer(signer);
        let n = 65_536 + 300;
        for i in 1..=n {
            read(&log, &store, i);
        }
        log.checkpoint_now().unwrap();
        let segments = audit_file::segments(log.dir()).unwrap();
        assert_eq!(segments.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 65_537]);
        let from: Vec<u64> = audit_file::entries(log.dir(), 65_530).map(|e| e.unwrap().0).take(10).collect();
        assert_eq!(from, (65_530..65_540).collect::<Vec<_>>());
        let report = log.verify(&public_key, true).unwrap();
        assert_eq!((report.entries, report.first_break, report.last_checkpoint), (n, None, n));

        // Archive up to a checkpoint in the second segment: what is left starts after it.
        read(&log, &store, n + 1);
        log.checkpoint_now().unwrap();
        log.remove_archived(n).unwrap();
        assert_eq!(audit_file::first_seq(log.dir()).unwrap(), Some(n + 1));
        read(&log, &store, n + 2);
        let report = log.verify(&public_key, true).unwrap();
        assert_eq!((report.entries, report.first_break.clone()), (2, None), "{report:?}");
    }

    /// Entries a vault of the previous layout kept in sled are copied into the files once, at
    /// open, its checkpoints moved, and the log verifies there.
    #[test]
    fn entries_kept_in_sled_are_copied_to_the_files() {
        use crate::store::Durability;
        use khlang_keys::{DerivationKey, OsRandom};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let signer = DerivationKey::generate(&OsRandom::new()).unwrap().audit_signer().unwrap();
        let public_key = signer.public_key().to_vec();
        let tree = store.vault_tree_for_tests();
        let mut hash = GENESIS;
        for seq in 1..=30u64 {
            let entry = AuditEntry { seq, rpc: "GetRecord".into(), ..AuditEntry::default() };
            let json = entry.canonical().unwrap();
            hash = chain_hash(&hash, &json);
            tree.insert([b"a".as_slice(), &seq.to_be_bytes()].concat(), [hash.as_slice(), &json].concat())
                .unwrap();
            if seq % 10 == 0 {
                let signature = signer.sign_checkpoint(seq, &hash, 7).unwrap();
                let cp = StoredCheckpoint {
                    seq,
                    hash: hex::encode(hash),
                    time_ms: 7,
                    signature: hex::encode(signature),
                };
                tree.insert([b"k".as_slice(), &seq.to_be_bytes()].concat(), serde_json::to_vec(&cp).unwrap())
                    .unwrap();
            }
        }
        let log = test_log(dir.path(), &store);
        assert_eq!(log.head(), (30, hash));
        assert!(store.legacy_checkpoints().unwrap().is_empty(), "checkpoints moved to their file");
        log.set_signer(signer);
        read(&log, &store, 31);
        let report = log.verify(&public_key, true).unwrap();
        assert_eq!(
            (report.entries, report.checkpoints, report.first_break.clone()),
            (31, 3, None),
            "{report:?}"
        );
        drop(log);
        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 31, "copied once, not again");
    }

    /// A change carries its entry (and any read entry before it not yet synced) in its sled
    /// batch; when the file lost its unsynced tail, the next open puts them back from sled.
    #[test]
    fn entries_a_crash_took_from_the_file_come_back_from_sled() {
        use crate::store::Durability;
        use khlang_keys::{DerivationKey, OsRandom};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let signer = DerivationKey::generate(&OsRandom::new()).unwrap().audit_signer().unwrap();
        let public_key = signer.public_key().to_vec();
        {
            let log = test_log(dir.path(), &store);
            for i in 1..=2 {
                read(&log, &store, i);
            }
            log.sync_now().unwrap();
            read(&log, &store, 3);
            let write = AuditEntry { rpc: "PutRecord".into(), ..AuditEntry::default() };
            assert!(matches!(log.commit(&store, write, Changes::new()).unwrap(), Committed::Done(4)));
            store.flush_now().unwrap();
        }
        let carried: Vec<u64> = store.audit_entries_after(0).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(carried, vec![3, 4], "the write carried the unsynced read before it");
        // The file's last two lines never reached the disk.
        let (_, segment) = audit_file::segments(&dir.path().join(audit_file::DIR)).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(&segment).unwrap();
        let kept: Vec<&str> = text.lines().take(2).collect();
        std::fs::write(&segment, kept.join("\n") + "\n").unwrap();

        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 4);
        let rpcs: Vec<String> = read_entries(log.dir()).map(|e| e.unwrap().rpc).collect();
        assert_eq!(rpcs, ["GetRecord", "GetRecord", "GetRecord", "PutRecord"]);
        log.set_signer(signer);
        read(&log, &store, 5);
        let report = log.verify(&public_key, true).unwrap();
        assert_eq!((report.entries, report.first_break), (5, None));
    }

    /// An archival interrupted between its two renames leaves the new folder complete and the old
    /// one moved aside: the next open finishes the swap instead of starting an empty log.
    #[test]
    fn an_interrupted_archival_is_finished_at_open() {
        use crate::store::Durability;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        {
            let log = test_log(dir.path(), &store);
            for i in 1..=4 {
                read(&log, &store, i);
            }
            log.sync_now().unwrap();
        }
        let audit = dir.path().join(audit_file::DIR);
        std::fs::rename(&audit, audit.with_extension("new")).unwrap();
        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 4, "the complete new folder took the log's place");
        drop(log);
        std::fs::create_dir_all(audit.with_extension("old")).unwrap();
        std::fs::create_dir_all(audit.with_extension("new")).unwrap();
        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 4);
        assert!(!audit.with_extension("old").exists() && !audit.with_extension("new").exists());
    }

    /// A change sled cannot store leaves neither the change nor its entry in sled; the log's entry
    /// for the request says it failed, and the chain goes on.
    #[test]
    fn a_change_that_cannot_be_stored_is_logged_as_failed() {
        use crate::store::{Durability, JobKind, StoredJob};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        let log = test_log(dir.path(), &store);
        read(&log, &store, 1);
        let job = StoredJob {
            format: 1,
            kind: JobKind::Reencrypt,
            cursor: vec![],
            changed: 0,
            skipped: 0,
            total: 0,
            started_ms: 0,
            finished_ms: Some(1),
            requested_by: String::new(),
        };
        let mut changes = Changes::new();
        changes.put_job(&job).unwrap();
        store.inject_apply_failure(true);
        let write = AuditEntry { rpc: "Reencrypt".into(), outcome: "Ok".into(), ..AuditEntry::default() };
        assert!(log.commit(&store, write, changes).is_err());
        store.inject_apply_failure(false);
        assert!(store.job().unwrap().is_none(), "the change was not stored");
        assert!(store.audit_entries_after(0).unwrap().is_empty(), "nor its entry in sled");
        assert_eq!(read(&log, &store, 3), 3, "the chain goes on");
        let entries: Vec<AuditEntry> = {
            log.write_through().unwrap();
            read_entries(log.dir()).map(Result::unwrap).collect()
        };
        let failed = &entries[1];
        assert_eq!((failed.seq, failed.rpc.as_str(), failed.outcome.as_str()), (2, "Reencrypt", "Internal"));
        assert_eq!(failed.reason, "the change could not be stored");
    }
}
