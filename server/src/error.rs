//! The domain's errors. One place (`api::status`) maps them to `tonic::Status`.
//! Messages name fields, limits and ids — never a field value, a token or key material.

use khlang_keys::KeyError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The request is malformed or a value fails its field's validator.
    #[error("{0}")]
    InvalidArgument(String),
    /// A configured limit (fields per record, bytes per field, ...) was exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// Not done because another part of the same all-or-nothing request was refused.
    #[error("{0}")]
    Aborted(String),
    /// No valid credentials were presented.
    #[error("missing, malformed or unknown bearer token")]
    Unauthenticated,
    /// A valid client certificate and a valid token name different identities.
    #[error(
        "the client certificate and the token name different identities: present one, or both of one identity"
    )]
    CredentialsDisagree,
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    AlreadyExists(String),
    /// Too many failed attempts with this credential, from anywhere (PCI DSS 8.3.4).
    #[error("this credential is locked after too many failed attempts; try again later")]
    LockedOut,
    /// Stored ciphertext failed to authenticate: moved, altered, or its key is gone.
    #[error("record {record_id}: {what} failed its integrity check")]
    Integrity { record_id: String, what: String },
    /// The vault is sealed or otherwise not ready for this call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Enough shares were given, but together they do not rebuild this vault's root key.
    #[error("the shares given do not rebuild this vault's root key; unsealing starts over")]
    RootMismatch,
    /// The audit trail could not record the request, so it is refused.
    #[error("the request could not be audited")]
    AuditUnavailable,
    /// This node is not ready for the call yet, though another may be (or this one shortly).
    #[error("{0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Storage(#[from] StoreError),
    #[error("key error: {0}")]
    Key(#[from] KeyError),
}

/// Errors of the storage layer (the engine and the on-disk encodings).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage engine failed (its own message; the engine's types stay in its module).
    #[error("database: {0}")]
    Backend(String),
    /// The database cannot be reached or will not take writes now (down, failing over, a
    /// read-only standby): worth retrying, here or on another node.
    #[error("the database is unavailable ({0}); try again shortly")]
    Unavailable(String),
    #[error("corrupt stored {0}")]
    Corrupt(&'static str),
    #[error("durable flush failed: {0}")]
    Flush(String),
    #[error("the vault at this path is not initialised")]
    NotInitialised,
    #[error("the vault at this path is already initialised")]
    AlreadyInitialised,
    #[error("this data folder was created in {found} mode; this server runs in {expected} mode")]
    ModeMismatch { found: String, expected: String },
    /// A stored record, or the index entry naming it, does not decode: damage to report as lost
    /// data naming the record, not an internal error.
    #[error("record {record_id}: its stored {what} is damaged")]
    Damaged { record_id: String, what: &'static str },
    /// The data folder's permissions let others change it.
    #[error("{0}")]
    Insecure(String),
    #[error("data folder: {0}")]
    Io(String),
    /// The folder was written by a newer build (its layout is one this build does not know).
    #[error(
        "this data folder has storage schema {found}; this build knows schema {supported} at most: run the newer khlangd"
    )]
    SchemaTooNew { found: u32, supported: u32 },
    /// A KEK version cannot be destroyed: data keys still reference it (found by the store's
    /// own count, under the lock that keeps writers from adding one).
    #[error(
        "{refs} data keys still reference KEK v{version}; wait for the rewrap to finish (`khlang keys status`) and try again"
    )]
    KekInUse { version: u32, refs: u64 },
    /// A stored authority value (identity, token, consent, regulations, …) fails its tag: it was
    /// not written by this vault. Never used; answered `DataLoss`.
    #[error(
        "the stored {what} fails its authenticity check ({why}): it was changed outside the vault and is not used"
    )]
    Unauthentic { what: String, why: &'static str },
    /// The data folder's files are damaged where the engine checks them (a checksum): named,
    /// answered `DataLoss`; restore from a backup.
    #[error("the data folder is damaged ({0}); restore it from a backup (khlangd restore)")]
    DamagedFolder(String),
    /// Authority values cannot be checked or written while the vault is sealed.
    #[error("the vault is sealed")]
    Sealed,
    /// The backend does not do this; the message says what does (a database's own tools).
    #[error("{0}")]
    NotSupported(&'static str),
}

/// How a request ended, named as gRPC names its status codes. The one mapping from domain errors
/// to codes ([`VaultError::outcome`]): the audit entry records [`Outcome::name`], and the wire
/// layer answers with the same code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    #[default]
    Ok,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    Unavailable,
    Internal,
    Aborted,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "Ok",
            Self::InvalidArgument => "InvalidArgument",
            Self::ResourceExhausted => "ResourceExhausted",
            Self::Unauthenticated => "Unauthenticated",
            Self::PermissionDenied => "PermissionDenied",
            Self::NotFound => "NotFound",
            Self::AlreadyExists => "AlreadyExists",
            Self::DataLoss => "DataLoss",
            Self::FailedPrecondition => "FailedPrecondition",
            Self::Unavailable => "Unavailable",
            Self::Internal => "Internal",
            Self::Aborted => "Aborted",
        }
    }
}

impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl Outcome {
    /// For code that reads like a string (the audit entry's JSON holds the name).
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

impl VaultError {
    /// The one mapping from domain errors to codes. Stored bytes that do not decode or check
    /// (`Corrupt`, `Damaged`, `DamagedFolder`, `Unauthentic`) are lost data, never `Internal`.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::InvalidArgument(_) => Outcome::InvalidArgument,
            Self::LimitExceeded(_) | Self::LockedOut => Outcome::ResourceExhausted,
            Self::Unauthenticated | Self::CredentialsDisagree => Outcome::Unauthenticated,
            Self::PermissionDenied(_) => Outcome::PermissionDenied,
            Self::NotFound(_) => Outcome::NotFound,
            Self::AlreadyExists(_) => Outcome::AlreadyExists,
            Self::Aborted(_) => Outcome::Aborted,
            Self::Integrity { .. }
            | Self::Storage(
                StoreError::Damaged { .. }
                | StoreError::Unauthentic { .. }
                | StoreError::DamagedFolder(_)
                | StoreError::Corrupt(_),
            ) => Outcome::DataLoss,
            Self::FailedPrecondition(_)
            | Self::RootMismatch
            | Self::Storage(StoreError::KekInUse { .. } | StoreError::NotSupported(_) | StoreError::Sealed) => {
                Outcome::FailedPrecondition
            }
            // A node that lost its database lease must not serve; another node may (retry there).
            Self::AuditUnavailable | Self::Unavailable(_) | Self::Storage(StoreError::Unavailable(_)) => {
                Outcome::Unavailable
            }
            Self::Storage(_) | Self::Key(_) => Outcome::Internal,
        }
    }

    /// The status code name this error maps to (recorded as an audit entry's outcome).
    pub fn code_name(&self) -> &'static str {
        self.outcome().name()
    }
}
