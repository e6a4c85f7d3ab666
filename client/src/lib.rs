//! Typed client for the Khlang vault's gRPC API. Only this crate and the server's wire layer see
//! protobuf types; callers get plain Rust types, with field values wiped on drop.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

use khlang_proto::pb::{self, records_client::RecordsClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

pub use tonic::Code;

/// Default address of a development vault.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7420";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The vault answered with an error status.
    #[error("{}: {}", code_name(.code), .message)]
    Status { code: Code, message: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("invalid vault address '{0}'")]
    InvalidAddress(String),
    #[error("the token contains characters that cannot be sent in a header")]
    InvalidToken,
}

fn code_name(code: &Code) -> String {
    format!("{code:?}")
}

impl ClientError {
    /// The gRPC status code, if the vault answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Status { code: s.code(), message: s.message().to_owned() }
    }
}

/// Plaintext personal data on the client side: wiped on drop, `Debug` prints nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(Zeroizing<String>);

impl SecretText {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(..)")
    }
}

/// A record as read: field name → value.
#[derive(Debug, Clone)]
pub struct Record {
    pub record_id: String,
    pub subject_id: SecretText,
    pub fields: BTreeMap<String, SecretText>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    pub record_id: String,
    pub field_names: Vec<String>,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A connection to a vault, authenticated as one identity. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Client {
    records: RecordsClient<InterceptedService<Channel, BearerAuth>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

fn to_pb_fields<K: Into<String>, V: Into<String>>(
    fields: impl IntoIterator<Item = (K, V)>,
) -> Vec<pb::Field> {
    fields.into_iter().map(|(k, v)| pb::Field { name: k.into(), value: v.into() }).collect()
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:7420`) with a bearer token.
    pub async fn connect(addr: &str, token: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|_| ClientError::InvalidAddress(addr.to_owned()))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { addr: addr.to_owned(), source })?;
        Self::with_channel(channel, token)
    }

    /// Uses an existing channel (e.g. one configured for TLS).
    pub fn with_channel(channel: Channel, token: &str) -> Result<Self, ClientError> {
        let header = Zeroizing::new(format!("Bearer {token}"));
        let mut value: MetadataValue<Ascii> = header.parse().map_err(|_| ClientError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self {
            records: RecordsClient::with_interceptor(channel, BearerAuth(value))
                .max_decoding_message_size(64 << 20),
        })
    }

    /// Stores a new record for `subject`; returns its id.
    pub async fn put<K: Into<String>, V: Into<String>>(
        &mut self,
        subject: &str,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<String, ClientError> {
        let req = pb::PutRecordRequest { subject_id: subject.to_owned(), fields: to_pb_fields(fields) };
        Ok(self.records.put_record(req).await?.into_inner().record_id)
    }

    /// Reads a record: every field, or only those named. `purpose` says why (required by the regulations).
    pub async fn get(
        &mut self,
        record_id: &str,
        fields: &[String],
        purpose: Option<&str>,
    ) -> Result<Record, ClientError> {
        let req = pb::GetRecordRequest {
            record_id: record_id.to_owned(),
            fields: fields.to_vec(),
            purpose: purpose.unwrap_or_default().to_owned(),
        };
        let resp = self.records.get_record(req).await?.into_inner();
        Ok(Record {
            record_id: resp.record_id,
            subject_id: SecretText::new(resp.subject_id),
            fields: resp.fields.into_iter().map(|f| (f.name, SecretText::new(f.value))).collect(),
        })
    }

    /// Sets and removes fields; returns the field names the record holds afterwards.
    pub async fn update<K: Into<String>, V: Into<String>>(
        &mut self,
        record_id: &str,
        set: impl IntoIterator<Item = (K, V)>,
        remove: &[String],
    ) -> Result<Vec<String>, ClientError> {
        let req = pb::UpdateRecordRequest {
            record_id: record_id.to_owned(),
            set: to_pb_fields(set),
            remove: remove.to_vec(),
        };
        Ok(self.records.update_record(req).await?.into_inner().field_names)
    }

    /// Destroys a record and its data key.
    pub async fn delete(&mut self, record_id: &str) -> Result<(), ClientError> {
        self.records.delete_record(pb::DeleteRecordRequest { record_id: record_id.to_owned() }).await?;
        Ok(())
    }

    /// A subject's record ids and field names.
    pub async fn list(&mut self, subject: &str) -> Result<Vec<RecordSummary>, ClientError> {
        let resp =
            self.records.list_records(pb::ListRecordsRequest { subject_id: subject.to_owned() }).await?;
        Ok(resp
            .into_inner()
            .records
            .into_iter()
            .map(|r| RecordSummary { record_id: r.record_id, field_names: r.field_names })
            .collect())
    }
}
