//! What the audit log says was last done at each authority key, so a value that was genuine once
//! and is put back after a later audited change is refused (see `storage::authority`). An archived
//! log's first part is carried by its signed base (`audit::archive_base`).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
/// What a migration entry's `writes` holds: every value its commit tagged (too many to name).
pub const MIGRATED_ALL: &str = "*";

/// The newest audited change at one authority key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Latest {
    Written { write: u64, seq: u64 },
    Removed { seq: u64 },
}

impl Latest {
    fn seq(self) -> u64 {
        match self {
            Self::Written { seq, .. } | Self::Removed { seq } => seq,
        }
    }
}

/// What the audit log says was last done at each authority key (its entries' `write` and
/// `writes`), so a value that was genuine once — a role before its demotion, a withdrawn consent,
/// a revoked token, older regulations — put back in the store is refused: its tag is right, but
/// its write is not the newest the log names for its key.
#[derive(Debug, Default)]
pub struct WriteIndex {
    latest: HashMap<String, Latest>,
    /// Writes of the one-time migration (each tagged every value it rewrote).
    migrations: HashSet<u64>,
    /// Every entry up to this seq has been read from the log (own commits are noted beside).
    upto: u64,
    /// The log starts at its first entry (nothing archived): a key it never names was never
    /// written by an audited change.
    complete: bool,
    pub(super) newest_regulations: Option<u64>,
    pub(super) built: bool,
    /// Writes being committed now: a reader may see the new value a moment before the commit
    /// returns and the log's entry is noted.
    pending: HashMap<String, Vec<u64>>,
    pending_removals: HashMap<String, usize>,
    /// KEK versions the log's rotations made (version → seq) and those its retirements ended:
    /// the store must hold every one made and not retired (see `vault::kek_check`).
    pub keks_made: BTreeMap<u32, u64>,
    pub keks_retired: HashSet<u32>,
}

/// The index's state as of an archival's last entry, carried in the signed archive base (sorted,
/// so the same log always gives the same bytes).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexBase {
    latest: Vec<(String, Latest)>,
    migrations: Vec<u64>,
    newest_regulations: Option<u64>,
    keks_made: BTreeMap<u32, u64>,
    keks_retired: Vec<u32>,
}

/// The part of an audit entry the index reads (the rest of the JSON is skipped).
#[derive(serde::Deserialize)]
struct EntryWrites {
    #[serde(default)]
    write: u64,
    #[serde(default)]
    writes: Vec<String>,
    #[serde(default)]
    rpc: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    key_versions: String,
}

impl WriteIndex {
    /// Notes one entry's writes. Out of order is fine: each key keeps its newest seq.
    pub fn note(&mut self, seq: u64, write: u64, writes: &[String]) {
        if write == 0 {
            return;
        }
        for name in writes {
            if name == MIGRATED_ALL {
                self.migrations.insert(write);
                continue;
            }
            let (key, next) = match name.strip_prefix('-') {
                Some(key) => (key, Latest::Removed { seq }),
                None => (name.as_str(), Latest::Written { write, seq }),
            };
            if let Some(serial) = key.strip_prefix("regulations:").and_then(|s| s.parse::<u64>().ok()) {
                self.newest_regulations = self.newest_regulations.max(Some(serial));
            }
            match self.latest.get(key) {
                Some(had) if had.seq() >= seq => {}
                _ => {
                    self.latest.insert(key.to_owned(), next);
                }
            }
        }
    }

    /// Notes a stored entry (`hash ‖ canonical JSON`) read from the log at `seq`; a line that does
    /// not parse is the verifier's to report.
    pub fn note_stored(&mut self, seq: u64, value: &[u8]) {
        if let Some(json) = value.get(32..)
            && let Ok(e) = serde_json::from_slice::<EntryWrites>(json)
        {
            self.note(seq, e.write, &e.writes);
            // Rotations and retirements: which KEK versions must exist.
            if e.outcome == "Ok"
                && let Some(v) = e.key_versions.strip_prefix("kek=").and_then(|v| v.parse::<u32>().ok())
            {
                match e.rpc.as_str() {
                    "RotateKey" => {
                        self.keks_made.insert(v, seq);
                    }
                    "RetireKey" => {
                        self.keks_retired.insert(v);
                    }
                    _ => {}
                }
            }
        }
        self.upto = self.upto.max(seq);
    }

    /// An entry read but not noted (its change never reached the store).
    pub fn skip(&mut self, seq: u64) {
        self.upto = self.upto.max(seq);
    }

    /// The log has been read from its first entry (`first`) to its end: judgements start.
    pub fn finish_build(&mut self, first: Option<u64>) {
        self.complete = first.is_none_or(|f| f <= 1);
        self.built = true;
    }

    /// The log has been read from its first kept entry, and the signed base of what was archived
    /// before it (`None`: archived by a version that kept none) has been merged: judgements start.
    pub fn finish_build_on(&mut self, first: Option<u64>, base: Option<IndexBase>) {
        self.finish_build(first);
        if let Some(base) = base {
            self.absorb(base);
            self.complete = true;
        }
    }

    /// What the entries read so far say, to carry past an archival (see `audit::archive_base`).
    pub fn base(&self) -> IndexBase {
        let mut latest: Vec<(String, Latest)> = self.latest.iter().map(|(k, v)| (k.clone(), *v)).collect();
        latest.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut migrations: Vec<u64> = self.migrations.iter().copied().collect();
        migrations.sort_unstable();
        let mut keks_retired: Vec<u32> = self.keks_retired.iter().copied().collect();
        keks_retired.sort_unstable();
        IndexBase {
            latest,
            migrations,
            newest_regulations: self.newest_regulations,
            keks_made: self.keks_made.clone(),
            keks_retired,
        }
    }

    /// Merges a base of older entries: a key's newest change wins, whichever was read first.
    pub fn absorb(&mut self, base: IndexBase) {
        for (key, old) in base.latest {
            match self.latest.get(&key) {
                Some(had) if had.seq() >= old.seq() => {}
                _ => {
                    self.latest.insert(key, old);
                }
            }
        }
        self.migrations.extend(base.migrations);
        self.newest_regulations = self.newest_regulations.max(base.newest_regulations);
        for (version, seq) in base.keks_made {
            self.keks_made.entry(version).or_insert(seq);
        }
        self.keks_retired.extend(base.keks_retired);
    }

    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// A change that writes `writes` as `write` is about to commit.
    pub fn begin(&mut self, write: u64, writes: &[String]) {
        for name in writes {
            match name.strip_prefix('-') {
                Some(key) => *self.pending_removals.entry(key.to_owned()).or_default() += 1,
                None => self.pending.entry(name.clone()).or_default().push(write),
            }
        }
    }

    /// That change committed as entry `seq` (`None`: it did not).
    pub fn finish(&mut self, write: u64, writes: &[String], seq: Option<u64>) {
        for name in writes {
            match name.strip_prefix('-') {
                Some(key) => {
                    if let Some(n) = self.pending_removals.get_mut(key) {
                        *n -= 1;
                        if *n == 0 {
                            self.pending_removals.remove(key);
                        }
                    }
                }
                None => {
                    if let Some(w) = self.pending.get_mut(name.as_str()) {
                        w.retain(|x| *x != write);
                        if w.is_empty() {
                            self.pending.remove(name.as_str());
                        }
                    }
                }
            }
        }
        if let Some(seq) = seq {
            self.note(seq, write, writes);
        }
    }

    /// Whether a value of `name` tagged as `write` is the newest the log names.
    pub(super) fn judge(&self, name: &str, write: u64) -> Result<(), &'static str> {
        if !self.built || self.pending.get(name).is_some_and(|w| w.contains(&write)) {
            return Ok(());
        }
        match self.latest.get(name) {
            Some(Latest::Written { write: newest, .. }) if *newest == write => Ok(()),
            Some(Latest::Written { .. }) => {
                Err("an older value, replaced by a later audited change, was put back")
            }
            Some(Latest::Removed { .. }) => Err("a value an audited change removed was put back"),
            None if self.migrations.contains(&write) || !self.complete => Ok(()),
            None => Err("no audited change wrote it"),
        }
    }

    /// Whether the log says a value of `name` exists (so its absence is a deletion outside the vault).
    pub(super) fn expects(&self, name: &str) -> bool {
        self.built
            && !self.pending_removals.contains_key(name)
            && matches!(self.latest.get(name), Some(Latest::Written { .. }))
    }
}
