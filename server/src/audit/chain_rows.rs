//! A shared chain's rows (PostgreSQL) as the log's storage port: the store's reader gives the
//! rows; reading them as a chain, verifying them and archiving through them are the audit
//! layer's, here, so the storage layer implements no audit trait.

use std::path::Path;

use khlang_keys::audit_chain::{ChainReport, HeadTagger};

use super::files::{AuditFiles, Scanned, StoredEntries};
use super::{ChainHead, ChainSource, VerifyWith, split_stored, verify_log};
use crate::StoreError;
use crate::storage::{ChainReader, HeadRecorder};

/// The chain's rows, read through the store's reader.
pub(crate) struct ChainRows(pub ChainReader);

fn appended_elsewhere() -> StoreError {
    StoreError::Backend("the shared audit chain is appended through the store, not its reader".into())
}

impl ChainSource for ChainRows {
    fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.0.ends()?.1.map_or(0, |h| h.seq))
    }

    fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.0.checkpoints()
    }

    fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.0.ends()?.0)
    }

    fn entry_hash(&self, seq: u64) -> Result<Option<[u8; 32]>, StoreError> {
        match self.0.pages(seq).next().transpose()? {
            Some((s, value, _)) if s == seq => {
                Ok(split_stored(&value).ok().and_then(|(h, _)| <[u8; 32]>::try_from(h).ok()))
            }
            _ => Ok(None),
        }
    }

    fn scan(&self, from: u64, f: &mut dyn FnMut(Scanned<'_>) -> bool) -> Result<(), StoreError> {
        let mut expected = from.max(1);
        for row in self.0.pages(from) {
            let (seq, value, tag) = row?;
            // A missing row is a damaged entry: the verifier sees the gap and names it.
            while expected < seq {
                if !f(Scanned::Entry { seq: expected, hash: None, json: &[] }) {
                    return Ok(());
                }
                expected += 1;
            }
            expected = seq + 1;
            let (hash, json) = match split_stored(&value) {
                Ok((hash, json)) => (<[u8; 32]>::try_from(hash).ok(), json),
                Err(_) => (None, &[][..]),
            };
            if !f(Scanned::Entry { seq, hash, json }) {
                return Ok(());
            }
            if let Some(tag) = tag {
                let tag = <[u8; 32]>::try_from(tag.as_slice()).unwrap_or_default();
                if !f(Scanned::Tag { seq, tag }) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl AuditFiles for ChainRows {
    fn append_entry(&self, _: u64, _: &[u8; 32], _: &[u8], _: bool) -> Result<(), StoreError> {
        Err(appended_elsewhere())
    }

    fn append_checkpoint(&self, _: u64, _: &[u8]) -> Result<(), StoreError> {
        Err(appended_elsewhere())
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn synced_seq(&self) -> u64 {
        0
    }

    fn write_through(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn sync_now(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Every batch is durable when its transaction commits.
    async fn durable(&self, _: u64) -> Result<(), StoreError> {
        Ok(())
    }

    fn set_sealing(&self, _: Option<HeadTagger>, _: Option<HeadRecorder>) {}

    fn remove_archived(&self, last: u64, base: &[u8], from: u64) -> Result<(), StoreError> {
        self.0.remove_archived(last, base, from)
    }

    fn archive_base(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.archive_base()
    }

    #[cfg(any(test, feature = "test-util"))]
    fn inject_failure(&self, _: bool) {}

    fn entries(&self, from: u64) -> StoredEntries<'_> {
        Box::new(self.0.pages(from).map(|r| r.map(|(seq, value, _)| (seq, value))))
    }

    fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        ChainSource::checkpoints(self)
    }

    fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        ChainSource::first_seq(self)
    }

    fn verify(&self, public_key: &[u8], with: &VerifyWith<'_>) -> Result<ChainReport, StoreError> {
        verify_log(self, public_key, with)
    }

    fn stored_head(&self) -> Result<Option<ChainHead>, StoreError> {
        Ok(self.0.ends()?.1.map(|h| (h.seq, h.hash)))
    }

    fn location(&self) -> &Path {
        self.0.location()
    }
}
