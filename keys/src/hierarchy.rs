//! Root key, versioned KEKs, per-record data keys and field envelopes.

use std::collections::BTreeMap;
use std::fmt;

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::{Key256, KeyError, Plaintext, RandomSource, aead, labels};

/// Format byte of KEK and data-key wraps.
const WRAP_V1: u8 = 1;
/// Format byte of field envelopes: `0x01 | generation u32 | nonce (12) | ciphertext | tag (16)`.
pub const FIELD_ENVELOPE_V1: u8 = 1;

fn be_u32(bytes: &[u8], at: usize, what: &'static str) -> Result<u32, KeyError> {
    let b: [u8; 4] =
        bytes.get(at..at + 4).and_then(|s| s.try_into().ok()).ok_or(KeyError::Malformed(what))?;
    Ok(u32::from_be_bytes(b))
}

/// Appends a length-prefixed byte string, so no two (record, field) pairs share an encoding.
fn push_lp(out: &mut Vec<u8>, bytes: &[u8]) {
    // Record ids and field names are bounded far below 4 GiB by the server's limits.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The vault's root of trust. Exists unsealed only in memory.
pub struct RootKey(Key256);

impl RootKey {
    pub fn generate(rng: &dyn RandomSource) -> Result<Self, KeyError> {
        Ok(Self(Key256::generate(rng)?))
    }

    pub fn from_key(key: Key256) -> Self {
        Self(key)
    }

    pub(crate) fn key(&self) -> &Key256 {
        &self.0
    }

    fn kek_aad(version: u32) -> Vec<u8> {
        let mut aad = labels::KEK_WRAP_AAD.to_vec();
        aad.push(WRAP_V1);
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }

    /// Wraps a KEK for storage: `0x01 | version u32 | nonce | ct | tag`, bound to its version.
    pub fn wrap_kek(&self, kek: &Kek, rng: &dyn RandomSource) -> Result<Vec<u8>, KeyError> {
        let mut out = vec![WRAP_V1];
        out.extend_from_slice(&kek.version.to_be_bytes());
        let nonce = aead::random_nonce(rng)?;
        let cipher = aead::cipher(&self.0)?;
        aead::seal_into(&cipher, &nonce, &Self::kek_aad(kek.version), kek.key.expose_secret(), &mut out)?;
        Ok(out)
    }

    pub fn unwrap_kek(&self, wrapped: &[u8]) -> Result<Kek, KeyError> {
        const WHAT: &str = "wrapped key-encryption key";
        match wrapped.first() {
            Some(&WRAP_V1) => {}
            Some(&v) => {
                return Err(KeyError::UnsupportedFormat { what: WHAT, version: v });
            }
            None => return Err(KeyError::Malformed(WHAT)),
        }
        let version = be_u32(wrapped, 1, WHAT)?;
        let key = aead::open(&aead::cipher(&self.0)?, &Self::kek_aad(version), &wrapped[5..], WHAT)?;
        Kek::from_key(version, Key256::from_slice(&key)?)
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootKey").finish_non_exhaustive()
    }
}

/// An HMAC-SHA256 key derived from the derivation key (token pepper, blind index).
pub struct DerivedKey(Key256);

impl DerivedKey {
    pub(crate) fn from_key(key: Key256) -> Self {
        Self(key)
    }

    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.0.expose_secret());
        let tag = hmac::sign(&key, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time check of a MAC, so a caller cannot learn how many bytes matched.
    pub fn verify(&self, data: &[u8], expected: &[u8]) -> bool {
        self.mac(data).ct_eq(expected).into()
    }
}

impl fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DerivedKey").finish_non_exhaustive()
    }
}

/// A versioned key-encryption key: wraps data keys.
pub struct Kek {
    version: u32,
    key: Key256,
    cipher: aead::Cipher,
}

impl Kek {
    pub fn generate(version: u32, rng: &dyn RandomSource) -> Result<Self, KeyError> {
        Self::from_key(version, Key256::generate(rng)?)
    }

    fn from_key(version: u32, key: Key256) -> Result<Self, KeyError> {
        Ok(Self { version, cipher: aead::cipher(&key)?, key })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    fn dek_aad(kek_version: u32, generation: u32, record_id: &[u8]) -> Vec<u8> {
        let mut aad = labels::DATA_KEY_WRAP_AAD.to_vec();
        aad.push(WRAP_V1);
        aad.extend_from_slice(&kek_version.to_be_bytes());
        aad.extend_from_slice(&generation.to_be_bytes());
        push_lp(&mut aad, record_id);
        aad
    }

    fn wrap_with_nonce(
        &self,
        dek: &DataKey,
        record_id: &[u8],
        nonce: &[u8; aead::NONCE_LEN],
    ) -> Result<WrappedDataKey, KeyError> {
        let mut out = vec![WRAP_V1];
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&dek.generation.to_be_bytes());
        let aad = Self::dek_aad(self.version, dek.generation, record_id);
        aead::seal_into(&self.cipher, nonce, &aad, dek.key.expose_secret(), &mut out)?;
        Ok(WrappedDataKey(out))
    }

    /// Wraps a record's data key, bound to the record id, this KEK's version and the key's generation.
    pub fn wrap_data_key(
        &self,
        dek: &DataKey,
        record_id: &[u8],
        rng: &dyn RandomSource,
    ) -> Result<WrappedDataKey, KeyError> {
        self.wrap_with_nonce(dek, record_id, &aead::random_nonce(rng)?)
    }

    pub fn unwrap_data_key(&self, wrapped: &WrappedDataKey, record_id: &[u8]) -> Result<DataKey, KeyError> {
        const WHAT: &str = "wrapped data key";
        let (kek_version, generation) = wrapped.header()?;
        if kek_version != self.version {
            return Err(KeyError::UnknownKekVersion(kek_version));
        }
        let aad = Self::dek_aad(kek_version, generation, record_id);
        let key = aead::open(&self.cipher, &aad, &wrapped.0[9..], WHAT)?;
        DataKey::from_parts(generation, Key256::from_slice(&key)?)
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("version", &self.version).finish_non_exhaustive()
    }
}

/// A data key as stored: `0x01 | kek_version u32 | generation u32 | nonce | ct | tag`.
/// Not secret on its own (it is ciphertext), so it may be copied and persisted.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDataKey(Vec<u8>);

impl WrappedDataKey {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `(kek_version, generation)` from the header, without any key.
    pub fn header(&self) -> Result<(u32, u32), KeyError> {
        Self::header_of(&self.0)
    }

    /// [`WrappedDataKey::header`] of stored bytes, without copying them.
    pub fn header_of(bytes: &[u8]) -> Result<(u32, u32), KeyError> {
        const WHAT: &str = "wrapped data key";
        match bytes.first() {
            Some(&WRAP_V1) => {}
            Some(&v) => {
                return Err(KeyError::UnsupportedFormat { what: WHAT, version: v });
            }
            None => return Err(KeyError::Malformed(WHAT)),
        }
        if bytes.len() != 9 + aead::NONCE_LEN + Key256::LEN + aead::TAG_LEN {
            return Err(KeyError::Malformed(WHAT));
        }
        Ok((be_u32(bytes, 1, WHAT)?, be_u32(bytes, 5, WHAT)?))
    }

    pub fn kek_version(&self) -> Result<u32, KeyError> {
        Ok(self.header()?.0)
    }
}

impl fmt::Debug for WrappedDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedDataKey").field("len", &self.0.len()).finish()
    }
}

/// A record's own data key. `generation` counts re-encryptions of the record.
pub struct DataKey {
    generation: u32,
    key: Key256,
    cipher: aead::Cipher,
}

impl DataKey {
    pub fn generate(generation: u32, rng: &dyn RandomSource) -> Result<Self, KeyError> {
        Self::from_parts(generation, Key256::generate(rng)?)
    }

    pub fn from_parts(generation: u32, key: Key256) -> Result<Self, KeyError> {
        Ok(Self { generation, cipher: aead::cipher(&key)?, key })
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey").field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// Where a field ciphertext belongs; all of it is bound as associated data.
#[derive(Debug, Clone, Copy)]
pub struct FieldContext<'a> {
    pub record_id: &'a [u8],
    pub field: &'a str,
}

fn field_aad(ctx: FieldContext<'_>, generation: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(labels::FIELD_AAD.len() + 13 + ctx.record_id.len() + ctx.field.len());
    aad.extend_from_slice(labels::FIELD_AAD);
    aad.push(FIELD_ENVELOPE_V1);
    aad.extend_from_slice(&generation.to_be_bytes());
    push_lp(&mut aad, ctx.record_id);
    push_lp(&mut aad, ctx.field.as_bytes());
    aad
}

pub(crate) fn seal_field_with_nonce(
    dek: &DataKey,
    ctx: FieldContext<'_>,
    value: &[u8],
    nonce: &[u8; aead::NONCE_LEN],
) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(5 + aead::NONCE_LEN + value.len() + aead::TAG_LEN);
    out.push(FIELD_ENVELOPE_V1);
    out.extend_from_slice(&dek.generation.to_be_bytes());
    aead::seal_into(&dek.cipher, nonce, &field_aad(ctx, dek.generation), value, &mut out)?;
    Ok(out)
}

/// Encrypts one field value under its record's data key, with a fresh random nonce.
pub fn seal_field(
    dek: &DataKey,
    ctx: FieldContext<'_>,
    value: &Plaintext,
    rng: &dyn RandomSource,
) -> Result<Vec<u8>, KeyError> {
    seal_field_with_nonce(dek, ctx, value.expose_secret(), &aead::random_nonce(rng)?)
}

/// Encrypts several fields of one record, drawing all their nonces with one call to the random
/// source (one system call instead of one per field).
pub fn seal_fields(
    dek: &DataKey,
    record_id: &[u8],
    fields: &[(&str, &Plaintext)],
    rng: &dyn RandomSource,
) -> Result<Vec<Vec<u8>>, KeyError> {
    let mut nonces = vec![0u8; fields.len() * aead::NONCE_LEN];
    rng.fill(&mut nonces)?;
    fields
        .iter()
        .zip(nonces.chunks_exact(aead::NONCE_LEN))
        .map(|((field, value), nonce)| {
            let nonce: &[u8; aead::NONCE_LEN] = nonce.try_into().map_err(|_| KeyError::Random)?;
            seal_field_with_nonce(dek, FieldContext { record_id, field }, value.expose_secret(), nonce)
        })
        .collect()
}

/// The data-key generation a field envelope was sealed under, from its header, without any key
/// (a reader compares it with the wrapped data key's to see a re-encryption between two reads).
pub fn envelope_generation(envelope: &[u8]) -> Result<u32, KeyError> {
    const WHAT: &str = "field envelope";
    match envelope.first() {
        Some(&FIELD_ENVELOPE_V1) => be_u32(envelope, 1, WHAT),
        Some(&v) => Err(KeyError::UnsupportedFormat { what: WHAT, version: v }),
        None => Err(KeyError::Malformed(WHAT)),
    }
}

/// Opens one field envelope. Fails closed (no partial plaintext) if anything was moved or altered.
pub fn open_field(dek: &DataKey, ctx: FieldContext<'_>, envelope: &[u8]) -> Result<Plaintext, KeyError> {
    const WHAT: &str = "field envelope";
    match envelope.first() {
        Some(&FIELD_ENVELOPE_V1) => {}
        Some(&v) => {
            return Err(KeyError::UnsupportedFormat { what: WHAT, version: v });
        }
        None => return Err(KeyError::Malformed(WHAT)),
    }
    let generation = be_u32(envelope, 1, WHAT)?;
    if generation != dek.generation {
        return Err(KeyError::Integrity(WHAT));
    }
    let mut plain = aead::open(&dek.cipher, &field_aad(ctx, generation), &envelope[5..], WHAT)?;
    Ok(Plaintext::new(std::mem::take(&mut *plain)))
}

/// The unwrapped KEKs and which one wraps new data keys.
#[derive(Debug, Default)]
pub struct KeyRing {
    active: Option<u32>,
    keks: BTreeMap<u32, Kek>,
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a KEK; the highest version present becomes active.
    pub fn insert(&mut self, kek: Kek) {
        let v = kek.version;
        self.keks.insert(v, kek);
        if self.active.is_none_or(|a| v > a) {
            self.active = Some(v);
        }
    }

    /// Drops a destroyed version; the highest one left becomes active.
    pub fn remove(&mut self, version: u32) {
        self.keks.remove(&version);
        self.active = self.keks.keys().next_back().copied();
    }

    pub fn active_version(&self) -> Option<u32> {
        self.active
    }

    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.keks.keys().copied()
    }

    /// Wraps a data key under the active KEK.
    pub fn wrap_data_key(
        &self,
        dek: &DataKey,
        record_id: &[u8],
        rng: &dyn RandomSource,
    ) -> Result<WrappedDataKey, KeyError> {
        let active = self.active.ok_or(KeyError::UnknownKekVersion(0))?;
        self.keks.get(&active).ok_or(KeyError::UnknownKekVersion(active))?.wrap_data_key(dek, record_id, rng)
    }

    /// Unwraps with whichever version wrapped it, so older versions stay decrypt-only.
    pub fn unwrap_data_key(&self, wrapped: &WrappedDataKey, record_id: &[u8]) -> Result<DataKey, KeyError> {
        let v = wrapped.kek_version()?;
        self.keks.get(&v).ok_or(KeyError::UnknownKekVersion(v))?.unwrap_data_key(wrapped, record_id)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Pins a data key's nonce, for known-answer vectors.
    pub fn wrap_data_key_with_nonce(
        kek: &Kek,
        dek: &DataKey,
        record_id: &[u8],
        nonce: &[u8; 12],
    ) -> Result<WrappedDataKey, KeyError> {
        kek.wrap_with_nonce(dek, record_id, nonce)
    }

    pub fn kek_from(version: u32, bytes: &[u8]) -> Kek {
        Kek::from_key(version, Key256::from_slice(bytes).unwrap()).unwrap()
    }

    pub fn field_aad_for(ctx: FieldContext<'_>, generation: u32) -> Vec<u8> {
        field_aad(ctx, generation)
    }
}
