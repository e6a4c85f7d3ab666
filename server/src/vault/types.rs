//! The vault's options and the plain values its operations take and return.

use super::*;

/// Configured limits, enforced on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest gRPC message accepted (enforced by the transport).
    pub max_message_bytes: usize,
    pub max_fields_per_record: usize,
    pub max_field_bytes: usize,
    pub max_subject_bytes: usize,
    /// Most records in one `PutRecords` request.
    pub max_batch_records: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_fields_per_record: 64,
            max_field_bytes: 8 * 1024,
            max_subject_bytes: 256,
            max_batch_records: 1000,
        }
    }
}

/// How field values are stored. `PlaintextBaseline` exists only in `bench` builds, so the
/// benchmark can measure what encryption costs on the same path; a data folder remembers its mode
/// and refuses the other (a build without it refuses a baseline folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CipherMode {
    #[default]
    Encrypted,
    #[cfg(feature = "bench")]
    PlaintextBaseline,
}

impl CipherMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Encrypted => MODE_ENCRYPTED,
            #[cfg(feature = "bench")]
            Self::PlaintextBaseline => MODE_BASELINE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// Where records, keys and identities live: sled in the data folder (the default), or a
    /// PostgreSQL database (the audit log's files stay in the data folder either way).
    pub storage: StorageLocation,
    pub limits: Limits,
    pub durability: Durability,
    pub mode: CipherMode,
    pub auth: AuthLimits,
    /// The regulations in force at start.
    pub regulations: Arc<Regulations>,
    /// Where reloads read the regulations from; `None` means the embedded sample, not reloadable.
    pub regulations_path: Option<PathBuf>,
    /// The file at `regulations_path` is meant to replace the regulations the vault holds
    /// (`--regulations-changed`): the vault starts under the ones it holds and, once unsealed,
    /// reloads the file (audited). Without it, a file that differs is refused.
    pub regulations_changed: bool,
    /// Benchmark baseline only (`bench` builds): allow every request without consulting the
    /// regulations.
    #[cfg(feature = "bench")]
    pub bench_skip_policy: bool,
    /// Benchmark baseline only (`bench` builds): write no audit entries (and do not flush for
    /// reads).
    #[cfg(feature = "bench")]
    pub bench_skip_audit: bool,
    pub checkpoints: CheckpointPolicy,
    /// The audit log's files: segment size, and the witness of its signed checkpoints.
    pub audit_files: crate::audit::files::FileOptions,
    /// The operator accepts the audit break carried forward at this entry (`--accept-audit-break`).
    pub accept_audit_break: Option<u64>,
    /// The operator accepts that the log starts at this entry with no signed archive base
    /// (`--accept-unbased-log`): archived by a version that kept none. Without it such a log is
    /// refused, since cutting the log's front is also how an attacker would hide a change.
    pub accept_unbased_log: Option<u64>,
    /// Pacing of background key jobs (tests slow them down to interrupt them).
    pub job_pacing: crate::vault::keyops::JobPacing,
    /// Argon2id cost for custodians' shares made by a rekey.
    pub seal_params: SealParams,
    /// How long a request to create a privileged identity waits for its approval.
    pub identity_request_ttl: Duration,
    /// The interval over which identical unauthenticated events from one address are counted
    /// into one summary entry instead of written one by one.
    pub audit_repeat_interval: Duration,
    /// How long a rekey ceremony may take before it is abandoned.
    pub rekey_ttl: Duration,
}

/// Which backend of the storage port a vault opens.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StorageLocation {
    /// sled, in `<data folder>/db`.
    #[default]
    Sled,
    /// A PostgreSQL connection string (libpq style; several hosts and
    /// `target_session_attrs=read-write` allowed), and the CA certificate (PEM file) that signed
    /// the database server's: given, the connection uses TLS as `sslmode` says (`require`: TLS
    /// or nothing).
    Postgres { url: String, ca_cert: Option<PathBuf> },
}

impl std::fmt::Debug for StorageLocation {
    /// Never prints a password the connection string may carry.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sled => f.write_str("Sled"),
            Self::Postgres { url, .. } => write!(f, "Postgres({})", crate::storage::redacted(url)),
        }
    }
}

impl std::str::FromStr for StorageLocation {
    type Err = String;

    /// `sled` or a `postgres://` / `postgresql://` connection string.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "sled" {
            Ok(Self::Sled)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Self::Postgres { url: s.to_owned(), ca_cert: None })
        } else {
            Err("expected `sled` or a postgres:// connection string".into())
        }
    }
}

impl VaultOptions {
    /// Whether the decide step is skipped (a `bench` build's baseline; never otherwise).
    pub(crate) fn skips_policy(&self) -> bool {
        #[cfg(feature = "bench")]
        return self.bench_skip_policy;
        #[cfg(not(feature = "bench"))]
        false
    }

    /// Whether no audit entries are written (a `bench` build's baseline; never otherwise).
    pub(crate) fn skips_audit(&self) -> bool {
        #[cfg(feature = "bench")]
        return self.bench_skip_audit;
        #[cfg(not(feature = "bench"))]
        false
    }
}

impl Default for VaultOptions {
    fn default() -> Self {
        Self {
            storage: StorageLocation::Sled,
            limits: Limits::default(),
            durability: Durability::default(),
            mode: CipherMode::default(),
            auth: AuthLimits::default(),
            regulations: Arc::new(Regulations::sample()),
            regulations_path: None,
            regulations_changed: false,
            #[cfg(feature = "bench")]
            bench_skip_policy: false,
            #[cfg(feature = "bench")]
            bench_skip_audit: false,
            checkpoints: CheckpointPolicy::default(),
            audit_files: Default::default(),
            accept_audit_break: None,
            accept_unbased_log: None,
            job_pacing: crate::vault::keyops::JobPacing::default(),
            seal_params: SealParams::DEFAULT,
            identity_request_ttl: crate::vault::identities::IDENTITY_REQUEST_TTL,
            audit_repeat_interval: crate::audit::repeats::REPEAT_INTERVAL,
            rekey_ttl: crate::vault::keyops::rekey::REKEY_TTL,
        }
    }
}

pub use crate::policy::Identity;

/// One request's context: the authenticated identity and where the request came from.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub peer: Option<SocketAddr>,
    /// The id the server gave this request (on the response and its audit entry).
    pub request_id: String,
    /// The caller's own `x-request-id`, if it sent one: recorded beside the server's, never instead.
    pub client_request_id: String,
}

/// A named field value as it enters or leaves the vault.
#[derive(Debug)]
pub struct FieldValue {
    pub name: String,
    pub value: Plaintext,
}

#[derive(Debug)]
pub struct RecordView {
    pub record_id: String,
    pub subject_id: Plaintext,
    pub fields: Vec<FieldValue>,
}

/// A data subject's consent: current choice per purpose, and every change, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentReport {
    pub current: Vec<StoredConsent>,
    pub history: Vec<StoredConsent>,
}

/// An identity as listed to administrators: never a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub name: String,
    pub role: String,
    pub created_ms: u64,
    pub created_by: String,
    pub revoked_ms: Option<u64>,
}

/// What the regulations in force are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegulationsInfo {
    pub version: String,
    pub organisation: String,
    pub roles: Vec<String>,
    pub purposes: Vec<String>,
    pub fields: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    pub record_id: String,
    pub field_names: Vec<String>,
}
