//! Tags on the stored values that decide who may do what. The store, a database administrator or
//! a backup file cannot be trusted to keep them as the vault wrote them, so each one carries an
//! HMAC-SHA256 under a key derived from the derivation key, over its key space, its own key, the
//! write that produced it and its encoded bytes: an edited value, one moved to another key or
//! space, or one spliced from another write fails its check.

use std::fmt;

use crate::hierarchy::DerivedKey;
use crate::labels;

/// Tags and checks authority values. Only the unsealed vault holds one.
pub struct AuthorityTagger(DerivedKey);

impl AuthorityTagger {
    pub(crate) fn new(key: DerivedKey) -> Self {
        Self(key)
    }

    /// Length-prefixed fields, so `("ab", "c")` and `("a", "bc")` never give the same message.
    fn message(space: &str, key: &[u8], write: u64, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(
            labels::AUTHORITY_TAG_MESSAGE.len() + 28 + space.len() + key.len() + body.len(),
        );
        m.extend_from_slice(labels::AUTHORITY_TAG_MESSAGE);
        for part in [space.as_bytes(), key] {
            m.extend_from_slice(&(part.len() as u64).to_be_bytes());
            m.extend_from_slice(part);
        }
        m.extend_from_slice(&write.to_be_bytes());
        m.extend_from_slice(&(body.len() as u64).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    pub fn tag(&self, space: &str, key: &[u8], write: u64, body: &[u8]) -> [u8; 32] {
        self.0.mac(&Self::message(space, key, write, body))
    }

    /// Constant-time.
    pub fn verify(&self, space: &str, key: &[u8], write: u64, body: &[u8], tag: &[u8]) -> bool {
        self.0.verify(&Self::message(space, key, write, body), tag)
    }
}

impl fmt::Debug for AuthorityTagger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityTagger").finish_non_exhaustive()
    }
}
