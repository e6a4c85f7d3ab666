//! Khlang's key hierarchy, kept pure: no I/O, no async, no protobuf.
//!
//! ```text
//! passphrase --Argon2id--> sealing key --AES-GCM--> RootKey (sealed file)
//! RootKey --AES-GCM--> KEK v1, v2, ...        (wrapped, versioned)
//! KEK vN  --AES-GCM--> DataKey per record     (wrapped, bound to record id + generation)
//! DataKey --AES-GCM--> field envelope         (bound to record id + field name + generation)
//! RootKey --AES-GCM--> DerivationKey --HKDF--> token pepper, blind index, audit signing key
//! RootKey <--Shamir K of N-- custodian shares, each sealed under its custodian's passphrase
//! ```
//!
//! Every ciphertext carries a format byte so the scheme can change later, and every AEAD call binds
//! its context as associated data so a ciphertext moved elsewhere fails to open.
#![forbid(unsafe_code)]

mod aead;
pub mod audit_chain;
mod authority;
mod custody;
mod error;
mod hierarchy;
pub mod labels;
mod random;
mod seal;
mod secret;
#[cfg(test)]
mod tests;

pub use authority::AuthorityTagger;
pub use custody::{
    DerivationKey, KeyShare, MAX_CUSTODIANS, combine_root_key, reseal, seal_share, sealed_share_info,
    split_root_key, unseal_share,
};
pub use error::KeyError;
pub use hierarchy::{
    DataKey, DerivedKey, FIELD_ENVELOPE_V1, FieldContext, Kek, KeyRing, RootKey, WrappedDataKey,
    envelope_generation, open_field, seal_field, seal_fields,
};
pub use random::{OsRandom, RandomSource};
pub use seal::{SealParams, seal_root_key, unseal_root_key};
pub use secret::{Key256, Plaintext};
