use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{KeyError, RandomSource};

/// A 256-bit secret key. Boxed so moves do not leave copies on the stack; wiped on drop;
/// `Debug` prints nothing of it.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Key256(Box<[u8; 32]>);

impl Key256 {
    pub const LEN: usize = 32;

    /// A fresh random key, made in place.
    pub fn generate(rng: &dyn RandomSource) -> Result<Self, KeyError> {
        let mut key = Self(Box::new([0u8; 32]));
        rng.fill(key.0.as_mut_slice())?;
        Ok(key)
    }

    /// Copies key bytes in (for unwrapping and test vectors). The caller wipes its own copy.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed("key"))?;
        let mut arr = Zeroizing::new(arr);
        let key = Self(Box::new(*arr));
        arr.zeroize();
        Ok(key)
    }

    /// The raw key bytes. The name is the warning: nothing may log or persist them unwrapped.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key256").finish_non_exhaustive()
    }
}

/// Plaintext personal data: wiped on drop, never printed.
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Plaintext(Vec<u8>);

impl Plaintext {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn from_str_copy(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }

    /// The plaintext bytes; only the execute and respond steps may call this.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_secret() {
        let key = Key256::from_slice(&[0xAB; 32]).unwrap();
        let printed = format!("{key:?}");
        assert!(!printed.to_lowercase().contains("ab"), "{printed}");
        let p = Plaintext::from_str_copy("4111111111111111");
        assert_eq!(format!("{p:?}"), "Plaintext(16 bytes)");
    }
}
