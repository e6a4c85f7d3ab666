//! Which records the access log says exist. Every put, delete and erasure is an entry committed
//! with its change, so the log is a ledger of the store's records: a record the store lacks though
//! its put has no later delete vanished outside the vault, and one the store holds that the log
//! never put (or deleted since) appeared outside it. The store is untrusted for integrity; the log
//! is chained and signed.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use super::{AuditLog, Rpc};
use crate::StoreError;

/// The fields of an entry the ledger reads; every other is ignored.
#[derive(Deserialize)]
struct RecordEvent {
    rpc: String,
    outcome: crate::Outcome,
    #[serde(default)]
    record_id: String,
    #[serde(default)]
    subject: String,
}

/// The ledger's state as of an archival's last entry, carried in the signed archive base
/// (`audit::archive_base`), sorted so the same log always gives the same bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct LedgerBase {
    live: Vec<(String, u64)>,
    of_subject: Vec<(String, Vec<String>)>,
    gone: Vec<(String, u64)>,
}

/// Where the log leaves each record it names.
#[derive(Debug, Default)]
pub struct RecordLedger {
    /// Records put and not deleted since: id → the put's seq.
    live: HashMap<String, u64>,
    /// Live records by subject blind index (hex): an erasure names the subject, not its records.
    of_subject: HashMap<String, Vec<String>>,
    /// Records deleted or erased: id → the seq that removed them.
    gone: HashMap<String, u64>,
    /// Records named by entries read after the first pass (in flux while the store was walked).
    touched: Option<HashSet<String>>,
    /// The log was read from its first entry (nothing archived away): a record it never names
    /// was never put by this vault.
    complete: bool,
}

/// How the store's records compare with the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Completeness {
    /// Records in the store that the log accounts for.
    pub matched: u64,
    /// Records older than the log's first kept entry (archived): not judged.
    pub before_log: u64,
    /// Records put or removed while the store was walked: not judged.
    pub in_flux: u64,
    /// Put, never deleted, and not in the store.
    pub vanished: u64,
    /// In the store without a put, or after their delete or erasure.
    pub appeared: u64,
    /// The first findings, by record id and entry (never a value).
    pub named: Vec<String>,
    /// Every vanished record's id (up to [`MAX_LOST`]): reads of them answer `DataLoss`.
    pub vanished_ids: Vec<String>,
}

/// Vanished records remembered by id at most.
pub const MAX_LOST: usize = 100_000;

impl Completeness {
    pub fn holds(&self) -> bool {
        self.vanished == 0 && self.appeared == 0
    }
}

/// Findings named at most (the rest are counted).
const NAMED_FINDINGS: usize = 20;

impl RecordLedger {
    /// What the entries noted so far say, to carry past an archival.
    pub fn base(&self) -> LedgerBase {
        fn sorted<V: Clone>(m: &HashMap<String, V>) -> Vec<(String, V)> {
            let mut v: Vec<(String, V)> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            v
        }
        LedgerBase {
            live: sorted(&self.live),
            of_subject: sorted(&self.of_subject),
            gone: sorted(&self.gone),
        }
    }

    /// Starts from the base of the entries an archival removed (before any kept entry is noted).
    pub fn absorb(&mut self, base: LedgerBase) {
        self.live.extend(base.live);
        self.of_subject.extend(base.of_subject);
        self.gone.extend(base.gone);
    }

    pub(super) fn note(&mut self, seq: u64, value: &[u8]) {
        let Some(e) = value.get(32..).and_then(|json| serde_json::from_slice::<RecordEvent>(json).ok())
        else {
            return;
        };
        if e.outcome != crate::Outcome::Ok {
            return;
        }
        let rpc = e.rpc.as_str();
        if rpc == Rpc::PutRecord.as_str() && !e.record_id.is_empty() {
            if let Some(t) = &mut self.touched {
                t.insert(e.record_id.clone());
            }
            self.gone.remove(&e.record_id);
            self.live.insert(e.record_id.clone(), seq);
            self.of_subject.entry(e.subject).or_default().push(e.record_id);
        } else if rpc == Rpc::DeleteRecord.as_str() && !e.record_id.is_empty() {
            self.remove(&e.record_id, seq);
        } else if rpc == Rpc::EraseSubject.as_str() {
            for id in self.of_subject.remove(&e.subject).unwrap_or_default() {
                self.remove(&id, seq);
            }
        }
    }

    fn remove(&mut self, id: &str, seq: u64) {
        if let Some(t) = &mut self.touched {
            t.insert(id.to_owned());
        }
        self.live.remove(id);
        self.gone.insert(id.to_owned(), seq);
    }

    /// Judges one record the store holds (`id`), and forgets it: what is left live afterwards
    /// vanished.
    fn judge(&mut self, id: &str, found: &mut Completeness) {
        let live = self.live.remove(id);
        if self.touched.as_ref().is_some_and(|t| t.contains(id)) {
            found.in_flux += 1;
        } else if live.is_some() {
            found.matched += 1;
        } else if let Some(seq) = self.gone.get(id) {
            found.appeared += 1;
            name(found, format!("record {id}: in the store, though entry {seq} removed it"));
        } else if self.complete {
            found.appeared += 1;
            name(found, format!("record {id}: in the store, though no entry put it"));
        } else {
            found.before_log += 1;
        }
    }

    /// After every stored record was judged: the records the log still holds live vanished
    /// (unless an entry since the walk began names them).
    fn finish(self, found: &mut Completeness) {
        let touched = self.touched.unwrap_or_default();
        let mut left: Vec<(u64, String)> = self
            .live
            .into_iter()
            .filter(|(id, _)| !touched.contains(id))
            .map(|(id, seq)| (seq, id))
            .collect();
        left.sort();
        found.vanished += left.len() as u64;
        for (seq, id) in left {
            name(found, format!("record {id}: put by entry {seq}, never deleted, and not in the store"));
            if found.vanished_ids.len() < MAX_LOST {
                found.vanished_ids.push(id);
            }
        }
    }
}

fn name(found: &mut Completeness, what: String) {
    if found.named.len() < NAMED_FINDINGS {
        found.named.push(what);
    }
}

/// How long the records check waits for the log's file to reach the store's head.
const FILE_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

impl AuditLog {
    /// Notes the log's entries after `after`, waiting (bounded by [`FILE_CATCH_UP`]) until the file
    /// holds `until`; with `stop_past`, entries past `until` are left unread. Returns the last seq
    /// noted.
    async fn note_until(
        &self,
        ledger: &mut RecordLedger,
        after: u64,
        until: u64,
        stop_past: bool,
    ) -> Result<u64, StoreError> {
        let mut read = after;
        let deadline = std::time::Instant::now() + FILE_CATCH_UP;
        loop {
            self.file.write_through()?;
            for item in self.file.entries(read + 1) {
                let (seq, value) = item?;
                if stop_past && seq > until {
                    break;
                }
                if seq <= read {
                    continue;
                }
                ledger.note(seq, &value);
                read = seq;
            }
            if read >= until || std::time::Instant::now() >= deadline {
                return Ok(read);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The store's records against the log (see the module doc). Read in three steps so that a
    /// vault serving meanwhile is judged fairly: the log up to the store's chain head, the
    /// store's records, then the entries since, whose records are in flux and not judged.
    pub async fn check_records(
        &self,
        store: &dyn crate::storage::Storage,
    ) -> Result<Completeness, StoreError> {
        // On sled the file may hold entries past the store's head whose change a crash took,
        // and an entry reaches the file a moment after its change reaches the store.
        let head = store.audit_head().await?.map_or(0, |h| h.seq);
        let base = self.current_base()?;
        let complete = base.is_some() || self.file.first_seq()?.is_none_or(|f| f <= 1);
        let mut ledger = RecordLedger { complete, ..Default::default() };
        if let Some(base) = base {
            ledger.absorb(base.records);
        }
        let read = self.note_until(&mut ledger, 0, head, true).await?;
        let mut stored = Vec::new();
        let mut cursor = crate::storage::Cursor::default();
        loop {
            let batch = store.walk(crate::storage::KeySpace::Records, &cursor, 1024).await?;
            let Some(last) = batch.last() else { break };
            cursor = last.cursor.clone();
            stored.extend(batch.into_iter().map(|w| w.record_id));
        }
        // Every record the walk saw was committed with its entry at or before the store's head
        // now: the entries since the first read are read up to it at least, and the records
        // they name are in flux.
        ledger.touched = Some(HashSet::new());
        let until = store.audit_head().await?.map_or(0, |h| h.seq);
        self.note_until(&mut ledger, read, until, false).await?;
        let mut found = Completeness::default();
        for id in &stored {
            ledger.judge(id, &mut found);
        }
        ledger.finish(&mut found);
        Ok(found)
    }
}
