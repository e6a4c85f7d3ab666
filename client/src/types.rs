//! The plain Rust types callers get: records, identities, audit entries, key status; built from
//! the wire's messages here, so no caller sees a protobuf type.

use super::*;

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

/// A data subject's choice for one purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEntry {
    pub purpose: String,
    pub granted: bool,
    pub at_ms: u64,
    pub recorded_by: String,
}

impl From<pb::ConsentEntry> for ConsentEntry {
    fn from(c: pb::ConsentEntry) -> Self {
        Self { purpose: c.purpose, granted: c.granted, at_ms: c.at_ms, recorded_by: c.recorded_by }
    }
}

/// A request to create an identity that waits for a second identity's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRequest {
    pub id: String,
    pub name: String,
    pub role: String,
    pub requested_by: String,
    pub requested_ms: u64,
    pub expires_ms: u64,
}

impl From<pb::IdentityRequest> for IdentityRequest {
    fn from(r: pb::IdentityRequest) -> Self {
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

/// What creating an identity did.
#[derive(Debug)]
pub enum IdentityCreation {
    /// The identity exists; its first token, shown once.
    Created(SecretText),
    /// The role needs a second identity's approval (two-person rule); nothing exists yet.
    Pending(IdentityRequest),
}

impl IdentityCreation {
    /// The token, for a role that needed no approval.
    pub fn token(self) -> Option<SecretText> {
        match self {
            Self::Created(t) => Some(t),
            Self::Pending(_) => None,
        }
    }

    /// The request, for a role that needs approval.
    pub fn pending(self) -> Option<IdentityRequest> {
        match self {
            Self::Created(_) => None,
            Self::Pending(r) => Some(r),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub name: String,
    pub role: String,
    pub created_ms: u64,
    pub created_by: String,
    pub revoked_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegulationsInfo {
    pub version: String,
    pub organisation: String,
    pub roles: Vec<String>,
    pub purposes: Vec<String>,
    pub fields: Vec<String>,
    pub warnings: Vec<String>,
}

impl From<pb::RegulationsInfo> for RegulationsInfo {
    fn from(r: pb::RegulationsInfo) -> Self {
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

/// Filters of an audit query; empty / zero means "any".
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub from_ms: u64,
    pub to_ms: u64,
    pub identity: String,
    pub role: String,
    pub subject_id: String,
    pub record_id: String,
    pub operation: String,
    pub decision: String,
    pub purpose: String,
    pub limit: u32,
}

/// One audit entry as a security officer reads it. Holds no personal data by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub rpc: String,
    pub operation: String,
    pub identity: String,
    pub role: String,
    pub peer: String,
    pub request_id: String,
    pub subject: String,
    pub record_id: String,
    pub fields: Vec<String>,
    pub purpose: String,
    pub decision: String,
    pub rule: String,
    pub reason: String,
    pub regulations_version: String,
    pub key_versions: String,
    pub outcome: String,
    /// A summary entry: how many identical unauthenticated events from one address it stands for.
    pub repeated: u64,
}

impl From<pb::AuditEntry> for AuditRecord {
    fn from(e: pb::AuditEntry) -> Self {
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

/// Whether the vault is sealed and how far unsealing has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealStatus {
    pub sealed: bool,
    pub threshold: u32,
    pub custodians: u32,
    pub received: Vec<u32>,
    /// The rekey ceremony in progress, if any.
    pub rekey: Option<RekeyStatus>,
}

impl From<pb::SealState> for SealStatus {
    fn from(s: pb::SealState) -> Self {
        Self {
            sealed: s.sealed,
            threshold: s.threshold,
            custodians: s.custodians,
            received: s.received,
            rekey: s.rekey.map(Into::into),
        }
    }
}

/// A rekey ceremony's progress.
#[derive(Clone, PartialEq, Eq)]
pub struct RekeyStatus {
    /// Only in the answer to the key admin who started the ceremony.
    pub nonce: Option<SecretText>,
    pub threshold: u32,
    pub custodians: u32,
    pub passphrases_set: Vec<u32>,
    pub approved: Vec<u32>,
    pub approvals_needed: u32,
    pub started_by: String,
    pub expires_ms: u64,
    /// The root key was replaced.
    pub done: bool,
    /// Each new share: the identity bound to it and whether it has set its passphrase.
    pub slots: Vec<RekeySlot>,
}

/// A new share of a rekey ceremony and the identity that alone may set its passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeySlot {
    pub custodian: u32,
    pub holder: String,
    pub set: bool,
}

impl std::fmt::Debug for RekeyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RekeyStatus")
            .field("threshold", &self.threshold)
            .field("custodians", &self.custodians)
            .field("passphrases_set", &self.passphrases_set)
            .field("approved", &self.approved)
            .field("approvals_needed", &self.approvals_needed)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl From<pb::RekeyStatus> for RekeyStatus {
    fn from(s: pb::RekeyStatus) -> Self {
        Self {
            nonce: (!s.nonce.is_empty()).then(|| SecretText::new(s.nonce)),
            threshold: s.threshold,
            custodians: s.custodians,
            passphrases_set: s.passphrases_set,
            approved: s.approved,
            approvals_needed: s.approvals_needed,
            started_by: s.started_by,
            expires_ms: s.expires_ms,
            done: s.done,
            slots: s
                .slots
                .into_iter()
                .map(|slot| RekeySlot { custodian: slot.custodian, holder: slot.holder, set: slot.set })
                .collect(),
        }
    }
}

/// One key-encryption key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersion {
    pub version: u32,
    /// `active`, `decrypt-only` or `retired`.
    pub state: String,
    pub created_ms: u64,
    pub retired_ms: Option<u64>,
    pub data_keys: Option<u64>,
    pub overdue: bool,
}

/// A background key job (rewrap after a rotation, or re-encryption of everything).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyJob {
    /// `rewrap` or `reencrypt`.
    pub kind: String,
    pub target_version: u32,
    pub changed: u64,
    pub skipped: u64,
    pub total: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub requested_by: String,
    pub rate_per_sec: f64,
    pub eta_secs: Option<u64>,
}

impl KeyJob {
    pub fn done(&self) -> u64 {
        self.changed + self.skipped
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeysStatus {
    pub versions: Vec<KeyVersion>,
    pub job: Option<KeyJob>,
    pub cryptoperiod_days: Option<u32>,
}

impl From<pb::KeysStatus> for KeysStatus {
    fn from(k: pb::KeysStatus) -> Self {
        Self {
            versions: k
                .versions
                .into_iter()
                .map(|v| KeyVersion {
                    version: v.version,
                    state: v.state,
                    created_ms: v.created_ms,
                    retired_ms: Some(v.retired_ms).filter(|m| *m > 0),
                    data_keys: v.data_keys,
                    overdue: v.overdue,
                })
                .collect(),
            job: k.job.map(|j| KeyJob {
                kind: j.kind,
                target_version: j.target_version,
                changed: j.changed,
                skipped: j.skipped,
                total: j.total,
                started_ms: j.started_ms,
                finished_ms: Some(j.finished_ms).filter(|m| *m > 0),
                requested_by: j.requested_by,
                rate_per_sec: j.rate_per_sec,
                eta_secs: j.eta_secs,
            }),
            cryptoperiod_days: k.cryptoperiod_days,
        }
    }
}

/// What `reencrypt` renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReencryptTarget {
    Record(String),
    Subject(String),
    All,
}
