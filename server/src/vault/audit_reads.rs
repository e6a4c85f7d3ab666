//! Reading the access log: only with an `AuditGrant` (made after the read was authorised and
//! its own entry written), export, verification, archival.

use super::*;

/// Witnessed heads as the wire gives them: `(seq, hash hex)`.
fn parse_witnessed(heads: &[(u64, String)]) -> Result<Vec<(u64, [u8; 32])>, VaultError> {
    if heads.len() > MAX_WITNESSED {
        return Err(VaultError::LimitExceeded(format!("more than {MAX_WITNESSED} witnessed heads")));
    }
    heads
        .iter()
        .enumerate()
        .map(|(i, (seq, hash))| {
            let hash =
                hex::decode(hash).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| {
                    VaultError::InvalidArgument(format!("witnessed head {i}: the hash is not 64 hex digits"))
                })?;
            Ok((*seq, hash))
        })
        .collect()
}

/// An export begun by [`Vault::audit_export`] (the head it ends at is signed).
#[derive(Debug)]
pub struct AuditExport {
    public_key: Vec<u8>,
}

/// Permission to read the audit log with one filter: made only by [`Vault::audit_read`], after
/// the read was authorised and its own entry written, so no code path can read entries unaudited.
#[derive(Debug)]
pub struct AuditGrant {
    filter: AuditFilter,
}

impl AuditGrant {
    /// An unaudited grant, for tests that read a stopped vault's log in process.
    #[cfg(any(test, feature = "test-util"))]
    pub fn unaudited_for_tests(filter: AuditFilter) -> Self {
        Self { filter }
    }
}

impl Vault {
    /// Authorises a read of the audit log (itself audited) and resolves a subject id to the blind
    /// index the entries hold. The grant it returns is the only way to read entries.
    pub async fn audit_read(
        &self,
        caller: &Caller,
        rpc: Rpc,
        filter: AuditFilter,
        subject_id: Option<&str>,
    ) -> Result<AuditGrant, VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, rpc, Operation::AuditRead, &regs);
        let (filter, regs) = (&filter, &regs);
        self.audited(
            entry,
            prepare!(|e| {
                let keys = self.unsealed()?;
                let mut filter = filter.clone();
                if let Some(subject) = subject_id.filter(|s| !s.is_empty()) {
                    self.check_subject(subject)?;
                    let index = hex::encode(Self::subject_index(&keys, subject));
                    e.subject.clone_from(&index);
                    filter.subject = Some(index);
                }
                e.reason = filter.describe();
                self.permit(regs, caller, Operation::AuditRead, e)?;
                Ok((AuditGrant { filter }, Changes::none()))
            }),
        )
        .await
    }

    /// Entries matching the grant's filter, oldest first.
    pub fn audit_entries(
        &self,
        grant: AuditGrant,
    ) -> impl Iterator<Item = Result<AuditEntry, VaultError>> + '_ {
        let filter = grant.filter;
        let limit = filter.limit.unwrap_or(usize::MAX);
        let written = self.audit.write_through().err().map(Err);
        written
            .into_iter()
            .chain(self.audit.read_entries().map(|r| r.map_err(VaultError::from)))
            .filter(move |r| r.as_ref().map_or(true, |e| filter.matches(e)))
            .take(limit)
    }

    /// Begins an export: the head is signed first, so an export always ends at a checkpoint its
    /// reader can verify with the public key. Its lines are [`Vault::export_lines`].
    pub async fn audit_export(&self, _grant: AuditGrant) -> Result<AuditExport, VaultError> {
        self.audit.checkpoint_now().await?;
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        Ok(AuditExport { public_key })
    }

    /// The export's JSON Lines (read synchronously: a blocking thread streams them).
    pub fn export_lines(&self, export: AuditExport) -> impl Iterator<Item = Result<String, VaultError>> + '_ {
        self.audit.export_lines(export.public_key).map(|r| r.map_err(VaultError::from))
    }

    /// Verifies the live log: chain, checkpoint signatures and their order, head tags, the
    /// store's records, that it ends at this vault's head, and that it holds every `witnessed`
    /// head. The head is signed first, so an intact log is covered up to its newest entry.
    pub async fn verify_audit(
        self: &Arc<Self>,
        caller: &Caller,
        witnessed: Vec<(u64, String)>,
    ) -> Result<(ChainReport, crate::audit::LogState, crate::audit::Completeness), VaultError> {
        let regs = self.regulations();
        let entry = self.draft(caller, Rpc::VerifyAudit, Operation::AuditRead, &regs);
        let (regs, witnessed) = (&regs, &witnessed);
        let witnessed = self
            .audited(
                entry,
                prepare!(|e| {
                    self.unsealed()?;
                    self.permit(regs, caller, Operation::AuditRead, e)?;
                    let heads = parse_witnessed(witnessed)?;
                    e.reason = format!("{} witnessed heads", heads.len());
                    Ok((heads, Changes::none()))
                }),
            )
            .await?;
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        self.audit.checkpoint_now().await?;
        // A full read and hash of the log (about a second per million entries): on the blocking
        // pool, not on a worker that serves requests.
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        let vault = self.clone();
        let report =
            tokio::task::spawn_blocking(move || vault.audit.verify(&records, &public_key, &witnessed))
                .await
                .map_err(|_| StoreError::Corrupt("audit verification task"))??;
        // Damage found now (the log edited while the vault ran, or on a shared database by
        // anyone who can write to it) is carried forward at once: no personal data moves while
        // the record of who saw it is in doubt.
        if report.uncarried.is_some() {
            self.audit.check_history(self.store.as_ref(), &report).await?;
        }
        let records = self.check_records().await?;
        Ok((report, self.audit.state(), records))
    }

    /// Verifies the whole audit log beside serving and carries damage forward (the tail since the
    /// last signed head was verified at unseal). Started once by the server after unsealing.
    pub async fn check_audit_history(self: &Arc<Self>) -> Result<(), VaultError> {
        let Some(public_key) = self.audit.public_key() else { return Ok(()) };
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        // About a second per million entries: on the blocking pool, not on a serving worker.
        let vault = self.clone();
        let report = tokio::task::spawn_blocking(move || vault.audit.verify(&records, &public_key, &[]))
            .await
            .map_err(|_| StoreError::Corrupt("audit verification task"))??;
        self.audit.check_history(self.store.as_ref(), &report).await.map(|_| ())
    }

    /// A receiver that disconnects once this vault is dropped, store and all (its data folder's
    /// lock free): the last `Arc` may be let go by a server task a moment after `serve` returns.
    pub fn released(&self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.released.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    /// Whether the audit log's tail was verified at unseal (metrics: intact or unverified).
    pub fn audit_history_checked(&self) -> bool {
        self.audit.tail_checked()
    }

    /// How long ago the newest audit checkpoint was signed.
    pub async fn audit_checkpoint_age(&self) -> Option<Duration> {
        self.audit.checkpoint_age().await
    }

    /// Whether the audit log can be written now (health).
    pub async fn audit_writable(&self) -> bool {
        self.audit.writable().await
    }

    /// Whether the audit log holds a break the operator has not accepted (health).
    pub fn audit_state(&self) -> crate::audit::LogState {
        self.audit.state()
    }

    /// The operator's view (no caller, nothing audited): the public key, hex, of an unsealed vault.
    pub fn audit_public_key_now(&self) -> Result<String, VaultError> {
        self.audit
            .public_key()
            .map(hex::encode)
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))
    }

    /// The operator's verification of the live log (no caller): `khlangd archive-audit` and tests.
    pub async fn verify_audit_now(&self) -> Result<ChainReport, VaultError> {
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        self.audit.verify(&records, &public_key, &[])
    }

    /// The checkpoint-verifying public key, hex.
    pub async fn audit_public_key(&self, caller: &Caller) -> Result<String, VaultError> {
        self.audit_read(caller, Rpc::AuditPublicKey, AuditFilter::default(), None).await?;
        self.audit
            .public_key()
            .map(hex::encode)
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))
    }

    /// Moves audit entries older than `before_ms` out of the vault into `out` (the export format,
    /// verifiable offline), up to the newest signed checkpoint before that time, which stays to
    /// anchor what remains. Refused for anything younger than the regulations' retention (PCI DSS
    /// 10.5.1) and for a log that does not verify. The operator's command on a stopped vault
    /// (`khlangd archive-audit`), never an API. `now_ms` is the clock (tests pass a later one).
    /// A refused or empty run is on the record too: every attempt to remove history is.
    pub async fn archive_audit(
        &self,
        before_ms: u64,
        now_ms: u64,
        out: &mut std::fs::File,
    ) -> Result<ArchiveReport, VaultError> {
        let result = self.archive_now(before_ms, now_ms, out).await;
        let not_done = match &result {
            Err(e) => Some((e.outcome(), format!("refused: {}", clean(&e.to_string())))),
            Ok(r) if r.entries == 0 => {
                Some((crate::Outcome::Ok, "nothing to archive: no signed checkpoint is old enough".into()))
            }
            Ok(_) => None,
        };
        if let Some((outcome, why)) = not_done {
            let mut entry = operator_entry(Rpc::ArchiveAudit, Operation::AuditRead, &self.regulations());
            entry.outcome = outcome;
            entry.reason = format!("archival of entries older than {before_ms} ms {why}");
            let recorded = self.commit_now(entry, Changes::none()).await;
            // The refusal is the answer; failing to record it matters only when nothing else failed.
            if result.is_ok() {
                recorded?;
            }
        }
        result
    }

    pub(crate) async fn archive_now(
        &self,
        before_ms: u64,
        now_ms: u64,
        out: &mut std::fs::File,
    ) -> Result<ArchiveReport, VaultError> {
        use std::io::Write;
        let regs = self.regulations();
        let retention_ms = u64::from(regs.audit_retention_days) * 86_400_000;
        if before_ms > now_ms.saturating_sub(retention_ms) {
            return Err(VaultError::FailedPrecondition(format!(
                "entries younger than {} days are kept (PCI DSS 10.5.1); archive only before {} ms",
                regs.audit_retention_days,
                now_ms.saturating_sub(retention_ms)
            )));
        }
        let public_key = self
            .audit
            .public_key()
            .ok_or_else(|| VaultError::FailedPrecondition("the vault is sealed".into()))?;
        let records = self.audit.stored_records(self.store.as_ref()).await?;
        let report = self.audit.verify(&records, &public_key, &[])?;
        if let Some(b) = report.first_break {
            return Err(VaultError::FailedPrecondition(format!(
                "the log does not verify (first untrustworthy entry {}: {}); nothing archived",
                b.seq, b.reason
            )));
        }
        let first = self.audit.first_seq()?.unwrap_or(1);
        let last = self
            .audit
            .checkpoints()?
            .iter()
            .filter_map(|c| serde_json::from_slice::<crate::audit::StoredCheckpoint>(c).ok())
            .filter(|c| c.seq >= first && c.time_ms < before_ms)
            .map(|c| c.seq)
            .max();
        let Some(last) = last else {
            return Ok(ArchiveReport { first, last: first.saturating_sub(1), entries: 0 });
        };
        let io = |e: std::io::Error| VaultError::FailedPrecondition(format!("cannot write the archive: {e}"));
        for line in self.audit.archive_lines(public_key, last) {
            writeln!(out, "{}", line?).map_err(io)?;
        }
        out.flush().map_err(io)?;
        out.sync_all().map_err(io)?;
        // The archive is on disk; only now do the entries leave the vault. Their entry comes
        // first: it names the signed base that takes their place, and is kept after them.
        let write = crate::audit::fresh_write()?;
        let base = self.audit.prepare_archival(last, write)?;
        let mut entry = operator_entry(Rpc::ArchiveAudit, Operation::AuditRead, &regs);
        entry.reason = format!(
            "entries {first} to {last} ({} entries) older than {before_ms} ms archived; checkpoint {last} anchors the rest and the signed base {} accounts for them",
            last + 1 - first,
            crate::audit::archive_base::base_name(last)
        );
        entry.write = write;
        entry.writes = vec![crate::audit::archive_base::base_name(last)];
        self.commit_now(entry, Changes::none()).await?;
        self.audit.remove_archived(last, &base, first)?;
        self.store.remove_audit_entries_upto(last).await?;
        Ok(ArchiveReport { first, last, entries: last + 1 - first })
    }

    /// The most passphrase derivations that ever ran at once (at most `auth::MAX_DERIVATIONS`).
    pub fn derivations_at_once_peak(&self) -> usize {
        self.derivations.peak()
    }

    /// Fault drill for tests: make every following audit append (and so every request) fail.
    #[cfg(any(test, feature = "test-util"))]
    pub fn inject_audit_failure(&self, fail: bool) {
        self.audit.inject_failure(fail);
    }
}
