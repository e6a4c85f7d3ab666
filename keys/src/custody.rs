//! Split knowledge and dual control over the root key (PCI DSS 3.6.1.2, 3.7.6): the root key is
//! split into N Shamir shares over GF(256) (the `blahaj` crate), any K of which rebuild it, and each
//! share is sealed under its own custodian's passphrase (Argon2id → AES-256-GCM).
//!
//! Sealed share, version 1 (integers big-endian):
//! ```text
//! "KHLSHAR" | 0x01 | m_cost u32 | t_cost u32 | p_cost u32 | threshold u8 | index u8 | salt (16)
//!           | nonce (12) | ct (33: share x ‖ 32 y bytes) | tag (16)
//! ```
//! The whole header is associated data, so a share cannot be relabelled as another custodian's or
//! claim a lower threshold.
//!
//! Also here: the derivation key. Token pepper, blind index and audit signing key are derived from
//! it rather than from the root key, so a rekey (new root key, new shares) changes none of them.

use std::fmt;

use rand::SeedableRng;
use zeroize::Zeroizing;

use crate::audit_chain::{AuditSigner, HeadTagger};
use crate::authority::AuthorityTagger;
use crate::hierarchy::DerivedKey;
use crate::seal::{ROOT, SealKind, random_salt, reseal_secret, seal_secret, sealed_extra, unseal_secret};
use crate::{Key256, KeyError, RandomSource, RootKey, SealParams, aead, labels};

/// Most custodians a vault may have (GF(256) allows 255; more than a handful is unmanageable).
pub const MAX_CUSTODIANS: u8 = 16;
const SHARE_LEN: usize = 1 + Key256::LEN;
const WRAP_V1: u8 = 1;

const SHARE: SealKind = SealKind {
    magic: b"KHLSHAR",
    label: labels::SHARE_SEAL_AAD,
    what: "sealed custodian share",
    extra_len: 2,
    secret_len: SHARE_LEN,
};

/// One custodian's share of the root key: wiped on drop, `Debug` shows only its index.
pub struct KeyShare {
    index: u8,
    threshold: u8,
    bytes: Zeroizing<Vec<u8>>,
}

impl KeyShare {
    /// Which custodian (1..=N) holds it.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// How many shares rebuild the root key.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }
}

#[cfg(test)]
impl KeyShare {
    /// A share with pinned bytes, for known-answer vectors.
    pub(crate) fn pinned(index: u8, threshold: u8, y: [u8; 32]) -> Self {
        Self { index, threshold, bytes: Zeroizing::new([&[index][..], &y].concat()) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyShare").field("index", &self.index).finish_non_exhaustive()
    }
}

fn check_scheme(threshold: u8, count: u8) -> Result<(), KeyError> {
    if threshold < 2 || count < threshold || count > MAX_CUSTODIANS {
        return Err(KeyError::InvalidScheme { threshold, count, max: MAX_CUSTODIANS });
    }
    Ok(())
}

/// Splits the root key into `count` shares, any `threshold` of which rebuild it. The polynomial
/// coefficients come from a ChaCha stream seeded by `rng`, so the randomness still comes from one
/// auditable source (and tests can pin it).
pub fn split_root_key(
    root: &RootKey,
    threshold: u8,
    count: u8,
    rng: &dyn RandomSource,
) -> Result<Vec<KeyShare>, KeyError> {
    check_scheme(threshold, count)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill(seed.as_mut_slice())?;
    let mut chacha = rand::rngs::StdRng::from_seed(*seed);
    let shares = blahaj::Sharks(threshold)
        .dealer_rng(root.key().expose_secret(), &mut chacha)
        .take(count as usize)
        .map(|s| {
            let bytes = Zeroizing::new(Vec::from(&s));
            KeyShare { index: bytes[0], threshold, bytes }
        })
        .collect();
    Ok(shares)
}

/// Rebuilds the root key from at least `threshold` distinct shares of one split. The result is
/// only as right as the shares: the caller checks it against something the root key wrapped.
pub fn combine_root_key(shares: &[&KeyShare]) -> Result<RootKey, KeyError> {
    let threshold = shares.first().map_or(0, |s| s.threshold);
    let mut distinct: Vec<u8> = shares.iter().map(|s| s.index).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if threshold < 2 || shares.iter().any(|s| s.threshold != threshold) || distinct.len() < threshold as usize
    {
        return Err(KeyError::NotEnoughShares { have: distinct.len(), need: threshold });
    }
    let parsed = shares
        .iter()
        .map(|s| blahaj::Share::try_from(s.bytes.as_slice()).map_err(|_| KeyError::Malformed("key share")))
        .collect::<Result<Vec<_>, _>>()?;
    let secret = Zeroizing::new(
        blahaj::Sharks(threshold)
            .recover(&parsed)
            .map_err(|_| KeyError::NotEnoughShares { have: distinct.len(), need: threshold })?,
    );
    Ok(RootKey::from_key(Key256::from_slice(&secret)?))
}

/// Seals a share under its custodian's passphrase (Argon2id; slow on purpose).
pub fn seal_share(
    share: &KeyShare,
    passphrase: &[u8],
    params: SealParams,
    rng: &dyn RandomSource,
) -> Result<Vec<u8>, KeyError> {
    seal_share_with(share, passphrase, params, &random_salt(rng)?, &aead::random_nonce(rng)?)
}

pub(crate) fn seal_share_with(
    share: &KeyShare,
    passphrase: &[u8],
    params: SealParams,
    salt: &[u8; 16],
    nonce: &[u8; aead::NONCE_LEN],
) -> Result<Vec<u8>, KeyError> {
    seal_secret(&SHARE, &[share.threshold, share.index], &share.bytes, passphrase, params, salt, nonce)
}

/// `(index, threshold)` of a sealed share, read without its passphrase.
pub fn sealed_share_info(sealed: &[u8]) -> Result<(u8, u8), KeyError> {
    let extra = sealed_extra(&SHARE, sealed)?;
    Ok((extra[1], extra[0]))
}

/// Opens a custodian's share. A wrong passphrase and an altered share give the same error.
pub fn unseal_share(sealed: &[u8], passphrase: &[u8]) -> Result<KeyShare, KeyError> {
    let (index, threshold) = sealed_share_info(sealed)?;
    let bytes = unseal_secret(&SHARE, sealed, passphrase)?;
    if bytes.first() != Some(&index) {
        return Err(KeyError::Integrity("sealed custodian share"));
    }
    Ok(KeyShare { index, threshold, bytes })
}

/// A custodian's passphrase change: the same sealed share (or sealed root key) under `new`,
/// with the same Argon2id cost. A wrong `old` gives [`KeyError::WrongPassphrase`].
pub fn reseal(sealed: &[u8], old: &[u8], new: &[u8], rng: &dyn RandomSource) -> Result<Vec<u8>, KeyError> {
    let kind = if sealed.starts_with(SHARE.magic) { &SHARE } else { &ROOT };
    reseal_secret(kind, sealed, old, new, rng)
}

/// The key every non-encryption key is derived from (HKDF-SHA256 under a named label).
pub struct DerivationKey(Key256);

impl DerivationKey {
    pub fn generate(rng: &dyn RandomSource) -> Result<Self, KeyError> {
        Ok(Self(Key256::generate(rng)?))
    }

    /// 32 bytes derived with HKDF-SHA256 under a named label from [`labels`].
    fn hkdf32(&self, label: &'static [u8]) -> Result<Key256, KeyError> {
        use ring::hkdf;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, labels::HKDF_SALT).extract(self.0.expose_secret());
        let info = [label];
        let okm = prk.expand(&info, hkdf::HKDF_SHA256).map_err(|_| KeyError::Derivation)?;
        let mut out = Zeroizing::new([0u8; 32]);
        okm.fill(out.as_mut_slice()).map_err(|_| KeyError::Derivation)?;
        Key256::from_slice(out.as_slice())
    }

    /// An HMAC key for another purpose (token pepper, blind index), derived under its label.
    pub fn derive(&self, label: &'static [u8]) -> Result<DerivedKey, KeyError> {
        Ok(DerivedKey::from_key(self.hkdf32(label)?))
    }

    /// The Ed25519 key that signs audit checkpoints, derived under its own label.
    pub fn audit_signer(&self) -> Result<AuditSigner, KeyError> {
        AuditSigner::from_seed(self.hkdf32(labels::AUDIT_SIGNING)?)
    }

    /// The HMAC key that tags acknowledged audit heads between signed checkpoints.
    pub fn audit_tagger(&self) -> Result<HeadTagger, KeyError> {
        Ok(HeadTagger::new(self.derive(labels::AUDIT_HEAD_TAG)?))
    }

    /// The HMAC key that authenticates stored authority values (identities, consent, rules).
    pub fn authority_tagger(&self) -> Result<AuthorityTagger, KeyError> {
        Ok(AuthorityTagger::new(self.derive(labels::AUTHORITY_TAG)?))
    }
}

impl fmt::Debug for DerivationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DerivationKey").finish_non_exhaustive()
    }
}

impl RootKey {
    /// Wraps the derivation key: `0x01 | nonce | ct | tag`.
    pub fn wrap_derivation_key(
        &self,
        key: &DerivationKey,
        rng: &dyn RandomSource,
    ) -> Result<Vec<u8>, KeyError> {
        let mut out = vec![WRAP_V1];
        let aad = [labels::DERIVATION_KEY_WRAP_AAD, &[WRAP_V1]].concat();
        aead::seal_into(
            &aead::cipher(self.key())?,
            &aead::random_nonce(rng)?,
            &aad,
            key.0.expose_secret(),
            &mut out,
        )?;
        Ok(out)
    }

    pub fn unwrap_derivation_key(&self, wrapped: &[u8]) -> Result<DerivationKey, KeyError> {
        const WHAT: &str = "wrapped derivation key";
        match wrapped.first() {
            Some(&WRAP_V1) => {}
            Some(&v) => return Err(KeyError::UnsupportedFormat { what: WHAT, version: v }),
            None => return Err(KeyError::Malformed(WHAT)),
        }
        let aad = [labels::DERIVATION_KEY_WRAP_AAD, &[WRAP_V1]].concat();
        let key = aead::open(&aead::cipher(self.key())?, &aad, &wrapped[1..], WHAT)?;
        Ok(DerivationKey(Key256::from_slice(&key)?))
    }

    /// Vaults created before derivation keys existed derived everything from the root key itself;
    /// this keeps their tokens, blind indexes and audit key valid (a rekey then stores it wrapped).
    pub fn legacy_derivation_key(&self) -> Result<DerivationKey, KeyError> {
        Ok(DerivationKey(Key256::from_slice(self.key().expose_secret())?))
    }
}
