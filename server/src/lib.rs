//! Khlang vault server, in layers (each depends only on the ones below it):
//!
//! - `api` — the gRPC services, the only place that sees protobuf types;
//! - `vault` — the request pipeline (authenticate, validate, decide, prepare, commit with the
//!   entry, respond), identities and credentials, and `vault::keyops` (custody, rotation,
//!   re-encryption, the rekey ceremony, the background key jobs);
//! - `audit` — entries, the chained log and its files, verification, export;
//! - `policy` — the regulations, the field catalogue and the pure decide step;
//! - `storage` — the storage port and its backends.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
mod clock;
pub mod dev;
mod error;
pub mod metrics;
pub mod policy;
pub mod storage;
mod tls_client;
pub mod vault;

pub use error::{Outcome, StoreError, VaultError};
pub use policy::Identity;
pub use vault::auth::{AuthLimits, Credentials, IssuedToken};
pub use vault::{
    ArchiveReport, AuditExport, AuditGrant, Caller, CipherMode, ConsentReport, FieldValue, IdentityInfo,
    Limits, RecordSummary, RecordView, RegulationsInfo, StorageLocation, Vault, VaultOptions,
};
