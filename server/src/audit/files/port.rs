//! The log's storage port: what the audit log needs of wherever its entries live (the files
//! beside sled, or a shared chain's tables).

use super::*;

/// Entries as read back: `(seq, hash ‖ canonical JSON)`, oldest first.
pub type StoredEntries<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + Send + 'a>;

/// Where the audit log keeps its entries and checkpoints: appended in seq order, durable up to a
/// seq, read back and verified. The segment files above are the implementation beside sled; a
/// backend that keeps entries in its own tables implements the same. Appends are synchronous (they
/// fill a buffer under the log's order; durability is awaited apart, by [`AuditFiles::durable`]).
#[async_trait::async_trait]
pub trait AuditFiles: Send + Sync {
    /// Appends entry `seq` (`urgent`: its request waits for its sync; otherwise it is durable
    /// elsewhere, in the change's commit, and synced with the next urgent one).
    fn append_entry(
        &self,
        seq: u64,
        hash: &[u8; 32],
        canonical: &[u8],
        urgent: bool,
    ) -> Result<(), StoreError>;
    fn append_checkpoint(&self, seq: u64, json: &[u8]) -> Result<(), StoreError>;
    /// Fails if an append would (a failed write earlier: fail closed).
    fn check_writable(&self) -> Result<(), StoreError>;
    /// The newest seq on disk.
    fn synced_seq(&self) -> u64;
    /// Writes what waits in memory (no sync), for a reader.
    fn write_through(&self) -> Result<(), StoreError>;
    fn sync_now(&self) -> Result<(), StoreError>;
    /// Returns once entry `seq` is on disk.
    async fn durable(&self, seq: u64) -> Result<(), StoreError>;
    /// The keys that tag each synced group, and where the synced heads are recorded (`None`: sealed).
    fn set_sealing(&self, tagger: Option<HeadTagger>, recorder: Option<HeadRecorder>);
    /// Removes entries up to `last` and the checkpoints before it (archival).
    /// `base`: the signed account of them (see `audit::archive_base`), kept in their place.
    /// `from`: the first kept entry `base` was built on (checked unchanged before anything goes).
    fn remove_archived(&self, last: u64, base: &[u8], from: u64) -> Result<(), StoreError>;
    /// The base the last archival kept (`None`: none, or nothing archived).
    fn archive_base(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Fault drill for tests: every following append fails (or succeeds again).
    #[cfg(any(test, feature = "test-util"))]
    fn inject_failure(&self, fail: bool);

    /// Entries from `from` on, oldest first: `(seq, hash ‖ canonical JSON)`.
    fn entries(&self, from: u64) -> StoredEntries<'_>;
    /// Every signed checkpoint kept, oldest first (JSON).
    fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError>;
    /// The seq of the oldest entry kept; `None` for an empty log.
    fn first_seq(&self) -> Result<Option<u64>, StoreError>;
    /// Verifies every entry and proof kept (the files: two threads, split at the middle).
    fn verify(
        &self,
        public_key: &[u8],
        with: &crate::audit::VerifyWith<'_>,
    ) -> Result<ChainReport, StoreError>;
    /// The head the store records beside the entries, when it keeps one (a shared chain's head
    /// row): what a live verification must reach.
    fn stored_head(&self) -> Result<Option<crate::audit::ChainHead>, StoreError> {
        Ok(None)
    }
    /// Where an operator finds them (the files' folder), for messages and tools.
    fn location(&self) -> &Path;
    /// Syncs, then hands every file of the log to `each` ([`copy_files`]), for a backup taken
    /// with commits held off. A database's rows are backed up with the database.
    fn backup_files(&self, each: &mut FileSink<'_>) -> Result<(), StoreError> {
        let _ = each;
        Err(StoreError::NotSupported(
            "this audit log lives in the database: back it up with the database's own tools",
        ))
    }
}

#[async_trait::async_trait]
impl AuditFiles for AuditFile {
    fn append_entry(
        &self,
        seq: u64,
        hash: &[u8; 32],
        canonical: &[u8],
        urgent: bool,
    ) -> Result<(), StoreError> {
        AuditFile::append_entry(self, seq, hash, canonical, urgent)
    }

    fn append_checkpoint(&self, seq: u64, json: &[u8]) -> Result<(), StoreError> {
        AuditFile::append_checkpoint(self, seq, json)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        AuditFile::check_writable(self)
    }

    fn synced_seq(&self) -> u64 {
        AuditFile::synced_seq(self)
    }

    fn write_through(&self) -> Result<(), StoreError> {
        AuditFile::write_through(self)
    }

    fn sync_now(&self) -> Result<(), StoreError> {
        AuditFile::sync_now(self)
    }

    async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        AuditFile::durable(self, seq).await
    }

    fn set_sealing(&self, tagger: Option<HeadTagger>, recorder: Option<HeadRecorder>) {
        AuditFile::set_sealing(self, tagger, recorder);
    }

    fn remove_archived(&self, last: u64, base: &[u8], from: u64) -> Result<(), StoreError> {
        AuditFile::remove_archived(self, last, base, from)
    }

    fn archive_base(&self) -> Result<Option<Vec<u8>>, StoreError> {
        archive_base(self.dir())
    }

    #[cfg(any(test, feature = "test-util"))]
    fn inject_failure(&self, fail: bool) {
        AuditFile::inject_failure(self, fail);
    }

    fn entries(&self, from: u64) -> StoredEntries<'_> {
        Box::new(entries(self.dir(), from))
    }

    fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        checkpoints(self.dir())
    }

    fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        first_seq(self.dir())
    }

    fn verify(
        &self,
        public_key: &[u8],
        with: &crate::audit::VerifyWith<'_>,
    ) -> Result<ChainReport, StoreError> {
        crate::audit::verify_dir(self.dir(), public_key, with)
    }

    fn location(&self) -> &Path {
        self.dir()
    }

    fn backup_files(&self, each: &mut FileSink<'_>) -> Result<(), StoreError> {
        AuditFile::sync_now(self)?;
        copy_files(self.dir(), each)
    }
}
