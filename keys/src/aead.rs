//! AES-256-GCM with a random 96-bit nonce, through RustCrypto's `aes-gcm` (its `zeroize` feature
//! wipes the expanded key schedule on drop, which ring's AEAD keys do not).

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce};
use zeroize::Zeroizing;

use crate::{Key256, KeyError, RandomSource};

pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;

/// The expanded key schedule; `ZeroizeOnDrop` through aes-gcm's `zeroize` feature. Long-lived keys
/// (KEKs, a record's data key) keep one so each use skips the expansion.
pub(crate) type Cipher = Aes256Gcm;

pub(crate) fn cipher(key: &Key256) -> Result<Cipher, KeyError> {
    Aes256Gcm::new_from_slice(key.expose_secret()).map_err(|_| KeyError::Malformed("key"))
}

/// Appends `nonce || ciphertext || tag` to `out`.
pub(crate) fn seal_into(
    cipher: &Cipher,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), KeyError> {
    out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(*nonce), aad, (&mut out[start..]).into())
        .map_err(|_| KeyError::Malformed("plaintext"))?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Opens `nonce || ciphertext || tag`; the plaintext buffer is wiped on drop.
pub(crate) fn open(
    cipher: &Cipher,
    aad: &[u8],
    sealed: &[u8],
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(KeyError::Malformed(what));
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KeyError::Malformed(what))?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| KeyError::Malformed(what))?;
    let mut buf = Zeroizing::new(ct.to_vec());
    cipher
        .decrypt_inout_detached(&Nonce::from(nonce), aad, buf.as_mut_slice().into(), &tag.into())
        .map_err(|_| KeyError::Integrity(what))?;
    Ok(buf)
}

pub(crate) fn random_nonce(rng: &dyn RandomSource) -> Result<[u8; NONCE_LEN], KeyError> {
    let mut n = [0u8; NONCE_LEN];
    rng.fill(&mut n)?;
    Ok(n)
}
