//! The wire layer: the only module that sees protobuf types. Each handler authenticates, converts
//! pb → domain, calls one domain operation, and converts back. Errors map to `Status` in one place.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use khlang_keys::Plaintext;
use khlang_proto::pb::{self, records_server::Records, records_server::RecordsServer};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::{Caller, FieldValue, RecordView, Vault, VaultError};

/// Metadata key of the request id, echoed back on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The single mapping from domain errors to gRPC statuses. Internal details go to the server log
/// under the request id, not to the caller.
pub fn status(err: VaultError, request_id: &str) -> Status {
    match err {
        VaultError::InvalidArgument(m) => Status::invalid_argument(m),
        VaultError::LimitExceeded(m) => Status::resource_exhausted(m),
        VaultError::Unauthenticated => Status::unauthenticated(err.to_string()),
        VaultError::PermissionDenied(m) => Status::permission_denied(m),
        VaultError::NotFound(_) => Status::not_found(err.to_string()),
        VaultError::Integrity { .. } => {
            tracing::error!(request_id, error = %err, "stored data failed its integrity check");
            Status::data_loss(format!("{err}; no data returned"))
        }
        VaultError::FailedPrecondition(m) => Status::failed_precondition(m),
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

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The gRPC `khlang.v1.Records` service over a [`Vault`].
#[derive(Debug, Clone)]
pub struct RecordsService {
    vault: Arc<Vault>,
}

impl RecordsService {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// The authenticate step: every handler starts here.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let request_id = request_id(req);
        let identity = self.vault.authenticate(bearer(req)).map_err(|e| {
            if matches!(e, VaultError::Unauthenticated) {
                tracing::warn!(target: "khlang::auth", request_id, peer = ?req.remote_addr(), "authentication failed");
            }
            status(e, &request_id)
        })?;
        Ok(Caller { identity, peer: req.remote_addr(), request_id })
    }
}

fn respond<T>(msg: T, caller: &Caller) -> Response<T> {
    let mut resp = Response::new(msg);
    if let Ok(v) = MetadataValue::try_from(caller.request_id.as_str()) {
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

impl From<RecordView> for pb::GetRecordResponse {
    fn from(view: RecordView) -> Self {
        Self {
            subject_id: text_out(&view.subject_id),
            fields: view
                .fields
                .iter()
                .map(|f| pb::Field { name: f.name.clone(), value: text_out(&f.value) })
                .collect(),
            record_id: view.record_id,
        }
    }
}

#[tonic::async_trait]
impl Records for RecordsService {
    #[tracing::instrument(skip_all, fields(rpc = "PutRecord"))]
    async fn put_record(
        &self,
        req: Request<pb::PutRecordRequest>,
    ) -> Result<Response<pb::PutRecordResponse>, Status> {
        let caller = self.caller(&req)?;
        let msg = req.into_inner();
        let record_id = self
            .vault
            .put(&caller, &msg.subject_id, fields_in(msg.fields))
            .await
            .map_err(|e| status(e, &caller.request_id))?;
        Ok(respond(pb::PutRecordResponse { record_id }, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = "GetRecord"))]
    async fn get_record(
        &self,
        req: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::GetRecordResponse>, Status> {
        let caller = self.caller(&req)?;
        let msg = req.into_inner();
        let purpose = Some(msg.purpose.as_str()).filter(|p| !p.is_empty());
        let view = self
            .vault
            .get(&caller, &msg.record_id, &msg.fields, purpose)
            .map_err(|e| status(e, &caller.request_id))?;
        Ok(respond(view.into(), &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = "UpdateRecord"))]
    async fn update_record(
        &self,
        req: Request<pb::UpdateRecordRequest>,
    ) -> Result<Response<pb::UpdateRecordResponse>, Status> {
        let caller = self.caller(&req)?;
        let msg = req.into_inner();
        let field_names = self
            .vault
            .update(&caller, &msg.record_id, fields_in(msg.set), &msg.remove)
            .await
            .map_err(|e| status(e, &caller.request_id))?;
        Ok(respond(pb::UpdateRecordResponse { field_names }, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = "DeleteRecord"))]
    async fn delete_record(
        &self,
        req: Request<pb::DeleteRecordRequest>,
    ) -> Result<Response<pb::DeleteRecordResponse>, Status> {
        let caller = self.caller(&req)?;
        let msg = req.into_inner();
        self.vault.delete(&caller, &msg.record_id).await.map_err(|e| status(e, &caller.request_id))?;
        Ok(respond(pb::DeleteRecordResponse {}, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = "ListRecords"))]
    async fn list_records(
        &self,
        req: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        let caller = self.caller(&req)?;
        let msg = req.into_inner();
        let records = self.vault.list(&caller, &msg.subject_id).map_err(|e| status(e, &caller.request_id))?;
        let records = records
            .into_iter()
            .map(|r| pb::RecordSummary { record_id: r.record_id, field_names: r.field_names })
            .collect();
        Ok(respond(pb::ListRecordsResponse { records }, &caller))
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

/// Serves the vault's gRPC API, health and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    vault: Arc<Vault>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let max = vault.limits().max_message_bytes;
    let records = RecordsServer::new(RecordsService::new(vault.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RecordsServer<RecordsService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(khlang_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        health.set_not_serving::<RecordsServer<RecordsService>>().await;
        let _ = stopping_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(records)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async { let _ = stopping_rx.await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!("drain timeout: closing with requests still open");
        }
    }
    vault.flush().map_err(|e| tracing::error!(error = %e, "final flush failed")).ok();
    let stats = vault.flush_stats();
    tracing::info!(
        flushes = stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
        durable_writes = stats.writes.load(std::sync::atomic::Ordering::Relaxed),
        "durability: writes acknowledged after a shared flush"
    );
    Ok(())
}
