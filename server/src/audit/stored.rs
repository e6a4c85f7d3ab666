//! The audit log's records as the store holds them (the signed head, the head's tag, ...), and
//! the witness file: what the checks read before they run.

use super::*;

/// The audit log's records as the store holds them, read before the (synchronous) checks that
/// use them.
#[derive(Debug, Default, Clone)]
pub struct StoredRecords {
    pub(super) signed: Option<Vec<u8>>,
    pub(super) tags: Vec<Vec<u8>>,
}

impl StoredRecords {
    pub async fn read(store: &dyn Storage) -> Result<Self, StoreError> {
        let mut tags = Vec::new();
        for which in [AuditRecord::ChangeTag, AuditRecord::ReadTag] {
            tags.extend(store.audit_record(which).await?);
        }
        Ok(Self { signed: store.audit_record(AuditRecord::SignedHead).await?, tags })
    }
}

/// Puts back into the log's file the entries that changes carried into sled after the file's
/// last entry (a crash lost the file's unsynced tail, or the vault is of the layout that kept the
/// whole log in sled), each checked against the chain; and moves that layout's checkpoints.
/// Returns the new head and the newest checkpoint moved.
pub(super) async fn recover_from_sled(
    store: &dyn Storage,
    file: &dyn AuditFiles,
    head: ChainHead,
) -> Result<(ChainHead, Option<u64>), StoreError> {
    let (mut seq, mut hash) = head;
    let mut recovered = 0u64;
    for (next, value) in store.audit_entries_after(seq).await? {
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
    let checkpoints = store.legacy_checkpoints().await?;
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
        store.remove_legacy_checkpoints().await?;
    }
    Ok(((seq, hash), newest_checkpoint))
}

pub(super) fn cp_seq_of(json: &[u8]) -> Result<u64, StoreError> {
    serde_json::from_slice::<StoredCheckpoint>(json)
        .map(|c| c.seq)
        .map_err(|_| StoreError::Corrupt("checkpoint"))
}

/// Reads a witness file (one checkpoint JSON a line, as the vault appends them).
pub fn read_witness(path: &Path) -> Result<Vec<Checkpoint>, StoreError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::Flush(format!("audit witness {}: {e}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            StoredCheckpoint::parse(l.as_bytes())
                .ok_or_else(|| StoreError::Flush(format!("audit witness line {}: not a checkpoint", i + 1)))
        })
        .collect()
}
