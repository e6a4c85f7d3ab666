//! The audit log: one entry for every request that reaches the vault, on disk before any plaintext
//! leaves or any change is acknowledged: a read's in the log's own files (`audit_file.rs`), synced;
//! a change's in the same atomic sled batch as the change (and in the files). Entries form a hash
//! chain over their canonical JSON; every N entries or T seconds, and at shutdown, the head is
//! signed (Ed25519, a key derived from the derivation key), each checkpoint naming the one before;
//! every acknowledged head in between carries an HMAC tag (a group of reads in the file, a change
//! in its batch), so nobody without the root key can rewrite the unsigned tail either.
//!
//! Entries name fields, never their values; the subject appears only as its blind index; strings a
//! caller sent are bounded and stripped of control characters, and JSON escapes the rest.

pub mod archive_base;
mod chain_rows;
mod entry;
pub mod files;
mod group_commit;
mod integrity;
mod ledger;
mod query;
pub(crate) mod repeats;
mod rpc;
mod shared;
pub mod sink;
mod stored;
mod tagging;
pub(crate) use tagging::fresh_write;
mod verify;

pub use entry::*;
pub use ledger::Completeness;
pub use query::*;
pub use stored::*;
pub use verify::*;

pub use rpc::Rpc;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use khlang_keys::audit_chain::{
    AuditSigner, ChainBreak, ChainReport, ChainVerifier, Checkpoint, GENESIS, HeadTagger, chain_hash,
    join_reports, verify_checkpoint,
};
use serde::{Deserialize, Serialize};

use crate::audit::files::{
    AuditFile, AuditFiles, FileOptions, Scanned, TaggedHead, decode_tagged, encode_tagged,
};
use crate::clock::now_ms;
use crate::policy::catalogue::printable;
use crate::storage::{AuditHead, AuditRecord, Changes, HeadRecorder, Storage};
use crate::{Outcome, StoreError, VaultError};

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
    /// The seq of the last checkpoint signed: the next one names it.
    last_signed: u64,
    /// Entries `(seq, hash ‖ JSON)` in the file's buffer, not yet synced and not in sled: the next
    /// change carries them into sled with its own, so what sled holds never skips one.
    unsynced: VecDeque<(u64, Vec<u8>)>,
    /// The chain head the store holds (the newest entry a change carried): the next change's
    /// commit expects it, so two writers can never both extend it.
    stored: Option<AuditHead>,
}

/// The keys of an unsealed vault's log.
struct LogKeys {
    signer: AuditSigner,
    /// Shared so a long verification holds no lock that commits need.
    tagger: std::sync::Arc<HeadTagger>,
}

/// A break found in the log and carried forward, not yet accepted by the operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BreakRecord {
    /// The seq of the `AuditBreak` entry that carried it forward.
    pub entry: u64,
    pub damaged_from: u64,
    pub damaged_to: u64,
    pub reason: String,
}

/// What the vault knows of its log's integrity.
#[derive(Default)]
struct Integrity {
    /// The file's head when the log was opened: what the first unlock verifies (entries after it
    /// are this process's own, chained in memory).
    opened: ChainHead,
    /// The first unlock verified the tail.
    checked: bool,
    broken: Option<BreakRecord>,
}

/// Appends entries (in its own files, see `audit_file.rs`) and signs checkpoints. `order` is
/// held by one committer at a time, across its store commit, so the chain is appended in the
/// order seqs are given; `head` is only ever held briefly (never across an await).
pub struct AuditLog {
    order: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Changes waiting for `order`: whoever takes it commits all of them as one group.
    waiting: Mutex<Vec<group_commit::Waiting>>,
    /// Serialises the rare integrity procedures (unlock, accepting a break, the history check).
    procedure: tokio::sync::Mutex<()>,
    head: Mutex<Head>,
    keys: std::sync::Arc<Mutex<Option<LogKeys>>>,
    integrity: Mutex<Integrity>,
    policy: CheckpointPolicy,
    /// On a store that holds one chain for every node: its batcher (every append goes through
    /// it, and `file` reads the store's rows).
    shared: Option<shared::Batcher>,
    /// Benchmark baseline only: apply changes without writing entries.
    disabled: bool,
    /// The first kept entry of an archived log with no base that the operator accepted.
    accept_unbased_log: Option<u64>,
    file: Box<dyn AuditFiles>,
    recorder: HeadRecorder,
    witness: Option<PathBuf>,
    /// On a shared chain: this node's own record of the newest head it signed, in its folder
    /// ([`NODE_WITNESS`]), so a chain cut back in the database is caught after a restart too.
    node_witness: Option<PathBuf>,
    /// Where each entry is also streamed (best-effort).
    sink: Option<std::sync::Arc<sink::AuditSink>>,
    /// The newest change whose store flush returned: with the files' synced seq, how far the
    /// log is durable (what the sink waits for).
    store_durable: tokio::sync::watch::Sender<u64>,
    /// Tags the authority values a change writes (installed at unseal, shared with the store's
    /// checking wrapper).
    authority: std::sync::Arc<crate::storage::authority::AuthorityKey>,
}

/// The SIEM sink the options name, started (a target that cannot be opened fails the open);
/// with `durable`, it streams only what the log's files hold on disk.
fn start_sink(
    options: &LogOptions,
    durable: Option<sink::DurableMark>,
) -> Result<Option<std::sync::Arc<sink::AuditSink>>, StoreError> {
    options
        .files
        .sink
        .as_ref()
        .map(|t| {
            sink::AuditSink::start(t, durable)
                .map(std::sync::Arc::new)
                .map_err(|e| StoreError::Io(e.to_string()))
        })
        .transpose()
}

/// The file in a node's data folder holding the newest checkpoint it signed on a shared chain
/// (one checkpoint line, replaced at each).
pub const NODE_WITNESS: &str = "audit-signed-head.json";

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

/// The log's options beyond its files'.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub checkpoints: CheckpointPolicy,
    pub files: FileOptions,
    /// Benchmark baseline only.
    pub disabled: bool,
    /// `--accept-unbased-log` (see `archive_base`).
    pub accept_unbased_log: Option<u64>,
}

/// What the vault's log reports of itself (health, `VerifyAudit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogState {
    Intact,
    /// A break was found and carried forward; the operator has not accepted it.
    Broken(BreakRecord),
}

impl AuditLog {
    /// Opens the log in `data_dir`, first taking back from sled what a crash took from the file
    /// (and, once, the whole log of the layout that kept it in sled). Its integrity is checked
    /// at the first [`AuditLog::unlock`], when the keys that prove it are there.
    pub async fn open(
        store: &dyn Storage,
        data_dir: &Path,
        options: &LogOptions,
    ) -> Result<Self, StoreError> {
        if let Some(chain) = store.shared_chain() {
            return Self::open_shared(store, chain, data_dir, options).await;
        }
        let (file, (last, checkpoint)) = AuditFile::open(data_dir, &options.files)?;
        let (store_durable, stored_mark) = tokio::sync::watch::channel(0);
        let sink =
            start_sink(options, Some(sink::DurableMark { file: file.durable_mark(), store: stored_mark }))?;
        let head = match last {
            Some((seq, value)) => {
                let (hash, _) = split_stored(&value)?;
                (seq, hash.try_into().map_err(|_| StoreError::Corrupt("audit entry"))?)
            }
            None => (0, GENESIS),
        };
        let ((seq, hash), moved_checkpoint) = recover_from_sled(store, &file, head).await?;
        let checkpointed_seq = moved_checkpoint
            .unwrap_or_else(|| checkpoint.as_deref().map_or(0, |c| cp_seq_of(c).unwrap_or(0)));
        // The next checkpoint names the newest one the vault signed, wherever it is recorded.
        let recorded =
            store.audit_record(AuditRecord::SignedHead).await?.and_then(|c| cp_seq_of(&c).ok()).unwrap_or(0);
        let broken = match store.audit_record(AuditRecord::Break).await? {
            Some(b) => serde_json::from_slice(&b).ok(),
            None => None,
        };
        Ok(Self {
            order: Default::default(),
            waiting: Default::default(),
            procedure: tokio::sync::Mutex::new(()),
            head: Mutex::new(Head {
                seq,
                hash,
                checkpointed_seq,
                checkpointed_at: Instant::now(),
                last_signed: checkpointed_seq.max(recorded),
                unsynced: VecDeque::new(),
                stored: store.audit_head().await?,
            }),
            keys: Default::default(),
            integrity: Mutex::new(Integrity { opened: (seq, hash), checked: false, broken }),
            policy: options.checkpoints,
            shared: None,
            disabled: options.disabled,
            accept_unbased_log: options.accept_unbased_log,
            file: Box::new(file),
            recorder: store.head_recorder(),
            witness: options.files.witness.clone(),
            node_witness: None,
            sink,
            store_durable,
            authority: Default::default(),
        })
    }

    /// The log on a store that keeps the chain for every node: nothing in the node's folder.
    async fn open_shared(
        store: &dyn Storage,
        chain: std::sync::Arc<dyn crate::storage::SharedChain>,
        data_dir: &Path,
        options: &LogOptions,
    ) -> Result<Self, StoreError> {
        let node_witness = data_dir.join(NODE_WITNESS);
        let tip = chain.tip().await?;
        let broken = match store.audit_record(AuditRecord::Break).await? {
            Some(b) => serde_json::from_slice(&b).ok(),
            None => None,
        };
        let keys: std::sync::Arc<Mutex<Option<LogKeys>>> = Default::default();
        let order: std::sync::Arc<tokio::sync::Mutex<()>> = Default::default();
        let file: Box<dyn AuditFiles> = Box::new(chain_rows::ChainRows(chain.rows()));
        // Sent after its batch commits: the database holds it by then.
        let sink = start_sink(options, None)?;
        let batcher = shared::Batcher::start(shared::State {
            chain,
            keys: keys.clone(),
            policy: options.checkpoints,
            order: order.clone(),
            failing: Default::default(),
            last_failed: Default::default(),
            mine: Default::default(),
            witness: options.files.witness.clone(),
            node_witness: node_witness.clone(),
            sink: sink.clone(),
        });
        Ok(Self {
            order,
            waiting: Default::default(),
            procedure: tokio::sync::Mutex::new(()),
            head: Mutex::new(Head {
                seq: tip.seq,
                hash: tip.hash,
                checkpointed_seq: tip.signed_seq,
                checkpointed_at: Instant::now(),
                last_signed: tip.signed_seq,
                unsynced: VecDeque::new(),
                stored: None,
            }),
            keys,
            integrity: Mutex::new(Integrity { opened: (tip.seq, tip.hash), checked: false, broken }),
            policy: options.checkpoints,
            shared: Some(batcher),
            disabled: options.disabled,
            accept_unbased_log: options.accept_unbased_log,
            file,
            recorder: store.head_recorder(),
            witness: options.files.witness.clone(),
            node_witness: Some(node_witness),
            sink,
            store_durable: tokio::sync::watch::channel(0).0,
            authority: Default::default(),
        })
    }

    /// Where the log's files are (tools and tests that read them as an intruder would).
    pub fn dir(&self) -> &Path {
        self.file.location()
    }

    /// Every entry kept, parsed, oldest first (damaged lines left out; verification names them).
    pub fn read_entries(&self) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + '_ {
        read_entries(&*self.file)
    }

    /// The export's JSON Lines (header, entries, checkpoints).
    pub fn export_lines(&self, public_key: Vec<u8>) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
        export_lines(&*self.file, public_key)
    }

    /// The archive's JSON Lines: entries up to `last` and the checkpoints up to it.
    pub fn archive_lines(
        &self,
        public_key: Vec<u8>,
        last: u64,
    ) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
        archive_lines(&*self.file, public_key, last)
    }

    /// The seq of the oldest entry kept.
    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        self.file.first_seq()
    }

    /// Every signed checkpoint kept, oldest first (JSON).
    pub fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.file.checkpoints()
    }

    /// Unsealing: installs the keys. The first time in this process, the tail on disk since the
    /// last signed head is verified first; damage is carried forward as an `AuditBreak` entry
    /// that links the chain on from the newest head the vault signed, never over the damage.
    pub async fn unlock(
        &self,
        store: &dyn Storage,
        signer: AuditSigner,
        tagger: HeadTagger,
        flusher_tagger: HeadTagger,
    ) -> Result<(), VaultError> {
        if self.disabled {
            *lock(&self.keys) = Some(LogKeys { signer, tagger: tagger.into() });
            return Ok(());
        }
        let _procedure = self.procedure.lock().await;
        let public_key = signer.public_key().to_vec();
        let (checked, opened) = {
            let integrity = lock(&self.integrity);
            (integrity.checked, integrity.opened)
        };
        // A shared chain's head is the store's, which other nodes moved since this one opened.
        let opened = self.file.stored_head()?.unwrap_or(opened);
        let finding = if checked {
            None
        } else {
            let records = StoredRecords::read(store).await?;
            self.file.write_through()?;
            Some(self.check_tail(&records, &public_key, &tagger, opened)?)
        };
        *lock(&self.keys) = Some(LogKeys { signer, tagger: tagger.into() });
        self.file.set_sealing(Some(flusher_tagger), Some(self.recorder.clone()));
        lock(&self.integrity).checked = true;
        match finding {
            Some(TailFinding::Damaged { report, anchor }) => {
                let b = report.uncarried.clone().unwrap_or(ChainBreak { seq: 1, reason: String::new() });
                let record = self.carry_forward(store, &b, anchor, report.last_entry).await?;
                lock(&self.integrity).broken = Some(record);
            }
            Some(TailFinding::Unproven { from, to }) => {
                let mut e = notice_entry(Rpc::AuditUnproven);
                e.reason = format!(
                    "entries {from} to {to} were on disk with neither a signature nor a head tag (written while sealed, \
                     or just before an unclean stop): nothing proves them"
                );
                tracing::warn!(from, to, "audit entries on disk are not proven by a signature or tag");
                self.append_notice(store, e).await?;
            }
            Some(TailFinding::Sound) | None => {}
        }
        if let Some(b) = &lock(&self.integrity).broken {
            tracing::error!(
                audit_break_entry = b.entry,
                "the audit log holds a break the operator has not accepted (entries {} to {}: {})",
                b.damaged_from,
                b.damaged_to,
                b.reason
            );
        }
        self.checkpoint_now().await
    }

    /// Sealing: the keys are wiped; entries are still chained, and signed at the next unseal.
    pub fn clear_signer(&self) {
        *lock(&self.keys) = None;
        self.file.set_sealing(None, None);
    }

    pub fn public_key(&self) -> Option<Vec<u8>> {
        lock(&self.keys).as_ref().map(|k| k.signer.public_key().to_vec())
    }

    /// `(seq, hash)` of the newest entry.
    pub fn head(&self) -> ChainHead {
        let head = lock(&self.head);
        (head.seq, head.hash)
    }

    /// Signs `(seq, hash)` as the checkpoint after the last one; `None` while sealed.
    fn sign(&self, head: &Head, seq: u64, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, VaultError> {
        let keys = lock(&self.keys);
        let Some(keys) = keys.as_ref() else { return Ok(None) };
        let cp = keys.signer.sign_checkpoint(seq, hash, now_ms(), head.last_signed)?;
        let json = serde_json::to_vec(&StoredCheckpoint::from_checkpoint(&cp))
            .map_err(|_| StoreError::Corrupt("checkpoint (encode)"))?;
        Ok(Some(json))
    }

    fn checkpoint_head(&self, head: &mut Head) -> Result<(), VaultError> {
        let (seq, hash) = (head.seq, head.hash);
        if let Some(cp) = self.sign(head, seq, &hash)? {
            self.file.append_checkpoint(seq, &cp).map_err(unavailable)?;
            head.checkpointed_seq = seq;
            head.last_signed = seq;
            head.checkpointed_at = Instant::now();
        }
        Ok(())
    }

    /// Appends `entry` and commits `changes` with it in one store commit. Fails (and changes
    /// nothing) if the entry cannot be written. Durable once [`AuditLog::durable`] returns (for a
    /// change, once the store's flush does).
    pub async fn commit(
        &self,
        store: &dyn Storage,
        mut entry: AuditEntry,
        mut changes: Changes,
    ) -> Result<Committed, VaultError> {
        // An archival's entry names its base's write itself (`archive_base`, read from the log).
        if !crate::storage::authority::writes_authority(&changes) {
            return self.commit_entry(store, entry, changes).await;
        }
        // Authority writes are tagged, and the index of writes learns of them as they commit.
        self.tag_authority(&mut entry, &mut changes)?;
        let (write, writes) = (entry.write, entry.writes.clone());
        self.authority.index().begin(write, &writes);
        let committed = self.commit_entry(store, entry, changes).await;
        let seq = match &committed {
            Ok(Committed::Done(seq)) => Some(*seq),
            _ => None,
        };
        self.authority.index().finish(write, &writes, seq);
        committed
    }

    async fn commit_entry(
        &self,
        store: &dyn Storage,
        entry: AuditEntry,
        changes: Changes,
    ) -> Result<Committed, VaultError> {
        if let (Some(batcher), false) = (&self.shared, self.disabled) {
            let committed = batcher.commit(entry, changes).await;
            if let Some(mine) = *lock(&batcher.state.mine) {
                let mut head = lock(&self.head);
                if mine.seq > head.seq {
                    (head.seq, head.hash) = (mine.seq, mine.hash);
                }
            }
            return committed;
        }
        if !changes.is_empty() && !self.disabled {
            return self.commit_grouped(store, entry, changes).await;
        }
        let _order = self.order.lock().await;
        self.commit_locked(store, entry, changes).await
    }

    /// One entry (and its change) committed alone, `order` held by the caller.
    async fn commit_locked(
        &self,
        store: &dyn Storage,
        mut entry: AuditEntry,
        changes: Changes,
    ) -> Result<Committed, VaultError> {
        if self.disabled {
            return Ok(if store.commit(changes).await? { Committed::Done(0) } else { Committed::Conflict });
        }
        // Phase 1, under the head's lock: the entry's seq and link; a read's entry goes to the
        // file's buffer at once (durable by the file's sync, which writes its group's tag).
        let (changes, next, stored_head, canonical, hash) = {
            let mut head = lock(&self.head);
            entry.seq = head.seq + 1;
            entry.time_ms = now_ms();
            entry.bound();
            let canonical = entry.canonical()?;
            let hash = chain_hash(&head.hash, &canonical);
            let value = [hash.as_slice(), &canonical].concat();
            if changes.is_empty() {
                self.append_file(entry.seq, entry.time_ms, &hash, &canonical, true).map_err(unavailable)?;
                let synced = self.file.synced_seq();
                while head.unsynced.front().is_some_and(|(s, _)| *s <= synced) {
                    head.unsynced.pop_front();
                }
                head.unsynced.push_back((entry.seq, value));
                head.seq = entry.seq;
                head.hash = hash;
                self.checkpoint_if_due(&mut head)?;
                return Ok(Committed::Done(entry.seq));
            }
            // A change carries its entry (with any entry before it not yet on disk, and the tag
            // of its head) in its own commit, which expects the store's chain head unmoved; the
            // file gets the entry too, synced later.
            self.file.check_writable().map_err(unavailable)?;
            let mut changes = changes;
            let synced = self.file.synced_seq();
            for (seq, earlier) in head.unsynced.iter().filter(|(s, _)| *s > synced) {
                changes.audit_entry(*seq, earlier);
            }
            changes.audit_entry(entry.seq, &value);
            if let Some(keys) = lock(&self.keys).as_ref() {
                let tagged: TaggedHead = (entry.seq, hash, keys.tagger.tag(entry.seq, &hash));
                changes.audit_head_tag(&encode_tagged(&tagged));
            }
            let next = AuditHead { seq: entry.seq, hash };
            changes.extend_audit_head(head.stored, next);
            (changes, next, head.stored, canonical, hash)
        };
        // Phase 2: the store commit, with no lock but `order` held.
        let stored = store.commit(changes).await;
        if let Ok(false) = stored {
            if store.audit_head().await? != stored_head {
                // Someone else extended the chain in the store: this log's view of it is stale,
                // and appending would fork it. Fail closed.
                tracing::error!("the audit chain head in the store moved under this vault");
                return Err(VaultError::AuditUnavailable);
            }
            // A record it read changed meanwhile: nothing was written and no seq was used; the
            // request prepares again.
            return Ok(Committed::Conflict);
        }
        let mut head = lock(&self.head);
        if let Err(e) = stored {
            // Neither the change nor its entry was stored: the entry says the change failed.
            tracing::error!(error = %e, "a change and its audit entry could not be stored");
            entry.outcome = Outcome::Internal;
            entry.reason = "the change could not be stored".into();
            // Nothing was written: the entry names no write.
            entry.write = 0;
            entry.writes.clear();
            let canonical = entry.canonical()?;
            let hash = chain_hash(&head.hash, &canonical);
            self.append_file(entry.seq, entry.time_ms, &hash, &canonical, true).map_err(unavailable)?;
            // Until the file's sync, the next change carries it into the store (as a read's).
            head.unsynced.push_back((entry.seq, [hash.as_slice(), &canonical].concat()));
            head.seq = entry.seq;
            head.hash = hash;
            return Err(e.into());
        }
        head.unsynced.clear();
        head.stored = Some(next);
        self.append_file(entry.seq, entry.time_ms, &hash, &canonical, false).map_err(unavailable)?;
        head.seq = entry.seq;
        head.hash = hash;
        self.checkpoint_if_due(&mut head)?;
        Ok(Committed::Done(entry.seq))
    }

    fn checkpoint_if_due(&self, head: &mut Head) -> Result<(), VaultError> {
        let due = head.seq - head.checkpointed_seq >= self.policy.every_entries
            || head.checkpointed_at.elapsed() >= self.policy.every;
        if due {
            self.checkpoint_head(head)?;
        }
        Ok(())
    }

    /// Writes every entry appended so far to the file (no sync), for a reader of the file: a
    /// change's entry otherwise waits in memory for the next sync (its durability is sled's).
    pub fn write_through(&self) -> Result<(), VaultError> {
        if self.shared.is_some() {
            // The store's rows are the log: nothing waits in memory (and no query is owed).
            return Ok(());
        }
        self.head_in_file().map(|_| ()).map_err(unavailable)
    }

    /// Entry `seq` travelled in a change whose store flush has returned: it, and every entry
    /// before it, is durable.
    pub fn stored_durably(&self, seq: u64) {
        self.store_durable.send_if_modified(|s| {
            let newer = *s < seq;
            *s = (*s).max(seq);
            newer
        });
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

    /// The store's audit records, read while no commit stands between its store write and its
    /// file append: a change's tag read in that gap names an entry the file does not hold yet, so
    /// a verification beside writers found a false cut tail (seen once under the full suite).
    pub async fn stored_records(&self, store: &dyn Storage) -> Result<StoredRecords, StoreError> {
        let _order = match self.shared {
            Some(_) => None,
            None => Some(self.order.lock().await),
        };
        StoredRecords::read(store).await
    }

    /// Every file of the log, for a backup taken with commits held off
    /// ([`AuditFiles::backup_files`]).
    pub fn backup_files(&self, each: &mut files::FileSink<'_>) -> Result<(), StoreError> {
        self.file.backup_files(each)
    }

    /// Appends an entry to the files and streams it to the sink, if there is one.
    fn append_file(
        &self,
        seq: u64,
        time_ms: u64,
        hash: &[u8; 32],
        canonical: &[u8],
        urgent: bool,
    ) -> Result<(), StoreError> {
        self.file.append_entry(seq, hash, canonical, urgent)?;
        if let Some(sink) = &self.sink {
            sink.send(seq, time_ms, canonical);
        }
        Ok(())
    }

    /// Holds every commit off while the guard lives (key retirement proves and destroys under
    /// it).
    pub async fn hold_commits(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.order.lock().await
    }

    /// Signs the current head now (shutdown, export, verification), if anything was appended
    /// since the last checkpoint, and syncs the log.
    pub async fn checkpoint_now(&self) -> Result<(), VaultError> {
        if self.disabled {
            return Ok(());
        }
        if let Some(batcher) = &self.shared {
            return batcher.checkpoint().await;
        }
        let mut head = lock(&self.head);
        if head.seq != 0 && head.seq != head.checkpointed_seq {
            self.checkpoint_head(&mut head)?;
        }
        self.file.sync_now().map_err(unavailable)
    }

    /// Whether the tail was verified since the log was opened (at the first unlock).
    pub fn tail_checked(&self) -> bool {
        lock(&self.integrity).checked
    }

    /// How long ago the newest checkpoint was signed (by any node, on a shared chain).
    pub async fn checkpoint_age(&self) -> Option<Duration> {
        match &self.shared {
            Some(batcher) => {
                let tip = batcher.state.chain.tip().await.ok()?;
                (tip.signed_ms > 0)
                    .then(|| Duration::from_millis(crate::clock::now_ms().saturating_sub(tip.signed_ms)))
            }
            None => Some(lock(&self.head).checkpointed_at.elapsed()),
        }
    }

    /// Whether an entry could be written now, as far as the log knows (health): its files have
    /// not failed; on a shared chain, the newest batch did not fail, or a read of the chain's
    /// head since says the database is back.
    pub async fn writable(&self) -> bool {
        if self.file.check_writable().is_err() {
            return false;
        }
        let Some(batcher) = &self.shared else { return true };
        let state = &batcher.state;
        if state.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        if state.last_failed.load(std::sync::atomic::Ordering::Relaxed) && state.chain.tip().await.is_ok() {
            state.last_failed.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        !state.last_failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fault drill for tests: make every following append fail (or succeed again).
    #[cfg(any(test, feature = "test-util"))]
    pub fn inject_failure(&self, fail: bool) {
        if let Some(batcher) = &self.shared {
            batcher.state.failing.store(fail, std::sync::atomic::Ordering::Relaxed);
        }
        self.file.inject_failure(fail);
    }
}

/// A witness's signed head beyond the chain's end `head`: the chain was cut or rolled back.
fn witnessed_beyond(proofs: &Proofs, head: u64) -> Option<ChainBreak> {
    let w = proofs.witness.iter().filter(|w| w.seq > head).min_by_key(|w| w.seq)?;
    let reason = format!(
        "the witness holds a signed head at {}, beyond this log's end {head}: rolled back or cut",
        w.seq
    );
    Some(ChainBreak { seq: head + 1, reason })
}

/// Adds a break found beside the chain (a record, a witness) to a report.
fn add_break(report: &mut ChainReport, b: ChainBreak) {
    if report.uncarried.as_ref().is_none_or(|u| u.seq > b.seq) {
        report.uncarried = Some(b.clone());
    }
    if report.first_break.as_ref().is_none_or(|f| f.seq > b.seq) {
        report.first_break = Some(b);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An entry the vault writes about its own log.
fn notice_entry(rpc: Rpc) -> AuditEntry {
    AuditEntry {
        rpc: rpc.as_str().to_owned(),
        identity: "khlangd".into(),
        decision: Decided::None,
        outcome: Outcome::Ok,
        ..AuditEntry::default()
    }
}

/// The stored hash of entry `seq`, if the log holds it.
/// The chain hash stored with entry `seq`, in the files of `dir`.
fn entry_hash_in(dir: &Path, seq: u64) -> Result<Option<[u8; 32]>, StoreError> {
    stored_hash(seq, files::entries(dir, seq).next().transpose()?)
}

fn stored_hash(seq: u64, item: Option<(u64, Vec<u8>)>) -> Result<Option<[u8; 32]>, StoreError> {
    match item {
        Some((s, value)) if s == seq => {
            Ok(split_stored(&value).ok().and_then(|(h, _)| <[u8; 32]>::try_from(h).ok()))
        }
        _ => Ok(None),
    }
}

fn entry_hash(files: &dyn AuditFiles, seq: u64) -> Result<Option<[u8; 32]>, StoreError> {
    stored_hash(seq, files.entries(seq).next().transpose()?)
}

enum TailFinding {
    Sound,
    Unproven { from: u64, to: u64 },
    Damaged { report: ChainReport, anchor: Option<Checkpoint> },
}

/// Proofs of the log kept outside its segment files.
#[derive(Default)]
struct Proofs {
    /// The store's record of the newest signed head.
    signed: Option<Checkpoint>,
    /// Tagged heads the store recorded (already checked against the tag key).
    tagged: Vec<(u64, [u8; 32])>,
    witness: Vec<Checkpoint>,
    file_checkpoints: Vec<Checkpoint>,
    /// A record that is itself damaged.
    tamper: Option<ChainBreak>,
}

impl Proofs {
    fn tamper_at(&mut self, seq: u64, reason: &str) {
        if self.tamper.as_ref().is_none_or(|t| t.seq > seq) {
            self.tamper = Some(ChainBreak { seq, reason: reason.to_owned() });
        }
    }

    /// Checkpoints to verify beside the checkpoints file's: the store's and the witness's newest.
    fn checkpoints(&self) -> Vec<Checkpoint> {
        self.signed.iter().chain(self.witness.last()).cloned().collect()
    }

    fn witnessed_before(&self, seq: u64) -> Vec<Checkpoint> {
        self.witness.iter().filter(|w| w.seq <= seq).cloned().collect()
    }

    fn max_seq(&self) -> u64 {
        let signed = self.signed.iter().chain(&self.witness).chain(&self.file_checkpoints).map(|c| c.seq);
        signed.chain(self.tagged.iter().map(|t| t.0)).max().unwrap_or(0)
    }

    /// The newest head the vault signed, wherever it is recorded: a forger cannot sign one, so
    /// every valid signature is the vault's.
    fn newest_signed(&self, public_key: &[u8]) -> Option<Checkpoint> {
        self.signed
            .iter()
            .chain(&self.witness)
            .chain(&self.file_checkpoints)
            .filter(|c| verify_checkpoint(public_key, c))
            .max_by_key(|c| c.seq)
            .cloned()
    }
}

#[cfg(test)]
mod tests;
