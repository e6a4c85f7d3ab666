//! The wire layer: the only server module that sees protobuf types. Each handler authenticates,
//! converts pb → domain, calls one domain operation, and converts back. Errors map to `Status` in
//! one place.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use khlang_keys::Plaintext;
use khlang_proto::pb::{
    self, admin_server::Admin, admin_server::AdminServer, audit_server::Audit, audit_server::AuditServer,
    keys_server::Keys, keys_server::KeysServer, operator_server::Operator, operator_server::OperatorServer,
    records_server::Records, records_server::RecordsServer, subjects_server::Subjects,
    subjects_server::SubjectsServer,
};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::server::{ServerTlsConfig, TcpIncoming};
use tonic::{Request, Response, Status};
use x509_cert::der::Decode;
use zeroize::Zeroizing;

use crate::audit::{AuditEntry, AuditFilter};
use crate::identities::{IdentityCreation, IdentityRequest};
use crate::lifecycle::{JobStatus, KeyStatus, ReencryptTarget, SealStatus};
use crate::rekey::RekeyStatus;
use crate::storage::JobKind;
use crate::storage::StoredConsent;
use crate::{Caller, Credentials, FieldValue, RecordView, RegulationsInfo, Vault, VaultError};

/// Metadata key of the request id, echoed back on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// A failed authentication answers no sooner than this, whatever failed (and slows guessing).
pub const FAILED_AUTH_FLOOR: Duration = Duration::from_millis(50);

/// The single mapping from domain errors to gRPC statuses. Internal details go to the server log
/// under the request id, not to the caller.
pub fn status(err: VaultError, request_id: &str) -> Status {
    match err {
        VaultError::InvalidArgument(m) => Status::invalid_argument(m),
        VaultError::LimitExceeded(m) => Status::resource_exhausted(m),
        VaultError::LockedOut => Status::resource_exhausted(err.to_string()),
        VaultError::Unauthenticated => Status::unauthenticated(err.to_string()),
        VaultError::PermissionDenied(m) => Status::permission_denied(m),
        VaultError::NotFound(_) => Status::not_found(err.to_string()),
        VaultError::AlreadyExists(m) => Status::already_exists(m),
        VaultError::Integrity { .. } | VaultError::Storage(crate::StoreError::Damaged { .. }) => {
            tracing::error!(request_id, error = %err, "stored data failed its integrity check");
            Status::data_loss(format!("{err}; no data returned"))
        }
        VaultError::FailedPrecondition(m) => Status::failed_precondition(m),
        VaultError::RootMismatch => Status::failed_precondition(err.to_string()),
        VaultError::AuditUnavailable => {
            tracing::error!(request_id, "audit write failed; request refused");
            Status::unavailable("the request could not be audited, so it was refused; no data returned")
        }
        VaultError::Storage(_) | VaultError::Key(_) => {
            tracing::error!(request_id, error = %err, "internal error");
            Status::internal(format!("internal error (request id {request_id}); see the server log"))
        }
    }
}

/// Every request gets an id of the server's own, on its response and its audit entry: a caller
/// cannot make two requests look like one in the log.
fn request_id<T>(_req: &Request<T>) -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The caller's `x-request-id`, recorded beside the server's.
fn client_request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(sanitize_client_id)
        .unwrap_or_default()
}

/// A caller's request id as an audit entry may hold it: 64 plain characters at most.
fn sanitize_client_id(v: &str) -> String {
    v.chars().take(64).filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect()
}

fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The subject common name of the client certificate the TLS handshake verified, if any.
fn certificate_name<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref()).ok()?;
    let cn = cert.tbs_certificate().subject().common_name().ok()??;
    Some(String::from(cn))
}

/// The gRPC API (`khlang.v1.Records`, `Subjects`, `Admin`) over a [`Vault`].
#[derive(Debug, Clone)]
pub struct Api {
    vault: Arc<Vault>,
}

impl Api {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// The authenticate step: every handler starts here. A role claimed in metadata is never read.
    async fn caller<T>(&self, req: &Request<T>, rpc: &str) -> Result<Caller, Status> {
        let started = Instant::now();
        let request_id = request_id(req);
        let client_request_id = client_request_id(req);
        let peer = req.remote_addr();
        let cert_name = certificate_name(req);
        let creds = Credentials {
            token: bearer(req),
            certificate_name: cert_name.as_deref(),
            peer: peer.map(|p| p.ip()),
        };
        match self.vault.authenticate(creds).await {
            Ok(identity) => Ok(Caller { identity, peer, request_id, client_request_id }),
            Err(mut e) => {
                let mut answer_at = started + FAILED_AUTH_FLOOR;
                if matches!(e, VaultError::Unauthenticated | VaultError::LockedOut) {
                    tracing::warn!(target: "khlang::auth", request_id, peer = ?peer, "authentication failed");
                    // The address is throttled, not locked: its failed answers wait their turn.
                    match self.vault.failure_answer_delay(peer.map(|p| p.ip())) {
                        Ok(d) => answer_at = answer_at.max(Instant::now() + d),
                        Err(full) => e = full,
                    }
                }
                // Refused either way; if even this cannot be recorded, the server log says so.
                if let Err(audit) =
                    self.vault.audit_refused(rpc, peer, &request_id, &client_request_id, &e).await
                {
                    tracing::error!(request_id, error = %audit, "could not audit a refused request");
                }
                tokio::time::sleep_until(answer_at).await;
                Err(status(e, &request_id))
            }
        }
    }
}

fn respond<T>(msg: T, caller: &Caller) -> Response<T> {
    stamped(msg, &caller.request_id)
}

/// A response carrying the server's request id.
fn stamped<T>(msg: T, request_id: &str) -> Response<T> {
    let mut resp = Response::new(msg);
    if let Ok(v) = MetadataValue::try_from(request_id) {
        resp.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn fields_in(fields: Vec<pb::Field>) -> Vec<FieldValue> {
    fields
        .into_iter()
        .map(|f| FieldValue { name: f.name, value: Plaintext::new(f.value.into_bytes()) })
        .collect()
}

/// Plaintext leaves the vault here, and only here.
fn text_out(p: &Plaintext) -> String {
    String::from_utf8_lossy(p.expose_secret()).into_owned()
}

fn fields_out(fields: &[FieldValue]) -> Vec<pb::Field> {
    fields.iter().map(|f| pb::Field { name: f.name.clone(), value: text_out(&f.value) }).collect()
}

impl From<RecordView> for pb::GetRecordResponse {
    fn from(view: RecordView) -> Self {
        Self {
            subject_id: text_out(&view.subject_id),
            fields: fields_out(&view.fields),
            record_id: view.record_id,
        }
    }
}

impl From<StoredConsent> for pb::ConsentEntry {
    fn from(c: StoredConsent) -> Self {
        Self { purpose: c.purpose, granted: c.granted, at_ms: c.at_ms, recorded_by: c.by }
    }
}

impl From<RegulationsInfo> for pb::RegulationsInfo {
    fn from(r: RegulationsInfo) -> Self {
        Self {
            version: r.version,
            organisation: r.organisation,
            roles: r.roles,
            purposes: r.purposes,
            fields: r.fields,
            warnings: r.warnings,
        }
    }
}

/// Runs a handler body with the caller, mapping domain errors to statuses with its request id.
macro_rules! handle {
    ($self:ident, $req:ident, $rpc:literal, |$caller:ident, $msg:ident| $body:expr) => {{
        let $caller = $self.caller(&$req, $rpc).await?;
        let $msg = $req.into_inner();
        let out: Result<_, VaultError> = $body;
        match out {
            Ok(v) => Ok(respond(v, &$caller)),
            Err(e) => Err(status(e, &$caller.request_id)),
        }
    }};
}

#[tonic::async_trait]
impl Records for Api {
    #[tracing::instrument(skip_all, fields(rpc = "PutRecord"))]
    async fn put_record(
        &self,
        req: Request<pb::PutRecordRequest>,
    ) -> Result<Response<pb::PutRecordResponse>, Status> {
        handle!(self, req, "PutRecord", |caller, msg| {
            let record_id = self.vault.put(&caller, &msg.subject_id, fields_in(msg.fields)).await;
            record_id.map(|record_id| pb::PutRecordResponse { record_id })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "GetRecord"))]
    async fn get_record(
        &self,
        req: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::GetRecordResponse>, Status> {
        handle!(self, req, "GetRecord", |caller, msg| {
            let purpose = Some(msg.purpose.as_str()).filter(|p| !p.is_empty());
            self.vault.get(&caller, &msg.record_id, &msg.fields, purpose).await.map(Into::into)
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "UpdateRecord"))]
    async fn update_record(
        &self,
        req: Request<pb::UpdateRecordRequest>,
    ) -> Result<Response<pb::UpdateRecordResponse>, Status> {
        handle!(self, req, "UpdateRecord", |caller, msg| {
            let names = self.vault.update(&caller, &msg.record_id, fields_in(msg.set), &msg.remove).await;
            names.map(|field_names| pb::UpdateRecordResponse { field_names })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "DeleteRecord"))]
    async fn delete_record(
        &self,
        req: Request<pb::DeleteRecordRequest>,
    ) -> Result<Response<pb::DeleteRecordResponse>, Status> {
        handle!(self, req, "DeleteRecord", |caller, msg| {
            self.vault.delete(&caller, &msg.record_id).await.map(|()| pb::DeleteRecordResponse {})
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListRecords"))]
    async fn list_records(
        &self,
        req: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        handle!(self, req, "ListRecords", |caller, msg| {
            self.vault.list(&caller, &msg.subject_id).await.map(|records| pb::ListRecordsResponse {
                records: records
                    .into_iter()
                    .map(|r| pb::RecordSummary { record_id: r.record_id, field_names: r.field_names })
                    .collect(),
            })
        })
    }
}

#[tonic::async_trait]
impl Subjects for Api {
    #[tracing::instrument(skip_all, fields(rpc = "SetConsent"))]
    async fn set_consent(
        &self,
        req: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::ConsentEntry>, Status> {
        handle!(self, req, "SetConsent", |caller, msg| {
            self.vault.set_consent(&caller, &msg.subject_id, &msg.purpose, msg.granted).await.map(Into::into)
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "GetConsent"))]
    async fn get_consent(
        &self,
        req: Request<pb::GetConsentRequest>,
    ) -> Result<Response<pb::GetConsentResponse>, Status> {
        handle!(self, req, "GetConsent", |caller, msg| {
            self.vault.consent(&caller, &msg.subject_id).await.map(|r| pb::GetConsentResponse {
                current: r.current.into_iter().map(Into::into).collect(),
                history: r.history.into_iter().map(Into::into).collect(),
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "ExportSubject"))]
    async fn export_subject(
        &self,
        req: Request<pb::ExportSubjectRequest>,
    ) -> Result<Response<pb::ExportSubjectResponse>, Status> {
        handle!(self, req, "ExportSubject", |caller, msg| {
            self.vault.export_subject(&caller, &msg.subject_id).await.map(|records| {
                pb::ExportSubjectResponse {
                    records: records
                        .into_iter()
                        .map(|r| pb::ExportedRecord { fields: fields_out(&r.fields), record_id: r.record_id })
                        .collect(),
                    subject_id: msg.subject_id.clone(),
                }
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "EraseSubject"))]
    async fn erase_subject(
        &self,
        req: Request<pb::EraseSubjectRequest>,
    ) -> Result<Response<pb::EraseSubjectResponse>, Status> {
        handle!(self, req, "EraseSubject", |caller, msg| {
            let n = self.vault.erase_subject(&caller, &msg.subject_id).await;
            n.map(|n| pb::EraseSubjectResponse { records_erased: u32::try_from(n).unwrap_or(u32::MAX) })
        })
    }
}

#[tonic::async_trait]
impl Admin for Api {
    #[tracing::instrument(skip_all, fields(rpc = "CreateIdentity"))]
    async fn create_identity(
        &self,
        req: Request<pb::CreateIdentityRequest>,
    ) -> Result<Response<pb::CreateIdentityResponse>, Status> {
        handle!(self, req, "CreateIdentity", |caller, msg| {
            let created = self.vault.create_identity(&caller, &msg.name, &msg.role).await;
            created.map(|c| match c {
                IdentityCreation::Created(t) => pb::CreateIdentityResponse {
                    token: t.expose_secret().to_owned(),
                    name: msg.name.clone(),
                    pending: None,
                },
                IdentityCreation::Pending(r) => pb::CreateIdentityResponse {
                    token: String::new(),
                    name: msg.name.clone(),
                    pending: Some(r.into()),
                },
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "ApproveIdentity"))]
    async fn approve_identity(
        &self,
        req: Request<pb::ApproveIdentityRequest>,
    ) -> Result<Response<pb::CreateIdentityResponse>, Status> {
        handle!(self, req, "ApproveIdentity", |caller, msg| {
            let token = self.vault.approve_identity(&caller, &msg.request_id).await;
            token.map(|t| pb::CreateIdentityResponse {
                token: t.expose_secret().to_owned(),
                name: String::new(),
                pending: None,
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "RefuseIdentity"))]
    async fn refuse_identity(
        &self,
        req: Request<pb::RefuseIdentityRequest>,
    ) -> Result<Response<pb::RefuseIdentityResponse>, Status> {
        handle!(self, req, "RefuseIdentity", |caller, msg| {
            self.vault
                .refuse_identity(&caller, &msg.request_id, &msg.reason)
                .await
                .map(|()| pb::RefuseIdentityResponse {})
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListIdentityRequests"))]
    async fn list_identity_requests(
        &self,
        req: Request<pb::ListIdentityRequestsRequest>,
    ) -> Result<Response<pb::ListIdentityRequestsResponse>, Status> {
        handle!(self, req, "ListIdentityRequests", |caller, _msg| {
            self.vault.identity_requests(&caller).await.map(|list| pb::ListIdentityRequestsResponse {
                requests: list.into_iter().map(Into::into).collect(),
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListIdentities"))]
    async fn list_identities(
        &self,
        req: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        handle!(self, req, "ListIdentities", |caller, _msg| {
            self.vault.list_identities(&caller).await.map(|ids| pb::ListIdentitiesResponse {
                identities: ids
                    .into_iter()
                    .map(|i| pb::IdentityInfo {
                        name: i.name,
                        role: i.role,
                        created_ms: i.created_ms,
                        created_by: i.created_by,
                        revoked_ms: i.revoked_ms.unwrap_or(0),
                    })
                    .collect(),
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "RevokeIdentity"))]
    async fn revoke_identity(
        &self,
        req: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevokeIdentityResponse>, Status> {
        handle!(self, req, "RevokeIdentity", |caller, msg| {
            self.vault.revoke_identity(&caller, &msg.name).await.map(|()| pb::RevokeIdentityResponse {})
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "ReloadRegulations"))]
    async fn reload_regulations(
        &self,
        req: Request<pb::ReloadRegulationsRequest>,
    ) -> Result<Response<pb::RegulationsInfo>, Status> {
        handle!(self, req, "ReloadRegulations", |caller, _msg| self
            .vault
            .reload_regulations(Some(&caller))
            .await
            .map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = "GetRegulations"))]
    async fn get_regulations(
        &self,
        req: Request<pb::GetRegulationsRequest>,
    ) -> Result<Response<pb::RegulationsInfo>, Status> {
        handle!(self, req, "GetRegulations", |caller, _msg| self
            .vault
            .regulations_info(&caller)
            .await
            .map(Into::into))
    }
}

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
            decision: e.decision,
            rule: e.rule,
            reason: e.reason,
            regulations_version: e.regulations_version,
            key_versions: e.key_versions,
            outcome: e.outcome,
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

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Streams what a blocking scan of the store produces, without holding the runtime.
fn stream_blocking<T: Send + 'static>(
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

    #[tracing::instrument(skip_all, fields(rpc = "QueryAudit"))]
    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<Self::QueryAuditStream>, Status> {
        let caller = self.caller(&req, "QueryAudit").await?;
        let msg = req.into_inner();
        let filter = self
            .vault
            .audit_read(&caller, "QueryAudit", filter_in(&msg), Some(&msg.subject_id))
            .await
            .map_err(|e| status(e, &caller.request_id))?;
        let stream = stream_blocking(self.vault.clone(), caller.request_id.clone(), move |vault, send| {
            for entry in vault.audit_entries(filter) {
                let failed = entry.is_err();
                if !send(entry.map(Into::into)) || failed {
                    break;
                }
            }
        });
        Ok(respond(stream, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ExportAudit"))]
    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let caller = self.caller(&req, "ExportAudit").await?;
        self.vault
            .audit_read(&caller, "ExportAudit", AuditFilter::default(), None)
            .await
            .map_err(|e| status(e, &caller.request_id))?;
        let stream = stream_blocking(self.vault.clone(), caller.request_id.clone(), move |vault, send| {
            match vault.audit_export() {
                Ok(lines) => {
                    for line in lines {
                        let failed = line.is_err();
                        if !send(line.map(|json| pb::AuditLine { json })) || failed {
                            break;
                        }
                    }
                }
                Err(e) => {
                    send(Err(e));
                }
            }
        });
        Ok(respond(stream, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = "VerifyAudit"))]
    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        handle!(self, req, "VerifyAudit", |caller, msg| {
            let witnessed = msg.witnessed.into_iter().map(|h| (h.seq, h.hash)).collect();
            self.vault.verify_audit(&caller, witnessed).await.map(|(r, state)| {
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
                }
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "AuditPublicKey"))]
    async fn audit_public_key(
        &self,
        req: Request<pb::AuditPublicKeyRequest>,
    ) -> Result<Response<pb::AuditPublicKeyResponse>, Status> {
        handle!(self, req, "AuditPublicKey", |caller, _msg| {
            self.vault
                .audit_public_key(&caller)
                .await
                .map(|public_key| pb::AuditPublicKeyResponse { public_key })
        })
    }
}

impl From<SealStatus> for pb::SealState {
    fn from(s: SealStatus) -> Self {
        Self {
            sealed: s.sealed,
            threshold: s.threshold.into(),
            custodians: s.custodians.into(),
            received: s.received.into_iter().map(u32::from).collect(),
            rekey: s.rekey.map(Into::into),
        }
    }
}

impl From<RekeyStatus> for pb::RekeyStatus {
    fn from(s: RekeyStatus) -> Self {
        Self {
            nonce: s.nonce.unwrap_or_default(),
            threshold: s.threshold.into(),
            custodians: s.custodians.into(),
            passphrases_set: s.passphrases_set.into_iter().map(u32::from).collect(),
            approved: s.approved.into_iter().map(u32::from).collect(),
            approvals_needed: s.approvals_needed.into(),
            started_by: s.started_by,
            expires_ms: s.expires_ms,
            done: s.done,
        }
    }
}

impl From<JobStatus> for pb::KeyJob {
    fn from(j: JobStatus) -> Self {
        let (kind, target_version) = match j.kind {
            JobKind::Rewrap { target } => ("rewrap", target),
            JobKind::Reencrypt => ("reencrypt", 0),
        };
        Self {
            kind: kind.into(),
            target_version,
            changed: j.changed,
            skipped: j.skipped,
            total: j.total,
            started_ms: j.started_ms,
            finished_ms: j.finished_ms.unwrap_or(0),
            requested_by: j.requested_by,
            rate_per_sec: j.rate_per_sec,
            eta_secs: j.eta_secs,
        }
    }
}

impl From<KeyStatus> for pb::KeysStatus {
    fn from(k: KeyStatus) -> Self {
        Self {
            versions: k
                .versions
                .into_iter()
                .map(|v| pb::KeyVersion {
                    version: v.version,
                    state: v.state.as_str().into(),
                    created_ms: v.created_ms,
                    retired_ms: v.retired_ms.unwrap_or(0),
                    data_keys: v.data_keys,
                    overdue: v.overdue,
                })
                .collect(),
            job: k.job.map(Into::into),
            cryptoperiod_days: k.cryptoperiod_days,
        }
    }
}

impl From<IdentityRequest> for pb::IdentityRequest {
    fn from(r: IdentityRequest) -> Self {
        Self {
            id: r.id,
            name: r.name,
            role: r.role,
            requested_by: r.requested_by,
            requested_ms: r.requested_ms,
            expires_ms: r.expires_ms,
        }
    }
}

fn custodian_in(n: u32) -> Result<u8, VaultError> {
    u8::try_from(n).map_err(|_| VaultError::InvalidArgument(format!("custodian {n} does not exist")))
}

/// Runs a custodian's call (Argon2id, slow on purpose) off the async runtime. These calls carry
/// no token: the passphrase is the credential, and the vault audits each attempt itself.
/// A custodian's step of the rekey ceremony (nonce, custodian number, passphrase; no token).
struct CeremonyCall {
    request_id: String,
    client_id: String,
    peer: Option<std::net::SocketAddr>,
}

/// The ceremony step a custodian takes with their passphrase.
#[derive(Clone, Copy)]
enum CeremonyStep {
    Passphrase,
    Approve,
}

impl CeremonyCall {
    fn of<T>(req: &Request<T>) -> Self {
        Self { request_id: request_id(req), client_id: client_request_id(req), peer: req.remote_addr() }
    }

    async fn run(
        self,
        vault: &Arc<Vault>,
        nonce: String,
        custodian: u32,
        passphrase: String,
        step: CeremonyStep,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        let (nonce, passphrase) = (Zeroizing::new(nonce), Zeroizing::new(passphrase));
        let Self { request_id, client_id, peer } = self;
        let rid = request_id.clone();
        let out = custodian_call(vault, &request_id, peer, move |v| async move {
            let custodian = custodian_in(custodian)?;
            match step {
                CeremonyStep::Passphrase => {
                    v.rekey_passphrase(&nonce, custodian, passphrase.as_bytes(), peer, &rid, &client_id).await
                }
                CeremonyStep::Approve => {
                    v.rekey_approve(&nonce, custodian, passphrase.as_bytes(), peer, &rid, &client_id).await
                }
            }
        })
        .await?;
        if out.done {
            // A new root key: a key job waiting for the keys may go on.
            vault.job_signal.notify_one();
        }
        Ok(stamped(out.into(), &request_id))
    }
}

/// A wrong passphrase or nonce is a failure of its address too: the answer waits its turn. The
/// call derives from a passphrase (Argon2id, tens of milliseconds of CPU), so it runs on the
/// blocking pool, driving its own store calls there.
async fn custodian_call<T: Send + 'static, F: std::future::Future<Output = Result<T, VaultError>>>(
    vault: &Arc<Vault>,
    request_id: &str,
    peer: Option<std::net::SocketAddr>,
    call: impl FnOnce(Arc<Vault>) -> F + Send + 'static,
) -> Result<T, Status> {
    let v = vault.clone();
    let runtime = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || runtime.block_on(call(v)))
        .await
        .map_err(|_| Status::internal(format!("internal error (request id {request_id})")))?;
    match result {
        Ok(value) => Ok(value),
        Err(VaultError::PermissionDenied(m)) => {
            let wait = vault.failure_answer_delay(peer.map(|p| p.ip())).map_err(|e| status(e, request_id))?;
            tokio::time::sleep(wait).await;
            Err(status(VaultError::PermissionDenied(m), request_id))
        }
        Err(e) => Err(status(e, request_id)),
    }
}

#[tonic::async_trait]
impl Operator for Api {
    #[tracing::instrument(skip_all, fields(rpc = "SealStatus"))]
    async fn seal_status(
        &self,
        req: Request<pb::SealStatusRequest>,
    ) -> Result<Response<pb::SealState>, Status> {
        let (request_id, client_id, peer) = (request_id(&req), client_request_id(&req), req.remote_addr());
        let rid = request_id.clone();
        let out = custodian_call(&self.vault, &request_id, peer, move |v| async move {
            v.seal_status_audited(peer, &rid, &client_id).await
        })
        .await?;
        Ok(stamped(out.into(), &request_id))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Unseal"))]
    async fn unseal(&self, req: Request<pb::UnsealRequest>) -> Result<Response<pb::SealState>, Status> {
        let (request_id, client_id, peer) = (request_id(&req), client_request_id(&req), req.remote_addr());
        let msg = req.into_inner();
        let passphrase = Zeroizing::new(msg.passphrase);
        let rid = request_id.clone();
        let out = custodian_call(&self.vault, &request_id, peer, move |v| async move {
            v.unseal_with(custodian_in(msg.custodian)?, passphrase.as_bytes(), peer, &rid, &client_id).await
        })
        .await?;
        Ok(stamped(out.into(), &request_id))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ChangePassphrase"))]
    async fn change_passphrase(
        &self,
        req: Request<pb::ChangePassphraseRequest>,
    ) -> Result<Response<pb::ChangePassphraseResponse>, Status> {
        let (request_id, client_id, peer) = (request_id(&req), client_request_id(&req), req.remote_addr());
        let msg = req.into_inner();
        let (old, new) = (Zeroizing::new(msg.old_passphrase), Zeroizing::new(msg.new_passphrase));
        let rid = request_id.clone();
        custodian_call(&self.vault, &request_id, peer, move |v| async move {
            v.change_passphrase(
                custodian_in(msg.custodian)?,
                old.as_bytes(),
                new.as_bytes(),
                peer,
                &rid,
                &client_id,
            )
            .await
        })
        .await?;
        Ok(stamped(pb::ChangePassphraseResponse {}, &request_id))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Seal"))]
    async fn seal(&self, req: Request<pb::SealRequest>) -> Result<Response<pb::SealState>, Status> {
        handle!(self, req, "Seal", |caller, _msg| self.vault.seal(&caller).await.map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Rekey"))]
    async fn rekey(&self, req: Request<pb::RekeyRequest>) -> Result<Response<pb::RekeyStatus>, Status> {
        handle!(self, req, "Rekey", |caller, msg| {
            match (u8::try_from(msg.threshold), u8::try_from(msg.custodians)) {
                (Ok(threshold), Ok(custodians)) => {
                    self.vault.start_rekey(&caller, threshold, custodians).await.map(Into::into)
                }
                _ => Err(VaultError::InvalidArgument("at most 255 custodians".into())),
            }
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = "RekeyPassphrase"))]
    async fn rekey_passphrase(
        &self,
        req: Request<pb::RekeyPassphraseRequest>,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        let call = CeremonyCall::of(&req);
        let msg = req.into_inner();
        call.run(&self.vault, msg.nonce, msg.custodian, msg.passphrase, CeremonyStep::Passphrase).await
    }

    #[tracing::instrument(skip_all, fields(rpc = "RekeyApprove"))]
    async fn rekey_approve(
        &self,
        req: Request<pb::RekeyApproveRequest>,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        let call = CeremonyCall::of(&req);
        let msg = req.into_inner();
        call.run(&self.vault, msg.nonce, msg.custodian, msg.passphrase, CeremonyStep::Approve).await
    }

    #[tracing::instrument(skip_all, fields(rpc = "RekeyCancel"))]
    async fn rekey_cancel(
        &self,
        req: Request<pb::RekeyCancelRequest>,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        handle!(self, req, "RekeyCancel", |caller, _msg| self
            .vault
            .cancel_rekey(&caller)
            .await
            .map(Into::into))
    }
}

#[tonic::async_trait]
impl Keys for Api {
    #[tracing::instrument(skip_all, fields(rpc = "RotateKey"))]
    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::KeysStatus>, Status> {
        handle!(self, req, "RotateKey", |caller, _msg| self.vault.rotate(&caller).await.map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = "KeyStatus"))]
    async fn key_status(
        &self,
        req: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeysStatus>, Status> {
        handle!(self, req, "KeyStatus", |caller, msg| self
            .vault
            .key_status(&caller, msg.count_data_keys)
            .await
            .map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = "RetireKey"))]
    async fn retire_key(
        &self,
        req: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        handle!(self, req, "RetireKey", |caller, msg| self
            .vault
            .retire(&caller, msg.version)
            .await
            .map(|()| pb::RetireKeyResponse {}))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Reencrypt"))]
    async fn reencrypt(
        &self,
        req: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        use pb::reencrypt_request::Target;
        handle!(self, req, "Reencrypt", |caller, msg| {
            let target = match msg.target {
                Some(Target::RecordId(id)) => Ok(ReencryptTarget::Record(id)),
                Some(Target::SubjectId(s)) => Ok(ReencryptTarget::Subject(s)),
                Some(Target::All(true)) => Ok(ReencryptTarget::All),
                _ => Err(VaultError::InvalidArgument("name a record_id, a subject_id, or all = true".into())),
            };
            match target {
                Ok(t) => {
                    self.vault.reencrypt(&caller, t).await.map(|records| pb::ReencryptResponse { records })
                }
                Err(e) => Err(e),
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How long open requests may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests whose message does not decode (invalid UTF-8 in a string, a wrong wire type) never
/// reach a handler: tonic answers `Internal` for them, unaudited. This layer turns that answer
/// into `InvalidArgument` and records the request like any other refused one.
#[derive(Clone)]
struct UndecodableRequests {
    vault: Arc<Vault>,
}

impl<S> tower::Layer<S> for UndecodableRequests {
    type Service = UndecodableService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UndecodableService { inner, vault: self.vault.clone() }
    }
}

#[derive(Clone)]
struct UndecodableService<S> {
    inner: S,
    vault: Arc<Vault>,
}

impl<S, B> tower::Service<http::Request<B>> for UndecodableService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .or_else(|| {
                req.extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            });
        let client_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(sanitize_client_id)
            .unwrap_or_default();
        let vault = self.vault.clone();
        // The clone that was made ready is the one to call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let refuse = move || {
                let request_id = uuid::Uuid::new_v4().to_string();
                tokio::spawn(async move {
                    let err = undecodable();
                    if let Err(e) = vault.audit_refused(&rpc, peer, &request_id, &client_id, &err).await {
                        tracing::error!(request_id, error = %e, "could not audit an undecodable request");
                    }
                });
            };
            // The status comes in the headers (trailers-only answer) or in the trailers.
            if failed_to_decode(resp.headers()) {
                refuse();
                return Ok(status(undecodable(), "").into_http::<tonic::body::Body>());
            }
            let (parts, body) = resp.into_parts();
            let body = WatchTrailers { inner: body, on_failure: Some(Box::new(refuse)) };
            Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

fn undecodable() -> VaultError {
    VaultError::InvalidArgument(
        "the request does not decode as this RPC's message (invalid UTF-8 in a string, or a wrong wire type)"
            .into(),
    )
}

fn failed_to_decode(headers: &http::HeaderMap) -> bool {
    headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains("decode Protobuf message"))
}

/// A response body whose trailers are checked for tonic's decode failure, rewritten to
/// `InvalidArgument`, and reported once.
struct WatchTrailers {
    inner: tonic::body::Body,
    on_failure: Option<Box<dyn FnOnce() + Send>>,
}

impl http_body::Body for WatchTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if failed_to_decode(&trailers) {
                        trailers.insert("grpc-status", http::HeaderValue::from_static("3"));
                        if let Ok(m) =
                            http::HeaderValue::from_str(&undecodable().to_string().replace(' ', "%20"))
                        {
                            trailers.insert("grpc-message", m);
                        }
                        if let Some(report) = this.on_failure.take() {
                            report();
                        }
                    }
                    std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
                Err(frame) => std::task::Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// Serves the vault's gRPC API, health and reflection on `listener` until `shutdown` resolves;
/// over TLS when `tls` is given (with client certificates if it names a client CA). The
/// background key jobs and the final flush are the caller's (the daemon's): see
/// [`crate::lifecycle::spawn_key_jobs`] and [`Vault::shut_down`].
pub async fn serve(
    vault: Arc<Vault>,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let max = vault.limits().max_message_bytes;
    let api = Api::new(vault.clone());
    let records =
        RecordsServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let subjects =
        SubjectsServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let admin = AdminServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let audit = AuditServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let operator =
        OperatorServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let keys = KeysServer::new(api).max_decoding_message_size(max).max_encoding_message_size(max);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RecordsServer<Api>>().await;
    health.set_serving::<SubjectsServer<Api>>().await;
    health.set_serving::<AdminServer<Api>>().await;
    health.set_serving::<AuditServer<Api>>().await;
    health.set_serving::<OperatorServer<Api>>().await;
    health.set_serving::<KeysServer<Api>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(khlang_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Health tells the truth about the audit log: while it holds a break the operator has not
    // accepted, the data services (and the server as a whole) answer NOT_SERVING. Once unsealed,
    // the whole log's history is verified here too, beside serving.
    let (stop_watch, mut stopped) = tokio::sync::watch::channel(false);
    let watcher = {
        let (health, vault) = (health.clone(), vault.clone());
        tokio::spawn(async move {
            let mut shown = None;
            let mut history_checked = false;
            loop {
                let broken = matches!(vault.audit_state(), crate::audit::LogState::Broken(_));
                if shown != Some(broken) {
                    use tonic_health::ServingStatus::{NotServing, Serving};
                    health.set_service_status("", if broken { NotServing } else { Serving }).await;
                    if broken {
                        health.set_not_serving::<RecordsServer<Api>>().await;
                        health.set_not_serving::<SubjectsServer<Api>>().await;
                    } else {
                        health.set_serving::<RecordsServer<Api>>().await;
                        health.set_serving::<SubjectsServer<Api>>().await;
                    }
                    shown = Some(broken);
                }
                if vault.repeats_counting() {
                    // Summaries of repeated unauthenticated events, once their interval ends.
                    let vault = vault.clone();
                    if let Err(e) = vault.write_repeats(false).await {
                        tracing::error!(error = %e, "could not write the summaries of repeated events");
                    }
                }
                if !history_checked && !vault.is_sealed() {
                    // About a second per million entries, on the blocking pool.
                    history_checked = true;
                    let vault = vault.clone();
                    if let Err(e) = vault.check_audit_history().await {
                        tracing::error!(error = %e, "the audit log's history could not be verified");
                    }
                    continue;
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
    };
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stop_watch.send(true);
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        health.set_not_serving::<RecordsServer<Api>>().await;
        health.set_not_serving::<SubjectsServer<Api>>().await;
        health.set_not_serving::<AdminServer<Api>>().await;
        health.set_not_serving::<AuditServer<Api>>().await;
        health.set_not_serving::<OperatorServer<Api>>().await;
        health.set_not_serving::<KeysServer<Api>>().await;
        let _ = stopping_tx.send(());
    };
    let mut builder = tonic::transport::Server::builder().layer(UndecodableRequests { vault: vault.clone() });
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(records)
        .add_service(subjects)
        .add_service(admin)
        .add_service(audit)
        .add_service(operator)
        .add_service(keys)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async { let _ = stopping_rx.await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!("drain timeout: closing with requests still open");
        }
    }
    // The watcher holds the vault: it lets go before serve returns, so the caller's final flush
    // (`Vault::shut_down`) runs with nothing else writing.
    let _ = watcher.await;
    Ok(())
}
