//! Sealing the root key under a passphrase (Argon2id → AES-256-GCM).
//!
//! Sealed format, version 1 (all integers big-endian):
//! ```text
//! "KHLROOT" | 0x01 | m_cost u32 | t_cost u32 | p_cost u32 | salt (16) | nonce (12) | ct (32) | tag (16)
//! ```
//! The header up to the salt is authenticated as associated data, so its parameters cannot be
//! lowered without the passphrase noticing.

use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

use crate::{Key256, KeyError, RandomSource, RootKey, aead, labels};

const MAGIC: &[u8; 7] = b"KHLROOT";
const FORMAT_V1: u8 = 1;
pub(crate) const SALT_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 1 + 12 + SALT_LEN;

/// Argon2id cost parameters recorded in the sealed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealParams {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl SealParams {
    /// The floor (OWASP's Argon2id minimum): anything weaker is refused when sealing and unsealing.
    pub const MINIMUM: Self = Self { m_cost: 19 * 1024, t_cost: 2, p_cost: 1 };
    /// What `init` uses unless told otherwise: 64 MiB, 3 passes.
    pub const DEFAULT: Self = Self { m_cost: 64 * 1024, t_cost: 3, p_cost: 1 };

    fn check(&self) -> Result<(), KeyError> {
        let min = Self::MINIMUM;
        if self.m_cost < min.m_cost || self.t_cost < min.t_cost || self.p_cost < min.p_cost {
            return Err(KeyError::WeakParameters(format!(
                "m={} KiB t={} p={} (at least m={} KiB t={} p={})",
                self.m_cost, self.t_cost, self.p_cost, min.m_cost, min.t_cost, min.p_cost
            )));
        }
        if self.m_cost > 4 * 1024 * 1024 || self.t_cost > 64 || self.p_cost > 16 {
            return Err(KeyError::Malformed("sealed root key parameters"));
        }
        Ok(())
    }
}

fn derive(passphrase: &[u8], salt: &[u8], params: SealParams) -> Result<Key256, KeyError> {
    params.check()?;
    let p = Params::new(params.m_cost, params.t_cost, params.p_cost, Some(Key256::LEN))
        .map_err(|_| KeyError::Derivation)?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
        .hash_password_into(passphrase, salt, out.as_mut_slice())
        .map_err(|_| KeyError::Derivation)?;
    Key256::from_slice(out.as_slice())
}

/// What a passphrase seals: its magic, AAD label and the fixed-size fields its header carries
/// after the Argon2id parameters (authenticated like the rest of the header).
pub(crate) struct SealKind {
    pub magic: &'static [u8; 7],
    pub label: &'static [u8],
    pub what: &'static str,
    pub extra_len: usize,
    pub secret_len: usize,
}

pub(crate) const ROOT: SealKind = SealKind {
    magic: MAGIC,
    label: labels::ROOT_SEAL_AAD,
    what: "sealed root key",
    extra_len: 0,
    secret_len: 32,
};

fn header(kind: &SealKind, params: SealParams, extra: &[u8], salt: &[u8; SALT_LEN]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN + extra.len());
    h.extend_from_slice(kind.magic);
    h.push(FORMAT_V1);
    h.extend_from_slice(&params.m_cost.to_be_bytes());
    h.extend_from_slice(&params.t_cost.to_be_bytes());
    h.extend_from_slice(&params.p_cost.to_be_bytes());
    h.extend_from_slice(extra);
    h.extend_from_slice(salt);
    h
}

/// Seals `root` under `passphrase`. Slow on purpose (Argon2id): keep it off request paths.
pub fn seal_root_key(
    root: &RootKey,
    passphrase: &[u8],
    params: SealParams,
    rng: &dyn RandomSource,
) -> Result<Vec<u8>, KeyError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill(&mut salt)?;
    let nonce = aead::random_nonce(rng)?;
    seal_with(root, passphrase, params, &salt, &nonce)
}

pub(crate) fn seal_with(
    root: &RootKey,
    passphrase: &[u8],
    params: SealParams,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; aead::NONCE_LEN],
) -> Result<Vec<u8>, KeyError> {
    seal_secret(&ROOT, &[], root.key().expose_secret(), passphrase, params, salt, nonce)
}

pub(crate) fn seal_secret(
    kind: &SealKind,
    extra: &[u8],
    secret: &[u8],
    passphrase: &[u8],
    params: SealParams,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; aead::NONCE_LEN],
) -> Result<Vec<u8>, KeyError> {
    if extra.len() != kind.extra_len || secret.len() != kind.secret_len {
        return Err(KeyError::Malformed(kind.what));
    }
    let kek = derive(passphrase, salt, params)?;
    let mut out = header(kind, params, extra, salt);
    let aad = [kind.label, &out].concat();
    aead::seal_into(&aead::cipher(&kek)?, nonce, &aad, secret, &mut out)?;
    Ok(out)
}

pub(crate) fn random_salt(rng: &dyn RandomSource) -> Result<[u8; SALT_LEN], KeyError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill(&mut salt)?;
    Ok(salt)
}

/// The header fields after the Argon2id parameters, read without the passphrase.
pub(crate) fn sealed_extra<'a>(kind: &SealKind, sealed: &'a [u8]) -> Result<&'a [u8], KeyError> {
    if sealed.len() < MAGIC.len() + 1 || &sealed[..MAGIC.len()] != kind.magic {
        return Err(KeyError::Malformed(kind.what));
    }
    let version = sealed[MAGIC.len()];
    if version != FORMAT_V1 {
        return Err(KeyError::UnsupportedFormat { what: kind.what, version });
    }
    let total = HEADER_LEN + kind.extra_len + aead::NONCE_LEN + kind.secret_len + aead::TAG_LEN;
    if sealed.len() != total {
        return Err(KeyError::Malformed(kind.what));
    }
    let base = MAGIC.len() + 13;
    Ok(&sealed[base..base + kind.extra_len])
}

/// Seals the same secret under a new passphrase, keeping its kind, header fields and Argon2id
/// parameters; fresh salt and nonce. Fails like [`unseal_secret`] if `old` is wrong.
pub(crate) fn reseal_secret(
    kind: &SealKind,
    sealed: &[u8],
    old: &[u8],
    new: &[u8],
    rng: &dyn RandomSource,
) -> Result<Vec<u8>, KeyError> {
    let secret = unseal_secret(kind, sealed, old)?;
    let u32_at = |i: usize| -> Result<u32, KeyError> {
        let b: [u8; 4] = sealed[i..i + 4].try_into().map_err(|_| KeyError::Malformed(kind.what))?;
        Ok(u32::from_be_bytes(b))
    };
    let base = MAGIC.len() + 1;
    let params = SealParams { m_cost: u32_at(base)?, t_cost: u32_at(base + 4)?, p_cost: u32_at(base + 8)? };
    let extra = sealed_extra(kind, sealed)?.to_vec();
    seal_secret(kind, &extra, &secret, new, params, &random_salt(rng)?, &aead::random_nonce(rng)?)
}

/// Opens a passphrase-sealed secret. A wrong passphrase and an altered file give the same error.
pub(crate) fn unseal_secret(
    kind: &SealKind,
    sealed: &[u8],
    passphrase: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    sealed_extra(kind, sealed)?;
    let u32_at = |i: usize| -> Result<u32, KeyError> {
        let b: [u8; 4] = sealed[i..i + 4].try_into().map_err(|_| KeyError::Malformed(kind.what))?;
        Ok(u32::from_be_bytes(b))
    };
    let base = MAGIC.len() + 1;
    let params = SealParams { m_cost: u32_at(base)?, t_cost: u32_at(base + 4)?, p_cost: u32_at(base + 8)? };
    let (header, body) = sealed.split_at(HEADER_LEN + kind.extra_len);
    let salt = &header[header.len() - SALT_LEN..];
    let kek = derive(passphrase, salt, params)?;
    aead::open(&aead::cipher(&kek)?, &[kind.label, header].concat(), body, kind.what).map_err(|e| match e {
        KeyError::Integrity(_) => KeyError::WrongPassphrase,
        other => other,
    })
}

/// Opens a sealed root key. A wrong passphrase and an altered file give the same error.
pub fn unseal_root_key(sealed: &[u8], passphrase: &[u8]) -> Result<RootKey, KeyError> {
    let root = unseal_secret(&ROOT, sealed, passphrase)?;
    Ok(RootKey::from_key(Key256::from_slice(&root)?))
}
