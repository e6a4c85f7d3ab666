//! Verifying a log wherever it is kept (segment files, a database's rows): the chain, its
//! checkpoints and tags, the store's records and a witness.

use super::*;

/// What a verification checks beyond the chain and the checkpoints file.
#[derive(Default)]
pub struct VerifyWith<'a> {
    /// The live log: verify up to this head, and that the log reaches it.
    pub expected_head: Option<ChainHead>,
    /// Check head tags (the vault's own verification).
    pub tagger: Option<&'a HeadTagger>,
    /// Signed heads recorded elsewhere (the store, a witness).
    pub checkpoints: Vec<Checkpoint>,
    /// Heads known genuine (tagged records, the head in memory, witnessed heads).
    pub known_heads: Vec<ChainHead>,
    /// Start after this signed head (its entry's stored hash is known to match).
    pub start: Option<Checkpoint>,
}

/// What a verification reads of a log, wherever it is kept (segment files, a database's rows).
pub trait ChainSource: Sync {
    /// The newest entry's seq (0: none).
    fn last_seq(&self) -> Result<u64, StoreError>;
    /// Every signed checkpoint kept, oldest first (JSON).
    fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError>;
    fn first_seq(&self) -> Result<Option<u64>, StoreError>;
    /// The chain hash stored with entry `seq`.
    fn entry_hash(&self, seq: u64) -> Result<Option<[u8; 32]>, StoreError>;
    /// Calls `f` for every entry and head tag from `from` on, oldest first, until it returns `false`.
    fn scan(&self, from: u64, f: &mut dyn FnMut(Scanned<'_>) -> bool) -> Result<(), StoreError>;
}

/// The segment files of one folder.
pub(crate) struct Dir<'a>(&'a Path);

impl ChainSource for Dir<'_> {
    fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(files::tail(self.0)?.0.map_or(0, |(seq, _)| seq))
    }

    fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        files::checkpoints(self.0)
    }

    fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        files::first_seq(self.0)
    }

    fn entry_hash(&self, seq: u64) -> Result<Option<[u8; 32]>, StoreError> {
        entry_hash_in(self.0, seq)
    }

    fn scan(&self, from: u64, f: &mut dyn FnMut(Scanned<'_>) -> bool) -> Result<(), StoreError> {
        files::scan_entries(self.0, from, f)
    }
}

/// Verifies the log in `dir`; with `expected_head`, only up to it, and that it ends there.
pub fn verify_dir(dir: &Path, public_key: &[u8], with: &VerifyWith<'_>) -> Result<ChainReport, StoreError> {
    verify_log(&Dir(dir), public_key, with)
}

/// Verifies the log `src` holds; with `expected_head`, only up to it, and that it ends there.
pub fn verify_log(
    src: &dyn ChainSource,
    public_key: &[u8],
    with: &VerifyWith<'_>,
) -> Result<ChainReport, StoreError> {
    let live = with.expected_head.is_some();
    // The live log is verified up to the head as it was when verification began (requests
    // keep appending meanwhile); a stored log, to its end.
    let last = match with.expected_head {
        Some((seq, _)) => seq,
        None => src.last_seq()?,
    };
    // Checkpoints the file gained after the live head was taken are left for the next time; the
    // caller's proofs all precede it, so one beyond the end means entries were cut.
    let mut checkpoints: Vec<Checkpoint> = src
        .checkpoints()?
        .iter()
        .filter_map(|c| StoredCheckpoint::parse(c))
        .filter(|c| !live || c.seq <= last)
        .chain(with.checkpoints.iter().cloned())
        .collect();
    checkpoints.sort_by_key(|c| c.seq);
    checkpoints.dedup();
    let known: Vec<ChainHead> = with.known_heads.clone();
    // Start: after a signed head the caller vouches for, after the anchor of an archival (the log
    // then starts at `first`, anchored by the signed checkpoint at `first - 1`, which must
    // verify), or at entry 1.
    let mut first = src.first_seq()?.unwrap_or(last + 1);
    let mut start_hash = GENESIS;
    let mut last_cp = Some(0);
    if let Some(s) = &with.start {
        first = s.seq + 1;
        start_hash = s.hash;
        last_cp = Some(s.seq);
    } else if first > 1 {
        let anchor = checkpoints.iter().find(|c| c.seq == first - 1).cloned();
        match anchor {
            Some(a) if verify_checkpoint(public_key, &a) => {
                start_hash = a.hash;
                last_cp = Some(a.seq);
            }
            _ => {
                return Ok(ChainReport {
                    first_break: Some(ChainBreak {
                        seq: first - 1,
                        reason: format!(
                            "entries before {first} are gone and no valid signed checkpoint at {} anchors the rest",
                            first - 1
                        ),
                    }),
                    ..ChainReport::default()
                });
            }
        }
    }
    let checkpoints: Vec<Checkpoint> = checkpoints.into_iter().filter(|c| c.seq >= first).collect();
    let known: Vec<ChainHead> = known.into_iter().filter(|h| h.0 >= first).collect();
    // Two halves on two threads, each reading and hashing its own range: every link is
    // checked against the hash stored before it, so the halves check what one pass would.
    let split = if last >= first + 4096 { first + (last - first) / 2 } else { last + 1 };
    let (early, late): (Vec<Checkpoint>, Vec<Checkpoint>) =
        checkpoints.into_iter().partition(|c| c.seq < split);
    let (known_early, known_late): (Vec<ChainHead>, Vec<ChainHead>) =
        known.into_iter().partition(|h| h.0 < split);
    let last_cp_early = early.last().map(|c| c.seq).or(last_cp);
    let prev_of_split =
        if split > first { src.entry_hash(split - 1)?.unwrap_or(GENESIS) } else { start_hash };
    let to = if live { last } else { u64::MAX };
    let make =
        |cps: Vec<Checkpoint>, heads: Vec<ChainHead>, seq: u64, prev: [u8; 32], last_cp: Option<u64>| {
            let v = ChainVerifier::starting_at(public_key, cps, seq, prev, last_cp).with_known_heads(heads);
            match with.tagger {
                Some(t) => v.with_tagger(t),
                None => v,
            }
        };
    let (first_part, second) = std::thread::scope(|scope| {
        let late_v =
            make(late.clone(), known_late.clone(), split, prev_of_split, last_cp_early).unproven_start();
        let second = scope.spawn(|| verify_range(src, late_v, split, to));
        let first_part =
            verify_range(src, make(early, known_early, first, start_hash, last_cp), first, split - 1);
        (first_part, second.join())
    });
    let second = second.map_err(|_| StoreError::Corrupt("audit verification thread"))??;
    let first_part = first_part?;
    // A first half that ended past a break: one pass would have skipped to the next carried-
    // forward break, so the second half is read again that way.
    let second = if first_part.is_skipping() && split <= last {
        let v = make(late, known_late, split, prev_of_split, last_cp_early).unproven_start().skipping();
        verify_range(src, v, split, to)?
    } else {
        second
    };
    let reached = if second.head().0 >= split { second.head() } else { first_part.head() };
    let mut report = join_reports(first_part.finish_part(split - 1), second.finish());
    if let Some(expected_head) = with.expected_head
        && report.uncarried.is_none()
        && reached != expected_head
    {
        let reason = format!("the log ends at {} but this vault wrote up to {}", reached.0, expected_head.0);
        add_break(&mut report, ChainBreak { seq: reached.0 + 1, reason });
    }
    Ok(report)
}

/// Feeds the stored entries and tags `from..=to` to `v`.
pub(crate) fn verify_range<'k>(
    src: &dyn ChainSource,
    mut v: ChainVerifier<'k>,
    from: u64,
    to: u64,
) -> Result<ChainVerifier<'k>, StoreError> {
    src.scan(from, &mut |item| {
        match item {
            Scanned::Entry { seq, .. } if seq > to => return false,
            Scanned::Entry { seq, hash: Some(hash), json } => v.entry(seq, embedded_seq(json), json, &hash),
            Scanned::Entry { seq, hash: None, .. } => v.entry(seq, None, &[], &[]),
            Scanned::Tag { seq, .. } if seq > to => return false,
            Scanned::Tag { seq, tag } => v.tag(seq, &tag),
        }
        true
    })?;
    Ok(v)
}
