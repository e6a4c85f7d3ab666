//! An archival removes the log's first entries, and with them what they said: which write of each
//! authority value is the newest (`storage::write_index`) and which records exist (`ledger`).
//! Without it a genuine value written before the archive point and put back later would be judged
//! by its tag alone, and records older than the archive not at all. So each archival keeps a
//! *base*: the index's and the ledger's state as of its last entry, tagged under the authority key
//! (space [`SPACE_ARCHIVE_BASE`], key: that last seq, write: the write id of the `ArchiveAudit`
//! entry that names it `archive-base:<last>`), stored in the same rename (files) or transaction
//! (a shared chain) that removes the entries.
//!
//! At unseal the kept log names the base's write (its entry comes after the archived ones, so it
//! is never archived with them): a base that is missing, edited, from another archival or another
//! vault stops the vault from opening (`DataLoss`). A log archived by a version that kept no base
//! names none: its older values are judged by their tag alone, and the vault logs that it is so.

use khlang_keys::AuthorityTagger;
use serde::{Deserialize, Serialize};

use super::AuditLog;
use super::ledger::{LedgerBase, RecordLedger};
use super::lock;
use crate::storage::write_index::{IndexBase, WriteIndex};
use crate::{StoreError, VaultError};

pub use crate::storage::authority::SPACE_ARCHIVE_BASE;

/// What the `ArchiveAudit` entry's `writes` names for the base of an archival up to `last`.
pub fn base_name(last: u64) -> String {
    format!("{SPACE_ARCHIVE_BASE}:{last}")
}

/// The log's account of entries `..=last`, as the archival that removed them left it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ArchiveBase {
    pub last: u64,
    pub authority: IndexBase,
    pub records: LedgerBase,
}

/// Stored as `HMAC (32 bytes) ‖ JSON`.
const TAG_LEN: usize = 32;

fn missing(last: u64, why: &'static str) -> StoreError {
    let what = base_name(last);
    tracing::error!(value = %what, why, "the archived log's signed base fails its check: the vault does not open on it");
    StoreError::Unauthentic { what, why }
}

impl AuditLog {
    /// The base of what was archived before the log's first kept entry, checked: `named` are the
    /// write ids the kept log gives `archive-base:<first - 1>` (see the module doc; more than one
    /// when two nodes' archivals to the same entry raced and one was refused at its removal).
    /// `None`: nothing was archived, or it was archived by a version that kept no base.
    pub(crate) fn archived_base(
        &self,
        first: Option<u64>,
        named: &[u64],
        tagger: &AuthorityTagger,
        accept_unbased: Option<u64>,
    ) -> Result<Option<ArchiveBase>, StoreError> {
        let Some(last) = first.filter(|f| *f > 1).map(|f| f - 1) else { return Ok(None) };
        if named.is_empty() {
            // No kept entry names a base: archived by a version that kept none — or the log's
            // front was cut outside the vault (to a later signed checkpoint) to hide a change.
            // Only the operator can tell; by default the vault does not open.
            if accept_unbased != Some(last + 1) {
                let what = format!("audit log from entry {}", last + 1);
                tracing::error!(
                    first_kept = last + 1,
                    "the audit log starts at entry {} and no kept entry names a signed archive base: entries before it were removed outside an archival, or archived by a version that kept no base; if the latter, start with --accept-unbased-log {}",
                    last + 1,
                    last + 1
                );
                return Err(StoreError::Unauthentic {
                    what,
                    why: "entries before it were removed with no signed base (an archival by an older version: start with --accept-unbased-log and that entry)",
                });
            }
            tracing::warn!(
                first_kept = last + 1,
                "accepted (--accept-unbased-log): authority values and records older than the log's first kept entry are judged by their tags alone"
            );
            return Ok(None);
        }
        let Some(stored) = self.file.archive_base()? else {
            return Err(missing(last, "the log names it, and it is not there"));
        };
        let (mac, json) = stored.split_at_checked(TAG_LEN).ok_or_else(|| missing(last, "it is cut short"))?;
        if !named
            .iter()
            .any(|write| tagger.verify(SPACE_ARCHIVE_BASE, &last.to_be_bytes(), *write, json, mac))
        {
            return Err(missing(
                last,
                "its tag does not match (edited, from another archival or another vault)",
            ));
        }
        let base: ArchiveBase =
            serde_json::from_slice(json).map_err(|_| missing(last, "it does not decode"))?;
        if base.last != last {
            return Err(missing(last, "it accounts for other entries"));
        }
        Ok(Some(base))
    }

    /// The base the kept log names for what was archived before it.
    pub(crate) fn current_base(&self) -> Result<Option<ArchiveBase>, StoreError> {
        let tagger = self.authority.get().ok_or(StoreError::Sealed)?;
        let first = self.file.first_seq()?;
        let named = self.base_writes(first)?;
        // An unbased log was judged by the unseal (refused, or accepted by the operator); the
        // front cannot move while the vault runs except by its own archival, which names a base.
        self.archived_base(first, &named, &tagger, first)
    }

    /// The write ids the kept entries give the base of what was archived before `first`, read
    /// from the log itself (on a shared chain a node's index may lag another node's archival);
    /// nothing to read when nothing was archived.
    pub(crate) fn base_writes(&self, first: Option<u64>) -> Result<Vec<u64>, StoreError> {
        let Some(f) = first.filter(|f| *f > 1) else { return Ok(Vec::new()) };
        let name = base_name(f - 1);
        #[derive(Deserialize)]
        struct Named {
            #[serde(default)]
            write: u64,
            #[serde(default)]
            writes: Vec<String>,
        }
        let mut found = Vec::new();
        for item in self.file.entries(0) {
            let (_, value) = item?;
            let Some(json) = value.get(32..) else { continue };
            // Most entries do not name it: no parse for them.
            if !std::str::from_utf8(json).is_ok_and(|j| j.contains(&name)) {
                continue;
            }
            if let Ok(e) = serde_json::from_slice::<Named>(json)
                && e.writes.contains(&name)
            {
                found.push(e.write);
            }
        }
        Ok(found)
    }

    /// The signed base for an archival of entries `..=last`: the current base (if the log was
    /// archived before) with the entries from the first kept one to `last` noted on it, tagged as
    /// `write` (the id the archival's entry will carry).
    pub fn prepare_archival(&self, last: u64, write: u64) -> Result<Vec<u8>, VaultError> {
        let tagger = self
            .authority
            .get()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        let mut index = WriteIndex::default();
        let mut ledger = RecordLedger::default();
        if let Some(old) = self.current_base()? {
            index.absorb(old.authority);
            ledger.absorb(old.records);
        }
        for item in self.file.entries(0) {
            let (seq, value) = item?;
            if seq > last {
                break;
            }
            index.note_stored(seq, &value);
            ledger.note(seq, &value);
        }
        let base = ArchiveBase { last, authority: index.base(), records: ledger.base() };
        let json = serde_json::to_vec(&base).map_err(|_| StoreError::Corrupt("archive base"))?;
        let mac = tagger.tag(SPACE_ARCHIVE_BASE, &last.to_be_bytes(), write, &json);
        Ok([mac.as_slice(), &json].concat())
    }

    /// Removes entries `..=last` (archived) and the checkpoints before `last`, with commits held
    /// off; the checkpoint at `last` stays and anchors the rest, and `base` (from
    /// [`AuditLog::prepare_archival`]) takes their place.
    /// `from`: the first kept entry the base was built on; if another archival moved it since
    /// (another node, on a shared chain), nothing is removed.
    pub fn remove_archived(&self, last: u64, base: &[u8], from: u64) -> Result<(), StoreError> {
        let _head = lock(&self.head);
        self.file.remove_archived(last, base, from)
    }
}
