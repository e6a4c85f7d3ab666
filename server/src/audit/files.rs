//! Where the audit log lives: append-only segment files beside the database
//! (`audit/<first entry seq>.log`), not in sled. An audited read must be durable before its
//! plaintext leaves; through sled each entry cost a tree insert, sled's background log writing and
//! a sled flush (measured: auditing took 37% of Get throughput, 24% with mimalloc). Here an entry
//! is one line appended to a memory buffer; a flusher thread writes the buffer and `fdatasync`s
//! once for every group of requests waiting.
//!
//! One text line per item, so a torn tail is recognisable and an officer can read the file:
//! `e <seq> <chain hash, hex> <canonical JSON>` for an entry; signed checkpoints go to their own
//! small file (`audit/checkpoints.log`, lines `c <seq> <checkpoint JSON>`), so verification finds
//! them all without a pass over the entries. After each group of entries it writes, the flusher
//! writes the group's head tag, `m <seq> <HMAC hex>` (see `khlang_keys::audit_chain`), in the same
//! write and sync. Canonical JSON never holds a raw newline (serde_json escapes control characters).
//!
//! A request that changes data carries its entry in its own sled batch (see `audit.rs`), so its
//! entry is appended here as not urgent: synced with the next urgent one, and taken back from sled
//! at open if a crash lost it from the file.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use khlang_keys::audit_chain::{ChainReport, HeadTagger};

use crate::StoreError;
use crate::storage::{AuditRecord, HeadRecorder};

mod archival;
mod port;
use archival::finish_archival;
pub use archival::{FileSink, archive_base, copy_files, restore_file};
pub use port::{AuditFiles, StoredEntries};

/// How the log's files are kept.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Entries per segment file.
    pub segment_entries: u64,
    /// Where every signed checkpoint is also appended and synced (outside the data folder).
    pub witness: Option<PathBuf>,
    /// Where every entry is also streamed, best-effort (a SIEM).
    pub sink: Option<super::sink::SinkTarget>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self { segment_entries: ROLL_ENTRIES, witness: None, sink: None }
    }
}

/// The folder under the data folder.
pub const DIR: &str = "audit";
/// Entries per segment (the default): bounds what a reader starting at a seq skips inside one file.
pub const ROLL_ENTRIES: u64 = 65_536;
/// Segments are zero-filled this far ahead of their end: an `fdatasync` of a write inside the
/// file's length has no size change to journal (measured here: 210 µs instead of 554 µs per sync
/// of a 20 KB append). A file's data ends at its last non-zero byte: a NUL byte inside the data is
/// damage to report, never the end.
const ZERO_AHEAD: u64 = 1 << 20;
/// Entries made durable elsewhere that may wait in memory before the flusher is woken for them.
const LAZY_BACKLOG: u64 = 4096;
/// The checkpoints' file in the folder.
const CHECKPOINTS: &str = "checkpoints.log";
/// The signed account of the entries an archival removed (see `audit::archive_base`).
const ARCHIVE_BASE: &str = "archive-base.json";
/// How long the flusher holds the door for more entries before writing a group. Measured with
/// 64 concurrent readers: 300 µs gave more Get/s than 100 µs or none (fewer, fuller syncs).
const GROUP_WINDOW: Duration = Duration::from_micros(300);

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Flush(format!("audit log: {e}"))
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

/// The segments in `dir`, oldest first, by the first entry seq their names give.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_error(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_error)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some(seq) = name.strip_suffix(".log").and_then(|s| s.parse::<u64>().ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest entry `(seq, hash ‖ JSON)` and the newest checkpoint's JSON, where there are any.
pub type Tail = (Option<(u64, Vec<u8>)>, Option<Vec<u8>>);

/// One parsed line.
pub enum Item {
    /// `(seq, value)`: value is the 32-byte chain hash followed by the canonical JSON; a hash that
    /// does not decode is left out, so the verifier reports the entry as damaged.
    Entry(u64, Vec<u8>),
    Checkpoint(u64, Vec<u8>),
    /// A head tag for entry `seq`; a tag that does not decode is all zeros (it fails to verify).
    Tag(u64, [u8; 32]),
    /// An entry before the seq the reader starts at.
    Skipped(u64),
    /// A line that is neither (an edit): reported by the verifier at the next expected seq.
    Garbled,
}

/// A line, borrowed; an entry's hash still in hex.
enum Line<'a> {
    Entry { seq: u64, hash_hex: &'a [u8], json: &'a [u8] },
    Checkpoint(u64, &'a [u8]),
    Tag(u64, &'a [u8]),
    Garbled,
}

fn split_line(line: &[u8]) -> Line<'_> {
    let mut parts = line.splitn(3, |b| *b == b' ');
    let (Some(kind), Some(seq), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return Line::Garbled;
    };
    let Some(seq) = std::str::from_utf8(seq).ok().and_then(|s| s.parse::<u64>().ok()) else {
        return Line::Garbled;
    };
    match kind {
        b"e" => {
            let at = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
            Line::Entry { seq, hash_hex: &rest[..at], json: rest.get(at + 1..).unwrap_or_default() }
        }
        b"c" => Line::Checkpoint(seq, rest),
        b"m" => Line::Tag(seq, rest),
        _ => Line::Garbled,
    }
}

/// 64 hex digits to 32 bytes (the `hex` crate's general decoder was a tenth of verification).
fn decode_hash(hex: &[u8]) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Parses a line; an entry before `min_seq` is only numbered (`Skipped`), not decoded.
fn parse_line(line: &[u8], min_seq: u64) -> Item {
    match split_line(line) {
        Line::Entry { seq, .. } if seq < min_seq => Item::Skipped(seq),
        Line::Entry { seq, hash_hex, json } => {
            let mut value = Vec::with_capacity(32 + json.len());
            if let Some(hash) = decode_hash(hash_hex) {
                value.extend_from_slice(&hash);
                value.extend_from_slice(json);
            }
            Item::Entry(seq, value)
        }
        Line::Checkpoint(seq, json) => Item::Checkpoint(seq, json.to_vec()),
        Line::Tag(seq, hex) => Item::Tag(seq, decode_hash(hex).unwrap_or_default()),
        Line::Garbled => Item::Garbled,
    }
}

/// Reads the complete lines of the segments, oldest first, from the segment holding `from_seq`.
/// A last line without its newline (being written, or torn by a crash) is not read.
pub struct Reader {
    segments: std::vec::IntoIter<(u64, PathBuf)>,
    current: Option<BufReader<std::io::Take<File>>>,
    line: Vec<u8>,
    min_seq: u64,
}

impl Reader {
    pub fn open(dir: &Path, from_seq: u64) -> Result<Self, StoreError> {
        let all = segments(dir)?;
        // Skip every segment whose successor starts at or before `from_seq`.
        let skip = all.windows(2).take_while(|w| w[1].0 <= from_seq).count();
        let segments: Vec<_> = all.into_iter().skip(skip).collect();
        Ok(Self { min_seq: from_seq, ..Self::over(segments) })
    }

    fn over(files: Vec<(u64, PathBuf)>) -> Self {
        Self { segments: files.into_iter(), current: None, line: Vec::new(), min_seq: 0 }
    }
}

impl Reader {
    /// The next complete line, without its newline.
    fn next_line(&mut self) -> Option<Result<&[u8], StoreError>> {
        loop {
            if self.current.is_none() {
                let (_, path) = self.segments.next()?;
                match File::open(&path).and_then(|f| Ok((data_end(&f)?, f))) {
                    Ok((end, f)) => {
                        use std::io::Read;
                        self.current = Some(BufReader::with_capacity(256 * 1024, f.take(end)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Some(Err(io_error(e))),
                }
            }
            let reader = self.current.as_mut()?;
            self.line.clear();
            match reader.read_until(b'\n', &mut self.line) {
                Ok(_) if self.line.last() == Some(&b'\n') => {
                    self.line.pop();
                    return Some(Ok(&self.line));
                }
                // End of this segment (or an unfinished last line): the next one.
                Ok(_) => self.current = None,
                Err(e) => return Some(Err(io_error(e))),
            }
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Item, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let min_seq = self.min_seq;
        Some(self.next_line()?.map(|line| parse_line(line, min_seq)))
    }
}

/// The seq a garbled line stands for: the one after the previous entry (the verifier then names
/// it as the first bad entry).
fn garbled_seq(prev: Option<u64>, from_seq: u64) -> u64 {
    prev.map_or(from_seq.max(1), |p| p + 1)
}

/// What [`scan_entries`] passes on.
pub enum Scanned<'a> {
    /// An entry; a damaged line comes as the seq after the previous entry with no hash.
    Entry { seq: u64, hash: Option<[u8; 32]>, json: &'a [u8] },
    /// A head tag for entry `seq`.
    Tag { seq: u64, tag: [u8; 32] },
}

/// Calls `f` for every entry (and head tag) from `from_seq` on, oldest first, without copying
/// them (verification); `f` returns `false` to stop.
pub fn scan_entries(
    dir: &Path,
    from_seq: u64,
    mut f: impl FnMut(Scanned<'_>) -> bool,
) -> Result<(), StoreError> {
    let mut reader = Reader::open(dir, from_seq)?;
    let mut prev = None::<u64>;
    while let Some(line) = reader.next_line() {
        let scanned = match split_line(line?) {
            Line::Entry { seq, hash_hex, json } => {
                prev = Some(seq);
                if seq < from_seq {
                    continue;
                }
                Scanned::Entry { seq, hash: decode_hash(hash_hex), json }
            }
            Line::Tag(seq, _) if seq < from_seq => continue,
            Line::Tag(seq, hex) => Scanned::Tag { seq, tag: decode_hash(hex).unwrap_or_default() },
            Line::Checkpoint(..) => continue,
            Line::Garbled => {
                let seq = garbled_seq(prev, from_seq);
                prev = Some(seq);
                if seq < from_seq {
                    continue;
                }
                Scanned::Entry { seq, hash: None, json: &[][..] }
            }
        };
        if !f(scanned) {
            break;
        }
    }
    Ok(())
}

/// Entries `(seq, hash ‖ JSON)` with seq ≥ `from_seq`, oldest first. A garbled line stands in as
/// the seq after the previous entry, with an empty value.
pub fn entries(
    dir: &Path,
    from_seq: u64,
) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + use<> {
    let reader = Reader::open(dir, from_seq);
    let mut prev = None::<u64>;
    let (reader, error) = match reader {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(Err(e))),
    };
    error.into_iter().chain(reader.into_iter().flatten().filter_map(move |item| match item {
        Ok(Item::Entry(seq, value)) => {
            prev = Some(seq);
            (seq >= from_seq).then_some(Ok((seq, value)))
        }
        Ok(Item::Skipped(seq)) => {
            prev = Some(seq);
            None
        }
        Ok(Item::Checkpoint(..) | Item::Tag(..)) => None,
        Ok(Item::Garbled) => {
            let seq = garbled_seq(prev, from_seq);
            prev = Some(seq);
            (seq >= from_seq).then_some(Ok((seq, Vec::new())))
        }
        Err(e) => Some(Err(e)),
    }))
}

/// Every checkpoint's JSON, oldest first.
pub fn checkpoints(dir: &Path) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut out = Vec::new();
    for item in Reader::over(vec![(0, dir.join(CHECKPOINTS))]) {
        if let Item::Checkpoint(_, json) = item? {
            out.push(json);
        }
    }
    Ok(out)
}

fn last_in_segment(path: &Path) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let mut last_entry = None;
    for item in Reader::over(vec![(0, path.to_path_buf())]) {
        if let Item::Entry(seq, value) = item? {
            last_entry = Some((seq, value));
        }
    }
    Ok(last_entry)
}

/// The newest entry (reading segments from the newest back only as far as needed) and the newest
/// checkpoint.
pub fn tail(dir: &Path) -> Result<Tail, StoreError> {
    let mut entry = None;
    for (_, path) in segments(dir)?.iter().rev() {
        entry = last_in_segment(path)?;
        if entry.is_some() {
            break;
        }
    }
    Ok((entry, checkpoints(dir)?.pop()))
}

/// The oldest entry's seq.
pub fn first_seq(dir: &Path) -> Result<Option<u64>, StoreError> {
    entries(dir, 0).next().transpose().map(|e| e.map(|(seq, _)| seq))
}

/// Where a file's data ends: after its last non-zero byte (the zero fill follows it). Reads
/// backwards from the end, so the cost is the fill, not the file.
fn data_end(file: &File) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(at) = chunk.iter().rposition(|b| *b != 0) {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Cuts a torn last line — what follows the last newline, up to the zero fill — and nothing
/// else: a NUL byte or a garbled line before it is damage for verification to report, and the
/// next line goes after every byte of it. Returns where the next line goes and how far the file
/// is zero-filled.
fn cut_torn_tail(path: &Path) -> Result<(u64, u64), StoreError> {
    let bytes = std::fs::read(path).map_err(io_error)?;
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |at| at + 1);
    let keep = bytes[..end].iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
    if keep < end {
        tracing::warn!(bytes = end - keep, "a torn last audit line (unclean stop) removed");
        let file = OpenOptions::new().write(true).open(path).map_err(io_error)?;
        if end == bytes.len() {
            file.set_len(keep as u64).map_err(io_error)?;
        } else {
            file.write_all_at(&vec![0; end - keep], keep as u64).map_err(io_error)?;
        }
        file.sync_all().map_err(io_error)?;
        return Ok((keep as u64, if end == bytes.len() { keep as u64 } else { bytes.len() as u64 }));
    }
    Ok((keep as u64, bytes.len() as u64))
}

/// Opens a segment for writing in place, its torn last line cut: the file, where the next line
/// goes, and how far it is zero-filled.
fn open_segment(path: &Path) -> Result<(File, u64, u64), StoreError> {
    let file = OpenOptions::new()
        .mode(0o600)
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error)?;
    let (offset, zeroed) = cut_torn_tail(path)?;
    Ok((file, offset, zeroed))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error)
}

/// What one drain wrote: the files to sync, the witness lines to send, the newest seq, the tag.
struct Drained {
    file: File,
    checkpoints: Option<File>,
    witness: Vec<u8>,
    signed: Option<Vec<u8>>,
    upto: u64,
    tagged: Option<TaggedHead>,
}

/// What appenders fill and the writer drains.
struct Pending {
    buf: Vec<u8>,
    /// Checkpoint lines, written after the entries they sign.
    checkpoints: Vec<u8>,
    /// The same checkpoints for the witness: one JSON object a line.
    witness: Vec<u8>,
    /// The newest checkpoint appended, recorded in the store once synced.
    newest_checkpoint: Option<Vec<u8>>,
    /// The newest entry appended (in `buf`, or written), and its chain hash.
    last_seq: u64,
    last_hash: [u8; 32],
    /// The newest entry synced: the flusher works while it is behind `last_seq`.
    synced_seq: u64,
    /// Where in `buf` a new segment starts, and its first entry's seq.
    roll: Option<(usize, u64)>,
    segment_entries: u64,
    flusher_idle: bool,
    stop: bool,
}

/// The open segment; its mutex orders writes to the file.
struct Io {
    file: File,
    /// Where the next line goes in `file`, and how far the file is zero-filled.
    offset: u64,
    zeroed: u64,
    checkpoints: File,
}

impl Io {
    /// Writes `bytes` at the end of the data, zero-filling ahead first when they would pass it.
    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let end = self.offset + bytes.len() as u64;
        if end > self.zeroed {
            let to = end + ZERO_AHEAD;
            let zeros =
                vec![0u8; usize::try_from(to - self.zeroed).map_err(|_| StoreError::Corrupt("audit fill"))?];
            self.file.write_all_at(&zeros, self.zeroed).map_err(io_error)?;
            self.zeroed = to;
        }
        self.file.write_all_at(bytes, self.offset).map_err(io_error)?;
        self.offset = end;
        Ok(())
    }

    fn switch_to(&mut self, path: &Path) -> Result<(), StoreError> {
        (self.file, self.offset, self.zeroed) = open_segment(path)?;
        Ok(())
    }
}

/// A group's tagged head: what the flusher records in the store once the group is synced.
pub type TaggedHead = (u64, [u8; 32], [u8; 32]);

/// Encodes a tagged head for the store: `seq u64 ‖ hash ‖ tag`.
pub fn encode_tagged(head: &TaggedHead) -> Vec<u8> {
    [head.0.to_be_bytes().as_slice(), &head.1, &head.2].concat()
}

pub fn decode_tagged(bytes: &[u8]) -> Option<TaggedHead> {
    if bytes.len() != 72 {
        return None;
    }
    let seq = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    Some((seq, bytes[8..40].try_into().ok()?, bytes[40..].try_into().ok()?))
}

/// Where the head tags of groups go besides the file, and the witness of checkpoints.
#[derive(Default)]
struct Sealing {
    tagger: Option<HeadTagger>,
    recorder: Option<HeadRecorder>,
}

struct Shared {
    dir: PathBuf,
    roll_entries: u64,
    sealing: Mutex<Sealing>,
    /// A file outside the data folder that every signed checkpoint is appended to and synced.
    witness: Option<Mutex<File>>,
    pending: Mutex<Pending>,
    io: Mutex<Io>,
    wake: Condvar,
    /// The newest entry on disk, or why the log stopped: once a write or sync fails, every later
    /// append and wait fails too (fail closed until a restart cuts any torn line).
    synced: watch::Sender<Result<u64, String>>,
    failed: AtomicBool,
    /// Fault drill (tests): appends fail as a full disk would make them.
    inject: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Writes what is buffered to the file (rolling to a new segment where the buffer says);
    /// returns the files to sync (the checkpoints' only if written to) and the newest seq written.
    fn drain(&self) -> Result<Drained, StoreError> {
        let mut io = lock(&self.io);
        let (mut buf, checkpoints, witness, signed, roll, upto, hash) = {
            let mut p = lock(&self.pending);
            (
                std::mem::take(&mut p.buf),
                std::mem::take(&mut p.checkpoints),
                std::mem::take(&mut p.witness),
                p.newest_checkpoint.take(),
                p.roll.take(),
                p.last_seq,
                p.last_hash,
            )
        };
        // The group's head tag goes in the same write as its entries.
        let tagged = match &lock(&self.sealing).tagger {
            Some(tagger) if !buf.is_empty() => {
                let tag = tagger.tag(upto, &hash);
                buf.extend_from_slice(format!("m {upto} {}\n", hex::encode(tag)).as_bytes());
                Some((upto, hash, tag))
            }
            _ => None,
        };
        let result = (|| {
            let rest = match roll {
                Some((at, first_seq)) => {
                    io.write(&buf[..at])?;
                    // Leaving a segment: it is complete on disk before the next one exists.
                    io.file.sync_data().map_err(io_error)?;
                    io.switch_to(&segment_path(&self.dir, first_seq))?;
                    sync_dir(&self.dir)?;
                    &buf[at..]
                }
                None => &buf[..],
            };
            io.write(rest)?;
            let checkpoints_file = if checkpoints.is_empty() {
                None
            } else {
                io.checkpoints.write_all(&checkpoints).map_err(io_error)?;
                Some(io.checkpoints.try_clone().map_err(io_error)?)
            };
            Ok((io.file.try_clone().map_err(io_error)?, checkpoints_file))
        })();
        match result {
            Ok((file, checkpoints_file)) => {
                Ok(Drained { file, checkpoints: checkpoints_file, witness, signed, upto, tagged })
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&self, e: StoreError) -> StoreError {
        tracing::error!(error = %e, "the audit log cannot be written; requests fail until a restart");
        self.failed.store(true, Ordering::SeqCst);
        let _previous = self.synced.send_replace(Err(e.to_string()));
        e
    }

    fn sync(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let Drained { file, checkpoints, witness, signed, upto, tagged } = self.drain()?;
        // Entries first: a checkpoint on disk without its entry would read as a truncation.
        file.sync_data().map_err(|e| self.fail(io_error(e)))?;
        if let Some(checkpoints) = checkpoints {
            checkpoints.sync_data().map_err(|e| self.fail(io_error(e)))?;
        }
        if let (Some(out), false) = (&self.witness, witness.is_empty()) {
            // A witness that cannot be written fails the log closed, as the log's own files do:
            // the operator asked for every checkpoint to leave the folder.
            let mut out = lock(out);
            out.write_all(&witness)
                .and_then(|()| out.sync_data())
                .map_err(|e| self.fail(StoreError::Flush(format!("audit witness: {e}"))))?;
        }
        if let Some(recorder) = &lock(&self.sealing).recorder {
            // After the sync: the store never names a head the file could still lose.
            if let Some(head) = tagged {
                recorder.record(AuditRecord::ReadTag, &encode_tagged(&head)).map_err(|e| self.fail(e))?;
            }
            if let Some(signed) = signed {
                recorder.record(AuditRecord::SignedHead, &signed).map_err(|e| self.fail(e))?;
            }
        }
        {
            let mut p = lock(&self.pending);
            p.synced_seq = p.synced_seq.max(upto);
        }
        self.synced.send_if_modified(|s| match s {
            Ok(old) if *old < upto => {
                *old = upto;
                true
            }
            _ => false,
        });
        crate::metrics::audit_sync(started.elapsed());
        Ok(())
    }
}

fn flusher(shared: Arc<Shared>) {
    loop {
        {
            let mut p = lock(&shared.pending);
            while p.synced_seq >= p.last_seq && !p.stop {
                p.flusher_idle = true;
                p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.synced_seq >= p.last_seq
                && p.buf.is_empty()
                && p.checkpoints.is_empty()
                && p.witness.is_empty()
            {
                return;
            }
        }
        std::thread::sleep(GROUP_WINDOW);
        if shared.sync().is_err() {
            return;
        }
    }
}

/// The appending side of the log.
pub struct AuditFile {
    shared: Arc<Shared>,
    synced: watch::Receiver<Result<u64, String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for AuditFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditFile").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

impl Drop for AuditFile {
    /// Writes and syncs what is left, then stops the flusher.
    fn drop(&mut self) {
        let _ = self.shared.sync();
        lock(&self.shared.pending).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl AuditFile {
    /// Opens (or creates) the log in `data_dir/audit`, cutting torn last lines. Returns the log and
    /// its newest entry and checkpoint.
    pub fn open(data_dir: &Path, options: &FileOptions) -> Result<(Self, Tail), StoreError> {
        let dir = data_dir.join(DIR);
        finish_archival(&dir)?;
        std::fs::create_dir_all(&dir).map_err(io_error)?;
        let checkpoints_path = dir.join(CHECKPOINTS);
        if checkpoints_path.exists() {
            cut_torn_tail(&checkpoints_path)?;
        }
        // A log without segments starts at entry 1 (an archival always leaves one).
        let (first, path) = segments(&dir)?.pop().unwrap_or_else(|| (1, segment_path(&dir, 1)));
        let (file, offset, zeroed) = open_segment(&path)?;
        let (last, checkpoint) = tail(&dir)?;
        let last_seq = last.as_ref().map_or(0, |(s, _)| *s);
        let last_hash = last
            .as_ref()
            .and_then(|(_, v)| v.get(..32))
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .unwrap_or([0; 32]);
        let witness = match &options.witness {
            Some(path) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| StoreError::Flush(format!("audit witness {}: {e}", path.display())))?,
            )),
            None => None,
        };
        let segment_entries = (last_seq + 1).saturating_sub(first);
        let checkpoints = OpenOptions::new()
            .mode(0o600)
            .create(true)
            .append(true)
            .open(checkpoints_path)
            .map_err(io_error)?;
        sync_dir(&dir)?;
        let (tx, rx) = watch::channel(Ok(last_seq));
        let shared = Arc::new(Shared {
            dir,
            roll_entries: options.segment_entries.max(1),
            sealing: Mutex::default(),
            witness,
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(64 * 1024),
                checkpoints: Vec::new(),
                witness: Vec::new(),
                newest_checkpoint: None,
                last_seq,
                last_hash,
                synced_seq: last_seq,
                roll: None,
                segment_entries,
                flusher_idle: false,
                stop: false,
            }),
            io: Mutex::new(Io { file, offset, zeroed, checkpoints }),
            wake: Condvar::new(),
            synced: tx,
            failed: AtomicBool::new(false),
            inject: AtomicBool::new(false),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("khlang-audit".into())
            .spawn(move || flusher(for_thread))
            .map_err(io_error)?;
        Ok((Self { shared, synced: rx, thread: Some(thread) }, (last, checkpoint)))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// From now on each group written ends with its head tag, recorded in the store once synced.
    pub fn set_sealing(&self, tagger: Option<HeadTagger>, recorder: Option<HeadRecorder>) {
        *lock(&self.shared.sealing) = Sealing { tagger, recorder };
    }

    /// Fails if an append would (injected failure, or the log failed earlier).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        if self.shared.inject.load(Ordering::Relaxed) {
            return Err(StoreError::Flush("injected write failure".into()));
        }
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Flush("the audit log failed earlier".into()));
        }
        Ok(())
    }

    fn push(
        &self,
        line: impl FnOnce(&mut Pending),
        entry_seq: Option<u64>,
        urgent: bool,
    ) -> Result<(), StoreError> {
        self.check_writable()?;
        let mut p = lock(&self.shared.pending);
        if let Some(seq) = entry_seq {
            if p.segment_entries >= self.shared.roll_entries && p.roll.is_none() {
                p.roll = Some((p.buf.len(), seq));
                p.segment_entries = 0;
            }
            p.segment_entries += 1;
            p.last_seq = seq;
        }
        line(&mut p);
        let backlog = p.last_seq.saturating_sub(p.synced_seq);
        if p.flusher_idle && (urgent || backlog >= LAZY_BACKLOG) {
            p.flusher_idle = false;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Appends entry `seq` (call in seq order). Durable once [`AuditFile::durable`] says so. An
    /// entry made durable elsewhere (in sled, with its change) is not `urgent`: it is synced with
    /// the next urgent one, or once `LAZY_BACKLOG` entries wait.
    pub fn append_entry(
        &self,
        seq: u64,
        hash: &[u8; 32],
        canonical: &[u8],
        urgent: bool,
    ) -> Result<(), StoreError> {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(hash, &mut hex).map_err(|_| StoreError::Corrupt("audit hash"))?;
        self.push(
            |p| {
                p.last_hash = *hash;
                let buf = &mut p.buf;
                buf.extend_from_slice(b"e ");
                buf.extend_from_slice(seq.to_string().as_bytes());
                buf.push(b' ');
                buf.extend_from_slice(&hex);
                buf.push(b' ');
                buf.extend_from_slice(canonical);
                buf.push(b'\n');
            },
            Some(seq),
            urgent,
        )
    }

    /// Appends a checkpoint (after the entry it signs); the witness gets it after its sync.
    pub fn append_checkpoint(&self, seq: u64, json: &[u8]) -> Result<(), StoreError> {
        let witnessed = self.shared.witness.is_some();
        self.push(
            |p| {
                if witnessed {
                    p.witness.extend_from_slice(json);
                    p.witness.push(b'\n');
                }
                p.newest_checkpoint = Some(json.to_vec());
                let buf = &mut p.checkpoints;
                buf.extend_from_slice(b"c ");
                buf.extend_from_slice(seq.to_string().as_bytes());
                buf.push(b' ');
                buf.extend_from_slice(json);
                buf.push(b'\n');
            },
            None,
            false,
        )
    }

    /// The newest entry synced to the file.
    pub fn synced_seq(&self) -> u64 {
        lock(&self.shared.pending).synced_seq
    }

    /// Writes everything appended so far to the file (no sync), so a reader of the file sees it.
    pub fn write_through(&self) -> Result<(), StoreError> {
        self.check_writable()?;
        self.shared.drain().map(|_| ())
    }

    /// Writes and syncs everything appended so far, now (shutdown, operator actions).
    pub fn sync_now(&self) -> Result<(), StoreError> {
        self.check_writable()?;
        self.shared.sync()
    }

    /// Returns once entry `seq` is on disk (shares the flusher's syncs with concurrent requests).
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.synced.clone();
        loop {
            match &*rx.borrow_and_update() {
                Ok(on_disk) if *on_disk >= seq => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(StoreError::Flush(e.clone())),
            }
            rx.changed().await.map_err(|_| StoreError::Flush("audit log stopped".into()))?;
        }
    }

    /// The seq on disk as it moves (or why the log failed), for the SIEM sink.
    pub fn durable_mark(&self) -> tokio::sync::watch::Receiver<Result<u64, String>> {
        self.synced.clone()
    }

    /// Fault drill for tests: make every following append fail (or succeed again).
    #[cfg(any(test, feature = "test-util"))]
    pub fn inject_failure(&self, fail: bool) {
        self.shared.inject.store(fail, Ordering::Relaxed);
    }
}
