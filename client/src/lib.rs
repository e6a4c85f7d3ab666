//! Typed client for the Khlang vault's gRPC API. Only this crate and the server's wire layer see
//! protobuf types; callers get plain Rust types, with field values wiped on drop.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

use khlang_proto::pb::{
    self, admin_client::AdminClient, audit_client::AuditClient, keys_client::KeysClient,
    operator_client::OperatorClient, records_client::RecordsClient, subjects_client::SubjectsClient,
};

pub use khlang_keys::audit_chain::{ChainBreak, ChainReport, Checkpoint, Verdict};
use khlang_keys::audit_chain::{ChainVerifier, verify_checkpoint};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use zeroize::Zeroizing;

pub use tonic::Code;

mod bulk;
mod types;
mod verify;
pub use bulk::*;
pub use types::*;
pub use verify::*;

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
    #[error("TLS configuration: {0}")]
    Tls(String),
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

/// What a request the server never saw is reported as (see [`never_processed`]).
const NOT_PROCESSED: &str = "the server closed the connection before it processed this request (it is shutting down): nothing was done, it is safe to retry";

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        if never_processed(&s) {
            return Self::Status { code: Code::Unavailable, message: NOT_PROCESSED.to_owned() };
        }
        Self::Status { code: s.code(), message: s.message().to_owned() }
    }
}

/// A server shutting down gracefully sends GOAWAY (NO_ERROR) naming the last stream it will
/// process; a stream above it, or one opened after it, never reached the vault. tonic reports
/// such a stream as Internal (gRPC's mapping of a NO_ERROR reset), which would tell a caller
/// that something broke mid-request; gRPC treats it as unprocessed and retryable, so it becomes
/// Unavailable here. Only a GOAWAY *received from the server* counts: a stream the server had
/// accepted and whose answer was lost ends otherwise (a broken pipe, Unknown).
fn never_processed(s: &tonic::Status) -> bool {
    if s.code() != Code::Internal {
        return false;
    }
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        cause = e.source();
    }
    false
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

/// TLS settings: the CA that signed the vault's certificate, and optionally a client certificate
/// (mutual TLS) whose subject common name is the identity to act as.
#[derive(Clone, Default)]
pub struct TlsOptions {
    pub ca_pem: Vec<u8>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Zeroizing<Vec<u8>>>,
    /// The name to check the server certificate against, when it differs from the address's host.
    pub domain: Option<String>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Adds `authorization: Bearer <token>` to every call (if there is a token).
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, BearerAuth>;

/// A connection to a vault, authenticated as one identity. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Client {
    records: RecordsClient<Authed>,
    subjects: SubjectsClient<Authed>,
    admin: AdminClient<Authed>,
    audit: AuditClient<Authed>,
    operator: OperatorClient<Authed>,
    keys: KeysClient<Authed>,
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
        Self::connect_with(addr, Some(token), None).await
    }

    /// Connects with an optional token and optional TLS (an `https://` address needs `tls`).
    pub async fn connect_with(
        addr: &str,
        token: Option<&str>,
        tls: Option<&TlsOptions>,
    ) -> Result<Self, ClientError> {
        let mut endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|_| ClientError::InvalidAddress(addr.to_owned()))?;
        if let Some(tls) = tls {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let (Some(cert), Some(key)) = (&tls.client_cert_pem, &tls.client_key_pem) {
                config = config.identity(TlsIdentity::from_pem(cert, key.as_slice()));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { addr: addr.to_owned(), source })?;
        Self::with_channel(channel, token)
    }

    /// Uses an existing channel.
    pub fn with_channel(channel: Channel, token: Option<&str>) -> Result<Self, ClientError> {
        let value = match token {
            Some(token) => {
                let header = Zeroizing::new(format!("Bearer {token}"));
                let mut value: MetadataValue<Ascii> =
                    header.parse().map_err(|_| ClientError::InvalidToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let auth = BearerAuth(value);
        Ok(Self {
            records: RecordsClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(64 << 20),
            subjects: SubjectsClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(64 << 20),
            admin: AdminClient::with_interceptor(channel.clone(), auth.clone()),
            audit: AuditClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(64 << 20),
            operator: OperatorClient::with_interceptor(channel.clone(), auth.clone()),
            keys: KeysClient::with_interceptor(channel, auth),
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

    /// Records a subject's consent (`granted`) or opt-out for a purpose.
    pub async fn set_consent(
        &mut self,
        subject: &str,
        purpose: &str,
        granted: bool,
    ) -> Result<ConsentEntry, ClientError> {
        let req =
            pb::SetConsentRequest { subject_id: subject.to_owned(), purpose: purpose.to_owned(), granted };
        Ok(self.subjects.set_consent(req).await?.into_inner().into())
    }

    /// `(current choices, history oldest first)`.
    pub async fn consent(
        &mut self,
        subject: &str,
    ) -> Result<(Vec<ConsentEntry>, Vec<ConsentEntry>), ClientError> {
        let resp =
            self.subjects.get_consent(pb::GetConsentRequest { subject_id: subject.to_owned() }).await?;
        let r = resp.into_inner();
        Ok((r.current.into_iter().map(Into::into).collect(), r.history.into_iter().map(Into::into).collect()))
    }

    /// Every record of a subject, decrypted (PDPA access and portability).
    pub async fn export_subject(&mut self, subject: &str) -> Result<Vec<Record>, ClientError> {
        let resp =
            self.subjects.export_subject(pb::ExportSubjectRequest { subject_id: subject.to_owned() }).await?;
        let r = resp.into_inner();
        Ok(r.records
            .into_iter()
            .map(|rec| Record {
                record_id: rec.record_id,
                subject_id: SecretText::new(r.subject_id.clone()),
                fields: rec.fields.into_iter().map(|f| (f.name, SecretText::new(f.value))).collect(),
            })
            .collect())
    }

    /// Destroys every record and data key of a subject; returns how many records.
    pub async fn erase_subject(&mut self, subject: &str) -> Result<u32, ClientError> {
        let resp =
            self.subjects.erase_subject(pb::EraseSubjectRequest { subject_id: subject.to_owned() }).await?;
        Ok(resp.into_inner().records_erased)
    }

    /// Creates an identity (its token, shown once) or, for a privileged role, files a request a
    /// second identity must approve.
    pub async fn create_identity(&mut self, name: &str, role: &str) -> Result<IdentityCreation, ClientError> {
        let req = pb::CreateIdentityRequest { name: name.to_owned(), role: role.to_owned() };
        let resp = self.admin.create_identity(req).await?.into_inner();
        Ok(match resp.pending {
            Some(r) => IdentityCreation::Pending(r.into()),
            None => IdentityCreation::Created(SecretText::new(resp.token)),
        })
    }

    /// Approves another identity's request; returns the new identity's token (shown once).
    pub async fn approve_identity(&mut self, request_id: &str) -> Result<SecretText, ClientError> {
        let req = pb::ApproveIdentityRequest { request_id: request_id.to_owned() };
        Ok(SecretText::new(self.admin.approve_identity(req).await?.into_inner().token))
    }

    /// Refuses a request (or withdraws one's own).
    pub async fn refuse_identity(&mut self, request_id: &str, reason: &str) -> Result<(), ClientError> {
        let req = pb::RefuseIdentityRequest { request_id: request_id.to_owned(), reason: reason.to_owned() };
        self.admin.refuse_identity(req).await?;
        Ok(())
    }

    /// Requests waiting for approval.
    pub async fn identity_requests(&mut self) -> Result<Vec<IdentityRequest>, ClientError> {
        let resp = self.admin.list_identity_requests(pb::ListIdentityRequestsRequest {}).await?;
        Ok(resp.into_inner().requests.into_iter().map(Into::into).collect())
    }

    pub async fn list_identities(&mut self) -> Result<Vec<IdentityInfo>, ClientError> {
        let resp = self.admin.list_identities(pb::ListIdentitiesRequest {}).await?;
        Ok(resp
            .into_inner()
            .identities
            .into_iter()
            .map(|i| IdentityInfo {
                name: i.name,
                role: i.role,
                created_ms: i.created_ms,
                created_by: i.created_by,
                revoked_ms: (i.revoked_ms != 0).then_some(i.revoked_ms),
            })
            .collect())
    }

    pub async fn revoke_identity(&mut self, name: &str) -> Result<(), ClientError> {
        self.admin.revoke_identity(pb::RevokeIdentityRequest { name: name.to_owned() }).await?;
        Ok(())
    }

    pub async fn reload_regulations(&mut self) -> Result<RegulationsInfo, ClientError> {
        Ok(self.admin.reload_regulations(pb::ReloadRegulationsRequest {}).await?.into_inner().into())
    }

    pub async fn regulations(&mut self) -> Result<RegulationsInfo, ClientError> {
        Ok(self.admin.get_regulations(pb::GetRegulationsRequest {}).await?.into_inner().into())
    }

    /// Audit entries matching `query`, oldest first (needs `audit_read`).
    pub async fn query_audit(&mut self, query: &AuditQuery) -> Result<Vec<AuditRecord>, ClientError> {
        let req = pb::QueryAuditRequest {
            from_ms: query.from_ms,
            to_ms: query.to_ms,
            identity: query.identity.clone(),
            role: query.role.clone(),
            subject_id: query.subject_id.clone(),
            record_id: query.record_id.clone(),
            operation: query.operation.clone(),
            decision: query.decision.clone(),
            purpose: query.purpose.clone(),
            limit: query.limit,
        };
        let mut stream = self.audit.query_audit(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(entry) = stream.message().await? {
            out.push(entry.into());
        }
        Ok(out)
    }

    /// The whole log as JSON Lines, each line handed to `sink` as it arrives.
    pub async fn export_audit(&mut self, mut sink: impl FnMut(&str)) -> Result<u64, ClientError> {
        let mut stream = self.audit.export_audit(pb::ExportAuditRequest {}).await?.into_inner();
        let mut n = 0;
        while let Some(line) = stream.message().await? {
            sink(&line.json);
            n += 1;
        }
        Ok(n)
    }

    /// The vault's checkpoint-verifying public key (hex).
    pub async fn audit_public_key(&mut self) -> Result<String, ClientError> {
        Ok(self.audit.audit_public_key(pb::AuditPublicKeyRequest {}).await?.into_inner().public_key)
    }

    // ---- custodians and keys ----------------------------------------------------------------

    /// Whether the vault is sealed (needs no token).
    pub async fn seal_status(&mut self) -> Result<SealStatus, ClientError> {
        Ok(self.operator.seal_status(pb::SealStatusRequest {}).await?.into_inner().into())
    }

    /// Submits custodian `custodian`'s passphrase (needs no token).
    pub async fn unseal(&mut self, custodian: u32, passphrase: &str) -> Result<SealStatus, ClientError> {
        let req = pb::UnsealRequest { custodian, passphrase: passphrase.to_owned() };
        Ok(self.operator.unseal(req).await?.into_inner().into())
    }

    /// A backup of the whole vault (key admin), its bytes handed to `sink` in order until it
    /// returns false (the stream is then dropped); returns how many it took. Restore it with
    /// `khlangd restore`.
    pub async fn backup(&mut self, mut sink: impl FnMut(&[u8]) -> bool) -> Result<u64, ClientError> {
        let mut stream = self.operator.backup(pb::BackupRequest {}).await?.into_inner();
        let mut n = 0u64;
        while let Some(chunk) = stream.message().await? {
            if !sink(&chunk.data) {
                break;
            }
            n += chunk.data.len() as u64;
        }
        Ok(n)
    }

    pub async fn seal(&mut self) -> Result<SealStatus, ClientError> {
        Ok(self.operator.seal(pb::SealRequest {}).await?.into_inner().into())
    }

    /// A custodian replaces their passphrase (needs no token; the old passphrase is the credential).
    pub async fn change_passphrase(
        &mut self,
        custodian: u32,
        old: &str,
        new: &str,
    ) -> Result<(), ClientError> {
        let req = pb::ChangePassphraseRequest {
            custodian,
            old_passphrase: old.to_owned(),
            new_passphrase: new.to_owned(),
        };
        self.operator.change_passphrase(req).await?;
        Ok(())
    }

    /// Starts a rekey ceremony (key admin): a new root key for any `threshold` of `custodians`.
    /// The answer's nonce goes to the custodians.
    pub async fn rekey(&mut self, threshold: u32, holders: &[&str]) -> Result<RekeyStatus, ClientError> {
        let custodians = u32::try_from(holders.len()).unwrap_or(u32::MAX);
        let holders = holders.iter().map(|h| (*h).to_owned()).collect();
        let req = pb::RekeyRequest { threshold, custodians, holders };
        Ok(self.operator.rekey(req).await?.into_inner().into())
    }

    /// A new custodian sets the passphrase of their own new share: this client's token must be
    /// the identity the share is bound to.
    pub async fn rekey_passphrase(
        &mut self,
        nonce: &str,
        custodian: u32,
        passphrase: &str,
    ) -> Result<RekeyStatus, ClientError> {
        let req = pb::RekeyPassphraseRequest {
            nonce: nonce.to_owned(),
            custodian,
            passphrase: passphrase.to_owned(),
        };
        Ok(self.operator.rekey_passphrase(req).await?.into_inner().into())
    }

    /// A current custodian approves with their current passphrase (needs no token); the approval
    /// that reaches the threshold replaces the root key.
    pub async fn rekey_approve(
        &mut self,
        nonce: &str,
        custodian: u32,
        passphrase: &str,
    ) -> Result<RekeyStatus, ClientError> {
        let req =
            pb::RekeyApproveRequest { nonce: nonce.to_owned(), custodian, passphrase: passphrase.to_owned() };
        Ok(self.operator.rekey_approve(req).await?.into_inner().into())
    }

    /// Abandons the ceremony in progress (key admin).
    pub async fn rekey_cancel(&mut self) -> Result<RekeyStatus, ClientError> {
        Ok(self.operator.rekey_cancel(pb::RekeyCancelRequest {}).await?.into_inner().into())
    }

    pub async fn rotate_key(&mut self) -> Result<KeysStatus, ClientError> {
        Ok(self.keys.rotate_key(pb::RotateKeyRequest {}).await?.into_inner().into())
    }

    /// Versions and the job's progress; `count` also counts data keys per version (a full scan).
    pub async fn key_status(&mut self, count: bool) -> Result<KeysStatus, ClientError> {
        let req = pb::KeyStatusRequest { count_data_keys: count };
        Ok(self.keys.key_status(req).await?.into_inner().into())
    }

    pub async fn retire_key(&mut self, version: u32) -> Result<(), ClientError> {
        self.keys.retire_key(pb::RetireKeyRequest { version }).await?;
        Ok(())
    }

    /// Returns how many records were re-encrypted (or, for `All`, will be by the background job).
    pub async fn reencrypt(&mut self, target: ReencryptTarget) -> Result<u64, ClientError> {
        use pb::reencrypt_request::Target;
        let target = match target {
            ReencryptTarget::Record(id) => Target::RecordId(id),
            ReencryptTarget::Subject(s) => Target::SubjectId(s),
            ReencryptTarget::All => Target::All(true),
        };
        let req = pb::ReencryptRequest { target: Some(target) };
        Ok(self.keys.reencrypt(req).await?.into_inner().records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A raw HTTP/2 peer over 127.0.0.1 that answers the first request's HEADERS with a GOAWAY
    /// (NO_ERROR) naming `last_stream` as the last stream it processed, then closes.
    async fn goaway_server(last_stream: Option<u32>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            tcp.read_exact(&mut preface).await.unwrap();
            assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
                let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                f.extend([kind, flags]);
                f.extend(stream.to_be_bytes());
                f.extend(payload);
                f
            };
            tcp.write_all(&frame(4, 0, 0, &[])).await.unwrap();
            loop {
                let mut head = [0u8; 9];
                tcp.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                tcp.read_exact(&mut payload).await.unwrap();
                match head[3] {
                    4 if head[4] & 1 == 0 => tcp.write_all(&frame(4, 1, 0, &[])).await.unwrap(),
                    1 => {
                        let last = last_stream.unwrap_or(stream);
                        let mut goaway = last.to_be_bytes().to_vec();
                        goaway.extend(0u32.to_be_bytes()); // NO_ERROR
                        tcp.write_all(&frame(7, 0, 0, &goaway)).await.unwrap();
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        return;
                    }
                    _ => {}
                }
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_request_above_the_servers_goaway_is_unavailable_and_said_to_be_unprocessed() {
        let addr = goaway_server(Some(0)).await;
        let mut c = Client::connect(&addr, "token").await.unwrap();
        let e = c.get("rec-1", &[], None).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
        assert!(e.to_string().contains("safe to retry"), "{e}");
    }

    /// A stream the server said it processed, whose answer never came, is not called unprocessed.
    #[tokio::test]
    async fn a_request_the_server_accepted_is_not_said_to_be_unprocessed() {
        let addr = goaway_server(None).await;
        let mut c = Client::connect(&addr, "token").await.unwrap();
        let e = c.get("rec-1", &[], None).await.unwrap_err();
        assert!(!e.to_string().contains("safe to retry"), "{e}");
        assert_ne!(e.code(), Some(Code::Unavailable), "{e}");
    }
}
