//! A sled database being filled from a backup's snapshot.

use super::*;

/// A database being restored from a snapshot ([`SledStore::restore_into`]).
pub struct SledRestore {
    pub(super) db: sled::Db,
    pub(super) trees: Vec<(&'static str, sled::Tree)>,
    pub(super) count: u64,
    pub(super) dir: std::path::PathBuf,
}

impl SledRestore {
    pub fn put(&mut self, entry: RawEntry) -> Result<(), StoreError> {
        let Some((_, tree)) = self.trees.iter().find(|(name, _)| *name == entry.space) else {
            return Err(StoreError::Corrupt("backup (an unknown key space)"));
        };
        tree.insert(entry.key, entry.value)?;
        self.count += 1;
        Ok(())
    }

    /// Makes the ids it gives start at `ids_from`, flushes, and returns how many entries it holds.
    pub fn finish(self, ids_from: u64) -> Result<u64, StoreError> {
        // sled cannot be told where its ids start: the store adds this floor to them (written
        // after the snapshot's own meta, which may hold an older floor).
        let Some((_, meta)) = self.trees.iter().find(|(name, _)| *name == "meta") else {
            return Err(StoreError::Corrupt("restore (no meta tree)"));
        };
        meta.insert(META_ID_FLOOR, &ids_from.to_be_bytes())?;
        self.db.flush()?;
        tighten(&self.dir)?;
        Ok(self.count)
    }
}
