//! Khlang vault server: the domain (records, field catalogue, policy, audit, storage, auth) and the
//! thin gRPC layer over it. Only `grpc` sees protobuf types.
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_file;
mod auth;
pub mod catalogue;
pub mod dev;
#[cfg(test)]
mod domain_tests;
mod error;
pub mod grpc;
pub mod identities;
pub mod lifecycle;
pub mod policy;
pub mod regulations;
pub mod rekey;
mod repeats;
pub mod storage;
mod vault;

pub use auth::{AuthLimits, Credentials, IssuedToken};
pub use error::{StoreError, VaultError};
pub use vault::{
    ArchiveReport, Caller, CipherMode, ConsentReport, FieldValue, Identity, IdentityInfo, Limits,
    RecordSummary, RecordView, RegulationsInfo, Vault, VaultOptions,
};
