//! Each node's cache of credentials (tokens, identities) read from the database, and what
//! invalidates it: its own commits, another node's (the credentials epoch), or a stale read
//! the authority check found.

use super::{Op, StoredIdentity, StoredToken};

/// The credentials cache: a read fills it only if no commit invalidated anything meanwhile (its
/// generation unchanged), so a value read before a revocation never outlives it.
#[derive(Default)]
pub(super) struct Credentials {
    pub(super) generation: u64,
    /// The credentials epoch last heard from the database, and until when the cache may be
    /// trusted without hearing it again.
    pub(super) epoch: Option<i64>,
    pub(super) trusted_until: Option<std::time::Instant>,
    pub(super) tokens: std::collections::HashMap<String, Option<StoredToken>>,
    pub(super) identities: std::collections::HashMap<String, Option<StoredIdentity>>,
}

/// Entries the credentials cache holds at most (then it starts again empty).
const CREDENTIALS_CACHED: usize = 10_000;

impl Credentials {
    pub(super) fn trusted(&self) -> bool {
        self.trusted_until.is_some_and(|t| std::time::Instant::now() < t)
    }

    pub(super) fn clear(&mut self) {
        self.tokens.clear();
        self.identities.clear();
        self.generation += 1;
    }

    pub(super) fn invalidate<'a>(&mut self, ops: impl IntoIterator<Item = &'a Op>) {
        for op in ops {
            match op {
                Op::PutToken { id, .. } | Op::RemoveToken(id) => {
                    self.tokens.remove(id);
                }
                Op::PutIdentity(identity) => {
                    self.identities.remove(&identity.name);
                }
                _ => continue,
            }
            self.generation += 1;
        }
    }

    pub(super) fn fill<T>(
        map: &mut std::collections::HashMap<String, Option<T>>,
        key: &str,
        value: Option<T>,
    ) {
        if map.len() >= CREDENTIALS_CACHED {
            map.clear();
        }
        map.insert(key.to_owned(), value);
    }
}
