//! The domain's stored types, shared by every backend. Encoded with postcard where a backend
//! stores bytes (sled); a backend with columns may store their fields apart.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// The proof that the vault wrote an authority value: an HMAC over its key space, its key, the
/// write that produced it and its encoded bytes (see `khlang_keys::AuthorityTagger`). Stored after
/// the value's own bytes, so a value written before tags existed decodes with none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthTag {
    /// The write that produced the value (one per committed change, named in its audit entry).
    pub write: u64,
    pub mac: [u8; 32],
}

/// A stored type as the backends encode it: its postcard bytes, then its tag when it is an
/// authority value that has one. The tag is not part of the bytes it authenticates.
pub trait Stored: Serialize + DeserializeOwned {
    fn auth(&self) -> Option<&AuthTag> {
        None
    }

    /// `false`: this type carries no tag (a trailer after its bytes is damage).
    fn set_auth(&mut self, _tag: Option<AuthTag>) -> bool {
        false
    }
}

/// Authority types: each has a slot for its tag.
macro_rules! authority {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            fn auth(&self) -> Option<&AuthTag> {
                self.auth.as_ref()
            }
            fn set_auth(&mut self, tag: Option<AuthTag>) -> bool {
                self.auth = tag;
                true
            }
        }
    )*};
}
authority!(
    StoredIdentity,
    StoredIdentityRequest,
    StoredToken,
    StoredConsent,
    StoredJob,
    StoredRegulations,
    FailureRecord
);
impl Stored for KekInfo {}

/// The value's own bytes, without its tag: what the tag authenticates.
pub fn body_of<T: Stored>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|_| StoreError::Corrupt(what))
}

/// The value's bytes followed by its tag, if it has one.
pub fn encode_stored<T: Stored>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    let mut out = body_of(value, what)?;
    if let Some(tag) = value.auth() {
        out.extend(postcard::to_stdvec(tag).map_err(|_| StoreError::Corrupt(what))?);
    }
    Ok(out)
}

pub fn decode_stored<T: Stored>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    let (mut value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|_| StoreError::Corrupt(what))?;
    if !rest.is_empty() {
        let tag: AuthTag = postcard::from_bytes(rest).map_err(|_| StoreError::Corrupt(what))?;
        if !value.set_auth(Some(tag)) {
            return Err(StoreError::Corrupt(what));
        }
    }
    Ok(value)
}

/// Current encoding of [`StoredRecord`] and [`StoredIdentity`]. (Format 1, from before data keys
/// were stored apart, is not read.)
pub const RECORD_FORMAT: u8 = 2;

/// A record as stored: envelopes (ciphertext), field names and, beside it at `d‖id`, its wrapped
/// data key. The key is stored apart so a KEK rotation rewrites 61 bytes per record, not the
/// record; a read checks the two belong together (same data-key generation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRecord {
    pub format: u8,
    /// The record's data key, wrapped by a KEK (empty in the plaintext benchmark baseline).
    /// Stored at `d‖id`, not in the record's own bytes.
    #[serde(skip)]
    pub wrapped_key: Vec<u8>,
    /// HMAC of the subject id (blind index), so a subject's records can be found without its id.
    pub subject_index: [u8; 32],
    /// The subject id, sealed under the record's data key like a field.
    pub subject: Vec<u8>,
    /// Sorted by name.
    pub fields: Vec<StoredField>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredField {
    pub name: String,
    pub envelope: Vec<u8>,
}

impl StoredRecord {
    pub fn new(
        wrapped_key: Vec<u8>,
        subject_index: [u8; 32],
        subject: Vec<u8>,
        fields: Vec<StoredField>,
        now_ms: u64,
    ) -> Self {
        Self {
            format: RECORD_FORMAT,
            wrapped_key,
            subject_index,
            subject,
            fields,
            created_ms: now_ms,
            updated_ms: now_ms,
        }
    }

    pub fn field_names(&self) -> Vec<String> {
        self.fields.iter().map(|f| f.name.clone()).collect()
    }

    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(self).map_err(|_| StoreError::Corrupt("record (encode)"))
    }

    /// Whether the wrapped data key and the sealed subject id name the same data-key generation
    /// (always true without encryption). A mismatch means a re-encryption ran between two reads.
    /// The formats are the key hierarchy's: it reads both headers.
    pub(crate) fn key_matches(&self) -> bool {
        if self.wrapped_key.is_empty() {
            return true;
        }
        match (
            khlang_keys::WrappedDataKey::header_of(&self.wrapped_key),
            khlang_keys::envelope_generation(&self.subject),
        ) {
            (Ok((_, a)), Ok(b)) => a == b,
            _ => false,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let r: Self = postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("record"))?;
        if r.format != RECORD_FORMAT {
            return Err(StoreError::Corrupt("record (unknown format)"));
        }
        Ok(r)
    }
}

/// An identity the regulations' roles apply to. Credentials (tokens, client certificates) point here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredIdentity {
    pub format: u8,
    pub name: String,
    pub role: String,
    pub created_ms: u64,
    pub created_by: String,
    /// Set when revoked; a revoked identity's tokens are deleted and it can never authenticate again.
    pub revoked_ms: Option<u64>,
    /// The vault's proof that it wrote this value (after the encoded bytes, not in them).
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}

impl StoredIdentity {
    pub fn new(name: String, role: String, created_by: String, created_ms: u64) -> Self {
        Self { format: RECORD_FORMAT, name, role, created_ms, created_by, revoked_ms: None, auth: None }
    }
}

/// A request to create an identity of a role that needs a second identity's approval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredIdentityRequest {
    pub format: u8,
    pub id: String,
    pub name: String,
    pub role: String,
    pub requested_by: String,
    pub requested_ms: u64,
    pub expires_ms: u64,
    /// The vault's proof that it wrote this value (after the encoded bytes, not in them).
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}

/// A bearer token: never the token itself, only an HMAC of its secret part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredToken {
    pub format: u8,
    pub identity: String,
    /// HMAC-SHA256 of the token's secret part under the token pepper.
    pub mac: [u8; 32],
    pub created_ms: u64,
    /// The vault's proof that it wrote this value (after the encoded bytes, not in them).
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}

/// A data subject's current choice for one purpose.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredConsent {
    pub format: u8,
    pub purpose: String,
    pub granted: bool,
    pub at_ms: u64,
    /// The identity that recorded it.
    pub by: String,
    /// The vault's proof that it wrote this value (after the encoded bytes, not in them).
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}

/// How the root key is held: sealed whole under one passphrase, or split among custodians.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Custody {
    /// One custodian (the development default): the root key sealed under their passphrase.
    Single { sealed_root: Vec<u8> },
    /// K of N custodians, each holding a sealed share (index 1..=N, in order).
    Shares { threshold: u8, sealed: Vec<Vec<u8>> },
}

/// A KEK version's life: created, and retired (destroyed) once no data key referenced it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KekInfo {
    pub version: u32,
    pub created_ms: u64,
    pub retired_ms: Option<u64>,
}

/// What a background key job does to every record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JobKind {
    /// Rewrap each data key under KEK `target`; fields are not touched.
    Rewrap { target: u32 },
    /// Fresh data key and fresh ciphertexts for every record.
    Reencrypt,
}

/// A background key job, persisted with every batch it applies so it resumes exactly where it
/// stopped: `cursor` is the last record key whose batch committed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredJob {
    pub format: u8,
    pub kind: JobKind,
    pub cursor: Vec<u8>,
    /// Records this job changed.
    pub changed: u64,
    /// Records it found already done (written under the target after the job began).
    pub skipped: u64,
    /// Records present when it began.
    pub total: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// The identity that started it.
    pub requested_by: String,
    /// The vault's proof that it wrote this value (after the encoded bytes, not in them).
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}

/// One version of the regulations as the store keeps it: its whole text (every version is
/// kept), numbered by `serial` in the order they came into force, and who loaded it when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredRegulations {
    pub format: u8,
    pub serial: u64,
    pub text: String,
    pub loaded_ms: u64,
    pub loaded_by: String,
    /// The vault's proof that it wrote this value (after the encoded bytes, not in them).
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}

/// A credential's recent failures (wall-clock ms, so a record survives a restart) and its lockout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub format: u8,
    pub failures: Vec<u64>,
    pub locked_until_ms: Option<u64>,
    /// The vault's proof that it wrote this record (after the encoded bytes, not in them): a
    /// lockout written into the store by anyone else is ignored.
    #[serde(skip)]
    pub auth: Option<AuthTag>,
}
