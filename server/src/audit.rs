//! The audit log: one entry for every request that reaches the vault, written in the same atomic
//! batch as the request's changes and flushed before any plaintext leaves or any change is
//! acknowledged. Entries form a hash chain over their canonical JSON; every N entries or T seconds,
//! and at shutdown, the head is signed (Ed25519, a key derived from the derivation key).
//!
//! Entries name fields, never their values; the subject appears only as its blind index; strings a
//! caller sent are bounded and stripped of control characters, and JSON escapes the rest.

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

/// Moves a vault's entries from sled (the layout before `audit_file.rs`) into the log's files, once.
fn migrate_from_sled(store: &Store, file: &AuditFile) -> Result<bool, StoreError> {
    let (entries, checkpoints) = store.legacy_audit()?;
    if entries.is_empty() && checkpoints.is_empty() {
        return Ok(false);
    }
    let mut checkpoints = checkpoints.into_iter().peekable();
    for (seq, value) in &entries {
        let (hash, json) = split_stored(value)?;
        let hash: [u8; 32] = hash.try_into().map_err(|_| StoreError::Corrupt("audit entry"))?;
        file.append_entry(*seq, &hash, json)?;
        while let Some((_, cp)) = checkpoints.next_if(|(cp_seq, _)| cp_seq <= seq) {
            file.append_checkpoint(cp_seq_of(&cp)?, &cp)?;
        }
    }
    for (_, cp) in checkpoints {
        file.append_checkpoint(cp_seq_of(&cp)?, &cp)?;
    }
    file.sync_now()?;
    store.remove_legacy_audit()?;
    tracing::info!(entries = entries.len(), "audit entries moved from the database to the audit log's files");
    Ok(true)
}

fn cp_seq_of(json: &[u8]) -> Result<u64, StoreError> {
    serde_json::from_slice::<StoredCheckpoint>(json)
        .map(|c| c.seq)
        .map_err(|_| StoreError::Corrupt("checkpoint"))
}

impl AuditLog {
    /// Opens the log in `data_dir` (moving entries a previous layout kept in sled there first).
    pub fn open(
        store: &Store,
        data_dir: &Path,
        policy: CheckpointPolicy,
        disabled: bool,
    ) -> Result<Self, StoreError> {
        let (mut file, mut last, mut checkpoint) = AuditFile::open(data_dir)?;
        if last.is_none() && checkpoint.is_none() && migrate_from_sled(store, &file)? {
            drop(file);
            (file, last, checkpoint) = AuditFile::open(data_dir)?;
        }
        let (seq, hash) = match last {
            Some((seq, value)) => {
                let (hash, _) = split_stored(&value)?;
                (seq, hash.try_into().map_err(|_| StoreError::Corrupt("audit entry"))?)
            }
            None => (0, GENESIS),
        };
        let checkpointed_seq =
            checkpoint.and_then(|c| serde_json::from_slice::<StoredCheckpoint>(&c).ok()).map_or(0, |c| c.seq);
        let log = Self {
            head: Mutex::new(Head { seq, hash, checkpointed_seq, checkpointed_at: Instant::now() }),
            signer: Mutex::new(None),
            policy,
            disabled,
            file,
        };
        log.record_lost_tail(store)?;
        Ok(log)
    }

    /// A power cut can persist sled's pages and not the log's: stored changes whose entries were
    /// lost (never acknowledged, but on disk) are then named by an entry of their own, so the log
    /// says what it is missing instead of silently lacking it.
    fn record_lost_tail(&self, store: &Store) -> Result<(), StoreError> {
        let Some(mark) = store.audited_mark()? else { return Ok(()) };
        let head = self.head().0;
        if self.disabled || mark <= head {
            return Ok(());
        }
        tracing::error!(head, mark, "the audit log lost entries of changes that are on disk");
        let entry = AuditEntry {
            rpc: "AuditRecovery".into(),
            decision: "none".into(),
            outcome: "DataLoss".into(),
            reason: format!(
                "the log ended at entry {head} but stored changes were audited up to entry {mark}: \
                 entries {} to {mark} were lost before reaching disk",
                head + 1
            ),
            ..AuditEntry::default()
        };
        match self.commit(store, entry, Changes::new()) {
            Ok(_) => self.file.sync_now().and_then(|()| store.flush_now()),
            Err(_) => Err(StoreError::Flush("the audit log's recovery entry could not be written".into())),
        }
    }

    /// Where the log's files are (readers open them on their own).
    pub fn dir(&self) -> &Path {
        self.file.dir()
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
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
    pub fn head(&self) -> (u64, [u8; 32]) {
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

    /// Appends `entry` and applies `changes`; the entry reaches the file before the change
    /// reaches sled. Fails (and changes nothing) if the entry cannot be written. Durable once
    /// [`AuditLog::durable`] (and, for a change, the store's flush) returns.
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
        self.file.append_entry(entry.seq, &hash, &canonical).map_err(unavailable)?;
        head.seq = entry.seq;
        head.hash = hash;
        let due = entry.seq - head.checkpointed_seq >= self.policy.every_entries
            || head.checkpointed_at.elapsed() >= self.policy.every;
        if due && let Some(cp) = self.checkpoint_json(entry.seq, &hash)? {
            self.file.append_checkpoint(entry.seq, &cp).map_err(unavailable)?;
            head.checkpointed_seq = entry.seq;
            head.checkpointed_at = Instant::now();
        }
        if !changes.is_empty() {
            self.file.write_through().map_err(unavailable)?;
            let mut changes = changes;
            changes.mark_audited(entry.seq);
            if let Err(e) = store.apply(changes) {
                // The entry says what was asked; a second one says it did not happen.
                tracing::error!(error = %e, "a change could not be stored after its audit entry");
                let failed = AuditEntry {
                    seq: entry.seq + 1,
                    time_ms: now_ms(),
                    outcome: "Internal".into(),
                    reason: format!("the change of entry {} could not be stored", entry.seq),
                    ..entry
                };
                let canonical = failed.canonical()?;
                let hash = chain_hash(&head.hash, &canonical);
                self.file.append_entry(failed.seq, &hash, &canonical).map_err(unavailable)?;
                head.seq = failed.seq;
                head.hash = hash;
                return Err(e.into());
            }
        }
        Ok(Committed::Done(entry.seq))
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
        let expected_head = {
            // Everything up to the head is in the file before reading starts.
            let head = self.head.lock().unwrap_or_else(|p| p.into_inner());
            if live && !self.disabled {
                self.file.write_through()?;
            }
            (head.seq, head.hash)
        };
        verify_dir(self.dir(), public_key, live.then_some(expected_head))
    }
}

/// Verifies the log in `dir`; with `expected_head`, only up to it, and that it ends there.
pub fn verify_dir(
    dir: &Path,
    public_key: &[u8],
    expected_head: Option<(u64, [u8; 32])>,
) -> Result<ChainReport, StoreError> {
    let live = expected_head.is_some();
    let (tail_entry, _) = audit_file::tail(dir)?;
    // The live log is verified up to the head as it was when verification began (requests
    // keep appending meanwhile); a stored log, to its end.
    let last = match expected_head {
        Some((seq, _)) => seq,
        None => tail_entry.map_or(0, |(seq, _)| seq),
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

    /// Entries a vault of the previous layout kept in sled move into the files once, at open,
    /// and verify there; sled no longer holds them.
    #[test]
    fn entries_kept_in_sled_move_to_the_files() {
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
        assert_eq!(store.legacy_audit().unwrap(), (vec![], vec![]));
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
        assert_eq!(log.head().0, 31, "moved once, not again");
    }

    /// After a power cut that kept a change in sled but lost its entry (and the entries before
    /// it) from the log, the next open appends an entry naming what was lost.
    #[test]
    fn a_change_whose_entry_was_lost_is_named_at_open() {
        use crate::store::Durability;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::PerRequest).unwrap();
        {
            let log = test_log(dir.path(), &store);
            for i in 1..=3 {
                read(&log, &store, i);
            }
            let write = AuditEntry { rpc: "PutRecord".into(), ..AuditEntry::default() };
            assert!(matches!(log.commit(&store, write, Changes::new()).unwrap(), Committed::Done(4)));
            log.sync_now().unwrap();
        }
        assert_eq!(store.audited_mark().unwrap(), Some(4));
        // The log's last two lines never reached the disk.
        let (_, segment) = audit_file::segments(&dir.path().join(audit_file::DIR)).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(&segment).unwrap();
        let kept: Vec<&str> = text.lines().take(2).collect();
        std::fs::write(&segment, kept.join("\n") + "\n").unwrap();

        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 3);
        let last = read_entries(log.dir()).last().unwrap().unwrap();
        assert_eq!((last.seq, last.rpc.as_str(), last.outcome.as_str()), (3, "AuditRecovery", "DataLoss"));
        assert!(
            last.reason.contains("ended at entry 2") && last.reason.contains("entries 3 to 4"),
            "{}",
            last.reason
        );
        drop(log);
        let log = test_log(dir.path(), &store);
        assert_eq!(log.head().0, 3, "named once");
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
}
