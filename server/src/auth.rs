//! Bearer tokens: `khl_<token id: 16 hex>_<secret: 64 hex>`. The vault stores, per token id, the
//! identity and an HMAC of the secret under a pepper derived from the root key — never the token.
//! Verification costs the same whatever failed (malformed, unknown id, wrong secret).

use std::fmt;

use khlang_keys::RandomSource;
use zeroize::Zeroizing;

use crate::store::StoredIdentity;
use crate::vault::now_ms;
use crate::{Identity, Vault, VaultError};

const PREFIX: &str = "khl_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A freshly issued token: shown to its holder once, wiped on drop, never printed by `Debug`.
pub struct IssuedToken(Zeroizing<String>);

impl IssuedToken {
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuedToken(..)")
    }
}

/// Splits a token into (id, secret bytes) if it has the right shape.
fn parse(token: &str) -> Option<(&str, Zeroizing<Vec<u8>>)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != ID_BYTES * 2
        || !id.bytes().all(|b| b.is_ascii_hexdigit())
        || secret.len() != SECRET_BYTES * 2
    {
        return None;
    }
    Some((id, Zeroizing::new(hex::decode(secret).ok()?)))
}

impl Vault {
    /// Issues a new token for `name` with `role`; the token is returned once and only its MAC kept.
    pub async fn issue_token(&self, name: &str, role: &str) -> Result<IssuedToken, VaultError> {
        if name.is_empty()
            || name.len() > 128
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(VaultError::InvalidArgument(
                "identity names are 1–128 characters of letters, digits and - _ . @".into(),
            ));
        }
        let keys = self.unsealed()?;
        let mut id = [0u8; ID_BYTES];
        self.rng.fill(&mut id)?;
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        self.rng.fill(secret.as_mut_slice())?;
        let token_id = hex::encode(id);
        let mac = keys.token_pepper.mac(secret.as_slice());
        self.store
            .put_identity(&token_id, &StoredIdentity::new(name.to_owned(), role.to_owned(), mac, now_ms()))?;
        self.store.durable().await?;
        let secret_hex = Zeroizing::new(hex::encode(secret.as_slice()));
        Ok(IssuedToken(Zeroizing::new(format!("{PREFIX}{token_id}_{}", secret_hex.as_str()))))
    }

    /// Resolves a bearer token to its identity, or `Unauthenticated`.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, VaultError> {
        let keys = self.unsealed()?;
        let dummy = [0u8; SECRET_BYTES];
        let parsed = token.and_then(parse);
        let stored = match &parsed {
            Some((id, _)) => self.store.get_identity(id)?,
            None => None,
        };
        let secret: &[u8] = parsed.as_ref().map_or(&dummy[..], |(_, s)| s.as_slice());
        let expected = stored.as_ref().map_or([0xFFu8; 32], |s| s.token_mac);
        // Always one MAC and one constant-time compare, so timing does not tell which part failed.
        let ok = keys.token_pepper.verify(secret, &expected);
        match stored {
            Some(identity) if ok && parsed.is_some() => {
                Ok(Identity { name: identity.name, role: identity.role })
            }
            _ => Err(VaultError::Unauthenticated),
        }
    }

    /// Whether a token is currently valid (used to reuse development credentials across restarts).
    pub fn token_is_valid(&self, token: &str) -> bool {
        self.authenticate(Some(token)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_the_exact_shape() {
        let good = format!("khl_{}_{}", "0".repeat(16), "ab".repeat(32));
        assert!(parse(&good).is_some());
        assert!(parse("").is_none());
        assert!(parse("khl_").is_none());
        assert!(parse(&good.replace("khl_", "khx_")).is_none());
        assert!(parse(&format!("khl_{}_{}", "0".repeat(15), "ab".repeat(32))).is_none());
        assert!(parse(&format!("khl_{}_{}", "0".repeat(16), "zz".repeat(32))).is_none());
        assert!(parse(&format!("{good}00")).is_none());
    }
}
