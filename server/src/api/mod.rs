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
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use x509_cert::der::Decode;
use zeroize::Zeroizing;

use crate::audit::{AuditEntry, AuditFilter, Rpc};
use crate::error::Outcome;
use crate::storage::JobKind;
use crate::storage::StoredConsent;
use crate::vault::identities::{IdentityCreation, IdentityRequest};
use crate::vault::keyops::rekey::RekeyStatus;
use crate::vault::keyops::{JobStatus, KeyStatus, ReencryptTarget, SealStatus};
use crate::{Caller, Credentials, FieldValue, RecordView, RegulationsInfo, Vault, VaultError};

/// Metadata key of the request id, echoed back on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// A failed authentication answers no sooner than this, whatever failed (and slows guessing).
pub const FAILED_AUTH_FLOOR: Duration = Duration::from_millis(50);

/// Domain errors as gRPC statuses: the code is the error's [`Outcome`] (the same one its audit
/// entry records); internal details go to the server log under the request id, not to the caller.
pub fn status(err: VaultError, request_id: &str) -> Status {
    let outcome = err.outcome();
    let message = match outcome {
        Outcome::DataLoss => {
            tracing::error!(request_id, error = %err, "stored data failed its integrity check");
            format!("{err}; no data returned")
        }
        Outcome::Unavailable if matches!(err, VaultError::AuditUnavailable) => {
            tracing::error!(request_id, "audit write failed; request refused");
            "the request could not be audited, so it was refused; no data returned".to_owned()
        }
        Outcome::Unavailable => {
            tracing::error!(request_id, error = %err, "this node cannot serve");
            format!("{err}; no data returned")
        }
        Outcome::Internal => {
            tracing::error!(request_id, error = %err, "internal error");
            format!("internal error (request id {request_id}); see the server log")
        }
        _ => err.to_string(),
    };
    Status::new(wire_code(outcome), message)
}

fn wire_code(outcome: Outcome) -> tonic::Code {
    use tonic::Code;
    match outcome {
        Outcome::Ok => Code::Ok,
        Outcome::InvalidArgument => Code::InvalidArgument,
        Outcome::ResourceExhausted => Code::ResourceExhausted,
        Outcome::Unauthenticated => Code::Unauthenticated,
        Outcome::PermissionDenied => Code::PermissionDenied,
        Outcome::NotFound => Code::NotFound,
        Outcome::AlreadyExists => Code::AlreadyExists,
        Outcome::DataLoss => Code::DataLoss,
        Outcome::FailedPrecondition => Code::FailedPrecondition,
        Outcome::Unavailable => Code::Unavailable,
        Outcome::Internal => Code::Internal,
        Outcome::Aborted => Code::Aborted,
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
    async fn caller<T>(&self, req: &Request<T>, rpc: Rpc) -> Result<Caller, Status> {
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
    ($self:ident, $req:ident, $rpc:expr, |$caller:ident, $msg:ident| $body:expr) => {{
        let $caller = $self.caller(&$req, $rpc).await?;
        let $msg = $req.into_inner();
        let out: Result<_, VaultError> = $body;
        match out {
            Ok(v) => Ok(respond(v, &$caller)),
            Err(e) => Err(status(e, &$caller.request_id)),
        }
    }};
}

mod admin;
mod audit;
mod keys;
mod observe;
mod operator;
mod records;
mod serve;
mod subjects;
mod tls;

pub use serve::{ServeError, serve};
pub use tls::{ServerTls, TlsSetupError};
