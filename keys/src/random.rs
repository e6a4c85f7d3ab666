use crate::KeyError;

/// Where key bytes and nonces come from. A trait so tests can pin nonces for known-answer vectors;
/// production code uses [`OsRandom`].
pub trait RandomSource: Send + Sync {
    fn fill(&self, dest: &mut [u8]) -> Result<(), KeyError>;
}

/// The operating system's CSPRNG, through ring.
pub struct OsRandom(ring::rand::SystemRandom);

impl OsRandom {
    pub fn new() -> Self {
        Self(ring::rand::SystemRandom::new())
    }
}

impl Default for OsRandom {
    fn default() -> Self {
        Self::new()
    }
}

impl RandomSource for OsRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<(), KeyError> {
        ring::rand::SecureRandom::fill(&self.0, dest).map_err(|_| KeyError::Random)
    }
}

impl std::fmt::Debug for OsRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OsRandom")
    }
}
