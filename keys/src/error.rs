/// Errors of the key layer. Messages name what failed, never key bytes or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The passphrase does not open the sealed root key (or the sealed file was altered).
    #[error("wrong passphrase, or the sealed root key was altered")]
    WrongPassphrase,
    /// Sealing parameters below the built-in floor: refusing them stops a downgrade.
    #[error("key derivation parameters below the minimum: {0}")]
    WeakParameters(String),
    /// The bytes are not a well-formed object of the expected kind.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A format version this build does not know.
    #[error("unsupported {what} format version {version}")]
    UnsupportedFormat { what: &'static str, version: u8 },
    /// Authentication failed: wrong key, wrong context, or altered bytes.
    #[error("integrity check failed for {0}")]
    Integrity(&'static str),
    /// A KEK version the key ring does not hold (destroyed or never created).
    #[error("key-encryption key version {0} is not available")]
    UnknownKekVersion(u32),
    /// The operating system's random source failed.
    #[error("random number generator failed")]
    Random,
    /// A custodian scheme that cannot be made (K of N with 2 <= K <= N <= max).
    #[error(
        "cannot split into {count} shares with threshold {threshold} (need 2 <= threshold <= custodians <= {max})"
    )]
    InvalidScheme { threshold: u8, count: u8, max: u8 },
    /// Fewer distinct shares than the threshold.
    #[error("{have} distinct shares given; {need} are needed")]
    NotEnoughShares { have: usize, need: u8 },
    /// Key derivation failed inside Argon2 or HKDF.
    #[error("key derivation failed")]
    Derivation,
}
