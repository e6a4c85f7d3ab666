//! The Audit service: query, export, verify, the public key; entries to protobuf.

use super::*;

impl From<AuditEntry> for pb::AuditEntry {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            time_ms: e.time_ms,
            rpc: e.rpc,
            operation: e.operation,
            identity: e.identity,
            role: e.role,
            peer: e.peer,
            request_id: e.request_id,
            subject: e.subject,
            record_id: e.record_id,
            fields: e.fields,
            purpose: e.purpose,
            decision: e.decision.as_str().to_owned(),
            rule: e.rule,
            reason: e.reason,
            regulations_version: e.regulations_version,
            key_versions: e.key_versions.to_string(),
            outcome: e.outcome.as_str().to_owned(),
            repeated: e.repeated,
        }
    }
}

fn filter_in(r: &pb::QueryAuditRequest) -> AuditFilter {
    let opt = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    AuditFilter {
        from_ms: Some(r.from_ms).filter(|v| *v > 0),
        to_ms: Some(r.to_ms).filter(|v| *v > 0),
        identity: opt(&r.identity),
        role: opt(&r.role),
        subject: None,
        record_id: opt(&r.record_id),
        operation: opt(&r.operation),
        decision: opt(&r.decision),
        purpose: opt(&r.purpose),
        limit: Some(r.limit as usize).filter(|v| *v > 0),
    }
}

pub(super) type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Streams what a blocking scan of the store produces, without holding the runtime.
pub(super) fn stream_blocking<T: Send + 'static>(
    vault: Arc<Vault>,
    request_id: String,
    scan: impl FnOnce(&Vault, &dyn Fn(Result<T, VaultError>) -> bool) + Send + 'static,
) -> Stream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::task::spawn_blocking(move || {
        let send =
            |item: Result<T, VaultError>| tx.blocking_send(item.map_err(|e| status(e, &request_id))).is_ok();
        scan(&vault, &send);
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Audit for Api {
    type QueryAuditStream = Stream<pb::AuditEntry>;
    type ExportAuditStream = Stream<pb::AuditLine>;

    #[tracing::instrument(skip_all, fields(rpc = Rpc::QueryAudit.as_str()))]
    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<Self::QueryAuditStream>, Status> {
        let caller = self.caller(&req, Rpc::QueryAudit).await?;
        let msg = req.into_inner();
        let grant = self
            .vault
            .audit_read(&caller, Rpc::QueryAudit, filter_in(&msg), Some(&msg.subject_id))
            .await
            .map_err(|e| status(e, &caller.request_id))?;
        let stream = stream_blocking(self.vault.clone(), caller.request_id.clone(), move |vault, send| {
            for entry in vault.audit_entries(grant) {
                let failed = entry.is_err();
                if !send(entry.map(Into::into)) || failed {
                    break;
                }
            }
        });
        Ok(respond(stream, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ExportAudit.as_str()))]
    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let caller = self.caller(&req, Rpc::ExportAudit).await?;
        let grant = self
            .vault
            .audit_read(&caller, Rpc::ExportAudit, AuditFilter::default(), None)
            .await
            .map_err(|e| status(e, &caller.request_id))?;
        let export = self.vault.audit_export(grant).await.map_err(|e| status(e, &caller.request_id))?;
        let stream = stream_blocking(self.vault.clone(), caller.request_id.clone(), move |vault, send| {
            for line in vault.export_lines(export) {
                let failed = line.is_err();
                if !send(line.map(|json| pb::AuditLine { json })) || failed {
                    break;
                }
            }
        });
        Ok(respond(stream, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::VerifyAudit.as_str()))]
    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        handle!(self, req, Rpc::VerifyAudit, |caller, msg| {
            let witnessed = msg.witnessed.into_iter().map(|h| (h.seq, h.hash)).collect();
            self.vault.verify_audit(&caller, witnessed).await.map(|(r, state, records)| {
                use khlang_keys::audit_chain::Verdict;
                let (verdict, first_bad_seq, reason) = match r.verdict() {
                    Verdict::Intact => (pb::Verdict::Intact, 0, String::new()),
                    Verdict::Unverified(why) => (pb::Verdict::Unverified, 0, why),
                    Verdict::Broken(b) => (pb::Verdict::Broken, b.seq, b.reason),
                };
                pb::VerifyAuditResponse {
                    entries: r.entries,
                    checkpoints: r.checkpoints,
                    last_checkpoint: r.last_checkpoint,
                    intact: verdict == pb::Verdict::Intact,
                    first_bad_seq,
                    reason,
                    verdict: verdict.into(),
                    last_entry: r.last_entry,
                    resumed_at: r.resumed_at,
                    break_open: matches!(state, crate::audit::LogState::Broken(_)),
                    records: Some(pb::RecordsCheck {
                        matched: records.matched,
                        vanished: records.vanished,
                        appeared: records.appeared,
                        before_log: records.before_log,
                        in_flux: records.in_flux,
                        findings: records.named,
                    }),
                }
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::AuditPublicKey.as_str()))]
    async fn audit_public_key(
        &self,
        req: Request<pb::AuditPublicKeyRequest>,
    ) -> Result<Response<pb::AuditPublicKeyResponse>, Status> {
        handle!(self, req, Rpc::AuditPublicKey, |caller, _msg| {
            self.vault
                .audit_public_key(&caller)
                .await
                .map(|public_key| pb::AuditPublicKeyResponse { public_key })
        })
    }
}
