//! Files that leave or enter the log's folder as a whole: an archival's swap of the folder, and a
//! backup's copy and restore.

use super::*;

/// Takes each file of a backup: its name and its data.
pub type FileSink<'a> = dyn FnMut(&str, Vec<u8>) -> Result<(), StoreError> + 'a;

/// Whether `name` is one of the log's own files: a segment (`<20 digits>.log`) or the checkpoints.
fn is_log_file(name: &str) -> bool {
    name == CHECKPOINTS
        || name == ARCHIVE_BASE
        || name.strip_suffix(".log").is_some_and(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
}

/// Every file of the log in `dir` with its data (the zero fill left out): segments oldest first,
/// then the checkpoints. A backup's copy, taken after a sync with commits held off; a group the
/// flusher is writing meanwhile is at most a torn last line, which the restored log cuts at open.
pub fn copy_files(dir: &Path, each: &mut FileSink<'_>) -> Result<(), StoreError> {
    let mut paths: Vec<PathBuf> = segments(dir)?.into_iter().map(|(_, p)| p).collect();
    paths.push(dir.join(CHECKPOINTS));
    paths.push(dir.join(ARCHIVE_BASE));
    for path in paths {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let mut bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(e)),
        };
        bytes.truncate(bytes.iter().rposition(|b| *b != 0).map_or(0, |at| at + 1));
        each(name, bytes)?;
    }
    Ok(())
}

/// Writes a chunk of a backup's file into a new log's folder (`data_dir/audit`), 0600 and synced:
/// the `first` chunk creates the file (refused if it exists), the others append. Refuses a name
/// that is not one of the log's files, so a backup cannot place a file anywhere else.
pub fn restore_file(data_dir: &Path, name: &str, bytes: &[u8], first: bool) -> Result<(), StoreError> {
    if !is_log_file(name) {
        return Err(StoreError::Corrupt("backup (an audit file name)"));
    }
    let dir = data_dir.join(DIR);
    std::fs::create_dir_all(&dir).map_err(io_error)?;
    let mut file = OpenOptions::new()
        .mode(0o600)
        .append(true)
        .create_new(first)
        .open(dir.join(name))
        .map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    sync_dir(&dir)
}

/// Completes or undoes an archival a crash interrupted (see [`AuditFile::remove_archived`]): the
/// new folder is complete (synced) before the old one is moved aside, so it replaces a missing
/// folder; otherwise it, and any folder moved aside, are left-overs.
/// The signed base of an archived log (`None`: nothing was archived, or by a version that wrote
/// none).
pub fn archive_base(dir: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(dir.join(ARCHIVE_BASE)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

pub(super) fn finish_archival(dir: &Path) -> Result<(), StoreError> {
    let (staging, old) = (dir.with_extension("new"), dir.with_extension("old"));
    if !dir.exists() {
        if staging.exists() {
            std::fs::rename(&staging, dir).map_err(io_error)?;
        } else if old.exists() {
            std::fs::rename(&old, dir).map_err(io_error)?;
        }
    }
    for leftover in [staging, old] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover).map_err(io_error)?;
        }
    }
    Ok(())
}

impl AuditFile {
    /// Removes entries `..=last` and checkpoints before `last` (archived; the checkpoint at `last`
    /// stays: it anchors what remains). Commits must be held off; the kept lines are written to a
    /// new folder first, which then replaces the old one. `base` (the signed account of what
    /// was archived, see `audit::archive_base`) goes in the new folder, so it and the entries it
    /// stands for replace the old ones in one rename.
    pub fn remove_archived(&self, last: u64, base: &[u8], from: u64) -> Result<(), StoreError> {
        self.sync_now()?;
        // One process holds the folder; still, the base must be built on what is here.
        if first_seq(&self.shared.dir)?.unwrap_or(1) != from {
            return Err(StoreError::NotSupported(
                "the log's first entry moved since the archive base was built",
            ));
        }
        let mut io = lock(&self.shared.io);
        let dir = &self.shared.dir;
        let staging = dir.with_extension("new");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io_error)?;
        }
        std::fs::create_dir_all(&staging).map_err(io_error)?;
        let mut out: Option<(File, u64)> = None;
        for item in Reader::open(dir, last + 1)? {
            let (seq, value) = match item? {
                Item::Entry(seq, value) if seq > last => (seq, value),
                // Tags are not carried over: the archiving vault signs what it keeps.
                Item::Entry(..) | Item::Skipped(_) | Item::Tag(..) => continue,
                _ => return Err(StoreError::Corrupt("audit line")),
            };
            if value.len() < 32 {
                return Err(StoreError::Corrupt("audit entry"));
            }
            if out.as_ref().is_none_or(|(_, n)| *n >= self.shared.roll_entries) {
                if let Some((file, _)) = out.take() {
                    file.sync_all().map_err(io_error)?;
                }
                out = Some((File::create(segment_path(&staging, seq)).map_err(io_error)?, 0));
            }
            if let Some((file, n)) = out.as_mut() {
                let mut line = format!("e {seq} {} ", hex::encode(&value[..32])).into_bytes();
                line.extend_from_slice(&value[32..]);
                line.push(b'\n');
                file.write_all(&line).map_err(io_error)?;
                *n += 1;
            }
        }
        if out.is_none() {
            // Nothing after `last`: an empty segment where the next entry goes.
            out = Some((File::create(segment_path(&staging, last + 1)).map_err(io_error)?, 0));
        }
        if let Some((file, _)) = out {
            file.sync_all().map_err(io_error)?;
        }
        let mut kept = File::create(staging.join(CHECKPOINTS)).map_err(io_error)?;
        for json in checkpoints(dir)? {
            let seq = serde_json::from_slice::<serde_json::Value>(&json)
                .ok()
                .and_then(|v| v["seq"].as_u64())
                .ok_or(StoreError::Corrupt("checkpoint"))?;
            if seq >= last {
                kept.write_all(format!("c {seq} ").as_bytes()).map_err(io_error)?;
                kept.write_all(&json).map_err(io_error)?;
                kept.write_all(b"\n").map_err(io_error)?;
            }
        }
        kept.sync_all().map_err(io_error)?;
        let mut based = File::create(staging.join(ARCHIVE_BASE)).map_err(io_error)?;
        based.write_all(base).map_err(io_error)?;
        based.sync_all().map_err(io_error)?;
        sync_dir(&staging)?;
        let old = dir.with_extension("old");
        std::fs::rename(dir, &old).map_err(io_error)?;
        std::fs::rename(&staging, dir).map_err(io_error)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        std::fs::remove_dir_all(&old).map_err(io_error)?;
        // Appends go on in the newest of the new segments.
        let mut p = lock(&self.shared.pending);
        let (first, path) =
            segments(dir)?.pop().unwrap_or((p.last_seq + 1, segment_path(dir, p.last_seq + 1)));
        io.switch_to(&path)?;
        io.checkpoints =
            OpenOptions::new().create(true).append(true).open(dir.join(CHECKPOINTS)).map_err(io_error)?;
        p.segment_entries = (p.last_seq + 1).saturating_sub(first);
        Ok(())
    }
}
