//! The audit journal: a cheaper durable path for entries that change nothing else (reads, denials,
//! queries). Such an entry is inserted into sled as usual, and also appended to an append-only file
//! that a flusher thread `fdatasync`s once for every group of waiters; the request answers once its
//! entry is in a synced journal, without waiting for a sled flush (which costs far more CPU here).
//!
//! On open, journal entries that sled lost in a crash (inserted but never flushed) are put back,
//! after checking each against the hash chain; then the journal starts afresh. Segments whose
//! entries sled has since flushed are deleted, so the journal stays small.
//!
//! Frame: `len u32 | seq u64 | chain hash (32) | canonical JSON`, big-endian. A torn frame at the
//! end (a crash mid-write) ends the replay; a seq written twice (an append whose sled insert then
//! failed) is taken from its last frame.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

use crate::StoreError;

const DIR: &str = "audit-journal";
/// Waiters one `fdatasync` serves at most, and how long the flusher holds the door for more.
const GROUP_MAX: usize = 256;
const GROUP_WINDOW: std::time::Duration = std::time::Duration::from_micros(300);
/// A segment is closed (and becomes deletable) once it holds this many entries.
const ROLL_ENTRIES: u64 = 10_000;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Flush(format!("audit journal: {e}"))
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
}

struct Inner {
    file: File,
    segments: Vec<Segment>,
    last_appended: u64,
}

type Waiter = (u64, oneshot::Sender<Result<(), String>>);

/// Journaled entries by seq: `(chain hash, canonical JSON)`.
pub type Frames = BTreeMap<u64, ([u8; 32], Vec<u8>)>;

pub struct Journal {
    dir: PathBuf,
    inner: Arc<Mutex<Inner>>,
    synced: Arc<AtomicU64>,
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

impl Journal {
    /// Every frame left in `data_dir`'s journal, by seq (the last frame of a seq wins).
    pub fn read_all(data_dir: &Path) -> Result<Frames, StoreError> {
        let dir = data_dir.join(DIR);
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(out) };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let mut bytes = Vec::new();
            File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io)?;
            let mut at = 0;
            while let Some(len) =
                bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes)
            {
                let Some(frame) = bytes.get(at + 4..at + 4 + len as usize) else { break };
                if frame.len() < 40 {
                    break;
                }
                let seq =
                    u64::from_be_bytes(frame[..8].try_into().map_err(|_| StoreError::Corrupt("journal"))?);
                let hash: [u8; 32] = frame[8..40].try_into().map_err(|_| StoreError::Corrupt("journal"))?;
                out.insert(seq, (hash, frame[40..].to_vec()));
                at += 4 + len as usize;
            }
        }
        Ok(out)
    }

    /// Starts a fresh journal in `data_dir` (call after [`Journal::read_all`] has been replayed and
    /// sled flushed): old segments are removed.
    pub fn start(data_dir: &Path, next_seq: u64) -> Result<Self, StoreError> {
        let dir = data_dir.join(DIR);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io)?;
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = segment_path(&dir, next_seq);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
        let inner = Arc::new(Mutex::new(Inner {
            file,
            segments: vec![Segment { first_seq: next_seq, path }],
            last_appended: next_seq.saturating_sub(1),
        }));
        let synced = Arc::new(AtomicU64::new(next_seq.saturating_sub(1)));
        let (tx, rx) = mpsc::channel::<Waiter>();
        let (flush_inner, flush_synced) = (inner.clone(), synced.clone());
        let thread = std::thread::Builder::new()
            .name("khlang-audit-journal".into())
            .spawn(move || flusher(rx, flush_inner, flush_synced))
            .map_err(io)?;
        Ok(Self { dir, inner, synced, tx: Some(tx), thread: Some(thread) })
    }

    /// Appends an entry (called in seq order, under the audit log's lock). Not yet durable.
    pub fn append(&self, seq: u64, hash: &[u8; 32], canonical: &[u8]) -> Result<(), StoreError> {
        let len =
            u32::try_from(8 + 32 + canonical.len()).map_err(|_| StoreError::Corrupt("journal frame"))?;
        let mut frame = Vec::with_capacity(4 + len as usize);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.extend_from_slice(hash);
        frame.extend_from_slice(canonical);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.file.write_all(&frame).map_err(io)?;
        inner.last_appended = seq;
        Ok(())
    }

    /// Returns once the journal is synced at least up to `seq`.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        if self.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let stopped = || StoreError::Flush("audit journal stopped".into());
        self.tx.as_ref().ok_or_else(stopped)?.send((seq, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(StoreError::Flush)
    }

    /// sled has flushed every entry up to `seq`: start a new segment and delete the ones whose
    /// entries are all at or below it.
    pub fn sled_flushed(&self, seq: u64) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let next = inner.last_appended + 1;
        if inner.segments.last().is_some_and(|s| s.first_seq + ROLL_ENTRIES <= next) {
            // Sync what the current segment holds before leaving it.
            inner.file.sync_data().map_err(io)?;
            self.synced.fetch_max(inner.last_appended, Ordering::AcqRel);
            let path = segment_path(&self.dir, next);
            inner.file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
            inner.segments.push(Segment { first_seq: next, path });
        }
        while inner.segments.len() > 1 && inner.segments[1].first_seq.saturating_sub(1) <= seq {
            let old = inner.segments.remove(0);
            std::fs::remove_file(&old.path).map_err(io)?;
        }
        Ok(())
    }
}

fn flusher(rx: mpsc::Receiver<Waiter>, inner: Arc<Mutex<Inner>>, synced: Arc<AtomicU64>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = std::time::Instant::now() + GROUP_WINDOW;
        while batch.len() < GROUP_MAX {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // Sync a handle of the current segment outside the lock, so appends go on meanwhile.
        let (file, upto) = {
            let inner = inner.lock().unwrap_or_else(|p| p.into_inner());
            (inner.file.try_clone(), inner.last_appended)
        };
        let result = file.and_then(|f| f.sync_data()).map_err(|e| e.to_string());
        if result.is_ok() {
            synced.fetch_max(upto, Ordering::AcqRel);
        }
        for (_, waiter) in batch {
            let _ = waiter.send(result.clone());
        }
    }
}
