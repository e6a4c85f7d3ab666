//! The log's integrity procedures: the unseal-time tail check, carrying a break forward and
//! its acceptance, and verification with the store's records and a witness.

use super::*;

impl AuditLog {
    /// Accepts the carried-forward break whose `AuditBreak` entry is `entry` (the operator's
    /// `--accept-audit-break`): recorded in the log, and data requests are served again.
    pub async fn accept_break(&self, store: &dyn Storage, entry: u64) -> Result<(), VaultError> {
        let _procedure = self.procedure.lock().await;
        let broken = lock(&self.integrity).broken.clone();
        match &broken {
            Some(b) if b.entry == entry => {
                let mut e = notice_entry(Rpc::AcceptAuditBreak);
                e.reason = format!(
                    "the operator accepted the break carried forward at {entry} (entries {} to {}: {})",
                    b.damaged_from, b.damaged_to, b.reason
                );
                self.append_notice(store, e).await?;
                store.remove_audit_record(AuditRecord::Break).await?;
                store.flush_now().await?;
                lock(&self.integrity).broken = None;
                tracing::warn!(entry, "audit break accepted by the operator");
                Ok(())
            }
            Some(b) => Err(VaultError::FailedPrecondition(format!(
                "--accept-audit-break {entry} names no open break; the open one is carried forward at entry {}",
                b.entry
            ))),
            None => Err(VaultError::FailedPrecondition(format!(
                "--accept-audit-break {entry}: the audit log has no open break"
            ))),
        }
    }

    pub fn state(&self) -> LogState {
        match &lock(&self.integrity).broken {
            Some(b) => LogState::Broken(b.clone()),
            None => LogState::Intact,
        }
    }

    /// Verifies what was on disk at open, from the newest signed head the store recorded (or
    /// from the start when that does not hold), with every proof the vault has.
    pub(super) fn check_tail(
        &self,
        records: &StoredRecords,
        public_key: &[u8],
        tagger: &HeadTagger,
        opened: ChainHead,
    ) -> Result<TailFinding, VaultError> {
        let proofs = self.stored_proofs(records, tagger)?;
        let start = match &proofs.signed {
            Some(a)
                if verify_checkpoint(public_key, a) && entry_hash(&*self.file, a.seq)? == Some(a.hash) =>
            {
                Some(a.clone())
            }
            _ => None,
        };
        let mut report = self.file.verify(
            public_key,
            &VerifyWith {
                expected_head: Some(opened),
                tagger: Some(tagger),
                checkpoints: proofs.checkpoints(),
                known_heads: proofs.tagged.clone(),
                start: start.clone(),
            },
        )?;
        if let Some(b) = proofs.tamper.clone() {
            add_break(&mut report, b);
        }
        // Witnessed heads before the log's first entry were archived (the archive holds them).
        let first = self.file.first_seq()?.unwrap_or(1);
        let before = proofs.witnessed_before(start.as_ref().map_or(0, |s| s.seq));
        for w in before.iter().filter(|w| w.seq >= first) {
            if entry_hash(&*self.file, w.seq)? != Some(w.hash) {
                let reason =
                    format!("the witness holds a signed head at {} that this log does not contain", w.seq);
                add_break(&mut report, ChainBreak { seq: w.seq, reason });
            }
        }
        if let Some(b) = witnessed_beyond(&proofs, opened.0) {
            add_break(&mut report, b);
        }
        if report.uncarried.is_some() {
            let anchor = proofs.newest_signed(public_key);
            report.last_entry = report.last_entry.max(opened.0).max(proofs.max_seq());
            return Ok(TailFinding::Damaged { report, anchor });
        }
        if report.proven < opened.0 {
            return Ok(TailFinding::Unproven { from: report.proven + 1, to: opened.0 });
        }
        Ok(TailFinding::Sound)
    }

    /// The proofs kept outside the segment files: the store's records and the witness.
    pub(super) fn stored_proofs(
        &self,
        records: &StoredRecords,
        tagger: &HeadTagger,
    ) -> Result<Proofs, StoreError> {
        let mut proofs = Proofs::default();
        if let Some(json) = &records.signed {
            match StoredCheckpoint::parse(json) {
                Some(cp) => proofs.signed = Some(cp),
                None => proofs.tamper_at(1, "the store's record of the last signed head is unreadable"),
            }
        }
        for bytes in &records.tags {
            {
                match decode_tagged(bytes) {
                    Some((seq, hash, tag)) if tagger.verify(seq, &hash, &tag) => {
                        proofs.tagged.push((seq, hash))
                    }
                    Some((seq, ..)) => {
                        proofs.tamper_at(seq, "the store's tagged head does not verify (tampered)")
                    }
                    None => proofs.tamper_at(1, "the store's tagged head is unreadable"),
                }
            }
        }
        if let Some(path) = &self.witness
            && path.exists()
        {
            proofs.witness = read_witness(path)?;
        }
        if let Some(path) = &self.node_witness
            && path.exists()
        {
            proofs.witness.extend(read_witness(path)?);
            proofs.witness.sort_by_key(|w| w.seq);
        }
        proofs.file_checkpoints =
            self.file.checkpoints()?.iter().filter_map(|c| StoredCheckpoint::parse(c)).collect();
        Ok(proofs)
    }

    /// Appends the `AuditBreak` entry: seq after every seq the vault knows, chained from the newest
    /// signed head (`anchor`), so what the vault signs next extends what it signed last.
    pub(super) async fn carry_forward(
        &self,
        store: &dyn Storage,
        b: &ChainBreak,
        anchor: Option<Checkpoint>,
        last_known: u64,
    ) -> Result<BreakRecord, VaultError> {
        let record = match &self.shared {
            Some(batcher) => self.append_break_shared(batcher, b, anchor).await?,
            None => {
                let _order = self.order.lock().await;
                self.append_break(b, anchor, last_known)?
            }
        };
        let json = serde_json::to_vec(&record).map_err(|_| StoreError::Corrupt("audit break (encode)"))?;
        store.set_audit_record(AuditRecord::Break, &json).await?;
        store.flush_now().await?;
        tracing::error!(
            first_untrusted = b.seq,
            reason = %b.reason,
            audit_break_entry = record.entry,
            "AUDIT LOG DAMAGED: entries from {} on cannot be trusted; data requests are refused until an operator \
             restarts with --accept-audit-break {}",
            b.seq,
            record.entry
        );
        Ok(record)
    }

    /// The file part of [`AuditLog::carry_forward`], under the head's lock.
    pub(super) fn append_break(
        &self,
        b: &ChainBreak,
        anchor: Option<Checkpoint>,
        last_known: u64,
    ) -> Result<BreakRecord, VaultError> {
        let mut head = lock(&self.head);
        let anchor =
            anchor.unwrap_or(Checkpoint { seq: 0, hash: GENESIS, time_ms: 0, prev: None, signature: vec![] });
        let to = last_known.max(head.seq);
        let mut entry = notice_entry(Rpc::AuditBreak);
        entry.seq = to + 1;
        entry.time_ms = now_ms();
        entry.damaged_from = b.seq.max(1);
        entry.damaged_to = to;
        entry.reason = clean(&b.reason);
        entry.anchor = (anchor.seq > 0).then(|| StoredCheckpoint::from_checkpoint(&anchor));
        let canonical = entry.canonical()?;
        let hash = chain_hash(&anchor.hash, &canonical);
        self.append_file(entry.seq, entry.time_ms, &hash, &canonical, true).map_err(unavailable)?;
        self.file.sync_now().map_err(unavailable)?;
        head.seq = entry.seq;
        head.hash = hash;
        head.unsynced.clear();
        head.last_signed = anchor.seq;
        let record = BreakRecord {
            entry: entry.seq,
            damaged_from: entry.damaged_from,
            damaged_to: to,
            reason: entry.reason,
        };
        Ok(record)
    }

    /// [`AuditLog::carry_forward`] on a shared chain: the entry follows the store's head.
    pub(super) async fn append_break_shared(
        &self,
        batcher: &shared::Batcher,
        b: &ChainBreak,
        anchor: Option<Checkpoint>,
    ) -> Result<BreakRecord, VaultError> {
        let anchor =
            anchor.unwrap_or(Checkpoint { seq: 0, hash: GENESIS, time_ms: 0, prev: None, signature: vec![] });
        let mut entry = notice_entry(Rpc::AuditBreak);
        entry.damaged_from = b.seq.max(1);
        entry.reason = clean(&b.reason);
        entry.anchor = (anchor.seq > 0).then(|| StoredCheckpoint::from_checkpoint(&anchor));
        let (damaged_from, reason) = (entry.damaged_from, entry.reason.clone());
        let seq = batcher.append_break(entry, anchor).await?;
        Ok(BreakRecord { entry: seq, damaged_from, damaged_to: seq - 1, reason })
    }

    pub(super) async fn append_notice(
        &self,
        store: &dyn Storage,
        entry: AuditEntry,
    ) -> Result<(), VaultError> {
        match self.commit(store, entry, Changes::none()).await? {
            Committed::Done(_) | Committed::Conflict => self.sync_now(),
        }
    }

    /// Verifies the stored log against `public_key` with every proof the vault holds (head tags,
    /// the store's records, `witnessed` heads); on the live log, up to the head this process
    /// holds in memory (which catches a truncated tail).
    pub fn verify(
        &self,
        records: &StoredRecords,
        public_key: &[u8],
        witnessed: &[(u64, [u8; 32])],
    ) -> Result<ChainReport, VaultError> {
        let tagger = lock(&self.keys).as_ref().map(|k| k.tagger.clone());
        let tagger = tagger.as_deref();
        // The proofs first, then the head: every proof then precedes the head verified up to.
        let proofs = match tagger {
            Some(t) => self.stored_proofs(records, t)?,
            None => Proofs::default(),
        };
        // The head this process holds is genuine; a shared chain's head row is only what the
        // store says, so there the newest head this node appended is, and the row (read after it:
        // the node's appends only move it on) may not be behind it.
        let mine = self.shared.as_ref().map(|b| lock(&b.state.mine).map(|m| (m.seq, m.hash)));
        let head = self.head_in_file()?;
        let own = mine.unwrap_or(Some(head));
        let first = self.file.first_seq()?.unwrap_or(1);
        let mut known = proofs.tagged.clone();
        known.extend(own);
        if let Some(own) = own.filter(|own| own.0 > head.0) {
            let reason = format!(
                "the store's chain ends at {} but this node appended up to {}: rolled back or cut",
                head.0, own.0
            );
            let mut report = ChainReport::default();
            add_break(&mut report, ChainBreak { seq: head.0 + 1, reason });
            return Ok(report);
        }
        let mut report = self.file.verify(
            public_key,
            &VerifyWith {
                expected_head: Some(head),
                tagger,
                checkpoints: proofs.checkpoints(),
                known_heads: known
                    .into_iter()
                    .chain(witnessed.iter().copied().filter(|w| w.0 >= first))
                    .collect(),
                start: None,
            },
        )?;
        if let Some(b) = witnessed_beyond(&proofs, head.0) {
            add_break(&mut report, b);
        }
        if let Some(b) = proofs.tamper {
            add_break(&mut report, b);
        }
        if let Some(&(seq, _)) = witnessed.iter().filter(|w| w.0 > head.0).min_by_key(|w| w.0) {
            let reason = format!(
                "the witness holds a signed head at {seq}, beyond this log's end {}: rolled back or cut",
                head.0
            );
            add_break(&mut report, ChainBreak { seq: head.0 + 1, reason });
        }
        Ok(report)
    }

    /// Verifies the whole log with every proof the vault has (the tail was verified at unlock;
    /// this runs beside serving) and carries any damage not yet recorded forward: the head is
    /// signed first, so the `AuditBreak` entry links from it and nothing genuine after the damage
    /// is left unsigned.
    /// `report` is the whole log's verification, run on a blocking thread ([`AuditLog::verify`]).
    pub async fn check_history(
        &self,
        store: &dyn Storage,
        report: &ChainReport,
    ) -> Result<Option<BreakRecord>, VaultError> {
        let Some(public_key) = self.public_key() else { return Ok(None) };
        if self.disabled {
            return Ok(None);
        }
        let Some(b) = report.uncarried.clone() else { return Ok(None) };
        let _procedure = self.procedure.lock().await;
        // Two verifications (the one beside serving, an officer's) can find the same damage
        // before either carried it: the second must not carry it again.
        if let Some(existing) = lock(&self.integrity).broken.clone()
            && (existing.damaged_from..=existing.entry).contains(&b.seq)
        {
            return Ok(Some(existing));
        }
        self.checkpoint_now().await?;
        let Some(tagger) = lock(&self.keys).as_ref().map(|k| k.tagger.clone()) else { return Ok(None) };
        let proofs = self.stored_proofs(&self.stored_records(store).await?, &tagger)?;
        let anchor = proofs.newest_signed(&public_key);
        let record = self.carry_forward(store, &b, anchor, report.last_entry).await?;
        lock(&self.integrity).broken = Some(record.clone());
        Ok(Some(record))
    }

    /// Verifies the stored log to its end, with only the checkpoints file (tests).
    #[cfg(test)]
    pub fn verify_stored(&self, public_key: &[u8]) -> Result<ChainReport, StoreError> {
        self.head_in_file()?;
        self.file.verify(public_key, &VerifyWith::default())
    }

    /// The head, with everything up to it written to the file: what a live verification of the
    /// file (possibly on another thread, [`verify_dir`]) must reach.
    pub fn head_in_file(&self) -> Result<ChainHead, StoreError> {
        if let Some(stored) = self.file.stored_head()? {
            return Ok(stored);
        }
        let head = lock(&self.head);
        if !self.disabled {
            self.file.write_through()?;
        }
        Ok((head.seq, head.hash))
    }
}
