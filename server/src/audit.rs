//! The audit log: one entry for every request that reaches the vault, written in the same atomic
//! batch as the request's changes and flushed before any plaintext leaves or any change is
//! acknowledged. Entries form a hash chain over their canonical JSON; every N entries or T seconds,
//! and at shutdown, the head is signed (Ed25519, a key derived from the derivation key).
//!
//! Entries name fields, never their values; the subject appears only as its blind index; strings a
//! caller sent are bounded and stripped of control characters, and JSON escapes the rest.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use khlang_keys::audit_chain::{
    AuditSigner, ChainReport, ChainVerifier, Checkpoint, GENESIS, chain_hash, join_reports,
};
use serde::{Deserialize, Serialize};

use crate::catalogue::printable;
use crate::store::{Changes, Record, Store};
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

/// Appends entries (with the request's changes) and signs checkpoints. The mutex orders the chain
/// and makes each commit's expectation check and write one step.
pub struct AuditLog {
    head: Mutex<Head>,
    signer: Mutex<Option<AuditSigner>>,
    policy: CheckpointPolicy,
    /// Benchmark baseline only: apply changes without writing entries.
    disabled: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("disabled", &self.disabled).finish_non_exhaustive()
    }
}

fn entry_key(seq: u64) -> Vec<u8> {
    [b"a".as_slice(), &seq.to_be_bytes()].concat()
}

fn checkpoint_key(seq: u64) -> Vec<u8> {
    [b"k".as_slice(), &seq.to_be_bytes()].concat()
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

impl AuditLog {
    pub fn open(store: &Store, policy: CheckpointPolicy, disabled: bool) -> Result<Self, StoreError> {
        let (seq, hash) = match store.last_audit_entry()? {
            Some((seq, value)) => {
                let (hash, _) = split_stored(&value)?;
                (seq, hash.try_into().map_err(|_| StoreError::Corrupt("audit entry"))?)
            }
            None => (0, GENESIS),
        };
        let checkpointed_seq = store
            .checkpoints()?
            .last()
            .and_then(|c| serde_json::from_slice::<StoredCheckpoint>(c).ok())
            .map_or(0, |c| c.seq);
        Ok(Self {
            head: Mutex::new(Head { seq, hash, checkpointed_seq, checkpointed_at: Instant::now() }),
            signer: Mutex::new(None),
            policy,
            disabled,
        })
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

    fn checkpoint_record(&self, seq: u64, hash: &[u8; 32]) -> Result<Option<Record>, VaultError> {
        let signer = self.signer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(signer) = signer.as_ref() else { return Ok(None) };
        let time_ms = now_ms();
        let signature = signer.sign_checkpoint(seq, hash, time_ms)?;
        let cp =
            StoredCheckpoint { seq, hash: hex::encode(hash), time_ms, signature: hex::encode(signature) };
        let json = serde_json::to_vec(&cp).map_err(|_| StoreError::Corrupt("checkpoint (encode)"))?;
        Ok(Some((checkpoint_key(seq), json)))
    }

    /// Appends `entry` and applies `changes` in one atomic write. Fails (and writes nothing) if the
    /// entry cannot be written.
    pub fn commit(
        &self,
        store: &Store,
        mut entry: AuditEntry,
        changes: Changes,
    ) -> Result<Committed, VaultError> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if self.disabled {
            return match store.commit(changes, &[]) {
                Ok(true) => Ok(Committed::Done(0)),
                Ok(false) => Ok(Committed::Conflict),
                Err(_) => Err(VaultError::AuditUnavailable),
            };
        }
        entry.seq = head.seq + 1;
        entry.time_ms = now_ms();
        let canonical = entry.canonical()?;
        let hash = chain_hash(&head.hash, &canonical);
        let mut records = vec![(entry_key(entry.seq), [hash.as_slice(), &canonical].concat())];
        let due = entry.seq - head.checkpointed_seq >= self.policy.every_entries
            || head.checkpointed_at.elapsed() >= self.policy.every;
        let checkpoint = if due { self.checkpoint_record(entry.seq, &hash)? } else { None };
        let checkpointed = checkpoint.is_some();
        records.extend(checkpoint);
        match store.commit(changes, &records) {
            Ok(true) => {}
            Ok(false) => return Ok(Committed::Conflict),
            Err(e) => {
                tracing::error!(error = %e, "audit entry could not be written");
                return Err(VaultError::AuditUnavailable);
            }
        }
        head.seq = entry.seq;
        head.hash = hash;
        if checkpointed {
            head.checkpointed_seq = entry.seq;
            head.checkpointed_at = Instant::now();
        }
        Ok(Committed::Done(entry.seq))
    }

    /// Runs `f` with every commit held off (key retirement proves and destroys under it).
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// Signs the current head now (shutdown), if anything was appended since the last checkpoint.
    pub fn checkpoint_now(&self, store: &Store) -> Result<(), VaultError> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if self.disabled || head.seq == 0 || head.seq == head.checkpointed_seq {
            return Ok(());
        }
        if let Some(record) = self.checkpoint_record(head.seq, &head.hash)? {
            store.commit(Changes::none(), &[record]).map_err(|_| VaultError::AuditUnavailable)?;
            head.checkpointed_seq = head.seq;
            head.checkpointed_at = Instant::now();
        }
        Ok(())
    }

    /// Verifies the stored log against `public_key`; on the live log, also that the newest entry is
    /// the head this process appended (catches a truncated tail).
    pub fn verify(&self, store: &Store, public_key: &[u8], live: bool) -> Result<ChainReport, StoreError> {
        let expected_head = self.head();
        // The live log is verified up to the head as it was when verification began (requests
        // keep appending meanwhile); a stored log, to its end.
        let last = if live { expected_head.0 } else { store.last_audit_entry()?.map_or(0, |(seq, _)| seq) };
        let checkpoints: Vec<Checkpoint> = store
            .checkpoints()?
            .iter()
            .filter_map(|c| {
                serde_json::from_slice::<StoredCheckpoint>(c).ok().and_then(|c| c.to_checkpoint())
            })
            .filter(|c| !live || c.seq <= last)
            .collect();
        // After an archival the log starts at `first`, anchored by the signed checkpoint at
        // `first - 1`, which must verify.
        let first = match store.first_audit_seq()? {
            Some(f) => f,
            None => last + 1,
        };
        let mut start_hash = GENESIS;
        if first > 1 {
            let anchor = checkpoints.iter().find(|c| c.seq == first - 1).cloned();
            let ok = anchor.as_ref().is_some_and(|a| {
                khlang_keys::audit_chain::verify_checkpoint(
                    public_key,
                    a.seq,
                    &a.hash,
                    a.time_ms,
                    &a.signature,
                )
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
        let prev_of_split = match store.audit_entries(split - 1).next().transpose()? {
            Some((seq, value)) if seq == split - 1 => split_stored(&value)
                .ok()
                .and_then(|(hash, _)| <[u8; 32]>::try_from(hash).ok())
                .unwrap_or(GENESIS),
            // Missing: the first half reports it.
            _ => GENESIS,
        };
        let to = if live { last } else { u64::MAX };
        let (first, second) = std::thread::scope(|scope| {
            let second = scope.spawn(|| {
                verify_range(
                    store,
                    ChainVerifier::starting_at(public_key, late, split, prev_of_split),
                    split,
                    to,
                )
            });
            let first = verify_range(
                store,
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
        if live && report.first_break.is_none() && reached != expected_head {
            report.first_break = Some(khlang_keys::audit_chain::ChainBreak {
                seq: reached.0 + 1,
                reason: format!(
                    "the log ends at {} but this vault wrote up to {}",
                    reached.0, expected_head.0
                ),
            });
        }
        Ok(report)
    }
}

/// Feeds the stored entries `from..=to` to `v`, stopping at the first break.
fn verify_range<'k>(
    store: &Store,
    mut v: ChainVerifier<'k>,
    from: u64,
    to: u64,
) -> Result<ChainVerifier<'k>, StoreError> {
    for item in store.audit_entries(from) {
        let (seq, value) = item?;
        if seq > to {
            break;
        }
        match split_stored(&value) {
            Ok((hash, json)) => v.entry(seq, embedded_seq(json), json, hash),
            Err(_) => v.entry(seq, None, &[], &[]),
        }
        if v.broken() {
            break;
        }
    }
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
pub fn read_entries(store: &Store) -> impl Iterator<Item = Result<AuditEntry, StoreError>> + '_ {
    store.audit_entries(0).map(|item| {
        let (_, value) = item?;
        let (_, json) = split_stored(&value)?;
        serde_json::from_slice(json).map_err(|_| StoreError::Corrupt("audit entry"))
    })
}

/// The archive of entries up to `last`: the export format (a header, each entry with its chain
/// hash, the checkpoints up to `last`, including the one anchoring its first entry).
pub fn archive_lines<'a>(
    store: &'a Store,
    public_key: Vec<u8>,
    last: u64,
) -> impl Iterator<Item = Result<String, StoreError>> + 'a {
    lines_up_to(store, public_key, last)
}

/// The export format, JSON Lines: a header, every entry with its chain hash, every checkpoint.
pub fn export_lines<'a>(
    store: &'a Store,
    public_key: Vec<u8>,
) -> impl Iterator<Item = Result<String, StoreError>> + 'a {
    lines_up_to(store, public_key, u64::MAX)
}

/// Export lines of the entries and checkpoints up to seq `last`.
fn lines_up_to<'a>(
    store: &'a Store,
    public_key: Vec<u8>,
    last: u64,
) -> impl Iterator<Item = Result<String, StoreError>> + 'a {
    let header = serde_json::json!({"type": "header", "format": "khlang-audit-1", "public_key": hex::encode(&public_key)});
    let entries = store
        .audit_entries(0)
        .take_while(move |item| item.as_ref().map_or(true, |(seq, _)| *seq <= last))
        .map(|item| {
            let (seq, value) = item?;
            let (hash, json) = split_stored(&value)?;
            let json = std::str::from_utf8(json).map_err(|_| StoreError::Corrupt("audit entry"))?;
            Ok(format!(r#"{{"type":"entry","seq":{seq},"hash":"{}","entry":{json}}}"#, hex::encode(hash)))
        });
    let checkpoints = store.checkpoints().map(|cps| {
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
        log.checkpoint_now(&store).unwrap();
        let sequential = |store: &Store| {
            let checkpoints: Vec<Checkpoint> = store
                .checkpoints()
                .unwrap()
                .iter()
                .filter_map(|c| serde_json::from_slice::<StoredCheckpoint>(c).ok()?.to_checkpoint())
                .collect();
            let mut v = ChainVerifier::new(&public_key, checkpoints);
            for item in store.audit_entries(0) {
                let (seq, value) = item.unwrap();
                let (hash, json) = split_stored(&value).unwrap();
                v.entry(seq, embedded_seq(json), json, hash);
            }
            v.finish()
        };
        let intact = log.verify(&store, &public_key, true).unwrap();
        assert_eq!(intact, sequential(&store));
        assert_eq!((intact.entries, intact.first_break.clone()), (N, None));

        let tree = store.vault_tree_for_tests();
        let split = N / 2 + 1;
        for (what, seq) in [
            ("edit", 100),
            ("edit", split - 1),
            ("edit", split),
            ("edit", N - 3),
            ("delete", split - 1),
            ("delete", 4000),
        ] {
            let key = entry_key(seq);
            let original = tree.get(&key).unwrap().unwrap();
            if what == "edit" {
                let mut forged = original.to_vec();
                let at = forged.len() - 40;
                forged[at] ^= 1;
                tree.insert(&key, forged).unwrap();
            } else {
                tree.remove(&key).unwrap();
            }
            let report = log.verify(&store, &public_key, false).unwrap();
            let reference = sequential(&store);
            assert_eq!(report.first_break, reference.first_break, "{what} {seq}");
            assert_eq!(report.last_checkpoint, reference.last_checkpoint, "{what} {seq}");
            assert_eq!(report.first_break.as_ref().map(|b| b.seq), Some(seq), "{what} {seq}: {report:?}");
            tree.insert(&key, original).unwrap();
        }
        // Truncation: the newest entries gone, the checkpoint beyond them remains.
        for seq in N - 5..=N {
            tree.remove(entry_key(seq)).unwrap();
        }
        let report = log.verify(&store, &public_key, false).unwrap();
        assert_eq!(report.first_break, sequential(&store).first_break);
        assert!(report.first_break.unwrap().reason.contains("truncated"));
    }
}
